"""How fast the batch-1 test protocol could go on this machine, next to how fast it goes.

  pip install -r requirements-bench.txt
  python -m benchmarks.batch1_floor --presets=small,medium,large   # from the repository root

A batch-1 token has work that no implementation can skip or batch: every layer multiplies its
state by its whole recurrent matrix W_hh (H x 4H float32), one token after another, so each
token reads every layer's W_hh once; and the dense products that do not wait on the recurrence
(the output layer, 2 H V FLOP a token, and the input projections of the layers after the
first, 2 H 4H each; the first layer's is a table lookup over a long stream) run at best at the
machine's matmul rate. This measures both rates here, each the best of several ways:

- reading a W_hh-sized float32 matrix over and over, as the recurrence does (a `lax.scan` of the
  matrix-vector product; PyTorch's `sum`, if installed);
- a float32 [1024, H] x [H, V] product (the output layer over a chunk) and a 2048^3 one, in XLA
  and PyTorch.

The floor is the time to read the matrices plus the time of the products at those rates, one
after the other (a model, not a proof: it leaves out the gate arithmetic, the softmax's exp and
every overhead, and assumes no overlap of the two). For the small matrices (hidden 200: 0.6 MB,
inside a core's L2) the read rates measured this way are bound by each step's fixed costs rather
than by memory, so there the floor is that of a loop step, not of the hardware. Next to it, the
batch-1 test's words/s of this package and of `throughput.py`'s PyTorch reference (float32, the
same --test_len stream, alternating, median of --repeats), and what 1.2x PyTorch would need as
a share of the floor. The package's batch-1 pass is `throughput.JaxSystem.test`: `train.evaluate`
with the model planned for that batch-1 stream (`model.planned_for`), as `loop.Evaluator` runs the
test set.
"""

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from benchmarks import throughput

READ_STEPS = 64


def _best_seconds(fn, repeats):
  fn()
  return min(throughput.timed(fn) for _ in range(repeats))


def read_rates(hidden, repeats, torch):
  """{method: GB/s} for reading one float32 H x 4H matrix again and again."""
  w_Hx4H = jax.random.normal(jax.random.key(0), (hidden, 4 * hidden)) * 0.05
  nbytes = w_Hx4H.size * 4

  @jax.jit
  def matvec(w, h_H):
    def step(h, _):
      a_4H = jnp.tanh(h @ w)
      return a_4H[:hidden] * a_4H[hidden:2 * hidden], None
    return jax.lax.scan(step, h_H, None, length=READ_STEPS)[0]

  h_H = jnp.ones((hidden,))
  rates = {"xla matvec": nbytes * READ_STEPS / _best_seconds(
      lambda: jax.block_until_ready(matvec(w_Hx4H, h_H)), repeats)}
  if torch is not None:
    t = torch.ones(hidden, 4 * hidden)

    def torch_reads():
      for _ in range(READ_STEPS):
        t.sum()
    rates["torch sum"] = nbytes * READ_STEPS / _best_seconds(torch_reads, repeats)
  return {k: v / 1e9 for k, v in rates.items()}


def matmul_rates(hidden, vocab, repeats, torch, rows=1024, square=2048):
  """{method: GFLOP/s} of float32 products: [rows, H] x [H, V] (the output layer over a chunk)
  and a square one (the machine's matmul rate on an easy shape), in XLA and PyTorch."""
  rates = {}
  for shape_name, (m, k, n) in (("", (rows, hidden, vocab)), (" square", (square,) * 3)):
    key_x, key_w = jax.random.split(jax.random.key(1))
    x, w = jax.random.normal(key_x, (m, k)), jax.random.normal(key_w, (k, n))
    product = jax.jit(lambda x, w: x @ w)
    flop = 2 * m * k * n
    rates["xla" + shape_name] = flop / _best_seconds(
        lambda: jax.block_until_ready(product(x, w)), repeats)  # pylint: disable=cell-var-from-loop
    if torch is not None:
      tx, tw = torch.randn(m, k), torch.randn(k, n)
      rates["torch" + shape_name] = flop / _best_seconds(lambda: tx @ tw, repeats)  # pylint: disable=cell-var-from-loop
  return {k: v / 1e9 for k, v in rates.items()}


