"""The successors' dropouts and optimizers (regularizers.py) against the equations computed another way.

The masks are read back from the model itself: a unit that a mask drops gets exactly zero gradient
on the weights that read it, so the zero rows of a gradient are the dropped units. The forward pass
must then equal a numpy model that applies those masks, held fixed, at every step of the window.
"""

import io
import re
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest
from absl.testing import parameterized

from zaremba_jax import config as config_lib
from zaremba_jax import evaluation
from zaremba_jax import kernels
from zaremba_jax import loop
from zaremba_jax import model as model_lib
from zaremba_jax import regularizers
from zaremba_jax import reporting
from zaremba_jax import train as train_lib
from zaremba_jax.kernels import recurrence
from zaremba_jax.kernels import reference
from tests import helpers
from tests.kernels_test import assert_close
from tests.kernels_test import native_runs

V, H, L, B, T = 13, 16, 2, 3, 8


def make(plan=kernels.Plan(), dropout=0.0, **options):
  return model_lib.LanguageModel(vocab_size=V, hidden_size=H, num_layers=L, dropout=dropout,
                                 init_scale=0.5, plan=plan, options=regularizers.Options(**options))


def init(model, seed=1):
  return model.init(jax.random.key(seed), jnp.zeros((B, T), jnp.int32),
                    model_lib.zero_state(L, B, H), train=False)["params"]


def sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def numpy_forward(p, tokens_BxT, carry, masks=None, w_hh=None, table=None):
  """The model in numpy (float64), one step and one layer at a time, from `carry`, with known
  masks held over the window. `masks` (each [B, H] multipliers, 0 or 1/keep): "input" (the
  embedding's output), "between" (each layer's output below the top), "output" (before the
  softmax), "recurrent" ([L] of them, on h_{t-1} in h_{t-1} W_hh). `w_hh` replaces each layer's
  W_hh (weight drop), `table` the embedding the first layer reads (embedding dropout)."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
  masks = masks or {}
  one = np.ones((tokens_BxT.shape[0], H))
  c, h = [np.asarray(x, np.float64).copy() for x in carry[0]], [np.asarray(x, np.float64).copy()
                                                                  for x in carry[1]]
  table = p["embedding"] if table is None else np.asarray(table, np.float64)
  logits = []
  for t in range(tokens_BxT.shape[1]):
    x = table[tokens_BxT[:, t]] * masks.get("input", one)
    for layer in range(L):
      q = p[f"lstm_{layer}"]
      w = q["w_hh"] if w_hh is None else np.asarray(w_hh[layer], np.float64)
      h_in = h[layer] * masks.get("recurrent", [one] * L)[layer]
      i, f, o, g = np.split(x @ q["w_ih"] + h_in @ w + q["b"], 4, axis=-1)
      c[layer] = sigmoid(f) * c[layer] + sigmoid(i) * np.tanh(g)
      h[layer] = sigmoid(o) * np.tanh(c[layer])
      x = h[layer] * masks.get("output" if layer == L - 1 else "between", one)
    logits.append(x @ p["softmax_w"] + p["softmax_b"])
  return np.stack(logits, axis=1)


def zero_rows(g):
  """The rows of a gradient that are exactly zero: the units a mask dropped."""
  return np.all(np.asarray(g) == 0.0, axis=-1)


class LockedMasksTest(parameterized.TestCase):
  """Gal's variational dropout: every mask one per row, the same at each step of the window."""

  def setUp(self):
    super().setUp()
    self.enter_context(jax.default_matmul_precision("highest"))
    rng = np.random.default_rng(0)
    self.tokens = rng.integers(0, V, size=(B, T)).astype(np.int32)
    self.targets = rng.integers(0, V, size=(B, T)).astype(np.int32)
    self.carry = model_lib.LSTMState(*helpers_random_carry(rng))

  def row_gradient(self, model, params, key, row):
    """The gradient of row `row`'s summed NLL alone (rows are independent sequences)."""
    def loss(p):
      nll, _ = model.apply({"params": p}, self.tokens, self.carry, train=True,
                           targets_BxT=self.targets, rngs={"dropout": key})
      return nll[row].sum()
    return jax.grad(loss)(params)

  def test_every_mask_is_held_over_the_window_and_differs_between_rows(self):
    p_out, p_between, p_rec = 0.5, 0.4, 0.5
    model = make(dropout=p_out, locked_dropout=True, dropout_between_layers=p_between,
                 dropout_recurrent=p_rec)
    params, key = init(model), jax.random.key(7)
    masks = {"input": [], "between": [], "output": [], "recurrent": [[] for _ in range(L)]}
    for row in range(B):
      g = self.row_gradient(model, params, key, row)
      # Each weight that reads a masked activation: its rows of dropped units are exactly zero.
      read_by = {"input": g["lstm_0"]["w_ih"], "between": g["lstm_1"]["w_ih"],
                 "output": g["softmax_w"]}
      for name, rate in (("input", p_out), ("between", p_between), ("output", p_out)):
        masks[name].append(np.where(zero_rows(read_by[name]), 0.0, 1.0 / (1.0 - rate)))
      for layer in range(L):
        dropped = zero_rows(g[f"lstm_{layer}"]["w_hh"])
        masks["recurrent"][layer].append(np.where(dropped, 0.0, 1.0 / (1.0 - p_rec)))
    masks = {k: (np.stack(v) if k != "recurrent" else [np.stack(m) for m in v])
             for k, v in masks.items()}
    for name, m_BxH in [(k, masks[k]) for k in ("input", "between", "output")] + [
        (f"recurrent {l}", m) for l, m in enumerate(masks["recurrent"])]:
      dropped = m_BxH == 0
      # A unit dropped at only some steps would have a non-zero gradient: these rows are units
      # dropped at every step. Each row drops some and keeps some, and the rows differ.
      self.assertTrue(dropped.any(axis=1).all() and (~dropped).any(axis=1).all(), name)
      self.assertGreater(len({tuple(r) for r in dropped}), 1, f"{name}: one mask for all rows")
    logits, _ = model.apply({"params": params}, self.tokens, self.carry, train=True,
                            rngs={"dropout": key})
    np.testing.assert_allclose(logits, numpy_forward(params, self.tokens, self.carry, masks),
                               rtol=1e-5, atol=1e-5)

  def test_masks_are_fresh_for_each_window(self):
    model = make(dropout_recurrent=0.5)
    params = init(model)
    dropped = [zero_rows(self.row_gradient(model, params, jax.random.key(k), 0)["lstm_0"]["w_hh"])
               for k in (1, 2)]
    self.assertFalse(np.array_equal(*dropped))

  def test_evaluation_draws_no_mask(self):
    model = make(dropout=0.5, locked_dropout=True, dropout_recurrent=0.5, dropout_embedding=0.5,
                 weight_drop=0.5)
    params = init(model)
    logits, _ = model.apply({"params": params}, self.tokens, self.carry, train=False)
    np.testing.assert_allclose(logits, numpy_forward(params, self.tokens, self.carry), rtol=1e-5,
                               atol=1e-5)


