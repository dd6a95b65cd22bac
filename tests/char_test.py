"""Character-level PTB: the derived stream against the course's own file, and char metrics."""

import io
import math
import os

import numpy as np
from absl.testing import absltest

from zaremba_jax import data as data_lib
from zaremba_jax import loop
from zaremba_jax import reporting
from tests import helpers


class CharDataTest(absltest.TestCase):

  def test_derived_valid_stream_equals_the_course_file(self):
    course = os.path.join(helpers.PTB_DIR, "ptb.char.valid.txt")
    if not helpers.HAVE_PTB or not os.path.isfile(course):
      self.skipTest(helpers.NO_PTB_REASON)
    want = data_lib.read_course_char_file(course)
    got = data_lib.read_chars(os.path.join(helpers.PTB_DIR, "ptb.valid.txt"))
    self.assertLen(want, 393_042)
    self.assertEqual(got, want)
    corpus = data_lib.load_corpus(helpers.PTB_DIR, "char")
    self.assertEqual(corpus.vocab_size, 50)
    self.assertEqual(corpus.vocab[:4], ("a", "e", "r", "_"))  # " aer banknote ..." comes first
    self.assertEqual([corpus.vocab[i] for i in corpus.valid[:10]], want[:10])

  def test_chars_by_hand(self):
    folder = self.create_tempdir().full_path
    path = os.path.join(folder, "f.txt")
    with open(path, "w") as f:
      f.write(" ab <unk> \n c\n")
    self.assertEqual(data_lib.read_chars(path),
                     ["a", "b", "_", "<", "u", "n", "k", ">", "<eos>", "c", "<eos>"])

  def test_course_metrics(self):
    # 1 nat a character: 1/ln 2 bits, and exp(5.6) course perplexity.
    m = reporting.char_metrics(nll_sum=10.0, count=10)
    self.assertAlmostEqual(m["bpc"], 1.0 / math.log(2))
    self.assertAlmostEqual(m["course_perplexity"], math.exp(5.6))


class CharRunTest(absltest.TestCase):

  def test_char_run_reports_bpc_and_course_perplexity(self):
    data = helpers.write_tiny_corpus(self.create_tempdir().full_path)
    workdir = self.create_tempdir().full_path
    out = io.StringIO()
    config = helpers.tiny_config(level="char", max_max_epoch=1, num_steps=10)
    result = loop.train_and_evaluate(config, data, workdir, reporting.Reporter(workdir, out))
    text = out.getvalue()
    self.assertRegex(text, r"valid bpc \d\.\d{4}  course ppl")
    self.assertRegex(text, r"summary: valid bpc [\d.]+ \(course ppl [\d.]+\)  test bpc [\d.]+"
                     r" \(course ppl [\d.]+\) .*chars/s")
    records = helpers.read_metrics(workdir)
    test = [r for r in records if r["split"] == "test"][-1]
    self.assertAlmostEqual(test["course_perplexity"], result["test"])
    self.assertAlmostEqual(math.log(test["course_perplexity"]) / 5.6,
                           test["bpc"] * math.log(2), places=6)


if __name__ == "__main__":
  absltest.main()
