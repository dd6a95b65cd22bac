"""Faults of a run on two processes (gloo on loopback): preemption, a lost peer or coordinator,
processes started differently, a process that never joins.

Each fault is two `python -m zaremba_jax.main` processes of a tiny model; after the fault every
process must end within 90 s with at most 4 lines (Gloo's own connection lines aside), no
traceback, no C++ stack trace, no "Fatal Python error". The resume-to-the-same-numbers check of
a preempted run takes three more runs: it is in the default suite only with
ZAREMBA_JAX_SLOW_TESTS=1 (a single process's SIGTERM resume is checkpoint_test's).
"""

import os
import re
import signal
import subprocess
import sys
import time

from absl.testing import absltest

from tests import helpers
from tests import scale_test
from zaremba_jax import hosts

SLOW = os.environ.get("ZAREMBA_JAX_SLOW_TESTS") == "1"
FAULT_DEADLINE = 90  # seconds from the fault to every process's exit
NOISE = ("Traceback", "Fatal Python error", "Check failure stack trace", "terminate called", " @ ")
# No periodic checkpoint gets in the way: those on disk are the epoch ends' and the signals'.
TINY = [*scale_test.TINY, "--checkpoint_every_steps=1000", "--peer_timeout=5"]
TRAIN_LINES = 160  # a short epoch (36 steps): the lost-peer tests wait for its checkpoint


class Process:
  """One process of the run, its stdout and stderr in files (a pipe could fill and block it)."""

  def __init__(self, root, pid, cmd, env):
    self.pid = pid
    self.out_path = os.path.join(root, f"p{pid}.out")
    self.err_path = os.path.join(root, f"p{pid}.err")
    self.popen = subprocess.Popen(cmd, cwd=helpers.REPO, env=env, text=True,
                                  stdout=open(self.out_path, "w"), stderr=open(self.err_path, "w"))
    self.mark = (0, 0)

  def output(self) -> tuple[str, str]:
    with open(self.out_path) as out, open(self.err_path) as err:
      return out.read(), err.read()

  def mark_now(self):
    """Remembers how much was written so far: what follows is 'after the fault'."""
    out, err = self.output()
    self.mark = (len(out), len(err))

  def lines_since_mark(self) -> list[str]:
    out, err = self.output()
    lines = out[self.mark[0]:].splitlines() + err[self.mark[1]:].splitlines()
    return [line for line in lines if line.strip() and not line.startswith("[Gloo]")
            and "is connected to 1 peer ranks" not in line]


class TwoProcessTestCase(absltest.TestCase):

  train_lines = TRAIN_LINES

  def setUp(self):
    super().setUp()
    self.root = self.create_tempdir().full_path
    self.data = helpers.write_tiny_corpus(self.create_tempdir().full_path,
                                          n_lines=(self.train_lines, 20, 20))
    self.workdir = os.path.join(self.root, "run")
    self.procs = []

  def tearDown(self):
    for p in self.procs:
      if p.popen.poll() is None:
        p.popen.kill()
        p.popen.wait()
    super().tearDown()

  def start(self, *flags, flags_by_process=None, only=None, port=None):
    port = port or scale_test.free_port()
    self.procs = []
    for pid in (only if only is not None else range(2)):
      cmd = scale_test.main_command(self.data, self.workdir, *TINY,
                                    f"--coordinator_address=127.0.0.1:{port}",
                                    "--num_processes=2", f"--process_id={pid}", *flags,
                                    *(flags_by_process or {}).get(pid, ()))
      self.procs.append(Process(self.root, pid, cmd, scale_test.env_for(2)))
    return self.procs

  def wait_for(self, proc, pattern, timeout=scale_test.TIMEOUT):
    deadline = time.time() + timeout
    while not re.search(pattern, proc.output()[0]):
      for p in self.procs:
        if p.popen.poll() is not None:
          self.fail(f"process {p.pid} ended (exit {p.popen.returncode}) before {pattern!r}:\n"
                    f"{p.output()[0][-2000:]}\n{p.output()[1][-3000:]}")
      self.assertLess(time.time(), deadline, f"no {pattern!r} in time")
      time.sleep(0.2)

  def fault(self, proc, signum):
    """Sends `signum` to `proc`; returns when that was."""
    for p in self.procs:
      p.mark_now()
    proc.popen.send_signal(signum)
    return time.time()

  def finish(self, since, deadline=FAULT_DEADLINE):
    """Waits for every process (at most `deadline` s after `since`); returns their exit codes."""
    codes = []
    for p in self.procs:
      try:
        codes.append(p.popen.wait(timeout=max(1, since + deadline - time.time())))
      except subprocess.TimeoutExpired:
        self.fail(f"process {p.pid} still running {deadline} s after the fault:\n"
                  f"{p.output()[0][-2000:]}\n{p.output()[1][-3000:]}")
    return codes

  def assertFewPlainLines(self, proc, most=4):
    lines = proc.lines_since_mark()
    self.assertLessEqual(len(lines), most, f"process {proc.pid}:\n" + "\n".join(lines))
    for line in lines:
      for noise in NOISE:
        self.assertNotIn(noise, line, f"process {proc.pid}:\n" + "\n".join(lines))
    return lines