def helpers_random_carry(rng):
  c = rng.normal(size=(L, B, H))
  h = np.tanh(rng.normal(size=(L, B, H)))
  return jnp.asarray(c, jnp.float32), jnp.asarray(h, jnp.float32)


class EmbeddingDropoutAndWeightDropTest(parameterized.TestCase):
  """Merity et al.'s embedding dropout (whole word rows) and weight drop (DropConnect on W_hh)."""

  def setUp(self):
    super().setUp()
    self.enter_context(jax.default_matmul_precision("highest"))
    rng = np.random.default_rng(1)
    self.tokens = rng.integers(0, V, size=(B, T)).astype(np.int32)
    self.targets = rng.integers(0, V, size=(B, T)).astype(np.int32)
    self.carry = model_lib.LSTMState(*helpers_random_carry(rng))

  def gradient(self, model, params, key):
    def loss(p):
      nll, _ = model.apply({"params": p}, self.tokens, self.carry, train=True,
                           targets_BxT=self.targets, rngs={"dropout": key})
      return nll.sum()
    return jax.grad(loss)(params)

  def test_drop_embedding_rows_zeroes_whole_rows_and_scales_the_rest(self):
    table = jax.random.normal(jax.random.key(0), (400, 6)) + 3.0  # no entry is 0
    dropped = regularizers.drop_embedding_rows(jax.random.key(1), table, 0.25)
    zero, kept = zero_rows(dropped), np.all(np.asarray(dropped) != 0, axis=1)
    self.assertTrue((zero | kept).all(), "a row partly dropped")
    np.testing.assert_allclose(np.asarray(dropped)[kept], np.asarray(table)[kept] / 0.75,
                               rtol=1e-6)
    self.assertBetween(zero.mean(), 0.15, 0.35)

  def test_a_dropped_word_is_dropped_at_every_occurrence(self):
    model = make(dropout_embedding=0.5)
    params, key = init(model), jax.random.key(3)
    g = self.gradient(model, params, key)["embedding"]
    present = np.isin(np.arange(V), self.tokens)
    dropped = zero_rows(g) & present
    self.assertTrue(dropped.any() and (present & ~dropped).any())
    keep_V = np.where(dropped, 0.0, 2.0)[:, None]  # words not in the window: any value
    logits, _ = model.apply({"params": params}, self.tokens, self.carry, train=True,
                            rngs={"dropout": key})
    want = numpy_forward(params, self.tokens, self.carry,
                         table=np.asarray(params["embedding"]) * keep_V)
    np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-5)

  def test_weight_drop_masks_w_hh_once_for_the_window(self):
    model = make(weight_drop=0.5)
    params, key = init(model), jax.random.key(4)
    g = self.gradient(model, params, key)
    w_hh = []
    for layer in range(L):
      dropped = np.asarray(g[f"lstm_{layer}"]["w_hh"]) == 0.0  # d(W * m)/dW = m
      self.assertBetween(dropped.mean(), 0.35, 0.65)
      w_hh.append(np.where(dropped, 0.0, 2.0 * np.asarray(params[f"lstm_{layer}"]["w_hh"])))
    logits, _ = model.apply({"params": params}, self.tokens, self.carry, train=True,
                            rngs={"dropout": key})
    np.testing.assert_allclose(logits, numpy_forward(params, self.tokens, self.carry, w_hh=w_hh),
                               rtol=1e-5, atol=1e-5)
    other = np.asarray(self.gradient(model, params, jax.random.key(5))["lstm_0"]["w_hh"]) == 0.0
    self.assertFalse(np.array_equal(other, np.asarray(g["lstm_0"]["w_hh"]) == 0.0))


