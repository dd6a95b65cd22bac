"""query_sentences, the next-character serve protocol, and sampling, on tiny trained models."""

import io
import math
import os
import subprocess
import sys
import tempfile

import jax.numpy as jnp
import numpy as np
from absl.testing import absltest
from absl.testing import parameterized

from zaremba_jax import checkpoint as checkpoint_lib
from zaremba_jax import data as data_lib
from zaremba_jax import evaluation
from zaremba_jax import loop
from zaremba_jax import reporting
from zaremba_jax import sample
from tests import helpers


def train_tiny(level, data, workdir):
  config = helpers.tiny_config(level=level, max_max_epoch=3, max_epoch=3, hidden_size=48, batch_size=8,
                               num_steps=10)
  return loop.train_and_evaluate(config, data, workdir, reporting.Reporter(workdir, io.StringIO()))


class SampleTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.data = helpers.write_tiny_corpus(tempfile.mkdtemp(), n_lines=(2000, 40, 40))
    cls.word_dir, cls.char_dir = tempfile.mkdtemp(), tempfile.mkdtemp()
    train_tiny("word", cls.data, cls.word_dir)
    train_tiny("char", cls.data, cls.char_dir)
    cls.word = checkpoint_lib.load_trained(cls.word_dir, say=lambda _: None)
    cls.char = checkpoint_lib.load_trained(cls.char_dir, say=lambda _: None)

  def test_query_sentences_greedy_follows_the_corpus(self):
    # The corpus counts up ("w2 w3 w4 ..."), so a trained model continues the count.
    (done,) = sample.query_sentences(self.word, ["2 w1 w2"])
    self.assertEqual(done.split()[:3], ["w1", "w2", "w3"])
    self.assertLen(done.split(), 4)

  def test_query_sampling_is_seeded(self):
    a = sample.query_sentences(self.word, ["6 w1"], temperature=1.5, seed=3)
    b = sample.query_sentences(self.word, ["6 w1"], temperature=1.5, seed=3)
    self.assertEqual(a, b)
    self.assertLen(a[0].split(), 7)

  def test_query_loop_errors_and_goes_on(self):
    stdin = io.StringIO("3 w1 w2\nfoo w1\n\n0 w1\n2 zebra w1\n500 w1\n")
    stdout, stderr = io.StringIO(), io.StringIO()
    rc = sample.run_query(self.word, stdin, stdout, stderr, 0.0, 0, 0, max_query_len=7)
    self.assertEqual(rc, 0)
    lines = stdout.getvalue().splitlines()
    self.assertEqual([len(l.split()) for l in lines], [5, 4, 8])
    self.assertNotIn("Query:", stdout.getvalue())  # no prompt when stdin is not a terminal
    err = stderr.getvalue()
    self.assertIn("'foo w1' must start with a positive integer", err)
    self.assertIn("empty query", err)
    self.assertIn("'0 w1' must start with a positive integer", err)
    self.assertIn("read as <unk>: zebra", err)
    self.assertIn("predicting 7 words, not 500", err)

  def test_serve_protocol_matches_evaluate(self):
    self.assert_serve_matches_evaluate(self.char, dtype=None)

  def test_bfloat16_serve_matches_bfloat16_evaluate(self):
    # One token at a time (native products where they run) against the test stream's kernels.
    char = checkpoint_lib.load_trained(self.char_dir, say=lambda _: None, dtype="bfloat16")
    self.assert_serve_matches_evaluate(char, dtype="bfloat16")

  def test_weights_cast_once_give_the_same_numbers(self):
    word = checkpoint_lib.load_trained(self.word_dir, say=lambda _: None, dtype="bfloat16")
    predictor = sample.Predictor(word)
    self.assertEqual(predictor.params["lstm_0"]["w_hh"].dtype, jnp.bfloat16)
    self.assertEqual(predictor.params["lstm_0"]["b"].dtype, jnp.float32)
    tokens_1xT = np.array([[1, 2, 3]], np.int32)
    got, _ = predictor._feed(predictor.params, tokens_1xT, predictor.start())
    want, _ = predictor._feed(word.params, tokens_1xT, predictor.start())
    np.testing.assert_array_equal(got, want)

  def assert_serve_matches_evaluate(self, trained, dtype):
    corpus = data_lib.load_corpus(self.data, "char")
    tokens = [corpus.vocab[i] for i in corpus.test]
    stdin = io.StringIO("".join(t + "\n" for t in tokens))
    stdout, stderr = io.StringIO(), io.StringIO()
    self.assertEqual(sample.run_serve(trained, stdin, stdout, stderr), 0)
    lines = stdout.getvalue().splitlines()
    self.assertEqual(lines[0], "OK GO")
    self.assertLen(lines, len(tokens) + 1)
    nll = 0.0
    for k, line in enumerate(lines[1:]):
      logprobs = np.array([float(x) for x in line.split(" ")])
      self.assertLen(logprobs, len(corpus.vocab))
      self.assertAlmostEqual(np.exp(logprobs).sum(), 1.0, places=4)
      if k + 1 < len(tokens):
        nll -= logprobs[corpus.vocab.index(tokens[k + 1])]
    course = math.exp(5.6 * nll / (len(tokens) - 1))
    # The checkpoint served is the best by validation, not necessarily the last one trained.
    evaluated = evaluation.evaluate_checkpoint(self.char_dir, self.data, dtype=dtype,
                                         reporter=reporting.Reporter(None, io.StringIO()))
    self.assertAlmostEqual(course / evaluated["test"], 1.0, delta=1e-3)
    self.assertEqual(stderr.getvalue(), "")

  def test_serve_unknown_token_still_answers(self):
    stdin = io.StringIO("w\nQ\n1\n")
    stdout, stderr = io.StringIO(), io.StringIO()
    sample.run_serve(self.char, stdin, stdout, stderr)
    lines = stdout.getvalue().splitlines()
    self.assertLen(lines, 4)
    self.assertEqual(lines[1], lines[2])  # the unknown token left the state alone
    self.assertIn("unknown token 'Q'", stderr.getvalue())

  def test_sample_renders_chars_and_words(self):
    out = io.StringIO()
    sample.run_sample(self.char, "w1 w2", 30, 0.0, 0, 0, stdout=out, stderr=io.StringIO())
    self.assertTrue(out.getvalue().startswith("w1 w2"))
    self.assertNotIn("_", out.getvalue())
    out = io.StringIO()
    sample.run_sample(self.word, "w1", 12, 1.0, 5, 0, stdout=out, stderr=io.StringIO())
    self.assertNotIn("<eos>", out.getvalue())
    self.assertGreater(len(out.getvalue().split()), 3)

  def test_command_line_query(self):
    run = subprocess.run([sys.executable, "-m", "zaremba_jax.main", "--mode=query",
                          f"--workdir={self.word_dir}"], input="5 w1 w2 w3\nbad\n",
                         capture_output=True, text=True, cwd=helpers.REPO, timeout=300)
    self.assertEqual(run.returncode, 0, run.stderr[-2000:])
    self.assertEqual([len(l.split()) for l in run.stdout.splitlines()], [8])
    self.assertIn("error: query 'bad'", run.stderr)

  def test_command_line_sample_defaults_to_the_apis_temperature(self):
    # One default for both: 1.0 (the model's own distribution), not greedy.
    from zaremba_jax import api  # pylint: disable=import-outside-toplevel
    run = subprocess.run([sys.executable, "-m", "zaremba_jax.main", "--mode=sample",
                          f"--workdir={self.word_dir}", "--prime=w1 w2", "--sample_len=40"],
                         capture_output=True, text=True, cwd=helpers.REPO, timeout=300)
    self.assertEqual(run.returncode, 0, run.stderr[-2000:])
    self.assertEqual(sample.SAMPLE_TEMPERATURE, 1.0)
    self.assertEqual(run.stdout, api.sample(self.word, prime="w1 w2", length=40) + "\n")
    self.assertEqual(run.stdout, api.sample(self.word, prime="w1 w2", length=40,
                                            temperature=1.0) + "\n")
    self.assertNotEqual(run.stdout, api.sample(self.word, prime="w1 w2", length=40,
                                               temperature=0.0) + "\n")

  def test_command_line_serve_starts_with_ok_go(self):
    run = subprocess.run([sys.executable, "-m", "zaremba_jax.main", "--mode=serve",
                          f"--workdir={self.char_dir}"], input="w\n1\n",
                         capture_output=True, text=True, cwd=helpers.REPO, timeout=300)
    self.assertEqual(run.returncode, 0, run.stderr[-2000:])
    lines = run.stdout.splitlines()
    self.assertEqual(lines[0], "OK GO")
    self.assertLen(lines, 3)