class LostPeerTest(TwoProcessTestCase):
  """SIGKILL of either process once a checkpoint exists: the other leaves with two lines, exit 3."""

  def kill_and_check(self, victim):
    self.start("--max_train_steps=400")
    self.wait_for(self.procs[0], r"epoch   1  valid ppl")
    # The epoch's end saves one step in both checkpoints/ and best/: both must complete (their
    # Orbax barriers, named by step, once collided and the run hung).
    per_epoch = int(re.search(r"(\d+) steps an epoch", self.procs[0].output()[0]).group(1))
    deadline = time.time() + scale_test.TIMEOUT
    while not all(os.path.isdir(os.path.join(self.workdir, kind, str(per_epoch)))
                  for kind in ("checkpoints", "best")):
      if time.time() > deadline:
        folders = {kind: os.listdir(os.path.join(self.workdir, kind))
                   for kind in ("checkpoints", "best")
                   if os.path.isdir(os.path.join(self.workdir, kind))}
        self.fail(f"the epoch's checkpoint {per_epoch} did not complete in both: {folders}")
      time.sleep(0.1)
    when = self.fault(self.procs[victim], signal.SIGKILL)
    codes = self.finish(when)
    survivor = self.procs[1 - victim]
    self.assertEqual(codes[1 - victim], hosts.EXIT_PEER_LOST)
    lines = self.assertFewPlainLines(survivor)
    text = "\n".join(lines)
    named = "process 0 (the coordinator)" if victim == 0 else "process 1"
    self.assertIn(f"error: {named} stopped answering", text)
    step = hosts.newest_checkpoint(self.workdir)
    self.assertIn(f"the newest checkpoint on disk is step {step} in {self.workdir}", text)
    self.assertIn("run the same commands on every process again to resume", text)

  def test_sigkill_of_process_1(self):
    self.kill_and_check(1)

  def test_sigkill_of_the_coordinator(self):
    self.kill_and_check(0)