def masked_recurrence_plans(dtype):
  """The recurrent products a CPU plan may pick (XLA's both ways, the native one of the dtype
  where it runs), factors made in the forward loop or from the gates."""
  names = ["xla", "xla_transposed"]
  if native_runs(dtype):
    names.append("native_bf16_pairs" if dtype == "bfloat16" else "native_f32_matmul")
  for in_loop in (True, False):
    for i, name in enumerate(names):
      yield kernels.Plan(dtype=dtype, factors_in_forward_loop=in_loop, recurrent_product=name,
                         weight_grads_via_gather=i % 2 == 1)


class FastAgainstReferenceTest(parameterized.TestCase):
  """The hand-written backward with the recurrent mask, and the whole model with every switch on,
  against the reference kernels (the equations under autodiff), in value and gradient."""

  def setUp(self):
    super().setUp()
    self.enter_context(jax.default_matmul_precision("highest"))

  @parameterized.parameters("float32", "bfloat16")
  def test_masked_recurrence(self, dtype):
    rng = np.random.default_rng(2)
    xw, w = (jnp.asarray(rng.normal(size=s) * k, jnp.float32)
             for s, k in (((6, B, 4 * 5), 1.0), ((5, 4 * 5), 0.5)))
    c0, h0 = (jnp.asarray(rng.normal(size=(B, 5)), jnp.float32) for _ in range(2))
    mask = jnp.asarray((rng.random((B, 5)) > 0.5) * 2.0, jnp.float32)
    probe = jnp.asarray(rng.normal(size=(6, B, 5)), jnp.float32)

    def scalar(fn, plan):
      def f(*args):
        out, (c, h) = fn(*args, plan, mask)
        return (out * probe).sum() + c.sum() + 2 * h.sum()
      return f
    args = (xw, w, c0, h0)
    want_value, want = jax.value_and_grad(
        scalar(reference.lstm_recurrence, kernels.Plan(kernels="reference", dtype=dtype)),
        argnums=(0, 1, 2, 3))(*args)
    unmasked = jax.grad(lambda *a: reference.lstm_recurrence(
        *a, kernels.Plan(kernels="reference", dtype=dtype))[0].sum(), argnums=1)(*args)
    self.assertGreater(float(jnp.abs(unmasked - want[1]).max()), 1e-2)  # the mask matters
    for plan in masked_recurrence_plans(dtype):
      value, got = jax.jit(jax.value_and_grad(scalar(recurrence.lstm_recurrence, plan),
                                              argnums=(0, 1, 2, 3)))(*args)
      assert_close(value, want_value, dtype, str(plan))
      for name, g, e in zip(("xw", "w_hh", "c0", "h0"), got, want):
        assert_close(g, e, dtype, f"{name} {plan}")

  @parameterized.product(dtype=("float32", "bfloat16"), tied=(False, True))
  def test_model_with_every_switch(self, dtype, tied):
    options = dict(locked_dropout=True, dropout_between_layers=0.2, dropout_recurrent=0.3,
                   dropout_embedding=0.2, weight_drop=0.3, tie_weights=tied)
    params = init(make(dropout=0.4, **options))
    rng = np.random.default_rng(3)
    tokens, targets = (rng.integers(0, V, size=(B, T)).astype(np.int32) for _ in range(2))
    carry = model_lib.LSTMState(*helpers_random_carry(rng))

    def loss(plan):
      def f(p):
        nll, _ = make(plan, dropout=0.4, **options).apply(
            {"params": p}, tokens, carry, train=True, targets_BxT=targets,
            rngs={"dropout": jax.random.key(9)})
        return nll.sum() / B
      return jax.jit(jax.value_and_grad(f))
    fast = kernels.Plan(dtype=dtype, factors_in_forward_loop=True,
                        weight_grads_via_gather=dtype == "bfloat16",
                        recurrent_product="xla_transposed" if dtype == "bfloat16" else "xla")
    got_value, got = loss(fast)(params)
    want_value, want = loss(kernels.Plan(kernels="reference", dtype=dtype))(params)
    assert_close(got_value, want_value, dtype, "loss")
    for (path, g), e in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
      assert_close(g, e, dtype, jax.tree_util.keystr(path))


