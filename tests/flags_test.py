"""Flagfiles parse, later flags win, bad values are refused naming the flag."""

import glob
import os
import subprocess
import sys

from absl import flags
from absl.testing import absltest
from absl.testing import flagsaver
from absl.testing import parameterized

from zaremba_jax import config as config_lib
from zaremba_jax import main as main_lib
from tests import helpers

FLAGFILES = sorted(glob.glob(os.path.join(helpers.REPO, "experiments", "*.flags")))


class FlagsTest(parameterized.TestCase):

  def parse(self, *args):
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["main", *args])
    return main_lib.config_from_flags()

  def setUp(self):
    super().setUp()
    self.enter_context(flagsaver.flagsaver())
    cwd = os.getcwd()
    os.chdir(helpers.REPO)  # nested --flagfile paths are relative to the repository
    self.addCleanup(os.chdir, cwd)

  def test_there_are_flagfiles(self):
    names = {os.path.basename(f) for f in FLAGFILES}
    self.assertContainsSubset({"small.flags", "medium.flags", "large.flags", "word200.flags"},
                              names)

  @parameterized.parameters(*FLAGFILES)
  def test_flagfile_parses(self, path):
    config = self.parse(f"--flagfile={path}")
    self.assertIsInstance(config, config_lib.Config)
    with open(path) as f:
      self.assertTrue(f.readline().startswith("#"), "each flagfile opens with a header comment")

  def test_presets_are_the_papers(self):
    large = self.parse("--flagfile=experiments/large.flags")
    self.assertEqual((large.hidden_size, large.num_steps, large.dropout, large.init_scale,
                      large.max_epoch, large.max_max_epoch, large.lr_decay, large.max_grad_norm),
                     (1500, 35, 0.65, 0.04, 14, 55, 1.15, 10.0))
    medium = self.parse("--flagfile=experiments/medium.flags")
    self.assertEqual((medium.hidden_size, medium.dropout, medium.max_epoch, medium.max_max_epoch,
                      medium.lr_decay), (650, 0.5, 6, 39, 1.2))
    small = self.parse("--flagfile=experiments/small.flags")
    self.assertEqual((small.hidden_size, small.num_steps, small.dropout, small.max_epoch,
                      small.max_max_epoch, small.lr_decay), (200, 20, 0.0, 4, 13, 2.0))
    word200 = self.parse("--flagfile=experiments/word200.flags")
    self.assertEqual((word200.hidden_size, word200.num_steps), (200, 50))

  def test_later_flags_override_the_flagfile(self):
    config = self.parse("--flagfile=experiments/large.flags", "--hidden_size=32")
    self.assertEqual(config.hidden_size, 32)
    self.assertEqual(config.dropout, 0.65)

  @parameterized.parameters(("--hidden_size=0", "hidden_size"), ("--batch_size=-2", "batch_size"),
                            ("--dropout=1.0", "dropout"), ("--dropout=-0.1", "dropout"),
                            ("--mode=dance", "mode"), ("--level=byte", "level"),
                            ("--num_steps=0", "num_steps"))
  def test_bad_values_are_refused_at_parse_time(self, arg, name):
    with self.assertRaisesRegex(flags.Error, name):
      self.parse(arg)

  def test_config_validates_too(self):
    with self.assertRaisesRegex(ValueError, "--dropout"):
      config_lib.Config(dropout=1.5)
    with self.assertRaisesRegex(ValueError, "--hidden_size"):
      config_lib.Config(hidden_size=0)

  def test_command_line_error_is_one_clear_line(self):
    for arg, name in (("--dropout=1.5", "dropout"), ("--members=0", "members"),
                      ("--no_such_flag=1", "no_such_flag")):
      run = subprocess.run([sys.executable, "-m", "zaremba_jax.main", arg],
                           cwd=helpers.REPO, capture_output=True, text=True, timeout=120)
      self.assertEqual(run.returncode, 1, arg)
      lines = run.stderr.strip().splitlines()
      self.assertLen(lines, 1, f"{arg}: {run.stderr}")
      self.assertTrue(lines[0].startswith("error: "), lines[0])
      self.assertIn(name, lines[0])


if __name__ == "__main__":
  absltest.main()
