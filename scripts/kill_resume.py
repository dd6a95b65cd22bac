"""Kills a training run with SIGKILL at random moments, reruns it until it finishes, and checks
that it ends with the same valid and test perplexity as the same run never interrupted.

  python -m scripts.kill_resume --data_dir=../shared/data/ptb   # from the repository root

Prints one line per attempt and a final verdict; exits 1 if the numbers differ.
"""

import argparse
import os
import random
import re
import signal
import subprocess
import sys
import tempfile

SUMMARY = re.compile(r"summary: valid ppl (\S+)  test ppl (\S+)")


def command(workdir, args):
  return [sys.executable, "-m", "zaremba_jax.main", f"--flagfile={args.flagfile}",
          f"--data_dir={args.data_dir}", f"--workdir={workdir}",
          f"--max_train_steps={args.steps}", f"--checkpoint_every_steps={args.every}"]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--data_dir", required=True)
  parser.add_argument("--flagfile", default="experiments/small.flags")
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--every", type=int, default=25)
  parser.add_argument("--min_s", type=float, default=3.0)
  parser.add_argument("--max_s", type=float, default=40.0)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--max_kills", type=int, default=10,
                      help="after this many kills, let the run finish")
  args = parser.parse_args()
  rng = random.Random(args.seed)
  root = tempfile.mkdtemp(prefix="kill_resume_")

  straight = subprocess.run(command(os.path.join(root, "straight"), args), capture_output=True,
                            text=True, check=True).stdout
  want = SUMMARY.search(straight).groups()
  print(f"uninterrupted: valid {want[0]}  test {want[1]}", flush=True)

  workdir = os.path.join(root, "killed")
  kills = 0
  while True:
    proc = subprocess.Popen(command(workdir, args), stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    delay = rng.uniform(args.min_s, args.max_s) if kills < args.max_kills else None
    try:
      out, _ = proc.communicate(timeout=delay)
    except subprocess.TimeoutExpired:
      proc.send_signal(signal.SIGKILL)
      out, _ = proc.communicate()
      kills += 1
      steps = sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints"))
                     if n.isdigit()) if os.path.isdir(os.path.join(workdir, "checkpoints")) else []
      print(f"kill {kills}: SIGKILL after {delay:.1f} s; checkpoints on disk: {steps}", flush=True)
      continue
    if proc.returncode != 0:
      print(f"run exited {proc.returncode}:\n{out}")
      return 1
    got = SUMMARY.search(out).groups()
    break
  same = got == want
  print(f"after {kills} SIGKILLs: valid {got[0]}  test {got[1]}  ->"
        f" {'identical' if same else 'DIFFERENT'} to the uninterrupted run")
  return 0 if same else 1


if __name__ == "__main__":
  sys.exit(main())
