"""scripts/eval_protocols.py: its 'ours' is the package's validation number; the others differ."""

import io
import tempfile

from absl.testing import absltest

from scripts import eval_protocols
from tests import helpers
from zaremba_jax import evaluation
from zaremba_jax import loop
from zaremba_jax import reporting


class EvalProtocolsTest(absltest.TestCase):

  def test_ours_is_the_packages_number_and_the_others_differ(self):
    data = helpers.write_tiny_corpus(tempfile.mkdtemp(), n_lines=(400, 40, 40))
    workdir = tempfile.mkdtemp()
    config = helpers.tiny_config(max_max_epoch=1, hidden_size=16)
    loop.train_and_evaluate(config, data, workdir, reporting.Reporter(workdir, io.StringIO()))
    want = evaluation.evaluate_checkpoint(workdir, data, reporter=reporting.Reporter(None, io.StringIO()))
    got = eval_protocols.protocols(workdir, data)
    names = list(got)
    self.assertTrue(names[0].endswith("(ours)"))
    self.assertAlmostEqual(got[names[0]], want["valid"], delta=1e-4 * want["valid"])
    self.assertIn("  without <eos> targets", got)
    reset = [n for n in names if n.startswith("state reset")]
    self.assertLen(reset, 1)
    for name in names[1:]:
      self.assertNotAlmostEqual(got[name], got[names[0]], delta=1e-6, msg=name)


if __name__ == "__main__":
  absltest.main()
