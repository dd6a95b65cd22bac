"""Checkpoints: bit-exact resume, signals, damaged checkpoints, refused flags, evaluate mode."""

import glob
import io
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from typing import Any

import flax
import jax
import numpy as np
from absl.testing import absltest

from zaremba_jax import checkpoint as checkpoint_lib
from zaremba_jax import data as data_lib
from zaremba_jax import evaluation
from zaremba_jax import loop
from zaremba_jax import reporting
from tests import helpers

TIMING = ("words_per_sec", "minutes")


def untimed(records):
  return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


@flax.struct.dataclass
class OlderTrainState:
  """TrainState as 0.x releases wrote it: no `average` field."""
  step: Any
  params: Any
  opt_state: Any
  carry: Any
  key: Any


class ResumeTest(absltest.TestCase):
  maxDiff = None

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.data = helpers.write_tiny_corpus(tempfile.mkdtemp())
    # Dropout on, so the PRNG key's continuation is checked too; 90 windows an epoch, and the
    # learning rate halves from epoch 2 (max_epoch=1), so a resume can straddle the change.
    cls.config = helpers.tiny_config(dropout=0.3, max_train_steps=140, checkpoint_every_steps=30,
                                     log_per_epoch=4, max_epoch=1)
    # The uninterrupted run that the stopped-and-resumed ones must equal.
    cls.straight_dir = tempfile.mkdtemp()
    cls.straight, _ = cls.train(cls.straight_dir)
    # A run stopped after the last step at the first rate: the end of epoch max_epoch = 1,
    # before its validation. Tests continue copies of it.
    cls.stopped_at_90_dir = tempfile.mkdtemp()
    stopped, log = cls.train(cls.stopped_at_90_dir, stop_after=90)
    assert stopped is None and "stop requested: saved step 90" in log, log

  def copy_of_stopped_at_90(self):
    workdir = self.create_tempdir().full_path
    shutil.copytree(self.stopped_at_90_dir, workdir, dirs_exist_ok=True)
    return workdir

  @classmethod
  def train(cls, workdir, stop_after=None, **changes):
    """Trains in `workdir`; with `stop_after`, asks the run to stop once it has done that many
    steps (the loop asks after each call of train steps)."""
    out = io.StringIO()
    def stop_requested(step):
      return "stop requested" if stop_after and step >= stop_after else None
    result = loop.train_and_evaluate(cls.config.replace(**changes), cls.data, workdir,
                                     reporting.Reporter(workdir, out),
                                     stop_requested=stop_requested)
    return result, out.getvalue()

  def assert_same_as_straight(self, resumed, resumed_dir):
    """A resumed run ended where the uninterrupted one did: every part of the TrainState
    (params, optimizer state, carry, PRNG key, step), the perplexities and metrics.jsonl."""
    a, b = self.straight["state"], resumed["state"]
    self.assertEqual(int(a.step[0]), 140)
    self.assertEqual(int(b.step[0]), 140)
    for part in ("params", "opt_state", "carry"):
      x, y = getattr(a, part), getattr(b, part)
      self.assertEqual(jax.tree.structure(x), jax.tree.structure(y), part)
      for (path, u), v in zip(jax.tree_util.tree_leaves_with_path(x), jax.tree.leaves(y)):
        np.testing.assert_array_equal(u, v, err_msg=f"{part}{jax.tree_util.keystr(path)}")
    np.testing.assert_array_equal(jax.random.key_data(a.key), jax.random.key_data(b.key))
    self.assertEqual((self.straight["valid"], self.straight["test"]),
                     (resumed["valid"], resumed["test"]))
    self.assertEqual(untimed(helpers.read_metrics(self.straight_dir)),
                     untimed(helpers.read_metrics(resumed_dir)))

  def test_stop_and_resume_is_bit_exact(self):
    # Stopped inside epoch 1 (lr 1) and continued into epoch 2 (lr 0.5).
    resumed_dir = self.create_tempdir().full_path
    stopped, log = self.train(resumed_dir, stop_after=70)  # mid-epoch: epoch 1 has 90 windows
    self.assertIsNone(stopped)
    saved = int(re.search(r"stop requested: saved step (\d+)", log).group(1))
    self.assertBetween(saved, 70, 79)  # the first call to end at or past step 70
    resumed, log = self.train(resumed_dir)
    self.assertIn("resuming from", log)
    self.assertIn(f"checkpoints/{saved}: epoch 1, window {saved}", log)
    self.assert_same_as_straight(resumed, resumed_dir)

  def test_resume_at_the_learning_rate_change_is_bit_exact(self):
    # Stopped after the last step at the first rate (the end of epoch max_epoch = 1, before its
    # validation), and continued at the next rate: the schedule must pick up where it was.
    rates = {r["epoch"]: r["learning_rate"] for r in helpers.read_metrics(self.straight_dir)
             if r["split"] == "train"}
    self.assertEqual(rates, {1: 1.0, 2: 0.5})
    resumed_dir = self.copy_of_stopped_at_90()
    resumed, log = self.train(resumed_dir)
    self.assertIn("resuming from", log)
    self.assert_same_as_straight(resumed, resumed_dir)

  def test_damaged_newest_checkpoint_is_skipped(self):
    workdir = self.create_tempdir().full_path
    self.train(workdir, max_train_steps=70)
    steps = checkpoint_lib.Checkpointer(workdir).steps()
    self.assertEqual(steps, [30, 60, 70])
    for path in glob.glob(os.path.join(workdir, "checkpoints", "70", "state", "**", "*"),
                          recursive=True):
      if os.path.isfile(path) and "manifest" in path:
        with open(path, "r+b") as f:
          f.truncate(10)
    _, log = self.train(workdir, max_train_steps=75)
    self.assertRegex(log, r"skipping unreadable checkpoint .*checkpoints/70")
    self.assertIn("resuming from", log)
    self.assertRegex(log, r"checkpoints/60: epoch 1, window 60")

  def test_checkpoint_from_before_the_average_field_resumes_bit_exactly(self):
    # Checkpoints written before TrainState had NT-ASGD's `average` field (0.x releases) hold
    # no such entry; a resume must still read them, not skip them all and train from scratch.
    resumed_dir = self.copy_of_stopped_at_90()
    run = loop.Run(self.config, data_lib.corpus_for(self.config, self.data))
    ckpt = checkpoint_lib.Checkpointer(resumed_dir)
    state, meta, step = ckpt.restore(run.abstract_state())
    ckpt.close()
    self.assertEqual(step, 90)
    shutil.rmtree(os.path.join(resumed_dir, "checkpoints"))
    older = OlderTrainState(**{f: getattr(state, f) for f in OlderTrainState.__dataclass_fields__})
    ckpt = checkpoint_lib.Checkpointer(resumed_dir)
    ckpt.save(90, older, meta)
    ckpt.close()
    resumed, log = self.train(resumed_dir)
    self.assertIn("checkpoints/90: epoch 1, window 90", log)
    self.assertNotIn("skipping", log)
    self.assert_same_as_straight(resumed, resumed_dir)

  def test_no_readable_checkpoint_stops_instead_of_training_over_them(self):
    workdir = self.copy_of_stopped_at_90()
    for path in glob.glob(os.path.join(workdir, "checkpoints", "*", "state", "**", "*manifest*"),
                          recursive=True):
      with open(path, "r+b") as f:
        f.truncate(10)
    before = helpers.folder_bytes(workdir)
    with self.assertRaisesRegex(checkpoint_lib.CheckpointError,
                                r"no checkpoint in .*\(steps 30, 60, 90\) could be read.*--restart"):
      self.train(workdir)
    self.assertEqual(helpers.folder_bytes(workdir), before)

  def test_saving_a_step_older_than_the_newest_is_refused_aloud(self):
    ckpt = checkpoint_lib.Checkpointer(self.create_tempdir().full_path)
    ckpt.save(5, {"x": np.zeros(2)}, {})
    ckpt.wait()
    with self.assertRaisesRegex(checkpoint_lib.CheckpointError,
                                r"step 3 was not written in .*: it holds the newer step 5"):
      ckpt.save(3, {"x": np.ones(2)}, {})
    ckpt.close()

  def test_shape_changing_flag_is_refused(self):
    workdir = self.create_tempdir().full_path
    self.train(workdir, max_train_steps=30)
    with self.assertRaisesRegex(checkpoint_lib.ResumeError,
                                r"--hidden_size=32 .* --hidden_size=16"):
      self.train(workdir, max_train_steps=60, hidden_size=32)
    # Nothing was lost: the old run still resumes.
    result, log = self.train(workdir, max_train_steps=60)
    self.assertIn("resuming from", log)
    self.assertEqual(int(result["state"].step[0]), 60)

  def test_restart_discards(self):
    workdir = self.create_tempdir().full_path
    self.train(workdir, max_train_steps=30)
    out = io.StringIO()
    result = loop.train_and_evaluate(self.config.replace(max_train_steps=10), self.data, workdir,
                                     reporting.Reporter(workdir, out), restart=True)
    self.assertIn("--restart: discarded checkpoints/ (steps 30)", out.getvalue())
    self.assertEqual(int(result["state"].step[0]), 10)
    self.assertNotIn("resuming", out.getvalue())
    self.assertEqual(checkpoint_lib.Checkpointer(workdir).steps(), [10])
    self.assertEqual(max(r["step"] for r in helpers.read_metrics(workdir)), 10)

  def test_evaluate_reproduces_the_end_of_training(self):
    workdir = self.create_tempdir().full_path
    trained, _ = self.train(workdir, max_train_steps=0, max_max_epoch=2)
    out = io.StringIO()
    result = evaluation.evaluate_checkpoint(workdir, self.data, reporter=reporting.Reporter(None, out))
    self.assertEqual(result["valid"], trained["valid"])
    self.assertEqual(result["test"], trained["test"])

  def test_evaluate_in_another_dtype(self):
    # The straight run trained in float32; evaluating it in bfloat16 rounds the products' inputs:
    # close to the float32 numbers, not equal to them.
    reporter = reporting.Reporter(None, io.StringIO())
    want = evaluation.evaluate_checkpoint(self.straight_dir, self.data, step=140, reporter=reporter)
    out = io.StringIO()
    got = evaluation.evaluate_checkpoint(self.straight_dir, self.data, step=140, dtype="bfloat16",
                                   reporter=reporting.Reporter(None, out))
    self.assertIn("in bfloat16", out.getvalue())
    self.assertNotEqual((got["valid"], got["test"]), (want["valid"], want["test"]))
    for split in ("valid", "test"):
      self.assertAlmostEqual(got[split] / want[split], 1.0, delta=0.01)
    trained = checkpoint_lib.load_trained(self.straight_dir, say=lambda _: None, dtype="bfloat16")
    self.assertEqual((trained.config.dtype, trained.model.plan.dtype), ("bfloat16", "bfloat16"))

  def test_evaluate_loads_the_best_checkpoint_and_names_its_epoch(self):
    workdir = self.copy_of_stopped_at_90()
    # Epoch 2 at a learning rate that wrecks the model validates far worse than epoch 1, so the
    # best checkpoint is the one taken at the end of epoch 1, not the last.
    _, log = self.train(workdir, learning_rate=1e3)
    self.assertIn("resuming from", log)
    valid = [r for r in helpers.read_metrics(workdir) if r["split"] == "valid"]
    self.assertEqual([(r["epoch"], r["step"]) for r in valid], [(1, 90), (2, 140)])
    # metrics.jsonl writes a perplexity that overflowed (a wrecked model's) as null.
    perplexity = lambda r: math.inf if r["perplexity"] is None else r["perplexity"]
    best = min(valid, key=perplexity)
    self.assertEqual(best["epoch"], 1)
    self.assertGreater(perplexity(valid[-1]), 2 * best["perplexity"])
    out = io.StringIO()
    reporter = reporting.Reporter(None, out)
    result = evaluation.evaluate_checkpoint(workdir, self.data, reporter=reporter)
    self.assertEqual(result["step"], best["step"])
    self.assertEqual(result["valid"], best["perplexity"])  # that epoch's validation, recomputed
    self.assertEqual([r["epoch"] for r in reporter.records], [best["epoch"]] * 2)
    self.assertRegex(out.getvalue(), rf"epoch +{best['epoch']}  valid ppl")
    # query, sample and serve load the same checkpoint.
    self.assertEqual(checkpoint_lib.load_trained(workdir, say=lambda _: None).step, best["step"])

  def test_evaluate_names_the_epoch_of_a_mid_epoch_checkpoint(self):
    # The straight run stopped at step 140, 50 windows into epoch 2, and checkpointed there.
    final = [r for r in helpers.read_metrics(self.straight_dir) if r["split"] == "valid"][-1]
    self.assertEqual((final["step"], final["epoch"]), (140, 2))
    reporter = reporting.Reporter(None, io.StringIO())
    result = evaluation.evaluate_checkpoint(self.straight_dir, self.data, step=140, reporter=reporter)
    self.assertEqual(result["valid"], final["perplexity"])
    self.assertEqual([r["epoch"] for r in reporter.records], [2, 2])

  def test_evaluate_without_checkpoint_says_so(self):
    workdir = self.create_tempdir().full_path
    with self.assertRaisesRegex(checkpoint_lib.CheckpointError, "no checkpoint in"):
      evaluation.evaluate_checkpoint(workdir, self.data)


