"""A client of the next-character protocol that knows only the protocol (it imports nothing of
zaremba_jax): it starts `--mode=serve`, waits for "OK GO", feeds the character test stream one
token a line, checks every answer (50 log-probabilities whose exponentials sum to 1), and computes
the course perplexity exp(5.6 x mean NLL per character) of the stream.

  python -m scripts.serve_client --workdir=runs/char_small --data_dir=../shared/data/ptb   # repo root

The first --latency_tokens tokens are sent one at a time, each waiting for its answer, to measure
per-token latency; the rest are streamed.
"""

import argparse
import math
import os
import statistics
import subprocess
import sys
import threading
import time


def char_stream(path):
  """The course's character tokens of a PTB word file: words joined by "_", <eos> per line."""
  tokens = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      tokens.extend("_".join(line.split()))
      tokens.append("<eos>")
  return tokens


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--data_dir", required=True)
  parser.add_argument("--split", default="test")
  parser.add_argument("--limit", type=int, default=0, help="feed only this many tokens (0: all)")
  parser.add_argument("--latency_tokens", type=int, default=1000)
  parser.add_argument("--dtype", default="", help="serve in this dtype (default: the checkpoint's)")
  args = parser.parse_args()

  train = char_stream(os.path.join(args.data_dir, "ptb.train.txt"))
  vocab = list(dict.fromkeys(train))  # the grader's numbering: order of first appearance
  index = {t: i for i, t in enumerate(vocab)}
  tokens = char_stream(os.path.join(args.data_dir, f"ptb.{args.split}.txt"))
  if args.limit:
    tokens = tokens[: args.limit]

  proc = subprocess.Popen([sys.executable, "-m", "zaremba_jax.main", "--mode=serve",
                           f"--workdir={args.workdir}",
                           *([f"--dtype={args.dtype}"] if args.dtype else [])], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1)
  started = time.time()
  first = proc.stdout.readline()
  if first.strip() != "OK GO":
    sys.exit(f"expected 'OK GO', got {first!r}")
  print(f"OK GO after {time.time() - started:.1f} s", flush=True)

  nll, bad, latencies = 0.0, 0, []

  def check(k, line):
    nonlocal nll, bad
    values = line.split(" ")
    logprobs = [float(v) for v in values]
    if len(logprobs) != len(vocab) or abs(sum(math.exp(x) for x in logprobs) - 1) > 5e-5:
      bad += 1
    if k + 1 < len(tokens):
      nll -= logprobs[index[tokens[k + 1]]]

  n_lat = min(args.latency_tokens, len(tokens))
  for k in range(n_lat):
    tic = time.perf_counter()
    proc.stdin.write(tokens[k] + "\n")
    proc.stdin.flush()
    line = proc.stdout.readline()
    latencies.append(time.perf_counter() - tic)
    check(k, line)

  def feed():
    for token in tokens[n_lat:]:
      proc.stdin.write(token + "\n")
    proc.stdin.close()

  writer = threading.Thread(target=feed)
  writer.start()
  tic = time.time()
  answered = n_lat
  for k in range(n_lat, len(tokens)):
    line = proc.stdout.readline()
    if not line:
      break
    check(k, line)
    answered += 1
  writer.join()
  proc.wait()
  streamed = time.time() - tic
  n_pred = len(tokens) - 1
  mean = nll / n_pred
  print(f"tokens sent {len(tokens)}, answers {answered}, malformed {bad}")
  if latencies:
    print(f"latency per token (lockstep, first {n_lat}): median"
          f" {1000 * statistics.median(latencies):.2f} ms, p90"
          f" {1000 * sorted(latencies)[int(0.9 * len(latencies))]:.2f} ms")
  print(f"streamed {len(tokens) - n_lat} tokens in {streamed:.1f} s")
  print(f"{args.split}: bpc {mean / math.log(2):.4f}  course ppl {math.exp(5.6 * mean):.2f}"
        f"  ({n_pred} predictions)")
  return 0 if answered == len(tokens) and bad == 0 else 1


if __name__ == "__main__":
  sys.exit(main())
