"""Reporter: the progress bar on a terminal leaves the lines and metrics.jsonl as they were;
metrics.jsonl is strict JSON; char summaries lead with bits per character; TensorBoard events."""

import io
import json
import math
import os
import struct
import subprocess
import sys
import types
from unittest import mock

from absl.testing import absltest

from zaremba_jax import reporting
from tests import helpers


class FakeTty(io.StringIO):

  def isatty(self):
    return True


def report_two_epochs(reporter):
  """What a run of two 90-step epochs with three progress lines each reports."""
  reporter.minutes = lambda: 1.5
  for epoch in (1, 2):
    for k in (1, 2, 3):
      reporter.train_progress(step=(epoch - 1) * 90 + 30 * k, epoch=epoch, fraction=k / 3,
                              nll_sum=200.0 / epoch, count=100, words_per_sec=1234.5,
                              learning_rate=1.0 / epoch, grad_norm=0.5)
    reporter.eval_result(step=epoch * 90, epoch=epoch, split="valid", nll_sum=180.0, count=100,
                         learning_rate=1.0 / epoch)
  reporter.eval_result(step=180, epoch=2, split="test", nll_sum=170.0, count=100,
                       learning_rate=float("nan"))


# The lines of report_two_epochs, as every stream that is not a terminal gets them.
WANT_FIRST_LINES = [
    "epoch   1   33.3%  train ppl      7.39  wps    1234  lr 1  grad norm   0.50  since beginning"
    " 1.5 min",
    "epoch   1   66.7%  train ppl      7.39  wps    1234  lr 1  grad norm   0.50  since beginning"
    " 1.5 min",
    "epoch   1  100.0%  train ppl      7.39  wps    1234  lr 1  grad norm   0.50  since beginning"
    " 1.5 min",
    "epoch   1  valid ppl      6.05  (100 tokens)  since beginning 1.5 min",
]


class ProgressBarTest(absltest.TestCase):

  def report(self, stream, **kwargs):
    workdir = self.create_tempdir().full_path
    report_two_epochs(reporting.Reporter(workdir, stream, **kwargs))
    return stream.getvalue(), helpers.read_metrics(workdir)

  def test_a_plain_stream_gets_the_lines_alone(self):
    text, _ = self.report(io.StringIO())
    lines = text.splitlines()
    self.assertEqual(lines[:4], WANT_FIRST_LINES)
    self.assertLen(lines, 9)
    self.assertNotIn("\r", text)
    self.assertEqual(text, self.report(io.StringIO(), bar=False)[0])

  def test_a_terminal_gets_a_bar_per_epoch_below_the_same_lines(self):
    plain, plain_metrics = self.report(io.StringIO())
    text, metrics = self.report(FakeTty())
    self.assertIn("epoch 1:  33%|", text)
    self.assertIn("30/90 steps", text)
    self.assertIn("epoch 2:  67%|", text)
    self.assertIn("ppl 7.39, wps 1234", text)
    # Every line is there, whole, in order; the bar is drawn between them and cleared.
    position = 0
    for line in plain.splitlines():
      position = text.index(line + "\n", position) + len(line)
    self.assertEqual(metrics, plain_metrics)  # not one byte of metrics.jsonl changes

  def test_without_tqdm_a_terminal_gets_the_lines_alone(self):
    plain, _ = self.report(io.StringIO())
    with mock.patch.dict(sys.modules, {"tqdm.auto": None}):  # import tqdm.auto fails
      text, _ = self.report(FakeTty())
    self.assertEqual(text, plain)

  def test_a_notebook_without_ipywidgets_gets_the_lines_alone(self):
    # tqdm.auto would fall back to a text bar there, its frames piling up in the cell's output.
    plain, _ = self.report(io.StringIO())
    fake_kernel = {"ipykernel.zmqshell": types.ModuleType("ipykernel.zmqshell")}
    with mock.patch.dict(sys.modules, fake_kernel), mock.patch("tqdm.notebook.IProgress", None):
      self.assertIsNone(reporting._tqdm_class())  # pylint: disable=protected-access
      text, _ = self.report(io.StringIO(), bar=True)
    self.assertEqual(text, plain)

  def test_a_process_that_imported_ipykernel_is_not_a_kernel(self):
    # jupyter_client imports ipykernel to find kernelspecs (the notebook tests do, in pytest's process).
    with mock.patch.dict(sys.modules, {"ipykernel": types.ModuleType("ipykernel")}):
      sys.modules.pop("ipykernel.zmqshell", None)
      self.assertFalse(reporting.in_jupyter_kernel())
    with mock.patch.dict(sys.modules, {"ipykernel.zmqshell": types.ModuleType("ipykernel.zmqshell")}):
      self.assertTrue(reporting.in_jupyter_kernel())

  def test_on_record_sees_each_record_once_as_written(self):
    seen = []
    workdir = self.create_tempdir().full_path
    reporter = reporting.Reporter(workdir, io.StringIO(), on_record=seen.append)
    report_two_epochs(reporter)
    self.assertEqual([r["split"] for r in seen], ["train"] * 3 + ["valid"] + ["train"] * 3 +
                     ["valid", "test"])
    metrics = helpers.read_metrics(workdir)
    self.assertEqual(seen, metrics)
    seen[0]["perplexity"] = 0.0  # a copy: the callback cannot change the run's records
    self.assertNotEqual(reporter.records[0]["perplexity"], 0.0)


