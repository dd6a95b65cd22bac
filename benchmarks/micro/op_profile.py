"""Where the training loop's or the batch-1 test's time goes, XLA operation by operation.

  python -m benchmarks.micro.op_profile --preset=char_small --dtype=bfloat16
  python -m benchmarks.micro.op_profile --preset=medium --what=test

Runs one call of the jitted `train_steps` (--steps_per_call windows, as the training loop does) or
of the batch-1 `evaluate` over a --test_len stream (its model planned for that stream, as
`loop.Evaluator` does; see `throughput.JaxSystem`), after compilation, under `jax.profiler.trace`,
and sums the trace's events by operation name (the names of the compiled HLO: `ynn_fusion.N` are
matmuls, `*_fusion` elementwise work, `while.N` loops). Prints the wall time and, for the --top
operations, milliseconds per window (or microseconds per token), calls and the threads they ran on.
Operations that run once per time step show calls = windows x steps; XLA's CPU runtime runs
independent operations on both cores at once, so the times add up to more than the wall time.
"""

import argparse
import collections
import glob
import gzip
import json
import os
import tempfile

import jax

from benchmarks import throughput

# Events that contain others (the executor, Python frames, loops) rather than doing the work.
CONTAINERS = ("ThunkExecutor", "$", "SlinkyThreadPool", "while", "call", "conditional",
              "PjitFunction", "PjRt", "CommonPjRt", "ParseArguments", "Handle inputs",
              "DevicePut", "ExecuteHelper")


def leaf_events(trace_dir):
  path = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)[0]
  with gzip.open(path) as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  complete = [e for e in events if e.get("ph") == "X" and "dur" in e]
  wait = [e for e in complete if e["name"].startswith("ThunkExecutor::Execute (wait")]
  wall_us = sum(e["dur"] for e in wait)
  return [e for e in complete if not e["name"].startswith(CONTAINERS)], wall_us


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--preset", default="char_small")
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--what", default="train", choices=["train", "test"])
  parser.add_argument("--test_len", type=int, default=4096)
  parser.add_argument("--top", type=int, default=25)
  args = parser.parse_args()
  config = throughput.preset_config(args.preset)
  system = throughput.JaxSystem(config, throughput.VOCAB[config.level], args.dtype, args.test_len)
  system.compile()
  run = system.test if args.what == "test" else lambda: system.train(system.per_call)
  run()
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      run()
    events, wall_us = leaf_events(trace_dir)
  if args.what == "test":
    per, unit, scale = system.test_words, "us/token", 1.0
  else:
    per, unit, scale = system.per_call, "ms/window", 1e-3
  total, calls, threads = collections.Counter(), collections.Counter(), collections.defaultdict(set)
  for e in events:
    total[e["name"]] += e["dur"]
    calls[e["name"]] += 1
    threads[e["name"]].add(e["tid"])
  print(f"{args.preset} {args.dtype} {args.what}: wall {wall_us * scale / per:.2f} {unit}, "
        f"operations {sum(total.values()) * scale / per:.2f} {unit} in all "
        f"({per} {'tokens' if args.what == 'test' else 'windows'}, jax {jax.__version__})")
  print(f"{unit:>10} {'calls':>7} {'threads':>7}  operation")
  for name, us in total.most_common(args.top):
    print(f"{us * scale / per:>10.2f} {calls[name]:>7} {len(threads[name]):>7}  {name}")


if __name__ == "__main__":
  main()