class SignalTest(absltest.TestCase):

  def run_main(self, data, workdir, *extra, stop_after_line=None):
    args = [sys.executable, "-m", "zaremba_jax.main", f"--data_dir={data}", f"--workdir={workdir}",
            "--batch_size=4", "--num_steps=5", "--hidden_size=64", "--max_epoch=1",
            "--max_max_epoch=3", "--log_per_epoch=20", "--checkpoint_every_steps=100000", *extra]
    proc = subprocess.Popen(args, cwd=helpers.REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    lines = []
    for line in proc.stdout:
      lines.append(line)
      if stop_after_line and stop_after_line in line:
        proc.send_signal(signal.SIGTERM)
        stop_after_line = None
    return proc.wait(timeout=300), "".join(lines)

  def test_sigterm_saves_and_the_rerun_finishes_the_same(self):
    data = helpers.write_tiny_corpus(self.create_tempdir().full_path, n_lines=(2000, 40, 40))
    straight_dir = self.create_tempdir().full_path
    rc, straight = self.run_main(data, straight_dir)
    self.assertEqual(rc, 0)
    stopped_dir = self.create_tempdir().full_path
    # Stopped early in epoch 2 of 3, where the learning rate has begun to decay.
    rc, first = self.run_main(data, stopped_dir, stop_after_line="epoch   2   ")
    self.assertEqual(rc, 0, first)
    self.assertRegex(first, r"SIGTERM: saved step \d+ in .*; run the same command again")
    self.assertNotIn("summary", first)
    rc, second = self.run_main(data, stopped_dir)
    self.assertEqual(rc, 0)
    self.assertIn("resuming from", second)
    summary = lambda log: re.search(r"summary: valid ppl (\S+)  test ppl (\S+)", log).groups()
    self.assertEqual(summary(straight), summary(second))


class DiskFullTest(absltest.TestCase):

  def test_full_disk_stops_cleanly_and_keeps_earlier_checkpoints(self):
    if os.geteuid() != 0:
      self.skipTest("needs root to mount a small tmpfs")
    mount = self.create_tempdir().full_path
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", mount],
                      capture_output=True).returncode != 0:
      self.skipTest("cannot mount a tmpfs here")
    self.addCleanup(subprocess.run, ["umount", mount])
    data = helpers.write_tiny_corpus(self.create_tempdir().full_path)
    workdir = os.path.join(mount, "run")
    # ~2.6 MB a checkpoint: the first fits in 3 MB, the second does not.
    config = helpers.tiny_config(hidden_size=200, checkpoint_every_steps=20, max_train_steps=60)
    with self.assertRaisesRegex(checkpoint_lib.CheckpointError,
                                r"No space left on device.*latest: step 20.*free disk space"):
      loop.train_and_evaluate(config, data, workdir, reporting.Reporter(workdir, io.StringIO()))
    self.assertEqual(checkpoint_lib.Checkpointer(workdir).steps(), [20])
    # With room again, the run resumes from the intact checkpoint.
    subprocess.run(["mount", "-o", "remount,size=64m", mount], check=True)
    out = io.StringIO()
    result = loop.train_and_evaluate(config, data, workdir, reporting.Reporter(workdir, out))
    self.assertIn("checkpoints/20: epoch 1, window 20", out.getvalue())
    self.assertEqual(int(result["state"].step[0]), 60)


if __name__ == "__main__":
  absltest.main()