class PreemptionTest(TwoProcessTestCase):
  """SIGTERM to either process: both stop at the same step and save it together, exit 0."""

  train_lines = 400  # 90 steps an epoch: the stop comes well inside it

  def term_and_check(self, target):
    self.start("--max_train_steps=400")
    self.wait_for(self.procs[0], r"epoch   1   50\.0%")  # mid-epoch, before the epoch's checkpoint
    per_epoch = int(re.search(r"(\d+) steps an epoch", self.procs[0].output()[0]).group(1))
    when = self.fault(self.procs[target], signal.SIGTERM)
    codes = self.finish(when)
    self.assertEqual(codes, [0, 0], [p.output()[1][-3000:] for p in self.procs])
    steps = set()
    for p in self.procs:
      lines = self.assertFewPlainLines(p, most=2)  # process 0 may print the epoch's last line
      stop = [line for line in lines if "saved step" in line]
      self.assertLen(stop, 1, lines)
      self.assertIn("every process saved step", stop[0])
      self.assertIn("run the same commands again to resume", stop[0])
      self.assertTrue(stop[0].startswith("SIGTERM:" if p.pid == target else "preempted"), stop[0])
      steps.add(int(re.search(r"saved step (\d+)", stop[0]).group(1)))
    self.assertLen(steps, 1)  # the same step on both
    step = steps.pop()
    self.assertGreater(step, per_epoch // 2)  # after the signal (a few steps pass while they agree)
    self.assertEqual(hosts.newest_checkpoint(self.workdir), step)
    return step

  def test_sigterm_to_process_1(self):
    self.term_and_check(1)

  def test_sigterm_to_the_coordinator(self):
    self.term_and_check(0)

  @absltest.skipUnless(SLOW, "set ZAREMBA_JAX_SLOW_TESTS=1: three more runs of two processes")
  def test_preempted_run_resumes_to_the_same_numbers(self):
    self.term_and_check(1)
    self.procs = self.start("--max_train_steps=120")
    self.finish(time.time(), deadline=scale_test.TIMEOUT)
    resumed = scale_test.final(self.workdir)
    self.assertIn("resuming from", self.procs[0].output()[0])
    self.workdir = os.path.join(self.root, "straight")
    self.start("--max_train_steps=120")
    self.finish(time.time(), deadline=scale_test.TIMEOUT)
    straight = scale_test.final(self.workdir)
    self.assertEqual(resumed["perplexity"], straight["perplexity"])
    self.assertEqual(resumed["member_perplexity"], straight["member_perplexity"])


class AbortPathTest(TwoProcessTestCase):
  """A peer lost while the survivor runs no collective: JAX itself ends the survivor (a fatal
  log and abort()), and our SIGABRT handler must still say it in two lines, exit 3."""

  CHILD = """
import functools, sys, time
from zaremba_jax import hosts, mesh
address, pid, workdir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
hosts.start(address, 2, pid, workdir=workdir, init_timeout=60, peer_timeout=3,
            initialize=functools.partial(mesh.initialize_distributed, address, 2, pid))
print("joined", flush=True)
time.sleep(120)
"""

  def start_idle(self):
    address = f"127.0.0.1:{scale_test.free_port()}"
    os.makedirs(os.path.join(self.workdir, "checkpoints", "20"), exist_ok=True)  # saved before
    self.procs = [Process(self.root, pid, [sys.executable, "-c", self.CHILD, address, str(pid),
                                           self.workdir], scale_test.env_for(2))
                  for pid in range(2)]
    for p in self.procs:
      self.wait_for(p, "joined", timeout=120)

  def test_idle_survivors_of_either_process(self):
    for victim in (0, 1):
      with self.subTest(victim=victim):
        self.start_idle()
        when = self.fault(self.procs[victim], signal.SIGKILL)
        codes = self.finish(when, deadline=60)
        survivor = self.procs[1 - victim]
        self.assertEqual(codes[1 - victim], hosts.EXIT_PEER_LOST, survivor.output())
        text = "\n".join(self.assertFewPlainLines(survivor))
        named = "process 0 (the coordinator)" if victim == 0 else "process 1"
        self.assertIn(f"error: {named} stopped answering", text)
        self.assertIn(f"the newest checkpoint on disk is step 20 in {self.workdir}", text)


class StartTest(TwoProcessTestCase):
  """Processes started differently, and a process that never comes."""

  def test_a_different_hidden_size_is_refused_on_both(self):
    started = time.time()
    self.start(flags_by_process={1: ["--hidden_size=20"]})
    for p in self.procs:
      p.mark_now()
    codes = self.finish(started, deadline=60)
    self.assertEqual(codes, [hosts.EXIT_REFUSED] * 2)
    want = ("error: the processes were started differently: process 1: hidden_size=20,"
            " process 0: hidden_size=16;")
    for p in self.procs:
      errors = [line for line in p.output()[1].splitlines() if line.startswith("error:")]
      self.assertLen(errors, 1, p.output()[1][-3000:])
      self.assertStartsWith(errors[0], want)
    self.assertFalse(os.path.exists(os.path.join(self.workdir, "checkpoints")))

  def test_a_process_that_never_joins_is_named_after_init_timeout(self):
    started = time.time()
    self.start("--init_timeout=8", only=[0])
    waiting = rf"waiting for 1 of 2 processes at 127\.0\.0\.1:\d+, up to 8 s"
    while not re.search(waiting, self.procs[0].output()[1]):
      self.assertLess(time.time() - started, 15, self.procs[0].output())
      time.sleep(0.1)
    codes = self.finish(started, deadline=60)
    gave_up = time.time() - started
    self.assertEqual(codes, [hosts.EXIT_REFUSED])
    self.assertGreaterEqual(gave_up, 8)
    errors = [line for line in self.procs[0].output()[1].splitlines() if line.startswith("error:")]
    self.assertLen(errors, 1, self.procs[0].output())
    self.assertIn("within --init_timeout=8 s; never joined: process id 1.", errors[0])


class PiecesTest(absltest.TestCase):
  """The parts that read JAX's messages and the workdir, on what JAX 0.10.2 prints."""

  def setUp(self):
    super().setUp()
    self.enterContext(absltest.mock.patch.object(hosts, "_state", hosts._State()))
    hosts._state.num_processes, hosts._state.process_id = 3, 0

  def test_who_stopped_from_the_heartbeat_error(self):
    text = ("UNAVAILABLE: The following tasks are unhealthy (stopped sending heartbeats):\n"
            "2\nThe tasks have crashed. Check the task logs for an earlier error")
    self.assertEqual(hosts.stopped_ids(text), [2])
    self.assertEqual(hosts.stopped_ids("Task 1 heartbeat timeout. This indicates"), [1])
    self.assertEqual(hosts.stopped_ids(
        "UNAVAILABLE: Failed to send RPC to coordination service. Either the leader task was"
        " preempted/died/restarted unexpectedly"), [0])
    self.assertEqual(hosts.stopped_ids("Gloo AllGather failed: Connection reset by peer"), [])

  def test_differences_name_the_field_and_both_values(self):
    everyone = [{"hidden_size": 200, "seed": 0}, {"hidden_size": 200, "seed": 0},
                {"hidden_size": 100, "seed": 1}]
    self.assertEqual(hosts.differences(everyone),
                     ["process 2: hidden_size=100, process 0: hidden_size=200",
                      "process 2: seed=1, process 0: seed=0"])
    self.assertEqual(hosts.differences(everyone[:2]), [])

  def test_missing_ids_by_sign_in_files(self):
    folder = self.create_tempdir().full_path
    for pid in (0, 2):
      hosts._sign_in(folder, pid)
    old = os.path.join(folder, "process_1.joined")
    with open(old, "w") as f:
      f.write("{}")
    os.utime(old, (time.time() - 3600, time.time() - 3600))  # a sign-in of an earlier start
    self.assertEqual(hosts.missing_ids(folder, 4, since=time.time() - 60), [1, 3])
    self.assertIsNone(hosts.missing_ids(None, 4, since=0))

  def test_newest_checkpoint_skips_unfinished_saves(self):
    workdir = self.create_tempdir().full_path
    self.assertIsNone(hosts.newest_checkpoint(workdir))
    for name in ("10", "20", "30.orbax-checkpoint-tmp"):
      os.makedirs(os.path.join(workdir, "checkpoints", name))
    self.assertEqual(hosts.newest_checkpoint(workdir), 20)

  def test_a_peer_failure_is_told_from_other_errors(self):
    gone = RuntimeError("UNKNOWN: Gloo AllGather failed: Connection reset by peer")
    self.assertTrue(hosts.is_peer_failure(gone))
    try:
      try:
        raise gone
      except RuntimeError as e:
        raise ValueError("a save failed") from e
    except ValueError as wrapped:
      self.assertTrue(hosts.is_peer_failure(wrapped))
    self.assertFalse(hosts.is_peer_failure(ValueError("shapes (3,) and (4,) do not match")))
    hosts._state.num_processes = 1  # one process: never a peer's fault
    self.assertFalse(hosts.is_peer_failure(gone))


if __name__ == "__main__":
  absltest.main()
