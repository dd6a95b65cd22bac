"""Members and batch rows over several (simulated) CPU devices and two processes, end to end.

Each run is `python -m zaremba_jax.main` in a subprocess: the device count is fixed when jax
starts (XLA_FLAGS=--xla_force_host_platform_device_count=N), and a multi-process run is several
processes. Results must agree across layouts within float tolerance (reductions run in another
order), and a checkpoint written on one layout must resume on another.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from absl.testing import absltest

from tests import helpers

TINY = ["--batch_size=4", "--num_steps=5", "--hidden_size=16", "--max_epoch=1",
        "--max_max_epoch=2", "--log_per_epoch=2", "--test_chunk=64", "--members=2",
        "--dropout=0.2", "--checkpoint_every_steps=10"]
TIMEOUT = 240


def env_for(devices: int) -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["JAX_PLATFORMS"] = "cpu"
  return env


def main_command(data, workdir, *flags):
  return [sys.executable, "-m", "zaremba_jax.main", f"--data_dir={data}", f"--workdir={workdir}",
          *TINY, *flags]


def train(data, workdir, devices, *flags):
  proc = subprocess.run(main_command(data, workdir, *flags), cwd=helpers.REPO, env=env_for(devices),
                        capture_output=True, text=True, timeout=TIMEOUT)
  if proc.returncode:
    raise AssertionError(f"exit {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
  return proc.stdout


def final(workdir) -> dict:
  """The last test record of a run: the ensemble's and each member's perplexity."""
  return [r for r in helpers.read_metrics(workdir) if r["split"] == "test"][-1]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class DevicesTest(absltest.TestCase):
  """1, 2 and 4 devices: the same numbers; a checkpoint of 4 devices resumes on 1 and on 2."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.root = tempfile.mkdtemp()
    os.makedirs(os.path.join(cls.root, "data"))
    cls.data = helpers.write_tiny_corpus(os.path.join(cls.root, "data"))
    cls.runs = {}
    for devices in (1, 2, 4):
      workdir = os.path.join(cls.root, f"d{devices}")
      cls.runs[devices] = (workdir, train(cls.data, workdir, devices, "--max_train_steps=20"))

  def test_same_numbers_on_1_2_and_4_devices(self):
    want = final(self.runs[1][0])
    for devices in (2, 4):
      got = final(self.runs[devices][0])
      self.assertAlmostEqual(got["perplexity"], want["perplexity"], delta=1e-5 * want["perplexity"])
      for g, w in zip(got["member_perplexity"], want["member_perplexity"]):
        self.assertAlmostEqual(g, w, delta=1e-5 * w)
    self.assertIn("2 members x 2 batch over 4 cpu devices", self.runs[4][1])
    self.assertIn("2 members x 1 batch over 2 cpu devices", self.runs[2][1])

  def test_carry_stays_sharded_along_the_batch(self):
    """One train call on a (members=1, batch=4) mesh: the carry out is split by rows."""
    child = f"""
import jax
from zaremba_jax import data as data_lib, loop
from tests import helpers
config = helpers.tiny_config(members=2, mesh="members=1,batch=4")
run = loop.Run(config, data_lib.corpus_for(config, {self.data!r}))
state = run.initial_state()
inputs, targets = loop.data_lib.train_windows(run.rows_BxL, 0, 2, config.num_steps)
state, _ = run.jit_train_steps()(state, run.place_windows(inputs), run.place_windows(targets))
c = state.carry.c_LxBxH
print(c.shape, tuple(c.sharding.spec), c.sharding.shard_shape(c.shape))
"""
    proc = subprocess.run([sys.executable, "-c", child], cwd=helpers.REPO, env=env_for(4),
                          capture_output=True, text=True, timeout=TIMEOUT)
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    self.assertEqual(proc.stdout.strip().splitlines()[-1],
                     "(2, 2, 4, 16) ('members', None, 'batch') (2, 2, 1, 16)")

  def test_checkpoint_of_4_devices_resumes_on_1_and_2(self):
    whole = os.path.join(self.root, "whole")
    train(self.data, whole, 1, "--max_train_steps=40")
    want = final(whole)
    for devices in (1, 2):
      resumed = os.path.join(self.root, f"from4on{devices}")
      shutil.copytree(self.runs[4][0], resumed)
      log = train(self.data, resumed, devices, "--max_train_steps=40")
      self.assertIn("resuming from", log)
      got = final(resumed)
      self.assertAlmostEqual(got["perplexity"], want["perplexity"], delta=1e-5 * want["perplexity"])

  def test_rows_that_do_not_divide_are_refused_in_one_line(self):
    proc = subprocess.run(main_command(self.data, os.path.join(self.root, "bad"),
                                       "--batch_size=3", "--members=1"),
                          cwd=helpers.REPO, env=env_for(2), capture_output=True, text=True,
                          timeout=TIMEOUT)
    self.assertEqual(proc.returncode, 1)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    self.assertLen(errors, 1)
    self.assertIn("3 batch rows do not divide over 2 devices", errors[0])
    self.assertFalse(os.path.exists(os.path.join(self.root, "bad", "checkpoints")))


