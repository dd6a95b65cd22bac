"""The batch-1 recurrence's floor: one layer's h @ W_hh step, alone, in a `lax.scan`.

  python -m benchmarks.micro.recurrent_matvec [--presets=small,medium,large] [--repeats=7]

In the paper's test protocol (batch 1) every token multiplies each layer's state by its whole
H x 4H recurrent matrix, so a step costs at least the time to read that matrix. This times a scan
of just that step (the matrix-vector product and the gate nonlinearities) for the presets' hidden
sizes, in float32 and with bfloat16 matmul inputs, as XLA's product in the layout of the plan a
batch-1 stream gets on this backend (`kernels.plan_for(batch_size=1, ...)`: on 1-D state vectors
where its `recurrence.PRODUCTS` entry is a vector form, else against W_hh^T where that is
transposed), and prints microseconds a step and the bytes of W_hh read per second. Next to it,
the model's own batch-1 loop under the same plan (`recurrence.forward_loop`, as evaluation runs
it; in bfloat16 with the native products where they run): what the gates, the cell and the loop
add to the bare step. Compare with the batch-1 column of `python -m benchmarks.throughput`: two
layers of this is most of a token's time.
"""

import argparse

import jax
import jax.numpy as jnp

from benchmarks.throughput import alternating_medians
from zaremba_jax import kernels
from zaremba_jax.kernels import matmul
from zaremba_jax.kernels import recurrence

HIDDEN = {"small": 200, "medium": 650, "large": 1500}  # char_small's is small's
LABEL = {"small": "small / char_small"}
STEPS = 512


def batch1_plan(dtype):
  """The plan of a batch-1 stream of STEPS tokens. (The vocabulary decides only the first layer's
  input form, which the recurrence does not see.)"""
  return kernels.plan_for(dtype=dtype, batch_size=1, vocab_size=10_000, stream_tokens=STEPS)


def bare_step_fn(hidden, plan):
  """STEPS bare recurrence steps at batch 1: the product in the plan's form, tanh, one product of
  two gates; nothing else."""
  def run(w_Hx4H, h_1xH, xw_Tx1x4H):
    del xw_Tx1x4H
    w = w_Hx4H.astype(plan.dtype)  # cast once, outside the loop, as the model does
    product = recurrence.PRODUCTS[plan.recurrent_product]
    if product.vector:
      h, contract = h_1xH[0], (0, 0)  # [H] x [H, 4H]
    elif product.layout == "transposed":
      h, w, contract = h_1xH, w.T, (1, 1)  # [1, H] x [4H, H]^T
    else:
      h, contract = h_1xH, (1, 0)  # [1, H] x [H, 4H]

    def step(h, _):
      a = jnp.tanh(matmul.dot(h, w, contract, plan.dtype))
      return a[..., :hidden] * a[..., hidden:2 * hidden], None

    return jax.lax.scan(step, h, None, length=STEPS)[0]
  return jax.jit(run)


def model_loop_fn(plan):
  """The model's forward loop over STEPS tokens at batch 1 (no backward: evaluation's form)."""
  def run(w_Hx4H, h_1xH, xw_Tx1x4H):
    return recurrence.forward_loop(xw_Tx1x4H, w_Hx4H, jnp.zeros_like(h_1xH), h_1xH, plan)
  return jax.jit(run)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--presets", default=",".join(HIDDEN),
                      help=f"a comma-separated subset of: {', '.join(HIDDEN)}")
  args = parser.parse_args()
  repeats = args.repeats
  print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}; median of {repeats}, {STEPS} steps")
  print(f"{'preset':<20} {'H':>5} {'W_hh MB':>8} {'dtype':>9} {'us/step':>9} {'GB/s of W_hh':>13}"
        f" {'model loop us/step':>19}")
  for preset in args.presets.split(","):
    hidden = HIDDEN[preset]
    keys = jax.random.split(jax.random.key(0))
    w = jax.random.normal(keys[0], (hidden, 4 * hidden)) * 0.05
    h = jnp.ones((1, hidden))
    xw = jax.random.normal(keys[1], (STEPS, 1, 4 * hidden)) * 0.1
    fns = {}
    for dtype in ("float32", "bfloat16"):
      plan = batch1_plan(dtype)
      fns[dtype] = bare_step_fn(hidden, plan)
      fns[dtype + " loop"] = model_loop_fn(plan)
    seconds = alternating_medians(fns, (w, h, xw), repeats)
    for dtype in ("float32", "bfloat16"):
      label = LABEL.get(preset, preset)
      step_s, loop_s = seconds[dtype] / STEPS, seconds[dtype + " loop"] / STEPS
      mbytes = hidden * 4 * hidden * jnp.dtype(dtype).itemsize / 1e6
      print(f"{label:<20} {hidden:>5} {mbytes:>8.1f} {dtype:>9} {step_s * 1e6:>9.1f}"
            f" {mbytes / 1e3 / step_s:>13.1f} {loop_s * 1e6:>19.1f}", flush=True)


if __name__ == "__main__":
  main()
