"""The neural cache and dynamic evaluation (test_time.py): off equals plain, small cases by hand,
no target read before it is scored, and the command's rows."""

import io
import os
import tempfile

import jax
import numpy as np
from absl.testing import absltest

from zaremba_jax import data as data_lib
from zaremba_jax import evaluation
from zaremba_jax import loop
from zaremba_jax import members as members_lib
from zaremba_jax import model as model_lib
from zaremba_jax import reporting
from zaremba_jax import test_time
from zaremba_jax import train as train_lib
from tests import helpers

VOCAB = 30


def tiny_members(members=1, **changes):
  config = helpers.tiny_config(**changes)
  model = model_lib.make_model(config, VOCAB)
  params = members_lib.stack([model_lib.init_params(model, jax.random.key(seed))
                              for seed in range(members)])
  return config, model, params


def hand_cache(nll_P, h_PxH, targets_P, window, theta, lam):
  """The cache mixture position by position, in float64, as Grave et al. write it."""
  out = []
  for t, nll in enumerate(nll_P):
    past = np.arange(max(0, t - window), t)
    if not len(past):
      out.append(nll)
      continue
    scores = theta * (h_PxH[past] @ h_PxH[t])
    weights = np.exp(scores - scores.max())
    weights /= weights.sum()
    p_cache = weights[targets_P[past] == targets_P[t]].sum()
    out.append(-np.log((1 - lam) * np.exp(-nll) + lam * p_cache))
  return np.array(out)


class CacheTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.config, cls.model, cls.params = tiny_members()
    # A stream that repeats itself, so that the cache has words to find.
    rng = np.random.default_rng(0)
    cls.stream = np.tile(rng.integers(0, VOCAB, 37), 8).astype(np.int32)
    cls.scorer = test_time.Scorer(cls.model, cls.config.test_chunk)
    cls.nll, cls.h, cls.targets = cls.scorer.outputs(cls.params, cls.stream)

  def test_plain_outputs_are_the_evaluations_nll(self):
    windows = data_lib.eval_windows(data_lib.batchify(self.stream, 1), self.config.test_chunk)
    planned = model_lib.planned_for(self.model, 1, windows[0].size)
    _, nll_NxBxT, count = train_lib.evaluate(jax.tree.map(lambda x: x[0], self.params), *windows,
                                             model=planned)
    want = np.asarray(nll_NxBxT).reshape(-1)[:int(count)]
    np.testing.assert_array_equal(self.nll[0], want)

  def test_lambda_zero_is_the_plain_model_to_the_last_bit(self):
    mixed = test_time.with_cache(self.nll, self.h, self.targets,
                                 test_time.Cache(window=50, theta=1.0, lam=0.0))
    np.testing.assert_array_equal(mixed, self.nll)

  def test_window_of_one_step_by_hand(self):
    lam = 0.25
    mixed = test_time.with_cache(self.nll, self.h, self.targets,
                                 test_time.Cache(window=1, theta=0.7, lam=lam))
    same = np.r_[False, self.targets[1:] == self.targets[:-1]]
    want = -np.log((1 - lam) * np.exp(-self.nll[0].astype(np.float64)) + lam * same)
    want[0] = self.nll[0][0]  # no earlier position: the model alone
    np.testing.assert_allclose(mixed[0], want, rtol=2e-6)

  def test_windows_across_blocks_by_hand(self):
    h = np.asarray(self.h[0], np.float64)
    for window in (3, 40, 500):  # within a block, across blocks (block 16), the whole stream
      got = test_time.cache_nll(self.nll[0], self.h[0], self.targets, 0.5, 0.3, window=window,
                                block=16)
      want = hand_cache(self.nll[0].astype(np.float64), h, self.targets, window, 0.5, 0.3)
      np.testing.assert_allclose(got, want, rtol=2e-5, err_msg=f"window {window}")


class DynamicTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.config, cls.model, cls.params = tiny_members()
    rng = np.random.default_rng(1)
    cls.stream = np.tile(rng.integers(0, VOCAB, 23), 10).astype(np.int32)
    cls.train_stream = rng.integers(0, VOCAB, 400).astype(np.int32)
    cls.scorer = test_time.Scorer(cls.model, cls.config.test_chunk)
    cls.plain, _, cls.targets = cls.scorer.outputs(cls.params, cls.stream)

  def dynamic(self, stream, **settings):
    settings = test_time.Dynamic(ms_windows=4, ms_batch=4, **settings)
    ms = self.scorer.mean_square_gradients(self.params, self.train_stream, settings)
    return self.scorer.outputs(self.params, stream, settings, ms)

  def test_learning_rate_zero_is_the_plain_model(self):
    for rms in (True, False):
      nll, _, targets = self.dynamic(self.stream, lr=0.0, decay=0.5, rms=rms)
      np.testing.assert_array_equal(targets, self.targets)
      # The same numbers, through the gradient's forward kernels instead of the evaluation's.
      np.testing.assert_allclose(nll, self.plain, rtol=1e-6, atol=1e-6)

  def test_it_learns_a_repeating_stream(self):
    for rms, lr in ((True, 0.003), (False, 0.5)):
      nll, _, _ = self.dynamic(self.stream, lr=lr, decay=0.0, rms=rms)
      self.assertLess(nll[0][-60:].sum(), 0.95 * self.plain[0][-60:].sum(), f"rms={rms}")

  def test_no_target_is_read_before_it_is_scored(self):
    later = 101
    changed = self.stream.copy()
    changed[later] = (changed[later] + 1) % VOCAB
    for dynamic in (None, test_time.Dynamic(lr=0.003, decay=0.01, ms_windows=4, ms_batch=4)):
      ms = (self.scorer.mean_square_gradients(self.params, self.train_stream, dynamic)
            if dynamic else None)
      scores = []
      for stream in (self.stream, changed):
        nll, h, targets = self.scorer.outputs(self.params, stream, dynamic, ms)
        scores.append(test_time.with_cache(nll, h, targets,
                                           test_time.Cache(window=50, theta=1.0, lam=0.3))[0])
      # Position t scores token t + 1: every score before the changed token's stays put.
      np.testing.assert_array_equal(scores[0][:later - 1], scores[1][:later - 1])
      self.assertNotEqual(scores[0][later - 1], scores[1][later - 1])


class CommandTest(absltest.TestCase):
  """`evaluate_test_time` on a trained two-member run: its rows, and plain = the evaluation."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    root = tempfile.mkdtemp()
    cls.data = helpers.write_tiny_corpus(root)
    cls.workdir = os.path.join(root, "run")
    config = helpers.tiny_config(members=2, max_train_steps=40)
    loop.train_and_evaluate(config, cls.data, cls.workdir,
                            reporting.Reporter(cls.workdir, io.StringIO()))

  def test_rows_and_the_plain_row(self):
    lines = []
    result = evaluation.evaluate_test_time(
        self.workdir, self.data,
        caches=[test_time.Cache(window=w, theta=1.0, lam=0.1) for w in (10, 50)],
        dynamics=[test_time.Dynamic(lr=lr, ms_windows=4) for lr in (0.0, 0.001)],
        say=lines.append, bar=False)
    self.assertEqual(set(result), {"plain", "cache", "dynamic", "both"})
    plain = evaluation.evaluate_checkpoint(self.workdir, self.data,
                                           reporter=reporting.Reporter(None, io.StringIO()))
    self.assertAlmostEqual(result["plain"]["test"], plain["test"], places=4)
    # Every row's choice is its best on valid, and it names its settings.
    valid_lines = [l for l in lines if l.startswith("valid ")]
    self.assertLen(valid_lines, 1 + 2 + 2 + 4)
    self.assertIn("cache window", result["cache"]["settings"])
    self.assertIn("dynamic lr", result["dynamic"]["settings"])
    # lr 0 is among the dynamic settings (the plain model) and pairs with every cache: the
    # searches' best can only be at least as good on valid.
    self.assertLessEqual(result["dynamic"]["valid"], result["plain"]["valid"] * (1 + 1e-5))
    self.assertLessEqual(result["both"]["valid"], result["cache"]["valid"] * (1 + 1e-5))


if __name__ == "__main__":
  absltest.main()