class ProcessesTest(absltest.TestCase):
  """Two processes of 2 devices each (gloo on loopback) against one process."""

  def setUp(self):
    super().setUp()
    self.root = self.create_tempdir().full_path
    self.data = helpers.write_tiny_corpus(self.create_tempdir().full_path)

  def start(self, workdir, port, *flags):
    procs = []
    for pid in range(2):
      cmd = main_command(self.data, workdir, f"--coordinator_address=127.0.0.1:{port}",
                         "--num_processes=2", f"--process_id={pid}", "--peer_timeout=10", *flags)
      procs.append(subprocess.Popen(cmd, cwd=helpers.REPO, env=env_for(2), text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    return procs

  def finish(self, procs):
    outs = []
    for p in procs:
      try:
        out, err = p.communicate(timeout=TIMEOUT)
      except subprocess.TimeoutExpired:
        for q in procs:
          q.kill()
        raise
      outs.append((p.returncode, out, err))
    return outs

  def test_two_processes_agree_and_survive_a_kill(self):
    single = os.path.join(self.root, "single")
    train(self.data, single, 1, "--max_train_steps=30")
    # Killed: one process dies by SIGKILL once a checkpoint exists; the other must end too.
    workdir = os.path.join(self.root, "two")
    procs = self.start(workdir, free_port(), "--max_train_steps=30")
    deadline = time.time() + TIMEOUT
    while not os.path.isdir(os.path.join(workdir, "checkpoints", "10")):
      self.assertLess(time.time(), deadline, "no checkpoint came")
      self.assertIsNone(procs[0].poll(), procs[0].stderr.read() if procs[0].poll() else "")
      time.sleep(0.2)
    procs[1].send_signal(signal.SIGKILL)
    outs = self.finish(procs)
    self.assertNotEqual(outs[0][0], 0, "the surviving process must stop too")
    # The same command again, in both processes: resumes and ends as the single process did.
    outs = self.finish(self.start(workdir, free_port(), "--max_train_steps=30"))
    for code, out, err in outs:
      self.assertEqual(code, 0, err[-3000:])
    self.assertIn("resuming from", outs[0][1])
    self.assertIn("summary:", outs[0][1])
    self.assertNotIn("summary:", outs[1][1])  # only process 0 logs
    self.assertNotIn("epoch", outs[1][1])
    got, want = final(workdir), final(single)
    self.assertAlmostEqual(got["perplexity"], want["perplexity"], delta=1e-5 * want["perplexity"])
    for g, w in zip(got["member_perplexity"], want["member_perplexity"]):
      self.assertAlmostEqual(g, w, delta=1e-5 * w)


if __name__ == "__main__":
  absltest.main()
