"""Starts a training run as two processes on loopback, sends one fault, and prints every
process's output with the time of each line, its exit status and when it ended.

  python -m scripts.host_faults --fault=term1 --after_checkpoint=100 --workdir=/tmp/f \\
      --data_dir=../shared/data/ptb -- --preset=small --max_train_steps=300 \\
      --checkpoint_every_steps=100 --peer_timeout=20        # from the repository root

Faults: none, term0/term1 (SIGTERM), int0/int1 (SIGINT), kill0/kill1 (SIGKILL) to process 0 or
1 once WORKDIR/checkpoints/N exists; missing1 starts process 0 alone. Flags after `--` go to
both processes; --flags1 adds some to process 1 only (e.g. --flags1=--hidden_size=100). Lines
after the fault are marked with '*'. Running it again with --fault=none on the same workdir
resumes. Each process gets 2 CPU devices (docs/hosts.md).
"""

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time

SIGNALS = {"term": signal.SIGTERM, "int": signal.SIGINT, "kill": signal.SIGKILL}


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--fault", default="none")
  parser.add_argument("--after_checkpoint", type=int, default=100)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--data_dir", required=True)
  parser.add_argument("--flags1", default="", help="extra flags for process 1, space-separated")
  parser.add_argument("--timeout", type=float, default=1200, help="seconds before giving up")
  args, common = parser.parse_known_args()
  common = [flag for flag in common if flag != "--"]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  port, t0 = free_port(), time.time()
  procs, outputs, ended = [], [], {}
  for pid in range(1 if args.fault == "missing1" else 2):
    cmd = [sys.executable, "-m", "zaremba_jax.main", f"--data_dir={args.data_dir}",
           f"--workdir={args.workdir}", f"--coordinator_address=127.0.0.1:{port}",
           "--num_processes=2", f"--process_id={pid}", *common,
           *(args.flags1.split() if pid == 1 else [])]
    proc = subprocess.Popen(cmd, env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    lines = []

    def read(proc=proc, lines=lines):
      for line in proc.stdout:
        lines.append((time.time(), line.rstrip("\n")))

    def wait(pid=pid, proc=proc):
      proc.wait()
      ended[pid] = time.time()

    threading.Thread(target=read, daemon=True).start()
    threading.Thread(target=wait, daemon=True).start()
    procs.append(proc)
    outputs.append(lines)
  fault_time = t0
  if args.fault[:-1] in SIGNALS:
    target = int(args.fault[-1])
    ready = os.path.join(args.workdir, "checkpoints", str(args.after_checkpoint))
    while not os.path.isdir(ready):
      if time.time() - t0 > args.timeout or any(p.poll() is not None for p in procs):
        sys.exit(f"no checkpoint {args.after_checkpoint} came; not sending {args.fault}")
      time.sleep(0.1)
    fault_time = time.time()
    procs[target].send_signal(SIGNALS[args.fault[:-1]])
    print(f"[{args.fault} sent {fault_time - t0:.1f} s after the start]")
  for pid, proc in enumerate(procs):
    try:
      proc.wait(timeout=max(1, t0 + args.timeout - time.time()))
    except subprocess.TimeoutExpired:
      print(f"[process {pid} still running after {args.timeout} s: killed]")
      proc.kill()
      proc.wait()
  time.sleep(0.2)  # the readers' last lines
  for pid, proc in enumerate(procs):
    after = [line for t, line in outputs[pid] if t >= fault_time and args.fault != "none"]
    print(f"===== process {pid}: exit {proc.returncode}"
          f" {ended.get(pid, time.time()) - fault_time:.1f} s after the fault;"
          f" {len(after)} lines after it, {len(outputs[pid])} in all")
    for t, line in outputs[pid]:
      mark = "*" if t >= fault_time and args.fault != "none" else " "
      print(f"{t - t0:7.1f} {mark} {line}")


if __name__ == "__main__":
  main()