class ChooseTest(parameterized.TestCase):
  """sample.choose against distributions computed by hand: p_i^(1/T) over the k most likely."""

  PROBS = np.array([0.05, 0.30, 0.10, 0.40, 0.15])

  @parameterized.named_parameters(
      ("t1_all", 1.0, 0, [0.05, 0.30, 0.10, 0.40, 0.15]),
      ("t2_all", 2.0, 0, np.sqrt([0.05, 0.30, 0.10, 0.40, 0.15])),
      ("t_half_all", 0.5, 0, np.square([0.05, 0.30, 0.10, 0.40, 0.15])),
      ("t1_top3", 1.0, 3, [0, 0.30, 0, 0.40, 0.15]),
      ("t2_top2", 2.0, 2, np.sqrt([0, 0.30, 0, 0.40, 0])),
      ("t1_top1", 1.0, 1, [0, 0, 0, 1, 0]),
      ("t1_top_k_past_vocab", 1.0, 9, [0.05, 0.30, 0.10, 0.40, 0.15]))
  def test_draws_follow_the_hand_computed_distribution(self, temperature, top_k, weights):
    p = np.asarray(weights, np.float64) / np.sum(weights)
    n = 2000
    # The same seeded stream drawn through rng.choice with the hand-computed probabilities must
    # pick the same tokens: one uniform a draw, against p's cumulative sums.
    got_rng, want_rng = np.random.default_rng(5), np.random.default_rng(5)
    got = [sample.choose(np.log(self.PROBS), temperature, top_k, got_rng) for _ in range(n)]
    want = [int(want_rng.choice(len(p), p=p)) for _ in range(n)]
    np.testing.assert_array_equal(got, want)
    # And the frequencies are p's (a loose check of the reference itself).
    freq = np.bincount(got, minlength=len(p)) / n
    np.testing.assert_allclose(freq, p, atol=0.04)

  @parameterized.parameters(0, 2)
  def test_temperature_zero_is_argmax(self, top_k):
    rng = np.random.default_rng(0)
    self.assertEqual(sample.choose(np.log(self.PROBS), 0.0, top_k, rng), 3)
    self.assertEqual(sample.choose(np.log(self.PROBS[::-1]), 0.0, top_k, rng), 1)


if __name__ == "__main__":
  absltest.main()
