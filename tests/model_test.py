"""The LSTM against the paper's equations, computed another way."""

import itertools
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import absltest

from zaremba_jax import model as model_lib
from tests import helpers


def sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def numpy_lstm_step(x, h, c, w_ih, w_hh, b):
  """The paper's equations written out gate by gate, order i, f, o, g."""
  n = h.shape[-1]
  a = x @ w_ih + h @ w_hh + b
  i, f, o, g = (a[:, k * n:(k + 1) * n] for k in range(4))
  c = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
  return sigmoid(o) * np.tanh(c), c


def assert_gradient_close(got, want, dtype, err_msg):
  """Two computations of one gradient agree: to 1e-5 in float32, 2e-2 with bfloat16 matmul
  inputs, relative to each element and to the gradient's largest entry."""
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  np.testing.assert_allclose(got, want, rtol=tol, atol=tol * float(jnp.abs(want).max()),
                             err_msg=err_msg)


class ModelTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    # On GPUs, float32 matmuls default to TF32; compare the equations at full precision.
    self.enter_context(jax.default_matmul_precision("highest"))
    self.model = model_lib.LanguageModel(vocab_size=11, hidden_size=6, num_layers=2, dropout=0.0,
                                         init_scale=0.5)
    self.batch = 3
    carry = model_lib.zero_state(2, self.batch, 6)
    self.params = self.model.init(jax.random.key(1), jnp.zeros((self.batch, 4), jnp.int32),
                                  carry, train=False)["params"]

  def numpy_forward(self, tokens_BxT, c_LxBxH, h_LxBxH):
    """A Python loop over time and layers, one token at a time."""
    p = jax.tree.map(np.asarray, self.params)
    c, h = [np.array(a, np.float64) for a in c_LxBxH], [np.array(a, np.float64) for a in h_LxBxH]
    logits = []
    for t in range(tokens_BxT.shape[1]):
      x = p["embedding"][tokens_BxT[:, t]]
      for layer in range(2):
        q = p[f"lstm_{layer}"]
        h[layer], c[layer] = numpy_lstm_step(x, h[layer], c[layer], q["w_ih"], q["w_hh"], q["b"])
        x = h[layer]
      logits.append(x @ p["softmax_w"] + p["softmax_b"])
    return np.stack(logits, axis=1), np.stack(c), np.stack(h)

  def test_initialiser_is_symmetric(self):
    flat = np.concatenate([np.ravel(a) for a in jax.tree.leaves(self.params)])
    self.assertLess(flat.min(), -0.4)
    self.assertGreater(flat.max(), 0.4)
    self.assertLessEqual(np.abs(flat).max(), 0.5)
    self.assertLess(abs(flat.mean()), 0.05)

  def test_parameters_are_the_papers(self):
    shapes = jax.tree.map(np.shape, self.params)
    self.assertEqual(shapes["lstm_0"], {"w_ih": (6, 24), "w_hh": (6, 24), "b": (24,)})
    self.assertEqual(shapes["embedding"], (11, 6))
    self.assertEqual(shapes["softmax_w"], (6, 11))

  def assert_matches_numpy_forward(self, batch, steps, seed):
    """The model from a random state over random tokens, against `numpy_forward`; the carry."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 11, size=(batch, steps)).astype(np.int32)
    c0 = rng.normal(size=(2, batch, 6)).astype(np.float32)
    h0 = rng.normal(size=(2, batch, 6)).astype(np.float32)
    logits, carry = self.model.apply({"params": self.params}, tokens,
                                     model_lib.LSTMState(jnp.asarray(c0), jnp.asarray(h0)),
                                     train=False)
    want_logits, want_c, want_h = self.numpy_forward(tokens, c0, h0)
    np.testing.assert_allclose(logits, want_logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(carry.c_LxBxH, want_c, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(carry.h_LxBxH, want_h, rtol=1e-5, atol=1e-5)
    return carry

  def test_scan_matches_loop_over_time(self):
    # Both forms of the recurrent product: h @ W_hh, and h against W_hh^T (bfloat16 on CPUs).
    for transposed in (False, True):
      with mock.patch.object(model_lib, "_transposed_recurrent_product", return_value=transposed):
        self.assert_matches_numpy_forward(self.batch, 7, seed=0)

  def test_batch_one_matches_loop_over_time(self):
    # Batch 1 (the test protocol) runs the recurrence on 1-D state vectors: check it separately.
    carry = self.assert_matches_numpy_forward(1, 9, seed=2)
    self.assertEqual(carry.h_LxBxH.shape, (2, 1, 6))

  def test_the_carry_carries(self):
    rng = np.random.default_rng(1)
    first_a, first_b, second = (rng.integers(0, 11, size=(self.batch, 5)).astype(np.int32)
                                for _ in range(3))
    zero = model_lib.zero_state(2, self.batch, 6)
    apply = lambda tokens, carry: self.model.apply({"params": self.params}, tokens, carry,
                                                   train=False)
    _, after_a = apply(first_a, zero)
    _, after_b = apply(first_b, zero)
    logits_a, _ = apply(second, after_a)
    logits_b, _ = apply(second, after_b)
    self.assertGreater(np.abs(np.asarray(logits_a) - np.asarray(logits_b)).max(), 1e-3)
    # Running two windows with the carry equals one window twice as long.
    both, _ = apply(np.concatenate([first_a, second], axis=1), zero)
    np.testing.assert_allclose(both[:, 5:], logits_a, rtol=1e-5, atol=1e-6)
    # Zero state gives what a fresh start gives.
    fresh, _ = apply(second, model_lib.zero_state(2, self.batch, 6))
    want, _, _ = self.numpy_forward(second, np.zeros((2, self.batch, 6)),
                                    np.zeros((2, self.batch, 6)))
    np.testing.assert_allclose(fresh, want, rtol=1e-5, atol=1e-5)

  def test_dropout_only_in_training_and_keyed(self):
    model = self.model.clone(dropout=0.5)
    tokens = jnp.ones((self.batch, 4), jnp.int32)
    zero = model_lib.zero_state(2, self.batch, 6)
    run = lambda key, train: model.apply({"params": self.params}, tokens, zero, train=train,
                                         rngs={"dropout": key})[0]
    np.testing.assert_array_equal(run(jax.random.key(0), False), run(jax.random.key(1), False))
    np.testing.assert_array_equal(run(jax.random.key(0), True), run(jax.random.key(0), True))
    self.assertGreater(np.abs(run(jax.random.key(0), True) - run(jax.random.key(1), True)).max(),
                       1e-3)



class RecurrenceGradientTest(absltest.TestCase):
  """The hand-written backward pass against autodiff of a plain loop over time."""

  def test_custom_vjp_matches_autodiff(self):
    self.enter_context(jax.default_matmul_precision("highest"))
    rng = np.random.default_rng(0)
    t, b, h = 6, 3, 5
    xw = jnp.asarray(rng.normal(size=(t, b, 4 * h)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(h, 4 * h)) * 0.5, jnp.float32)
    c0 = jnp.asarray(rng.normal(size=(b, h)), jnp.float32)
    h0 = jnp.asarray(rng.normal(size=(b, h)), jnp.float32)
    probe_out = jnp.asarray(rng.normal(size=(t, b, h)), jnp.float32)
    probe_c = jnp.asarray(rng.normal(size=(b, h)), jnp.float32)
    probe_h = jnp.asarray(rng.normal(size=(b, h)), jnp.float32)

    def plain(xw, w, c, hh):
      outs = []
      for step in range(t):
        a = xw[step] + hh @ w
        i, f, o, g = jnp.split(a, 4, axis=-1)
        c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        hh = jax.nn.sigmoid(o) * jnp.tanh(c)
        outs.append(hh)
      return jnp.stack(outs), (c, hh)

    def scalar(fn):
      def f(*args):
        out, (c, hh) = fn(*args)
        return (out * probe_out).sum() + (c * probe_c).sum() + (hh * probe_h).sum()
      return f

    want = jax.grad(scalar(plain), argnums=(0, 1, 2, 3))(xw, w, c0, h0)
    # Both places for the backward's per-step factors: the forward loop (CPUs), and a pass over
    # the stored gates before the backward loop (GPUs); both forms of the forward's product.
    for in_loop, transposed in itertools.product((True, False), (False, True)):
      with mock.patch.object(model_lib, "_factors_in_loop", return_value=in_loop), \
           mock.patch.object(model_lib, "_transposed_recurrent_product", return_value=transposed):
        got = jax.grad(scalar(model_lib.lstm_recurrence), argnums=(0, 1, 2, 3))(xw, w, c0, h0)
      for name, g, e in zip(("xw", "w_hh", "c0", "h0"), got, want):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5,
                                   err_msg=f"{name}, {in_loop=}, {transposed=}")
    out, _ = model_lib.lstm_recurrence(xw, w, c0, h0)
    np.testing.assert_allclose(out, plain(xw, w, c0, h0)[0], rtol=1e-6, atol=1e-6)

  def test_bfloat16_stays_close(self):
    model = model_lib.LanguageModel(vocab_size=50, hidden_size=32, num_layers=2, dropout=0.0,
                                    init_scale=0.1)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 50, size=(4, 8)), jnp.int32)
    carry = model_lib.zero_state(2, 4, 32)
    params = model.init(jax.random.key(0), tokens, carry, train=False)["params"]
    full, _ = model.apply({"params": params}, tokens, carry, train=False)
    half, carry_bf16 = model.clone(dtype=jnp.bfloat16).apply({"params": params}, tokens, carry,
                                                            train=False)
    self.assertEqual(half.dtype, jnp.float32)
    self.assertEqual(carry_bf16.c_LxBxH.dtype, jnp.float32)
    np.testing.assert_allclose(half, full, atol=2e-2)
    self.assertGreater(np.abs(np.asarray(half) - np.asarray(full)).max(), 0)  # really bf16


class TableInputTest(absltest.TestCase):
  """The first layer fed (E W_ih)[tokens] against E[tokens] W_ih: the same layer, computed twice."""

  def test_table_path_equals_lookup_then_project(self):
    self.enter_context(jax.default_matmul_precision("highest"))
    rng = np.random.default_rng(5)
    t, b, v, d, h = 7, 4, 9, 5, 6  # v < t * b, the case the model takes the table path for
    table_VxD = jnp.asarray(rng.normal(size=(v, d)), jnp.float32)
    tokens_TxB = jnp.asarray(rng.integers(0, v, size=(t, b)), jnp.int32)
    c0, h0 = (jnp.asarray(rng.normal(size=(b, h)), jnp.float32) for _ in range(2))
    probe_TxBxH = jnp.asarray(rng.normal(size=(t, b, h)), jnp.float32)
    layer = model_lib.LSTMLayer(hidden_size=h, init_scale=0.5)
    params = layer.init(jax.random.key(0), c0, h0, x_TxBxD=table_VxD[tokens_TxB])["params"]

    def loss(params, table_VxD, via_table):
      inputs = (dict(table_VxD=table_VxD, tokens_TxB=tokens_TxB) if via_table else
                dict(x_TxBxD=table_VxD[tokens_TxB]))
      out_TxBxH, (c, hh) = layer.apply({"params": params}, c0, h0, **inputs)
      return (out_TxBxH * probe_TxBxH).sum() + c.sum() + hh.sum()

    for dtype in (jnp.float32, jnp.bfloat16):
      layer = layer.clone(dtype=dtype)
      got, got_grads = jax.value_and_grad(loss, argnums=(0, 1))(params, table_VxD, True)
      want, want_grads = jax.value_and_grad(loss, argnums=(0, 1))(params, table_VxD, False)
      np.testing.assert_allclose(got, want, rtol=1e-5 if dtype == jnp.float32 else 2e-2)
      for (path, g), e in zip(jax.tree_util.tree_leaves_with_path(got_grads),
                              jax.tree.leaves(want_grads)):
        assert_gradient_close(g, e, dtype, f"{jax.tree_util.keystr(path)} {dtype}")

  def test_a_projected_table_with_dropout_is_refused(self):
    model = model_lib.LanguageModel(vocab_size=9, hidden_size=8, num_layers=1, dropout=0.5,
                                    init_scale=0.1)
    tokens = jnp.zeros((2, 3), jnp.int32)
    carry = model_lib.zero_state(1, 2, 8)
    params = model.init(jax.random.key(0), tokens, carry, train=False)["params"]
    table = model_lib.first_layer_table(params)
    with self.assertRaisesRegex(ValueError, "without dropout"):
      model.apply({"params": params}, tokens, carry, train=True, xw_table_Vx4H=table,
                  rngs={"dropout": jax.random.key(1)})


class WeightGradTest(absltest.TestCase):
  """x^T dy through a materialised transpose, the bfloat16 weight gradients' fast form."""

  def setUp(self):
    super().setUp()
    rng = np.random.default_rng(3)
    self.x = jnp.asarray(rng.normal(size=(37, 11)), jnp.float32)
    self.dy = jnp.asarray(rng.normal(size=(37, 23)), jnp.float32)

  def test_transpose_by_gather_is_the_transpose(self):
    np.testing.assert_array_equal(model_lib._transpose_by_gather(self.x), self.x.T)

  def test_equals_the_one_dot_general_form(self):
    for dtype in (jnp.float32, jnp.bfloat16):
      got = model_lib._weight_grad(self.x, self.dy, dtype)
      want = model_lib._dot(self.x, self.dy, (0, 0), dtype)  # same rounding of the inputs
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=str(dtype))

  def test_bfloat16_product_stays_bfloat16_on_cpu(self):
    if jax.default_backend() != "cpu":
      self.skipTest("the float32 fallback this guards against is XLA CPU's")
    hlo = jax.jit(model_lib._weight_grad, static_argnums=2).lower(
        self.x, self.dy, jnp.bfloat16).compile().as_text()
    dot_computation = [c for c in hlo.split("\n\n") if " dot(" in c]
    self.assertLen(dot_computation, 1)
    self.assertIn("bf16[11,37]", dot_computation[0])  # the transposed x, still bfloat16

  def test_projection_gradient_matches_autodiff(self):
    w = jnp.asarray(np.random.default_rng(4).normal(size=(11, 23)), jnp.float32)
    probe = self.dy
    for dtype in (jnp.float32, jnp.bfloat16):
      loss = lambda f: lambda x, w: (f(x, w) * probe).sum()
      got = jax.grad(loss(lambda x, w: model_lib._project(x, w, dtype)), argnums=(0, 1))(self.x, w)
      want = jax.grad(loss(lambda x, w: model_lib._matmul(x, w, dtype)), argnums=(0, 1))(self.x, w)
      for name, g, e in zip(("x", "w"), got, want):
        assert_gradient_close(g, e, dtype, f"{name} {dtype}")


