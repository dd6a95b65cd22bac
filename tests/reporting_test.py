"""Reporter: the progress bar on a terminal leaves the lines and metrics.jsonl as they were."""

import io
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
    self.assertEqual(seen[:-1], metrics[:-1])  # (the test record's NaN is unequal to itself)
    seen[0]["perplexity"] = 0.0  # a copy: the callback cannot change the run's records
    self.assertNotEqual(reporter.records[0]["perplexity"], 0.0)


if __name__ == "__main__":
  absltest.main()
