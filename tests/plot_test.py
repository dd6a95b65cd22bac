"""python -m zaremba_jax.plot: the figure's lines are metrics.jsonl's numbers."""

import io
import json
import math
import os
import subprocess
import sys
import tempfile

import numpy as np
from absl.testing import absltest

from zaremba_jax import config as config_lib
from zaremba_jax import data as data_lib
from zaremba_jax import loop
from zaremba_jax import plot
from zaremba_jax import reporting
from tests import helpers


def lines_by_label(ax):
  return {line.get_label(): line for line in ax.get_lines()}


def write_metrics(folder, records):
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in records)
  return folder


def synthetic_records(steps_per_epoch=50, epochs=2, lines=2, level="word", members=0):
  """Records as a run logs them: `lines` progress lines an epoch, a validation at each end."""
  records = []
  key = "bpc" if level == "char" else "perplexity"
  for epoch in range(1, epochs + 1):
    for k in range(1, lines + 1):
      step = (epoch - 1) * steps_per_epoch + k * steps_per_epoch // lines
      records.append({"step": step, "epoch": epoch, "split": "train", key: 10.0 / (step + 1),
                      "learning_rate": 1.0 / epoch})
    valid = {"step": epoch * steps_per_epoch, "epoch": epoch, "split": "valid", key: 5.0 / epoch,
             "learning_rate": 1.0 / epoch}
    if members:
      valid[f"member_{key}"] = [valid[key] + 0.1 * (i + 1) for i in range(members)]
    records.append(valid)
  records.append({"step": epochs * steps_per_epoch, "epoch": epochs, "split": "test", key: 4.0,
                  "learning_rate": float("nan")})
  return records


class TinyRunPlotTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    data = helpers.write_tiny_corpus(tempfile.mkdtemp())
    cls.config = helpers.tiny_config(max_max_epoch=3, max_epoch=1, log_per_epoch=3)
    cls.workdir = os.path.join(tempfile.mkdtemp(), "tiny")
    loop.train_and_evaluate(cls.config, data, cls.workdir,
                            reporting.Reporter(cls.workdir, io.StringIO()))
    corpus = data_lib.load_corpus(data, "word")
    cls.steps_per_epoch = data_lib.num_train_windows(
        data_lib.batchify(corpus.train, cls.config.batch_size), cls.config.num_steps)
    cls.records = helpers.read_metrics(cls.workdir)

  def test_png_is_written_and_the_lines_are_the_records(self):
    out = os.path.join(self.create_tempdir().full_path, "curves.png")
    fig = plot.plot([self.workdir], out)
    with open(out, "rb") as f:
      self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")
    ax, lr_ax = fig.axes
    lines = lines_by_label(ax)
    train = [r for r in self.records if r["split"] == "train"]
    valid = [r for r in self.records if r["split"] == "valid"]
    self.assertLen(valid, 3)
    np.testing.assert_array_equal(lines["tiny train"].get_ydata(), [r["perplexity"] for r in train])
    np.testing.assert_array_equal(lines["tiny valid"].get_ydata(), [r["perplexity"] for r in valid])
    # x: the fractional epoch, from the steps and the corpus's epoch length (computed here apart).
    np.testing.assert_allclose(lines["tiny train"].get_xdata(),
                               [r["step"] / self.steps_per_epoch for r in train])
    np.testing.assert_allclose(lines["tiny valid"].get_xdata(), [1, 2, 3])
    (lr,) = lr_ax.get_lines()
    self.assertEqual(lr.get_label(), "tiny learning rate")
    np.testing.assert_array_equal(lr.get_ydata(), [r["learning_rate"] for r in train])
    self.assertEqual(sorted(set(lr.get_ydata())), [0.25, 0.5, 1.0])
    self.assertEqual(lr_ax.get_yscale(), "log")
    self.assertEqual(ax.get_ylabel(), "perplexity")
    self.assertLen(ax.get_lines(), 2)  # not a preset: no reference line

  def test_an_evaluation_appended_later_is_not_plotted_twice(self):
    workdir = os.path.join(self.create_tempdir().full_path, "tiny")
    best = min((r for r in self.records if r["split"] == "valid"), key=lambda r: r["perplexity"])
    write_metrics(workdir, self.records + [dict(best, epoch=0), dict(best, split="test")])
    fig = plot.plot([workdir])
    np.testing.assert_allclose(lines_by_label(fig.axes[0])["tiny valid"].get_xdata(), [1, 2, 3])

  def test_the_command_writes_the_png(self):
    out = os.path.join(self.create_tempdir().full_path, "c.png")
    result = subprocess.run([sys.executable, "-m", "zaremba_jax.plot", self.workdir, "--out", out],
                            cwd=helpers.REPO, capture_output=True, text=True, timeout=300)
    self.assertEqual(result.returncode, 0, result.stderr)
    self.assertEqual(result.stdout, f"wrote {out}\n")
    self.assertGreater(os.path.getsize(out), 1000)


