"""The command line's error exits: each a status of 1 and one line on stderr saying what to do."""

import io
import os
import subprocess
import sys
import tempfile

from absl.testing import absltest
from absl.testing import parameterized

from zaremba_jax import loop
from zaremba_jax import reporting
from tests import helpers

# The processes run side by side (the slow part of each is importing jax), on the CPU so that no
# accelerator's start-up message joins stderr.
ENV = {**{k: v for k, v in os.environ.items() if k != "ZAREMBA_JAX_DATA"}, "JAX_PLATFORMS": "cpu"}


def start(*args):
  return subprocess.Popen([sys.executable, "-m", "zaremba_jax.main", *args], cwd=helpers.REPO,
                          env=ENV, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def finish(proc):
  stdout, stderr = proc.communicate(timeout=300)
  return proc.returncode, stdout, stderr


class ErrorExitTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.data = helpers.write_tiny_corpus(tempfile.mkdtemp(), n_lines=(60, 10, 10))
    cls.empty = tempfile.mkdtemp()
    cases = {
        "missing_workdir": ("--mode=evaluate",),
        "stray_arguments": ("--mode=train", "ptb.txt", "extra"),
        "data_error": ("--mode=train", f"--data_dir={cls.empty}",
                       f"--workdir={tempfile.mkdtemp()}"),
        "checkpoint_error": ("--mode=evaluate", f"--data_dir={cls.data}",
                             f"--workdir={tempfile.mkdtemp()}"),
    }
    running = {name: start(*args) for name, args in cases.items()}
    # Meanwhile, a checkpoint of each level: one train step, then stop (and save).
    cls.word_dir, cls.char_dir = tempfile.mkdtemp(), tempfile.mkdtemp()
    for level, workdir in (("word", cls.word_dir), ("char", cls.char_dir)):
      config = helpers.tiny_config(level=level, num_layers=1, hidden_size=8, steps_per_call=1)
      loop.train_and_evaluate(config, cls.data, workdir, reporting.Reporter(workdir, io.StringIO()),
                              stop_requested=lambda step: "stop")
    running["query_on_char_model"] = start("--mode=query", f"--workdir={cls.char_dir}")
    running["serve_on_word_model"] = start("--mode=serve", f"--workdir={cls.word_dir}")
    cls.results = {name: finish(proc) for name, proc in running.items()}

  @parameterized.named_parameters(
      (case, case, message) for case, message in (
          ("missing_workdir", r"--mode=evaluate needs --workdir"),
          ("stray_arguments", r"unexpected arguments: ptb\.txt extra"),
          ("data_error", r"--data_dir=.* lacks ptb\.train\.txt"),
          ("checkpoint_error", r"no checkpoint in .*; train there first"),
          ("query_on_char_model", r"--mode=query .* char-level"),
          ("serve_on_word_model", r"--mode=serve .* word-level")))
  def test_error_exit_is_status_1_and_one_line(self, case, message):
    rc, _, stderr = self.results[case]
    self.assertEqual(rc, 1, stderr)
    lines = stderr.splitlines()
    self.assertEqual(len(lines), 1, f"stderr should be one line; it has {len(lines)}, ending:\n"
                                    f"{stderr[-1000:]}")
    self.assertRegex(lines[0], r"^error: ")
    self.assertRegex(lines[0], message)


if __name__ == "__main__":
  absltest.main()
