"""One LSTM layer's forward loop, taken apart: microseconds a time step.

  python -m benchmarks.micro.recurrence_step --batch=100 --hidden=200 --steps=50   # char_small

Times, each as a `lax.scan` over --steps steps at --batch rows (median of --repeats, alternating):
the recurrent matmul alone (h @ W_hh, in the form the plan gives it), the gate arithmetic alone
(no matmul), and the model's whole forward loop as training runs it (`recurrence.forward_loop`
under the plan `kernels.plan_for` gives a training window of this shape on this backend, with what
it keeps for the backward), in float32 and with bfloat16 matmul inputs. Where the whole loop costs
more than its matmul, the rest is elementwise work and the loop's own overhead.
"""

import argparse

import jax
import jax.numpy as jnp

from benchmarks.throughput import alternating_medians
from zaremba_jax import kernels
from zaremba_jax.kernels import matmul
from zaremba_jax.kernels import recurrence


def training_plan(dtype, batch, steps):
  """The plan of a training window of batch x steps tokens. (The vocabulary decides only the
  first layer's input form, which the recurrence does not see.)"""
  return kernels.plan_for(dtype=dtype, batch_size=batch, vocab_size=10_000,
                          stream_tokens=batch * steps)


def loops(batch, hidden, steps):
  """name -> fn(w_Hx4H, xw_TxBx4H, h_BxH, c_BxH) for each piece."""
  def matmul_only(plan):
    # XLA's product in the layout a training loop uses (under a gradient, never a native one).
    transposed = recurrence.PRODUCTS[plan.recurrent_product].under_gradient == "xla_transposed"

    def run(w, xw, h, c):
      del c
      w = w.astype(plan.dtype)
      if transposed:
        w = w.T  # [4H, H], as the forward loop multiplies by it
      contract = (1, 1 if transposed else 0)
      step = lambda h, _: (matmul.dot(h, w, contract, plan.dtype)[:, :hidden], None)
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

  def whole(plan):
    emit = "factors" if plan.factors_in_forward_loop else "gates"
    return lambda w, xw, h, c: recurrence.forward_loop(xw, w, c, h, plan, emit)

  f32, bf16 = (training_plan(dtype, batch, steps) for dtype in ("float32", "bfloat16"))
  return {"matmul only float32": matmul_only(f32),
          "matmul only bfloat16": matmul_only(bf16),
          "gate arithmetic only": gates_only,
          "whole loop float32": whole(f32),
          "whole loop bfloat16": whole(bf16)}


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
  fns = {name: jax.jit(fn) for name, fn in loops(b, h, t).items()}
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
