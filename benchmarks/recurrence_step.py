"""One LSTM layer's forward loop, taken apart: microseconds a time step.

  python benchmarks/recurrence_step.py --batch=100 --hidden=200 --steps=50   # char_small

Times, each as a `lax.scan` over --steps steps at --batch rows (median of --repeats, alternating):
the recurrent matmul alone (h @ W_hh), the gate arithmetic alone (no matmul), and the model's whole
forward loop as training runs it on this backend (`model._recurrence_forward`, with what it keeps
for the backward), in float32 and with bfloat16 matmul inputs. Where the whole loop costs more than
its matmul, the rest is elementwise work and the loop's own overhead.
"""

import argparse
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.throughput import alternating_medians  # pylint: disable=g-import-not-at-top
from zaremba_jax import model as model_lib


def loops(batch, hidden):
  """name -> fn(w_Hx4H, xw_TxBx4H, h_BxH, c_BxH) for each piece."""
  def matmul_only(dtype):
    def run(w, xw, h, c):
      del c
      w = w.astype(dtype)
      step = lambda h, _: (model_lib._matmul(h, w, dtype)[:, :hidden], None)
      return jax.lax.scan(step, h, xw)[0]
    return run

  def gates_only(w, xw, h, c):
    del w
    def step(carry, xw_Bx4H):
      c, h = carry
      i, f, o, g = jnp.split(jnp.tanh(xw_Bx4H + h.sum() * 0), 4, axis=-1)
      c = f * c + i * g
      h = o * jnp.tanh(c)
      return (c, h), (h, c)
    return jax.lax.scan(step, (c, h), xw)

  emit = "factors" if model_lib._factors_in_loop() else "gates"  # pylint: disable=protected-access

  def whole(dtype):
    return lambda w, xw, h, c: model_lib._recurrence_forward(xw, w, c, h, dtype, emit)

  return {"matmul only float32": matmul_only(jnp.float32),
          "matmul only bfloat16": matmul_only(jnp.bfloat16),
          "gate arithmetic only": gates_only,
          "whole loop float32": whole(jnp.float32),
          "whole loop bfloat16": whole(jnp.bfloat16)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--batch", type=int, default=100)
  parser.add_argument("--hidden", type=int, default=200)
  parser.add_argument("--steps", type=int, default=50)
  parser.add_argument("--repeats", type=int, default=9)
  args = parser.parse_args()
  b, h, t = args.batch, args.hidden, args.steps
  keys = jax.random.split(jax.random.key(0), 2)
  args_ = (jax.random.normal(keys[0], (h, 4 * h)) * 0.05, jax.random.normal(keys[1], (t, b, 4 * h)),
           jnp.zeros((b, h)), jnp.zeros((b, h)))
  fns = {name: jax.jit(fn) for name, fn in loops(b, h).items()}
  seconds = alternating_medians(fns, args_, args.repeats)
  gflop = 2 * b * h * 4 * h / 1e9
  print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}; batch {b}, hidden {h}, {t} steps")
  print(f"{'piece':<22} {'us/step':>8} {'matmul GFLOP/s':>15}")
  for name, total_s in seconds.items():
    step_s = total_s / t
    rate = f"{gflop / step_s:.0f}" if name.startswith("matmul") else "-"
    print(f"{name:<22} {step_s * 1e6:>8.1f} {rate:>15}")


if __name__ == "__main__":
  main()
