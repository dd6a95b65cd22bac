"""The batch-1 recurrence's floor: one layer's h @ W_hh step, alone, in a `lax.scan`.

  python benchmarks/recurrent_matvec.py

In the paper's test protocol (batch 1) every token multiplies each layer's state by its whole
H x 4H recurrent matrix, so a step costs at least the time to read that matrix. This times a scan
of just that step (the matrix-vector product and the gate nonlinearities) for the presets' hidden
sizes, in float32 and with bfloat16 matmul inputs, and prints microseconds a step and the bytes
of W_hh read per second. Compare with the batch-1 column of benchmarks/throughput.py: two layers
of this is most of a token's time.
"""

import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.throughput import alternating_medians  # pylint: disable=g-import-not-at-top
from zaremba_jax import model as model_lib

HIDDEN = {"small / char_small": 200, "medium": 650, "large": 1500}
STEPS = 512


def scan_fn(hidden, dtype):
  """STEPS recurrence steps at batch 1, as the model runs them (model._matmul)."""
  def run(w_Hx4H, h_1xH):
    w = w_Hx4H.astype(dtype)  # cast once, outside the loop, as the model does

    def step(h_1xH, _):
      a_1x4H = jnp.tanh(model_lib._matmul(h_1xH, w, dtype))
      return a_1x4H[:, :hidden] * a_1x4H[:, hidden:2 * hidden], None

    return jax.lax.scan(step, h_1xH, None, length=STEPS)[0]
  return jax.jit(run)


def main(repeats=7):
  print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}; median of {repeats}, {STEPS} steps")
  print(f"{'preset':<20} {'H':>5} {'W_hh MB':>8} {'dtype':>9} {'us/step':>9} {'GB/s of W_hh':>13}")
  for preset, hidden in HIDDEN.items():
    w = jax.random.normal(jax.random.key(0), (hidden, 4 * hidden)) * 0.05
    h = jnp.ones((1, hidden))
    fns = {name: scan_fn(hidden, dtype) for name, dtype in
           (("float32", jnp.float32), ("bfloat16", jnp.bfloat16))}
    for name, seconds in alternating_medians(fns, (w, h), repeats).items():
      step_s = seconds / STEPS
      mbytes = hidden * 4 * hidden * jnp.dtype(name).itemsize / 1e6
      print(f"{preset:<20} {hidden:>5} {mbytes:>8.1f} {name:>9} {step_s * 1e6:>9.1f}"
            f" {mbytes / 1e3 / step_s:>13.1f}", flush=True)


if __name__ == "__main__":
  main()