class Waitable:
  """A stand-in for a call's metrics on the device: records when the bar waits for it."""

  def __init__(self, log, name):
    self.log, self.name = log, name

  def block_until_ready(self):
    self.log.append(self.name)
    return self


class BarPerCallTest(absltest.TestCase):

  def test_the_bar_moves_after_every_call_waiting_for_the_one_before(self):
    reporter = reporting.Reporter(None, FakeTty())
    reporter.steps_per_epoch = 90
    waited, positions = [], []
    for step in range(10, 30, 10):  # calls of 10 steps; the first progress line is at 30
      reporter.tick(step, 1, step / 90, Waitable(waited, step))
      bar = reporter._bar  # pylint: disable=protected-access
      positions.append(None if bar is None else bar.n)
    # After the call ending at 20 was started, the one ending at 10 has finished: 10 steps shown.
    self.assertEqual(positions, [None, 10])
    self.assertEqual(waited, [10])  # and the call in flight was not waited for
    reporter.train_progress(step=30, epoch=1, fraction=30 / 90, nll_sum=200.0, count=100,
                            words_per_sec=1234.5, learning_rate=1.0, grad_norm=0.5)
    self.assertEqual(reporter._bar.n, 30)  # pylint: disable=protected-access
    reporter.tick(40, 1, 40 / 90, Waitable(waited, 40))  # the line read every call before it
    reporter.tick(50, 1, 50 / 90, Waitable(waited, 50))
    self.assertEqual(reporter._bar.n, 40)  # pylint: disable=protected-access
    self.assertEqual(waited, [10, 40])
    self.assertIn("10/90 steps", reporter.stream.getvalue())

  def test_the_training_loop_ticks_after_every_call(self):
    from zaremba_jax import loop  # pylint: disable=import-outside-toplevel
    ticks = []

    class Recording(reporting.Reporter):
      def tick(self, step, epoch, fraction, metrics):
        ticks.append((step, epoch, fraction))
        super().tick(step, epoch, fraction, metrics)

    data = helpers.write_tiny_corpus(self.create_tempdir().full_path)
    config = helpers.tiny_config(max_max_epoch=2, steps_per_call=3, log_per_epoch=1)
    reporter = Recording(None, io.StringIO())
    loop.train_and_evaluate(config, data, None, reporter)
    steps_per_epoch = reporter.steps_per_epoch
    # Calls of 3 steps, then single steps where the epoch's end is nearer than 3.
    want, step = [], 0
    for epoch in (1, 2):
      window = 0
      while window < steps_per_epoch:
        count = 3 if steps_per_epoch - window >= 3 else 1
        window, step = window + count, step + count
        want.append((step, epoch, window / steps_per_epoch))
    self.assertEqual(ticks, want)

  def test_without_a_bar_nothing_waits(self):
    waited = []
    reporter = reporting.Reporter(None, io.StringIO())
    for step in (10, 20, 30):
      reporter.tick(step, 1, step / 90, Waitable(waited, step))
    self.assertEqual(waited, [])
    self.assertEqual(reporter.stream.getvalue(), "")


def refuse(constant):
  raise ValueError(f"{constant} is not JSON")


class StrictJsonTest(absltest.TestCase):

  def test_no_nan_nor_infinity_in_metrics_jsonl(self):
    workdir = self.create_tempdir().full_path
    reporter = reporting.Reporter(workdir, io.StringIO())
    report_two_epochs(reporter)  # its test result has learning_rate NaN
    reporter.train_progress(step=200, epoch=3, fraction=0.1, nll_sum=1e6, count=1,  # diverged
                            words_per_sec=1.0, learning_rate=0.25, grad_norm=float("nan"),
                            member_nll=[1e6, 2.0])
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
      records = [json.loads(line, parse_constant=refuse) for line in f]
    test = [r for r in records if r["split"] == "test"][0]
    self.assertNotIn("learning_rate", test)  # a test has no learning rate
    self.assertEqual(test["perplexity"], math.exp(1.7))
    diverged = records[-1]
    self.assertIsNone(diverged["perplexity"])
    self.assertIsNone(diverged["grad_norm"])
    self.assertEqual(diverged["member_perplexity"], [None, math.exp(2.0)])
    self.assertEqual(reporter.records, records)

  def test_records_of_older_runs_are_written_back_as_json(self):
    workdir = self.create_tempdir().full_path
    reporter = reporting.Reporter(workdir, io.StringIO())
    reporter.restore([{"step": 5, "split": "test", "perplexity": 9.0,
                       "learning_rate": float("nan")}])
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
      self.assertEqual([json.loads(line, parse_constant=refuse) for line in f],
                       [{"step": 5, "split": "test", "perplexity": 9.0, "learning_rate": None}])


