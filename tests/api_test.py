"""zaremba_jax.api: README.md's example as written, and each function on tiny runs."""

import contextlib
import io
import json
import os
import re
import tempfile
from unittest import mock

import numpy as np
from absl.testing import absltest

import zaremba_jax
from zaremba_jax import api
from zaremba_jax import checkpoint as checkpoint_lib
from zaremba_jax import config as config_lib
from zaremba_jax import sample as sample_lib
from tests import helpers

TIMING = ("words_per_sec", "minutes")


def as_json(records, timed=True):
  """Records as JSON lines, to compare (timing fields left out with timed=False)."""
  return [json.dumps({k: v for k, v in r.items() if timed or k not in TIMING}) for r in records]


def readme_example() -> str:
  """The python block between <!-- api-example --> and <!-- /api-example --> in README.md."""
  with open(os.path.join(helpers.REPO, "README.md"), encoding="utf-8") as f:
    text = f.read()
  found = re.search(r"<!-- api-example -->\s*```python\n(.*?)```\s*<!-- /api-example -->", text,
                    re.DOTALL)
  assert found, "README.md has no ```python block between <!-- api-example --> markers"
  return found.group(1)


class ReadmeExampleTest(absltest.TestCase):

  def test_readme_example_runs_as_written(self):
    code = readme_example()
    data = helpers.write_tiny_corpus(self.create_tempdir().full_path, n_lines=(2000, 100, 100))
    here = os.getcwd()
    os.chdir(self.create_tempdir().full_path)  # the example writes runs/api-demo
    out = io.StringIO()
    try:
      with mock.patch.dict(os.environ, {"ZAREMBA_JAX_DATA": data}), contextlib.redirect_stdout(out):
        namespace = {}
        exec(compile(code, "README.md (api-example)", "exec"), namespace)  # pylint: disable=exec-used
      workdir = os.path.abspath("runs/api-demo")
      records = helpers.read_metrics(workdir)
    finally:
      os.chdir(here)
    # What the example says it does: 20 steps, the records handed to the callback as written.
    self.assertEqual(namespace["trained"].step, 20)
    # (api.evaluate appended its own valid and test records after the run's.)
    self.assertEqual(as_json(namespace["records"]), as_json(records[:len(namespace["records"])]))
    self.assertEqual(namespace["records"][-1]["split"], "test")
    self.assertIn("valid ", out.getvalue())
    self.assertLen(re.findall(r"^\s+\S+ 0\.\d{3}$", out.getvalue(), re.MULTILINE), 5)


