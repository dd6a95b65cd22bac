"""Where a training step's time goes: each piece of the model timed on its own.

  python -m benchmarks.micro.profile_step --presets=small,char_small --dtype=float32

For each preset it times, after compilation (median of --repeats runs of --iters calls each):
the whole jitted train step, one LSTM layer's recurrence forward and forward+backward, the input
projection of one layer, and the output layer (fused softmax cross-entropy) forward+backward.
The pieces are the kernels the model calls (`kernels.lstm_recurrence`, `kernels.input_projection`,
`kernels.softmax_nll`) under the training plan of `model.make_model`, as the train step runs them.
The pieces leave out the embedding, dropout, clipping and the update, so they need not sum to
the step. Prints a table in milliseconds and as a share of the step.
"""

import argparse
import statistics

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import throughput
from zaremba_jax import kernels


def pieces(config, vocab, dtype):
  """(name, run) for every piece of `config`'s train step; run(n) makes n calls and waits."""
  rng = np.random.default_rng(0)
  b, t, h = config.batch_size, config.num_steps, config.hidden_size
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape) * 0.1, jnp.float32)
  xw, w_hh = normal(t, b, 4 * h), normal(h, 4 * h)
  c0, h0, probe = normal(b, h), normal(b, h), normal(t, b, h)
  x_TxBxH, w_ih, bias = normal(t, b, h), normal(h, 4 * h), normal(4 * h)
  x_NxH, w_out, b_out = normal(b * t, h), normal(h, vocab), normal(vocab)
  targets = jnp.asarray(rng.integers(0, vocab, size=(b * t,)), jnp.int32)
  # The whole step as the training loop runs it, its donated state threaded through; the pieces
  # run under the same plan as its model.
  system = throughput.JaxSystem(config, vocab, dtype, test_len=4096)
  plan = system.model.plan

  def recurrence(xw, w_hh, c0, h0):
    return kernels.lstm_recurrence(xw, w_hh, c0, h0, plan)[0]

  def recurrence_loss(xw, w_hh, c0, h0):
    return (recurrence(xw, w_hh, c0, h0) * probe).sum()

  def projection_loss(x, w, bias):
    return kernels.input_projection(x, w, bias, plan).sum()

  def output_loss(x, w, bias):
    return kernels.softmax_nll(x, w, bias, targets, plan).sum()

  grad_all = lambda fn, n: jax.jit(jax.grad(fn, argnums=tuple(range(n))))

  def calls(fn, *args):
    def run(n):
      for _ in range(n):
        out = fn(*args)
      jax.block_until_ready(out)
    return run

  return [
      ("train step (whole)", system.train),
      ("recurrence fwd (1 layer)", calls(jax.jit(recurrence), xw, w_hh, c0, h0)),
      ("recurrence fwd+bwd (1 layer)", calls(grad_all(recurrence_loss, 4), xw, w_hh, c0, h0)),
      ("input projection fwd+bwd", calls(grad_all(projection_loss, 3), x_TxBxH, w_ih, bias)),
      ("output layer fwd+bwd", calls(grad_all(output_loss, 3), x_NxH, w_out, b_out)),
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
    for piece, run in pieces(config, vocab, args.dtype):
      run(args.iters)  # compile
      ms = statistics.median(throughput.timed(lambda: run(args.iters)) / args.iters * 1e3
                             for _ in range(args.repeats))
      step_ms = step_ms or ms  # the first piece is the whole step
      print(f"{name:<11} {piece:<30} {ms:>9.2f} {ms / step_ms:>7.0%}", flush=True)

if __name__ == "__main__":
  main()
