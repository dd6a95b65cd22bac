"""Weight-gradient products x^T dy of the presets' shapes, in the forms XLA can run them.

  python -m benchmarks.micro.weight_grad [--repeats=11]

x^T dy written as one dot_general (contracting both operands' first axis, `kernels.matmul.dot`)
runs in float32 on XLA's CPU backend even for bfloat16 inputs; `kernels.matmul.weight_grad` under
a plan with `weight_grads_via_gather` (what `kernels.resolve` picks for bfloat16 on a CPU)
materialises x^T by a gather first so that the product runs in bfloat16. This prints the median
time of each form, alternating them, for the output layer's and the LSTM's weight gradients.
"""

import argparse

import jax

from benchmarks.throughput import alternating_medians
from zaremba_jax import kernels
from zaremba_jax.kernels import matmul

# (rows M = batch x window, in features K, out features N, what)
SHAPES = [(400, 200, 10_000, "small softmax"), (700, 650, 10_000, "medium softmax"),
          (700, 1500, 10_000, "large softmax"), (400, 200, 800, "small LSTM"),
          (700, 650, 2600, "medium LSTM"), (700, 1500, 6000, "large LSTM"),
          (5000, 200, 800, "char_small LSTM")]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--repeats", type=int, default=11)
  parser.add_argument("--shapes", default="",
                      help="comma-separated names of SHAPES to run (default: all), e.g. 'small LSTM'")
  args = parser.parse_args()
  repeats = args.repeats
  gather = kernels.Plan(dtype="bfloat16", weight_grads_via_gather=True)
  forms = {
      "one dot_general f32": lambda x, dy: matmul.dot(x, dy, (0, 0), "float32"),
      "one dot_general bf16": lambda x, dy: matmul.dot(x, dy, (0, 0), "bfloat16"),
      "via gather bf16": lambda x, dy: matmul.weight_grad(x, dy, gather),
  }
  wanted = set(filter(None, args.shapes.split(",")))
  print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}; ms, median of {repeats}")
  print(f"{'shape':<17} {'M x K x N':>18}" + "".join(f" {name:>21}" for name in forms))
  for m, k, n, what in SHAPES:
    if wanted and what not in wanted:
      continue
    key_x, key_dy = jax.random.split(jax.random.key(0))
    x, dy = jax.random.normal(key_x, (m, k)), jax.random.normal(key_dy, (m, n))
    fns = {name: jax.jit(form) for name, form in forms.items()}
    seconds = alternating_medians(fns, (x, dy), repeats)
    print(f"{what:<17} {f'{m} x {k} x {n}':>18}"
          + "".join(f" {s * 1e3:>21.2f}" for s in seconds.values()), flush=True)


if __name__ == "__main__":
  main()