class ApiTest(absltest.TestCase):
  maxDiff = None

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.data = helpers.write_tiny_corpus(tempfile.mkdtemp(), n_lines=(1000, 40, 40))
    cls.config = helpers.tiny_config(max_max_epoch=2, max_epoch=1, hidden_size=32, dropout=0.2,
                                     log_per_epoch=4)
    cls.word_dir = tempfile.mkdtemp()
    cls.seen = []
    cls.result = api.train(cls.config, cls.word_dir, cls.data, callback=cls.seen.append,
                           progress=False)
    cls.word = api.load(cls.word_dir)
    cls.char_dir = tempfile.mkdtemp()
    api.train(cls.config.replace(level="char", max_train_steps=30), cls.char_dir, cls.data,
              progress=False)
    cls.char = api.load(cls.char_dir)

  def test_package_exports(self):
    self.assertIs(zaremba_jax.load, api.load)
    self.assertIs(zaremba_jax.next_token_distribution, api.next_token_distribution)
    self.assertTrue(callable(api.train))

  def test_preset_is_the_flagfile_and_replace_changes_fields(self):
    small = api.preset("small")
    self.assertEqual(small, config_lib.Config())  # the defaults are the paper's small model
    self.assertEqual(api.preset("word200").num_steps, 50)
    changed = small.replace(hidden_size=64, max_train_steps=20)
    self.assertEqual((changed.hidden_size, changed.max_train_steps, changed.num_layers), (64, 20, 2))

  def test_callback_gets_every_record_as_written(self):
    written = helpers.read_metrics(self.word_dir)[:len(self.seen)]  # evaluate appends its own
    self.assertEqual(as_json(self.seen), as_json(written))
    self.assertEqual(as_json(self.result["records"]), as_json(written))
    self.assertEqual([r["split"] for r in written if r["split"] != "train"],
                     ["valid", "valid", "test"])
    self.assertIsNone(self.result["stopped"])
    self.assertEqual(self.result["test"], written[-1]["perplexity"])

  def test_callback_returning_true_stops_like_sigterm_and_train_resumes(self):
    workdir = self.create_tempdir().full_path
    first_valid = lambda r: r["split"] == "valid"
    stopped = api.train(self.config, workdir, self.data, callback=first_valid, progress=False)
    self.assertEqual(stopped["stopped"], "stopped by the callback")
    self.assertNotIn("valid", stopped)
    # The rest of the call of train steps after the validation ran, then the run saved and stopped.
    end_of_epoch_1 = next(r["step"] for r in stopped["records"] if r["split"] == "valid")
    saved = max(checkpoint_lib.Checkpointer(workdir).steps())
    self.assertBetween(saved, end_of_epoch_1 + 1, end_of_epoch_1 + self.config.steps_per_call)
    resumed = api.train(self.config, workdir, self.data, progress=False)
    self.assertIsNone(resumed["stopped"])
    self.assertEqual((resumed["valid"], resumed["test"]), (self.result["valid"], self.result["test"]))
    self.assertEqual(as_json(helpers.read_metrics(workdir), timed=False),
                     as_json(self.result["records"], timed=False))

  def test_stop_training_exception_stops_at_the_progress_line(self):
    def stop(record):
      raise api.StopTraining
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
      stopped = api.train(self.config, self.create_tempdir().full_path, self.data, callback=stop)
    self.assertEqual(stopped["stopped"], "stopped by the callback")
    self.assertLen(stopped["records"], 1)  # the first progress line
    step = stopped["records"][0]["step"]
    self.assertIn(f"stopped by the callback: saved step {step}", out.getvalue())

  def test_progress_false_prints_nothing_and_a_late_stop_finds_the_run_done(self):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
      result = api.train(self.config.replace(max_train_steps=3), None, self.data, progress=False,
                         callback=lambda r: r["split"] == "test")
    self.assertEqual(out.getvalue(), "")
    self.assertIsNone(result["stopped"])
    self.assertIn("test", result)

  def test_load_and_evaluate_read_the_best_checkpoint(self):
    valid = {r["step"]: r["perplexity"] for r in self.result["records"] if r["split"] == "valid"}
    best_step = min(valid, key=valid.get)
    self.assertEqual(self.word.step, best_step)
    with contextlib.redirect_stdout(io.StringIO()):
      result = api.evaluate(self.word_dir, self.data)
      twice = api.evaluate(f"{self.word_dir},{self.word_dir}", self.data)
    self.assertEqual(result["step"], best_step)
    self.assertAlmostEqual(result["valid"], valid[best_step], places=5)
    # Two copies of one model average to that model.
    self.assertAlmostEqual(twice["valid"], result["valid"], places=4)

  def test_next_token_distribution_sums_to_one_and_matches_the_predictor(self):
    dist = api.next_token_distribution(self.word, "w1 w2")
    tokens = [t for t, _ in dist]
    probs = np.array([p for _, p in dist])
    self.assertCountEqual(tokens, self.word.vocab)
    self.assertAlmostEqual(probs.sum(), 1.0, places=5)
    self.assertTrue(np.all(np.diff(probs) <= 0))  # most likely first
    # The same distribution fed one token at a time, the state carried by hand.
    predictor = sample_lib.Predictor(self.word)
    carry = predictor.start()
    for word in ("w1", "w2"):
      logprobs, carry = predictor.feed([predictor.index[word]], carry)
    want = np.exp(np.asarray(logprobs, np.float64))
    got = dict(dist)
    np.testing.assert_allclose([got[t] for t in predictor.vocab], want, rtol=1e-5, atol=1e-7)
    self.assertEqual(api.next_token_distribution(self.word, "w1 w2", top=3), dist[:3])

  def test_next_token_distribution_of_characters_and_of_nothing(self):
    predictor = sample_lib.Predictor(self.char)
    ids = [predictor.index[c] for c in "w1_w"]  # a space is "_"
    logprobs, _ = predictor.feed(ids, predictor.start())
    got = dict(api.next_token_distribution(self.char, "w1 w"))
    np.testing.assert_allclose([got[t] for t in predictor.vocab],
                               np.exp(np.asarray(logprobs, np.float64)), rtol=1e-5, atol=1e-7)
    # An empty prompt is the start of a sentence: the distribution after <eos>.
    logprobs, _ = predictor.feed([predictor.index["<eos>"]], predictor.start())
    got = dict(api.next_token_distribution(self.char, ""))
    np.testing.assert_allclose([got[t] for t in predictor.vocab],
                               np.exp(np.asarray(logprobs, np.float64)), rtol=1e-5, atol=1e-7)

  def test_sample_is_seeded_and_greedy_at_temperature_zero(self):
    a = api.sample(self.word, prime="w1 w2", length=30, seed=3)
    self.assertEqual(a, api.sample(self.word, prime="w1 w2", length=30, seed=3))
    self.assertNotEqual(a, api.sample(self.word, prime="w1 w2", length=30, seed=4))
    self.assertEqual(a.split()[:2], ["w1", "w2"])
    ids = [self.word.vocab.index(w) for w in ("w1", "w2")]
    greedy = sample_lib.generate(sample_lib.Predictor(self.word), ids, 12, temperature=0.0)
    self.assertEqual(api.sample(self.word, prime="w1 w2", length=12, temperature=0.0),
                     sample_lib.render(self.word, ids + greedy).rstrip(" "))
    text = api.sample(self.char, prime="w1 w", length=40, seed=0)
    self.assertTrue(text.startswith("w1 w"))

  def test_query_sentences_is_the_command_lines(self):
    queries = ["3 w1 w2", "2 w4"]
    self.assertEqual(api.query_sentences(self.word, queries),
                     sample_lib.query_sentences(self.word, queries))
    self.assertEqual(api.query_sentences(self.word, "3 w1 w2"), api.query_sentences(self.word,
                                                                                    queries[:1]))


if __name__ == "__main__":
  absltest.main()