class FractionalEpochTest(absltest.TestCase):
  """Points sit at step / steps_per_epoch, for a run cut short and for a full one."""

  def test_a_30_step_run_with_one_progress_line(self):
    # An epoch of 4 x 5 windows is longer than 30 steps here: the run never ends an epoch.
    data = helpers.write_tiny_corpus(self.create_tempdir().full_path, n_lines=(2000, 40, 40))
    config = helpers.tiny_config(max_train_steps=30, log_per_epoch=1)
    workdir = os.path.join(self.create_tempdir().full_path, "short")
    loop.train_and_evaluate(config, data, workdir, reporting.Reporter(workdir, io.StringIO()))
    corpus = data_lib.load_corpus(data, "word")
    steps_per_epoch = data_lib.num_train_windows(
        data_lib.batchify(corpus.train, config.batch_size), config.num_steps)
    self.assertGreater(steps_per_epoch, 100)
    records = helpers.read_metrics(workdir)
    self.assertEqual([(r["split"], r["step"]) for r in records],
                     [("train", 30), ("valid", 30), ("test", 30)])
    for r in records:
      self.assertEqual(r["steps_per_epoch"], steps_per_epoch)
      self.assertAlmostEqual(r["fractional_epoch"], 30 / steps_per_epoch)
    out = os.path.join(self.create_tempdir().full_path, "short.png")
    self.assertEqual(plot.main([workdir, "--out", out]), 0)
    lines = lines_by_label(plot.plot([workdir]).axes[0])
    np.testing.assert_allclose(lines["short valid"].get_xdata(), [30 / steps_per_epoch])
    np.testing.assert_allclose(lines["short train"].get_xdata(), [30 / steps_per_epoch])
    self.assertEqual(lines["short train"].get_marker(), "o")  # one point: drawn as a dot

  def test_a_full_run_shaped_metrics_file(self):
    # What 13 epochs of 1327 steps (medium's and large's epoch) write, through the Reporter as
    # the loop calls it (a line every 132 windows, the epoch's last at its end), then the same file
    # without the new fields, as runs before 2026-12-03 wrote it.
    steps_per_epoch, log_every, epochs = 1327, 132, 13
    workdir = os.path.join(self.create_tempdir().full_path, "full")
    reporter = reporting.Reporter(workdir, io.StringIO())
    reporter.steps_per_epoch = steps_per_epoch
    want_train = []
    for epoch in range(1, epochs + 1):
      windows = [w for w in range(log_every, steps_per_epoch, log_every)
                 if steps_per_epoch - w >= log_every // 2] + [steps_per_epoch]
      for w in windows:
        step = (epoch - 1) * steps_per_epoch + w
        want_train.append(step / steps_per_epoch)
        reporter.train_progress(step=step, epoch=epoch, fraction=w / steps_per_epoch,
                                nll_sum=500.0 / epoch, count=100, words_per_sec=8000.0,
                                learning_rate=1.0, grad_norm=1.0)
      reporter.eval_result(step=epoch * steps_per_epoch, epoch=epoch, split="valid",
                           nll_sum=480.0 / epoch, count=100, learning_rate=1.0)
    reporter.eval_result(step=epochs * steps_per_epoch, epoch=epochs, split="test", nll_sum=470.0,
                         count=100, learning_rate=float("nan"))
    old = write_metrics(os.path.join(self.create_tempdir().full_path, "old"), [
        {k: v for k, v in r.items() if k not in ("steps_per_epoch", "fractional_epoch")}
        for r in helpers.read_metrics(workdir)])
    for folder, name in ((workdir, "full"), (old, "old")):
      lines = lines_by_label(plot.plot([folder]).axes[0])
      np.testing.assert_allclose(lines[f"{name} train"].get_xdata(), want_train, err_msg=name)
      np.testing.assert_allclose(lines[f"{name} valid"].get_xdata(), range(1, epochs + 1),
                                 err_msg=name)
    self.assertLen(want_train, 10 * epochs)


class PlotTest(absltest.TestCase):

  def test_several_runs_members_and_the_paper_reference(self):
    root = self.create_tempdir().full_path
    one = write_metrics(os.path.join(root, "a"), synthetic_records())
    two_records = synthetic_records(members=2)
    two = write_metrics(os.path.join(root, "b"), two_records)
    fig = plot.plot([one, two], preset="small")
    lines = lines_by_label(fig.axes[0])
    valid = [r for r in two_records if r["split"] == "valid"]
    for i in range(2):
      np.testing.assert_array_equal(lines[f"_b valid member {i}"].get_ydata(),
                                    [r["member_perplexity"][i] for r in valid])
    np.testing.assert_array_equal(lines["b valid"].get_ydata(), [r["perplexity"] for r in valid])
    np.testing.assert_allclose(lines["a train"].get_xdata(), [0.5, 1, 1.5, 2])
    self.assertEqual(list(lines["small: paper valid 120.7"].get_ydata()), [120.7, 120.7])
    self.assertNotIn("_b valid member 0", lines_by_label(plot.plot([two], members=False).axes[0]))

  def test_char_runs_plot_bits_per_character_against_the_course_seed(self):
    folder = write_metrics(os.path.join(self.create_tempdir().full_path, "c"),
                           synthetic_records(level="char"))
    fig = plot.plot([folder], preset="char_small")
    ax = fig.axes[0]
    self.assertEqual(ax.get_ylabel(), "bits per character")
    (reference,) = [l for l in ax.get_lines() if l.get_label().startswith("char_small")]
    self.assertAlmostEqual(reference.get_ydata()[0], math.log(282) / 5.6 / math.log(2))
    self.assertAlmostEqual(reference.get_ydata()[0], 1.4535, places=4)

  def test_word_and_char_runs_are_refused_together(self):
    root = self.create_tempdir().full_path
    word = write_metrics(os.path.join(root, "w"), synthetic_records())
    char = write_metrics(os.path.join(root, "c"), synthetic_records(level="char"))
    with self.assertRaisesRegex(plot.PlotError, "mix word and character"):
      plot.plot([word, char])

  def test_steps_per_epoch_from_the_records(self):
    self.assertEqual(plot.steps_per_epoch(synthetic_records(steps_per_epoch=37, lines=3)), 37)
    # One epoch that ended (validated, no cap) is exact too.
    self.assertEqual(plot.steps_per_epoch(synthetic_records(steps_per_epoch=37, epochs=1)), 37)
    # Stopped by --max_train_steps inside the first epoch (1327 steps, 10 lines an epoch): the
    # lines' spacing gives the epoch's length to within log_per_epoch steps.
    records = [{"step": s, "epoch": 1, "split": "train"} for s in (132, 264, 300)]
    records.append({"step": 300, "epoch": 1, "split": "valid"})
    estimate = plot.steps_per_epoch(records, {"max_train_steps": 300, "log_per_epoch": 10})
    self.assertBetween(estimate, 1327 - 10, 1327)

  def test_a_preset_is_recognised_from_the_saved_config(self):
    for name in config_lib.preset_names():
      saved = config_lib.preset(name).replace(dtype="bfloat16", seed=4, members=2).to_dict()
      self.assertEqual(plot.recognise(saved), name)
      self.assertIn(name, plot.REFERENCES)
    self.assertIsNone(plot.recognise(config_lib.preset("small").replace(hidden_size=64).to_dict()))
    self.assertIsNone(plot.recognise(None))

  def test_without_matplotlib_one_line_and_exit_1(self):
    folder = write_metrics(os.path.join(self.create_tempdir().full_path, "a"), synthetic_records())
    code = ("import sys; sys.modules['matplotlib'] = None\n"
            "from zaremba_jax import plot\n"
            f"sys.exit(plot.main([{folder!r}, '--out', 'x.png']))")
    result = subprocess.run([sys.executable, "-c", code], cwd=helpers.REPO, capture_output=True,
                            text=True, timeout=120)
    self.assertEqual(result.returncode, 1)
    self.assertEqual(result.stderr, "error: the plot needs matplotlib: pip install matplotlib\n")
    self.assertEqual(result.stdout, "")


if __name__ == "__main__":
  absltest.main()