class RecurrentProductTest(absltest.TestCase):
  """The forward loop's h @ W_hh in the form chosen for speed (the numbers: ModelTest)."""

  def test_bfloat16_is_transposed_and_stays_bfloat16_on_cpu(self):
    if jax.default_backend() != "cpu":
      self.skipTest("the transposed form is the CPU's")
    xw, w_hh, state = jnp.zeros((4, 3, 24)), jnp.zeros((6, 24)), jnp.zeros((3, 6))
    hlo = jax.jit(model_lib.lstm_recurrence, static_argnums=4).lower(
        xw, w_hh, state, state, jnp.bfloat16).compile().as_text()
    dot_computation = [c for c in hlo.split("\n\n") if " dot(" in c]
    self.assertLen(dot_computation, 1)
    self.assertIn("bf16[24,6]", dot_computation[0])  # W_hh^T, still bfloat16
    self.assertIn("rhs_contracting_dims={1}", dot_computation[0])


class SoftmaxNLLTest(absltest.TestCase):
  """The fused softmax cross-entropy against optax on explicit logits."""

  def setUp(self):
    super().setUp()
    rng = np.random.default_rng(1)
    n, h, v = 12, 8, 30
    self.x = jnp.asarray(rng.normal(size=(n, h)), jnp.float32)
    self.w = jnp.asarray(rng.uniform(-0.5, 0.5, size=(h, v)), jnp.float32)
    self.b = jnp.asarray(rng.uniform(-0.5, 0.5, size=(v,)), jnp.float32)
    self.targets = jnp.asarray(rng.integers(0, v, size=(n,)), jnp.int32)
    self.probe = jnp.asarray(rng.normal(size=(n,)), jnp.float32)  # unequal weights per row

  def _losses(self, dtype):
    def fused(x, w, b):
      return (model_lib.softmax_nll(x, w, b, self.targets, dtype) * self.probe).sum()

    def plain(x, w, b):
      logits = jnp.dot(x, w, precision="highest") + b
      nll = optax.softmax_cross_entropy_with_integer_labels(logits, self.targets)
      return (nll * self.probe).sum()
    return fused, plain

  def test_matches_optax_in_value_and_gradient(self):
    self.enter_context(jax.default_matmul_precision("highest"))
    fused, plain = self._losses(jnp.float32)
    want_value = plain(self.x, self.w, self.b)
    # Outside a gradient (evaluation; on the CPU the bias is folded into the product) and inside.
    np.testing.assert_allclose(fused(self.x, self.w, self.b), want_value, rtol=1e-6)
    value, got = jax.value_and_grad(fused, argnums=(0, 1, 2))(self.x, self.w, self.b)
    np.testing.assert_allclose(value, want_value, rtol=1e-6)
    want = jax.grad(plain, argnums=(0, 1, 2))(self.x, self.w, self.b)
    for name, g, e in zip(("x", "w", "b"), got, want):
      np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6, err_msg=name)

  def test_bfloat16_gradient_stays_close(self):
    fused, plain = self._losses(jnp.bfloat16)
    got = jax.grad(fused, argnums=(0, 1, 2))(self.x, self.w, self.b)
    want = jax.grad(plain, argnums=(0, 1, 2))(self.x, self.w, self.b)
    for name, g, e in zip(("x", "w", "b"), got, want):
      np.testing.assert_allclose(g, e, atol=0.03 * float(jnp.abs(e).max()), err_msg=name)
      self.assertGreater(float(jnp.abs(g - e).max()), 0, msg=name)  # really bfloat16

  def test_model_nll_path_equals_logits_path(self):
    model = model_lib.LanguageModel(vocab_size=30, hidden_size=8, num_layers=2, dropout=0.0,
                                    init_scale=0.3)
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 30, size=(3, 4)), jnp.int32)
    targets = jnp.roll(tokens, -1, axis=1)
    carry = model_lib.zero_state(2, 3, 8)
    params = model.init(jax.random.key(0), tokens, carry, train=False)["params"]
    logits, carry_a = model.apply({"params": params}, tokens, carry, train=False)
    nll, carry_b = model.apply({"params": params}, tokens, carry, train=False,
                               targets_BxT=targets)
    self.assertEqual(nll.shape, (3, 4))
    np.testing.assert_allclose(
        nll, optax.softmax_cross_entropy_with_integer_labels(logits, targets), rtol=1e-5)
    np.testing.assert_allclose(carry_a.h_LxBxH, carry_b.h_LxBxH)


if __name__ == "__main__":
  absltest.main()