class OptimizerTest(parameterized.TestCase):
  """Weight decay in the chain and NT-ASGD's average."""

  def setUp(self):
    super().setUp()
    self.enter_context(jax.default_matmul_precision("highest"))
    rng = np.random.default_rng(4)
    self.windows = [tuple(jnp.asarray(rng.integers(0, 10, size=(4, 5)), jnp.int32)
                          for _ in range(2)) for _ in range(6)]

  def test_weight_decay_adds_lr_times_wd_times_params_after_clipping(self):
    config = helpers.tiny_config(max_grad_norm=1e-3, learning_rate=0.5)  # every gradient clipped
    model = model_lib.make_model(config, 10)
    plain_tx = train_lib.make_optimizer(config, 10)
    decay_tx = train_lib.make_optimizer(config.replace(weight_decay=0.1), 10)
    state = train_lib.create_train_state(config, model, plain_tx, jax.random.key(0))
    plain, _ = train_lib.train_step(state, *self.windows[0], model=model, tx=plain_tx)
    state_d = state.replace(opt_state=decay_tx.init(state.params))
    decayed, _ = train_lib.train_step(state_d, *self.windows[0], model=model, tx=decay_tx)
    for a, b, p in zip(jax.tree.leaves(decayed.params), jax.tree.leaves(plain.params),
                       jax.tree.leaves(state.params)):
      np.testing.assert_allclose(a - b, -0.5 * 0.1 * p, rtol=1e-4, atol=1e-7)

  def test_average_is_the_mean_of_the_iterates_since_the_trigger(self):
    config = helpers.tiny_config(nt_asgd=True, dropout=0.2)
    model = model_lib.make_model(config, 10)
    tx = train_lib.make_optimizer(config, 10)
    state = train_lib.create_train_state(config, model, tx, jax.random.key(0))
    step = jax.jit(lambda s, x, y: train_lib.train_step(s, x, y, model=model, tx=tx)[0])
    iterates = []
    for k, window in enumerate(self.windows):
      if k == 2:  # what loop.Training does when validation stops improving
        state = state.replace(average={**state.average, "active": jnp.asarray(True)})
      state = step(state, *window)
      iterates.append(state.params)
      if k < 2:  # before the trigger the average is the parameters themselves
        for a, p in zip(jax.tree.leaves(train_lib.evaluated_params(state)),
                        jax.tree.leaves(state.params)):
          np.testing.assert_array_equal(a, p)
    self.assertEqual(int(state.average["count"]), 4)
    for path_a, *ps in zip(jax.tree_util.tree_leaves_with_path(state.average["params"]),
                           *[jax.tree.leaves(p) for p in iterates[2:]]):
      path, a = path_a
      want = np.mean(np.stack([np.asarray(p, np.float64) for p in ps]), axis=0)
      np.testing.assert_allclose(a, want, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))

  def test_trigger_is_merity_et_als_non_monotone_condition(self):
    logs = [5.0, 4.0, 3.0, 3.5, 3.2]
    self.assertFalse(regularizers.nt_asgd_triggers(logs[:2], 9.0, 2))  # too few to judge
    self.assertFalse(regularizers.nt_asgd_triggers(logs, 3.9, 3))  # 3.9 < min(5, 4)
    self.assertTrue(regularizers.nt_asgd_triggers(logs, 4.1, 3))   # 4.1 > min(5, 4)
    self.assertTrue(regularizers.nt_asgd_triggers(logs, 3.1, 2))   # 3.1 > min(5, 4, 3)
    self.assertFalse(regularizers.nt_asgd_triggers(logs, 3.0, 2))  # ties do not trigger

  def test_bad_flags_say_what_to_do(self):
    for changes, text in ((dict(dropout_recurrent=1.0), "dropout_recurrent=1.0 must be in"),
                          (dict(locked_dropout=True), "give a --dropout"),
                          (dict(dropout_between_layers=-0.5), "or -1 for the same as --dropout"),
                          (dict(weight_decay=-1.0), "weight_decay=-1.0 must be >= 0"),
                          (dict(nonmono=0), "nonmono=0 must be at least 1")):
      with self.assertRaisesRegex(ValueError, re.escape(text)):
        config_lib.Config(**changes)