def measured_test_wps(config, vocab, args):
  """{system: median batch-1 words/s} for this package and the PyTorch reference, float32."""
  test_len = throughput.test_tokens(args.test_len, config.level)
  systems = [throughput.JaxSystem(config, vocab, "float32", test_len)]
  if not args.no_torch:
    systems.append(throughput.TorchSystem(config, vocab, False, test_len))
  for system in systems:
    system.compile()
  wps = {system.name: [] for system in systems}
  for _ in range(args.repeats):
    for system in systems:
      wps[system.name].append(system.test_words / throughput.timed(system.test))
  return {k: statistics.median(v) for k, v in wps.items()}


def floor_row(name, args, torch):
  config = throughput.preset_config(name)
  vocab = throughput.VOCAB[config.level]
  hidden, layers = config.hidden_size, config.num_layers
  reads = read_rates(hidden, args.rate_repeats, torch)
  matmuls = matmul_rates(hidden, vocab, args.rate_repeats, torch)
  read_how, read_gbs = max(reads.items(), key=lambda kv: kv[1])
  mm_how, mm_gflops = max(matmuls.items(), key=lambda kv: kv[1])
  w_hh_mb = hidden * 4 * hidden * 4 / 1e6
  mflop = (2 * hidden * vocab + (layers - 1) * 2 * hidden * 4 * hidden) / 1e6
  floor_us = layers * w_hh_mb / read_gbs * 1e3 + mflop / mm_gflops * 1e3
  row = {"preset": name, "hidden": hidden, "layers": layers, "w_hh_mb": w_hh_mb,
         "read_gbs": reads, "mflop_per_token": mflop, "matmul_gflops": matmuls,
         "floor_us_per_token": floor_us, "floor_wps": 1e6 / floor_us,
         "read_best": read_how, "matmul_best": mm_how}
  row["test_wps"] = measured_test_wps(config, vocab, args)
  return row


def print_table(rows, out=sys.stdout):
  head = (f"{'preset':<11} {'W_hh MB':>8} {'read GB/s':>20} {'MFLOP':>6} {'GFLOP/s':>20}"
          f" {'floor w/s':>10} {'jax w/s':>8} {'torch w/s':>9} {'jax/torch':>9}"
          f" {'jax/floor':>9} {'torch/floor':>11} {'1.2x torch/floor':>16}")
  print(head, file=out)
  print("-" * len(head), file=out)
  for r in rows:
    read = f"{r['read_gbs'][r['read_best']]:.0f} ({r['read_best']})"
    mm = f"{r['matmul_gflops'][r['matmul_best']]:.0f} ({r['matmul_best']})"
    jax_wps = r["test_wps"]["jax float32"]
    torch_wps = r["test_wps"].get("torch float32")
    floor = r["floor_wps"]
    cells = [f"{jax_wps:>8.0f}"]
    if torch_wps:
      cells += [f"{torch_wps:>9.0f}", f"{jax_wps / torch_wps:>8.2f}x", f"{jax_wps / floor:>9.2f}",
                f"{torch_wps / floor:>11.2f}", f"{1.2 * torch_wps / floor:>16.2f}"]
    else:
      cells += [f"{'-':>9}", f"{'-':>9}", f"{jax_wps / floor:>9.2f}", f"{'-':>11}", f"{'-':>16}"]
    print(f"{r['preset']:<11} {r['layers'] * r['w_hh_mb']:>8.1f} {read:>20}"
          f" {r['mflop_per_token']:>6.1f} {mm:>20} {floor:>10.0f} " + " ".join(cells), file=out)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--presets", default="small,medium,large")
  parser.add_argument("--test_len", default="2048",
                      help='tokens in the batch-1 test, or "full" (see throughput.py)')
  parser.add_argument("--repeats", type=int, default=5, help="batch-1 test runs per system")
  parser.add_argument("--rate_repeats", type=int, default=7, help="best of this many, per rate")
  parser.add_argument("--no_torch", action="store_true")
  parser.add_argument("--json", default=None)
  args = parser.parse_args()
  throughput.flags.FLAGS.mark_as_parsed()
  torch = None
  if not args.no_torch:
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError:
      args.no_torch = True
  info = {"jax": jax.__version__, "device": jax.devices()[0].device_kind,
          "cores": os.cpu_count(), "date": time.strftime("%Y-%m-%d"),
          "torch": getattr(torch, "__version__", None)}
  print(json.dumps(info), flush=True)
  throughput.run_presets(args.presets.split(","), lambda name: floor_row(name, args, torch),
                         print_table, args.json, info, key="rows")


if __name__ == "__main__":
  main()
