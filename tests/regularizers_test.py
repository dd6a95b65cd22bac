"""The successors' regularizers (regularizers.py) against the equations computed another way."""

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest
from absl.testing import parameterized

from zaremba_jax import config as config_lib
from zaremba_jax import kernels
from zaremba_jax import model as model_lib
from zaremba_jax import regularizers
from zaremba_jax import train as train_lib
from tests import helpers

V, H, L = 13, 6, 2


def make(options, plan=kernels.Plan(), dropout=0.0):
  return model_lib.LanguageModel(vocab_size=V, hidden_size=H, num_layers=L, dropout=dropout,
                                 init_scale=0.5, plan=plan, options=options)


def init(model, batch=3, steps=4, seed=1):
  carry = model_lib.zero_state(L, batch, H)
  return model.init(jax.random.key(seed), jnp.zeros((batch, steps), jnp.int32), carry,
                    train=False)["params"]


def sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def numpy_forward(p, tokens_BxT, tied, projection):
  """The model in numpy, one step and one layer at a time, from a zero state: logits_BxTxV."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
  batch = tokens_BxT.shape[0]
  c, h = [np.zeros((batch, H)) for _ in range(L)], [np.zeros((batch, H)) for _ in range(L)]
  w_out = p["embedding"].T if tied else p["softmax_w"]
  logits = []
  for t in range(tokens_BxT.shape[1]):
    x = p["embedding"][tokens_BxT[:, t]]
    for layer in range(L):
      q = p[f"lstm_{layer}"]
      i, f, o, g = np.split(x @ q["w_ih"] + h[layer] @ q["w_hh"] + q["b"], 4, axis=-1)
      c[layer] = sigmoid(f) * c[layer] + sigmoid(i) * np.tanh(g)
      h[layer] = sigmoid(o) * np.tanh(c[layer])
      x = h[layer]
    if projection:
      x = x @ p["projection_w"] + p["projection_b"]
    logits.append(x @ w_out + p["softmax_b"])
  return np.stack(logits, axis=1)


def assert_close(got, want, dtype, err_msg=""):
  tol = 1e-5 if dtype == "float32" else 2e-2
  np.testing.assert_allclose(got, want, rtol=tol, atol=tol * float(jnp.abs(want).max()),
                             err_msg=err_msg)


class TyingTest(parameterized.TestCase):
  """Weight tying and Press & Wolf's projection regularization."""

  def setUp(self):
    super().setUp()
    self.enter_context(jax.default_matmul_precision("highest"))

  def test_tying_leaves_one_matrix(self):
    untied = init(make(regularizers.Options()))
    tied = init(make(regularizers.Options(tie_weights=True)))
    projected = init(make(regularizers.Options(tie_weights=True, projection_reg=0.1)))
    count = lambda p: sum(a.size for a in jax.tree.leaves(p))
    self.assertNotIn("softmax_w", tied)
    self.assertEqual(count(untied) - count(tied), H * V)
    self.assertEqual(count(projected) - count(tied), H * H + H)
    self.assertEqual(projected["projection_w"].shape, (H, H))

  def test_small_tied_pr_has_press_and_wolfs_parameter_count(self):
    # Press & Wolf: 2.69M parameters for the small model with tying and the projection.
    config = config_lib.preset("small_tied_pr")
    model = model_lib.make_model(config, 10000)
    carry = model_lib.zero_state(config.num_layers, 1, config.hidden_size)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32),
                                               carry, train=False))
    self.assertEqual(sum(np.prod(s.shape) for s in jax.tree.leaves(shapes)), 2_691_800)

  @parameterized.parameters((True, False), (True, True))
  def test_forward_is_the_equations(self, tied, projection):
    options = regularizers.Options(tie_weights=tied, projection_reg=0.1 if projection else 0.0)
    model = make(options)
    params = init(model)
    tokens = np.random.default_rng(0).integers(0, V, size=(3, 5)).astype(np.int32)
    logits, _ = model.apply({"params": params}, tokens, model_lib.zero_state(L, 3, H), train=False)
    np.testing.assert_allclose(logits, numpy_forward(params, tokens, tied, projection), rtol=1e-5,
                               atol=1e-5)

  @parameterized.product(dtype=("float32", "bfloat16"), projection=(False, True))
  def test_fast_kernels_match_the_reference_in_value_and_gradient(self, dtype, projection):
    options = regularizers.Options(tie_weights=True, projection_reg=0.1 if projection else 0.0)
    params = init(make(options))
    rng = np.random.default_rng(2)
    tokens, targets = (rng.integers(0, V, size=(3, 5)).astype(np.int32) for _ in range(2))

    def loss(plan):
      def f(p):
        nll, _ = make(options, plan).apply({"params": p}, tokens, model_lib.zero_state(L, 3, H),
                                           train=False, targets_BxT=targets)
        return nll.sum() / 3 + regularizers.penalty(p, options)
      return f
    fast = kernels.Plan(dtype=dtype, factors_in_forward_loop=True,
                        weight_grads_via_gather=dtype == "bfloat16")
    got_value, got = jax.value_and_grad(loss(fast))(params)
    want_value, want = jax.value_and_grad(loss(kernels.Plan(kernels="reference", dtype=dtype)))(
        params)
    assert_close(got_value, want_value, dtype)
    for (path, g), e in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
      assert_close(g, e, dtype, jax.tree_util.keystr(path))

  def test_penalty_is_lambda_sum_of_squares_of_p(self):
    options = regularizers.Options(tie_weights=True, projection_reg=0.25)
    params = init(make(options))
    want = 0.25 * float(np.sum(np.asarray(params["projection_w"], np.float64) ** 2))
    self.assertAlmostEqual(float(regularizers.penalty(params, options)), want, places=4)
    self.assertEqual(regularizers.penalty(params, regularizers.Options(tie_weights=True)), 0.0)

  def test_train_step_differentiates_the_penalty(self):
    # Its gradient on P is the NLL's plus 2 lambda P.
    config = helpers.tiny_config(tie_weights=True, projection_reg=0.5, max_grad_norm=1e9)
    model = model_lib.make_model(config, V)
    tx = train_lib.make_optimizer(config, 10)
    state = train_lib.create_train_state(config, model, tx, jax.random.key(0))
    rng = np.random.default_rng(3)
    inputs, targets = (jnp.asarray(rng.integers(0, V, size=(4, 5)), jnp.int32) for _ in range(2))
    new, _ = train_lib.train_step(state, inputs, targets, model=model, tx=tx)
    no_reg = model.clone(options=regularizers.Options(tie_weights=True, projection_reg=1e-30))
    plain, _ = train_lib.train_step(state, inputs, targets, model=no_reg, tx=tx)
    p = state.params["projection_w"]
    # SGD at rate 1: the difference of the two updates is -2 lambda P (lambda 0.5 against ~0).
    np.testing.assert_allclose(new.params["projection_w"] - plain.params["projection_w"], -p,
                               rtol=1e-4, atol=1e-6)

  def test_projection_needs_tying(self):
    with self.assertRaisesRegex(ValueError, "add --tie_weights"):
      config_lib.Config(projection_reg=0.1)
    with self.assertRaisesRegex(ValueError, "projection_reg=-1"):
      config_lib.Config(projection_reg=-1.0, tie_weights=True)

  def test_defaults_are_the_papers_model(self):
    self.assertEqual(regularizers.options_from_config(config_lib.Config()), regularizers.Options())
    for name in config_lib.preset_names():
      if name in ("small", "medium", "large", "word200", "char_small", "char_large"):
        self.assertEqual(regularizers.options_from_config(config_lib.preset(name)),
                         regularizers.Options(), name)


if __name__ == "__main__":
  absltest.main()