class NTASGDRunTest(absltest.TestCase):
  """A run whose averaging starts, stopped after the trigger and resumed, equals one that did not
  stop; what is evaluated is the average."""

  def test_stop_and_resume_after_the_trigger_is_bit_exact(self):
    data = helpers.write_tiny_corpus(tempfile.mkdtemp())
    # lr 3 makes validation jump about on the tiny corpus, so averaging starts before step 470;
    # every dropout on, so the masks' keys resume too.
    config = helpers.tiny_config(dropout=0.3, locked_dropout=True, dropout_recurrent=0.2,
                                 weight_drop=0.2, dropout_embedding=0.1, weight_decay=1e-3,
                                 nt_asgd=True, nonmono=1, learning_rate=3.0, max_epoch=6,
                                 max_max_epoch=6, max_train_steps=500, checkpoint_every_steps=50)

    def train(workdir, stop_after=None):
      out = io.StringIO()
      result = loop.train_and_evaluate(
          config, data, workdir, reporting.Reporter(workdir, out),
          stop_requested=lambda step: "stop" if stop_after and step >= stop_after else None)
      return result, out.getvalue()
    straight, log = train(self.create_tempdir().full_path)
    trigger = int(re.search(r"NT-ASGD: member 0 averages from step (\d+)", log).group(1))
    self.assertLess(trigger, 470)  # (360 here, at epoch 4's end)
    self.assertEqual(int(straight["state"].average["count"][0]), 500 - trigger)
    resumed_dir = self.create_tempdir().full_path
    self.assertIsNone(train(resumed_dir, stop_after=470)[0])
    resumed, log = train(resumed_dir)
    self.assertIn("resuming from", log)
    for part in ("params", "opt_state", "average"):
      for u, v in zip(jax.tree.leaves(getattr(straight["state"], part)),
                      jax.tree.leaves(getattr(resumed["state"], part))):
        np.testing.assert_array_equal(u, v, err_msg=part)
    self.assertEqual((straight["valid"], straight["test"]), (resumed["valid"], resumed["test"]))
    # --mode=evaluate loads the average (the checkpoint at the cap is the final state).
    evaluated = evaluation.evaluate_checkpoint(resumed_dir, data, step=500,
                                               reporter=reporting.Reporter(None, io.StringIO()))
    self.assertAlmostEqual(evaluated["valid"], resumed["valid"], places=6)


class GpuPresetsInTestSizeTest(parameterized.TestCase):
  """The GPU presets, shrunk to test size (16 units, batch 4, 10-step windows) with every other
  flag as the preset has it (layers, dropouts, weight drop, decay, NT-ASGD, schedule), train 200
  steps on the tiny corpus and learn it: their full rows are not run on this CPU."""

  @parameterized.parameters("medium_variational", "large_variational_tied", "awd_lstm")
  def test_200_steps(self, name):
    data = helpers.write_tiny_corpus(tempfile.mkdtemp())
    config = config_lib.preset(name, hidden_size=16, batch_size=4, num_steps=10, test_chunk=64,
                               max_train_steps=200, log_per_epoch=1)
    out = io.StringIO()
    result = loop.train_and_evaluate(config, data, None, reporting.Reporter(None, out))
    self.assertEqual(int(result["state"].step[0]), 200)
    # 10 words: a uniform guess is perplexity 10; each next word here follows from the last.
    self.assertLess(result["valid"], 9.0, out.getvalue())
    self.assertLess(result["test"], 9.0)


if __name__ == "__main__":
  absltest.main()
