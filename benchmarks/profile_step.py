"""Where a training step's time goes: each piece of the model timed on its own.

  python benchmarks/profile_step.py --presets=small,char_small --dtype=float32

For each preset it times, after compilation (median of --repeats runs of --iters calls each):
the whole jitted train step, one LSTM layer's recurrence forward and forward+backward, the input
projection of one layer, and the output layer (fused softmax cross-entropy) forward+backward.
The pieces leave out the embedding, dropout, clipping and the update, so they need not sum to
the step. Prints a table in milliseconds and as a share of the step.
"""

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import throughput  # pylint: disable=g-import-not-at-top
from zaremba_jax import model as model_lib
from zaremba_jax import train as train_lib


def time_ms(fn, args, iters, repeats):
  jax.block_until_ready(fn(*args))  # compile
  runs = []
  for _ in range(repeats):
    tic = time.perf_counter()
    for _ in range(iters):
      out = fn(*args)
    jax.block_until_ready(out)
    runs.append((time.perf_counter() - tic) / iters * 1e3)
  return statistics.median(runs)


def pieces(config, vocab, dtype):
  """(name, jitted fn, args) for every piece of `config`'s train step."""
  rng = np.random.default_rng(0)
  b, t, h = config.batch_size, config.num_steps, config.hidden_size
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape) * 0.1, jnp.float32)
  xw, w_hh = normal(t, b, 4 * h), normal(h, 4 * h)
  c0, h0, probe = normal(b, h), normal(b, h), normal(t, b, h)
  x_TxBxH, w_ih, bias = normal(t, b, h), normal(h, 4 * h), normal(4 * h)
  x_NxH, w_out, b_out = normal(b * t, h), normal(h, vocab), normal(vocab)
  targets = jnp.asarray(rng.integers(0, vocab, size=(b * t,)), jnp.int32)

  def recurrence(xw, w_hh, c0, h0):
    return model_lib.lstm_recurrence(xw, w_hh, c0, h0, dtype)[0]

  def recurrence_loss(xw, w_hh, c0, h0):
    return (recurrence(xw, w_hh, c0, h0) * probe).sum()

  def projection_loss(x, w, bias):
    return (model_lib._matmul(x, w, dtype) + bias).sum()  # pylint: disable=protected-access

  def output_loss(x, w, bias):
    return model_lib.softmax_nll(x, w, bias, targets, dtype).sum()

  grad_all = lambda fn, n: jax.jit(jax.grad(fn, argnums=tuple(range(n))))
  system = throughput.JaxSystem(config, vocab, jnp.dtype(dtype).name, test_len=4096)
  return [
      ("train step (whole)", None, system),
      ("recurrence fwd (1 layer)", jax.jit(recurrence), (xw, w_hh, c0, h0)),
      ("recurrence fwd+bwd (1 layer)", grad_all(recurrence_loss, 4), (xw, w_hh, c0, h0)),
      ("input projection fwd+bwd", grad_all(projection_loss, 3), (x_TxBxH, w_ih, bias)),
      ("output layer fwd+bwd", grad_all(output_loss, 3), (x_NxH, w_out, b_out)),
  ]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--presets", default="small,medium,large,char_small")
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--iters", type=int, default=10)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  throughput.flags.FLAGS.mark_as_parsed()
  print(f"{'preset':<11} {'piece':<30} {'ms':>9} {'of step':>8}")
  for name in args.presets.split(","):
    config = throughput.preset_config(name)
    vocab = throughput.VOCAB[config.level]
    step_ms = None
    for piece, fn, fn_args in pieces(config, vocab, args.dtype):
      if fn is None:  # the whole step, with its donated state threaded through
        system = fn_args
        system.train(1)
        runs = [throughput.timed(lambda: system.train(args.iters)) / args.iters * 1e3
                for _ in range(args.repeats)]
        ms = step_ms = statistics.median(runs)
      else:
        ms = time_ms(fn, fn_args, args.iters, args.repeats)
      print(f"{name:<11} {piece:<30} {ms:>9.2f} {ms / step_ms:>7.0%}", flush=True)


if __name__ == "__main__":
  main()