class SummaryTest(absltest.TestCase):

  def test_a_char_summary_leads_with_bits_per_character(self):
    out = io.StringIO()
    reporter = reporting.Reporter(None, out, level="char")
    course = reporting.char_metrics(1.0, 1.0)["course_perplexity"]  # 1 nat a character
    reporter.summary(course, course, "wall time 1.0 min")
    bpc = 1 / math.log(2)
    self.assertEqual(out.getvalue(), f"summary: valid bpc {bpc:.4f} (course ppl {course:.2f})  test"
                     f" bpc {bpc:.4f} (course ppl {course:.2f})  wall time 1.0 min\n")
    out = io.StringIO()
    reporting.Reporter(None, out).summary(120.123, 114.987, "x")
    self.assertEqual(out.getvalue(), "summary: valid ppl 120.12  test ppl 114.99  x\n")


def read_event_scalars(folder):
  """{tag: [(step, value)]} of the TensorBoard event files in `folder`, read by hand: TFRecord
  framing (length, its CRC, the bytes, their CRC) around Event protos (tensorboardX's own)."""
  from tensorboardX.proto import event_pb2  # pylint: disable=import-outside-toplevel
  scalars = {}
  for name in sorted(os.listdir(folder)):
    with open(os.path.join(folder, name), "rb") as f:
      data = f.read()
    offset = 0
    while offset < len(data):
      (length,) = struct.unpack("<Q", data[offset:offset + 8])
      event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
      offset += 12 + length + 4
      for value in event.summary.value:
        scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
  return scalars


class TensorBoardTest(absltest.TestCase):

  def test_off_by_default(self):
    workdir = self.create_tempdir().full_path
    report_two_epochs(reporting.Reporter(workdir, io.StringIO()))
    self.assertEqual(os.listdir(workdir), ["metrics.jsonl"])

  def test_the_events_hold_the_records_numbers(self):
    try:
      import tensorboardX  # pylint: disable=import-outside-toplevel,unused-import
    except ImportError:
      self.skipTest("tensorboardX is not installed (pip install -r requirements-dev.txt)")
    workdir = self.create_tempdir().full_path
    reporter = reporting.Reporter(workdir, io.StringIO())
    reporter.open_tensorboard()
    report_two_epochs(reporter)
    reporter.close_tensorboard()
    scalars = read_event_scalars(os.path.join(workdir, reporting.TENSORBOARD_FOLDER))
    records = helpers.read_metrics(workdir)
    for split, name in (("train", "perplexity"), ("valid", "perplexity"), ("test", "perplexity"),
                        ("train", "learning_rate"), ("train", "words_per_sec")):
      want = [(r["step"], r[name]) for r in records if r["split"] == split]
      got = scalars[f"{split}/{name}"]
      self.assertEqual([s for s, _ in got], [s for s, _ in want], f"{split}/{name}")
      self.assertSequenceAlmostEqual([v for _, v in got], [v for _, v in want], places=4)
    self.assertNotIn("test/learning_rate", scalars)  # NaN, left out

  def test_a_run_with_tensorboard_writes_its_events(self):
    try:
      import tensorboardX  # pylint: disable=import-outside-toplevel,unused-import
    except ImportError:
      self.skipTest("tensorboardX is not installed (pip install -r requirements-dev.txt)")
    from zaremba_jax import loop  # pylint: disable=import-outside-toplevel
    data = helpers.write_tiny_corpus(self.create_tempdir().full_path)
    workdir = self.create_tempdir().full_path
    loop.train_and_evaluate(helpers.tiny_config(max_max_epoch=1, tensorboard=True), data, workdir,
                            reporting.Reporter(workdir, io.StringIO()))
    scalars = read_event_scalars(os.path.join(workdir, reporting.TENSORBOARD_FOLDER))
    valid = [r for r in helpers.read_metrics(workdir) if r["split"] == "valid"]
    self.assertEqual([s for s, _ in scalars["valid/perplexity"]], [r["step"] for r in valid])
    self.assertAlmostEqual(scalars["valid/perplexity"][-1][1], valid[-1]["perplexity"], places=3)

  def test_the_flag_without_tensorboardx_is_one_line(self):
    code = ("import sys; sys.modules['tensorboardX'] = None; sys.argv = ['zaremba-jax',"
            " '--tensorboard', '--workdir=x']\nfrom zaremba_jax import main; main.run()")
    run = subprocess.run([sys.executable, "-c", code], cwd=helpers.REPO, capture_output=True,
                         text=True, timeout=120)
    self.assertEqual(run.returncode, 1)
    self.assertEqual(run.stderr, "error: --tensorboard needs tensorboardX: pip install tensorboardX"
                     " (it is in requirements-dev.txt)\n")


if __name__ == "__main__":
  absltest.main()
