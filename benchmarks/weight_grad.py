"""Weight-gradient products x^T dy of the presets' shapes, in the forms XLA can run them.

  python benchmarks/weight_grad.py

x^T dy written as one dot_general (contracting both operands' first axis) runs in float32 on
XLA's CPU backend even for bfloat16 inputs; `model._weight_grad` materialises x^T by a gather
first so that the product runs in bfloat16. This prints the median time of each form, alternating
them, for the output layer's and the LSTM's weight gradients.
"""

import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.throughput import alternating_medians  # pylint: disable=g-import-not-at-top
from zaremba_jax import model as model_lib

# (rows M = batch x window, in features K, out features N, what)
SHAPES = [(400, 200, 10_000, "small softmax"), (700, 650, 10_000, "medium softmax"),
          (700, 1500, 10_000, "large softmax"), (400, 200, 800, "small LSTM"),
          (700, 650, 2600, "medium LSTM"), (700, 1500, 6000, "large LSTM"),
          (5000, 200, 800, "char_small LSTM")]


def main(repeats=11):
  forms = {
      "one dot_general f32": lambda x, dy: model_lib._dot(x, dy, (0, 0), jnp.float32),
      "one dot_general bf16": lambda x, dy: model_lib._dot(x, dy, (0, 0), jnp.bfloat16),
      "_weight_grad bf16": lambda x, dy: model_lib._weight_grad(x, dy, jnp.bfloat16),
  }
  print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}; ms, median of {repeats}")
  print(f"{'shape':<17} {'M x K x N':>18}" + "".join(f" {name:>21}" for name in forms))
  for m, k, n, what in SHAPES:
    key_x, key_dy = jax.random.split(jax.random.key(0))
    x, dy = jax.random.normal(key_x, (m, k)), jax.random.normal(key_dy, (m, n))
    fns = {name: jax.jit(form) for name, form in forms.items()}
    seconds = alternating_medians(fns, (x, dy), repeats)
    print(f"{what:<17} {f'{m} x {k} x {n}':>18}"
          + "".join(f" {s * 1e3:>21.2f}" for s in seconds.values()), flush=True)


if __name__ == "__main__":
  main()
