"""Every fast kernel against the reference kernels (the paper's equations under autodiff).

Values and gradients, float32 and bfloat16, for every form a plan can choose. The plans are
built here by hand, so each form is tested on any machine, whatever `resolve` would pick.
"""

import functools
import itertools
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import absltest
from absl.testing import parameterized

from zaremba_jax import kernels
from zaremba_jax import model as model_lib
from zaremba_jax import train as train_lib
from zaremba_jax.kernels import matmul
from zaremba_jax.kernels import native
from zaremba_jax.kernels import plan as plan_lib
from zaremba_jax.kernels import recurrence
from zaremba_jax.kernels import reference
from zaremba_jax.kernels import softmax
from tests import helpers

REFERENCE = kernels.Plan(kernels="reference")
BOTH = frozenset({"float32", "bfloat16"})  # what the native library offers on an AVX512-BF16 CPU


def reference_plan(dtype):
  return kernels.Plan(kernels="reference", dtype=dtype)


def assert_close(got, want, dtype, err_msg):
  """Two computations of one quantity agree: to 1e-5 in float32, 2e-2 with bfloat16 matmul
  inputs, relative to each element and to the largest entry."""
  tol = 1e-5 if dtype == "float32" else 2e-2
  np.testing.assert_allclose(got, want, rtol=tol, atol=tol * float(jnp.abs(want).max()),
                             err_msg=err_msg)


def native_runs(precision):
  """Whether `precision`'s native products run here (building the library if they would)."""
  return precision in native.offers() and native.load() is None


def recurrence_plans(dtype):
  """Every recurrent product of the plan's dtype (the native ones where they run), with the
  backward's factors made in the forward loop or from the gates."""
  products = [name for name, product in recurrence.PRODUCTS.items()
              if product.native is None or product.native == dtype and native_runs(dtype)]
  for in_loop, (i, name) in itertools.product((True, False), enumerate(products)):
    yield kernels.Plan(dtype=dtype, factors_in_forward_loop=in_loop, recurrent_product=name,
                       weight_grads_via_gather=i % 2 == 1)


class RecurrenceTest(parameterized.TestCase):
  """The hand-written backward pass and the forward's forms against autodiff of the cell."""

  def setUp(self):
    super().setUp()
    self.enter_context(jax.default_matmul_precision("highest"))

  def inputs(self, batch):
    rng = np.random.default_rng(batch)
    t, h = 6, 5
    arrays = dict(xw=(t, batch, 4 * h), w=(h, 4 * h), c0=(batch, h), h0=(batch, h),
                  probe_out=(t, batch, h), probe_c=(batch, h), probe_h=(batch, h))
    return {name: jnp.asarray(rng.normal(size=shape) * (0.5 if name == "w" else 1.0),
                              jnp.float32) for name, shape in arrays.items()}

  @parameterized.product(dtype=("float32", "bfloat16"), batch=(1, 3))
  def test_fast_matches_reference(self, dtype, batch):
    a = self.inputs(batch)

    def scalar(fn, plan):
      def f(xw, w, c, h):
        out, (c, h) = fn(xw, w, c, h, plan)
        return (out * a["probe_out"]).sum() + (c * a["probe_c"]).sum() + (h * a["probe_h"]).sum()
      return f

    args = (a["xw"], a["w"], a["c0"], a["h0"])
    want_value, want = jax.value_and_grad(
        scalar(reference.lstm_recurrence, reference_plan(dtype)), argnums=(0, 1, 2, 3))(*args)
    want_out = reference.lstm_recurrence(*args, reference_plan(dtype))
    for plan in recurrence_plans(dtype):
      msg = f"{plan}"
      out = recurrence.lstm_recurrence(*args, plan)  # outside a gradient: the primal's forms
      for g, e in zip(jax.tree.leaves(out), jax.tree.leaves(want_out)):
        assert_close(g, e, dtype, msg)
      value, got = jax.value_and_grad(scalar(recurrence.lstm_recurrence, plan),
                                      argnums=(0, 1, 2, 3))(*args)
      assert_close(value, want_value, dtype, msg)
      for name, g, e in zip(("xw", "w_hh", "c0", "h0"), got, want):
        assert_close(g, e, dtype, f"{name} {msg}")

  def test_reference_is_the_papers_cell(self):
    """The reference against the equations written out in numpy, one step at a time."""
    a = self.inputs(3)
    xw, w = np.asarray(a["xw"], np.float64), np.asarray(a["w"], np.float64)
    c, h = np.asarray(a["c0"], np.float64), np.asarray(a["h0"], np.float64)
    sigmoid = lambda x: 1.0 / (1.0 + np.exp(-x))
    outs = []
    for t in range(xw.shape[0]):
      i, f, o, g = np.split(xw[t] + h @ w, 4, axis=-1)
      c = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
      h = sigmoid(o) * np.tanh(c)
      outs.append(h)
    out, (c_got, h_got) = reference.lstm_recurrence(a["xw"], a["w"], a["c0"], a["h0"], REFERENCE)
    np.testing.assert_allclose(out, np.stack(outs), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(c_got, c, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(h_got, h, rtol=1e-5, atol=1e-6)


class SoftmaxNLLTest(parameterized.TestCase):
  """The fused softmax cross-entropy against the reference (log_softmax) and optax."""

  def setUp(self):
    super().setUp()
    self.enter_context(jax.default_matmul_precision("highest"))
    rng = np.random.default_rng(1)
    n, h, v = 12, 8, 30
    self.x = jnp.asarray(rng.normal(size=(n, h)), jnp.float32)
    self.w = jnp.asarray(rng.uniform(-0.5, 0.5, size=(h, v)), jnp.float32)
    self.b = jnp.asarray(rng.uniform(-0.5, 0.5, size=(v,)), jnp.float32)
    self.targets = jnp.asarray(rng.integers(0, v, size=(n,)), jnp.int32)
    self.probe = jnp.asarray(rng.normal(size=(n,)), jnp.float32)  # unequal weights per row

  def loss(self, fn, plan):
    return lambda x, w, b: (fn(x, w, b, self.targets, plan) * self.probe).sum()

  @parameterized.product(dtype=("float32", "bfloat16"), fold=(False, True),
                         gather=(False, True), rows=(0, 5))
  def test_fast_matches_reference(self, dtype, fold, gather, rows):
    # rows=5: 12 rows in blocks of 5, the last block padded.
    plan = kernels.Plan(dtype=dtype, fold_output_bias=fold, weight_grads_via_gather=gather,
                        output_rows_per_block=rows)
    args = (self.x, self.w, self.b)
    want_value, want = jax.value_and_grad(self.loss(reference.softmax_nll, reference_plan(dtype)),
                                          argnums=(0, 1, 2))(*args)
    # Outside a gradient (evaluation, where the bias may be folded into the product) and inside.
    assert_close(self.loss(softmax.softmax_nll, plan)(*args), want_value, dtype, "value")
    value, got = jax.value_and_grad(self.loss(softmax.softmax_nll, plan), argnums=(0, 1, 2))(*args)
    assert_close(value, want_value, dtype, "value in a gradient")
    for name, g, e in zip(("x", "w", "b"), got, want):
      assert_close(g, e, dtype, name)

  def test_reference_matches_optax(self):
    logits = jnp.dot(self.x, self.w, precision="highest") + self.b
    want = optax.softmax_cross_entropy_with_integer_labels(logits, self.targets)
    np.testing.assert_allclose(reference.softmax_nll(self.x, self.w, self.b, self.targets,
                                                     REFERENCE), want, rtol=1e-6)

  def test_bfloat16_really_rounds(self):
    fused = self.loss(softmax.softmax_nll, kernels.Plan(dtype="bfloat16"))
    plain = self.loss(softmax.softmax_nll, kernels.Plan())
    got = jax.grad(fused, argnums=1)(self.x, self.w, self.b)
    want = jax.grad(plain, argnums=1)(self.x, self.w, self.b)
    self.assertGreater(float(jnp.abs(got - want).max()), 0)


class MatmulTest(parameterized.TestCase):
  """The projections and x^T dy through a materialised transpose."""

  def setUp(self):
    super().setUp()
    self.enter_context(jax.default_matmul_precision("highest"))
    rng = np.random.default_rng(3)
    self.x = jnp.asarray(rng.normal(size=(37, 11)), jnp.float32)
    self.dy = jnp.asarray(rng.normal(size=(37, 23)), jnp.float32)

  def test_transpose_by_gather_is_the_transpose(self):
    np.testing.assert_array_equal(matmul.transpose_by_gather(self.x), self.x.T)

  @parameterized.parameters("float32", "bfloat16")
  def test_weight_grad_forms_agree(self, dtype):
    got = matmul.weight_grad(self.x, self.dy, kernels.Plan(dtype=dtype,
                                                           weight_grads_via_gather=True))
    want = matmul.weight_grad(self.x, self.dy, kernels.Plan(dtype=dtype))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

  @parameterized.product(dtype=("float32", "bfloat16"), gather=(False, True))
  def test_input_projection_matches_reference(self, dtype, gather):
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=(5, 3, 11)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(11, 8)), jnp.float32)
    b = jnp.asarray(rng.normal(size=(8,)), jnp.float32)
    probe = jnp.asarray(rng.normal(size=(5, 3, 8)), jnp.float32)
    plan = kernels.Plan(dtype=dtype, weight_grads_via_gather=gather)
    loss = lambda fn, p: lambda x, w, b: (fn(x, w, b, p) * probe).sum()
    got = jax.value_and_grad(loss(matmul.input_projection, plan), argnums=(0, 1, 2))(x, w, b)
    want = jax.value_and_grad(loss(reference.input_projection, reference_plan(dtype)),
                              argnums=(0, 1, 2))(x, w, b)
    for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      assert_close(g, e, dtype, f"{plan}")

  def test_bfloat16_weight_grad_stays_bfloat16_on_cpu(self):
    if jax.default_backend() != "cpu":
      self.skipTest("the float32 fallback this guards against is XLA CPU's")
    plan = kernels.Plan(dtype="bfloat16", weight_grads_via_gather=True)
    hlo = jax.jit(lambda x, dy: matmul.weight_grad(x, dy, plan)).lower(
        self.x, self.dy).compile().as_text()
    dot_computation = [c for c in hlo.split("\n\n") if " dot(" in c]
    self.assertLen(dot_computation, 1)
    self.assertIn("bf16[11,37]", dot_computation[0])  # the transposed x, still bfloat16

  def test_bfloat16_recurrent_product_is_transposed_on_cpu(self):
    if jax.default_backend() != "cpu":
      self.skipTest("the transposed form is the CPU's")
    plan = kernels.Plan(dtype="bfloat16", recurrent_product="xla_transposed")
    xw, w_hh, state = jnp.zeros((4, 3, 24)), jnp.zeros((6, 24)), jnp.zeros((3, 6))
    hlo = jax.jit(lambda *a: recurrence.lstm_recurrence(*a, plan)).lower(
        xw, w_hh, state, state).compile().as_text()
    dot_computation = [c for c in hlo.split("\n\n") if " dot(" in c]
    self.assertLen(dot_computation, 1)
    self.assertIn("bf16[24,6]", dot_computation[0])  # W_hh^T, still bfloat16
    self.assertIn("rhs_contracting_dims={1}", dot_computation[0])


class NativeProductsTest(parameterized.TestCase):
  """The native products against XLA's dot of the same precision."""

  def setUp(self):
    super().setUp()
    for precision in ("float32", "bfloat16"):
      if not native_runs(precision):
        self.skipTest(f"native {precision} products unavailable here: "
                      f"{native.missing(precision) or native.load()}")

  # Shapes off every block size of the kernels (4 rows, 32 lanes; 128 and 16 columns), and the
  # medium model's W_hh, which is split over threads.
  @parameterized.parameters((5, 3), (37, 11), (803, 201), (2600, 650))
  def test_both_products_equal_xla_bfloat16_dot(self, n, k):
    rng = np.random.default_rng(n)
    w_NxK = jnp.asarray(rng.normal(size=(n, k)), jnp.bfloat16)
    h_K = jnp.asarray(rng.normal(size=(k,)), jnp.float32)
    want = matmul.dot(w_NxK, h_K, (1, 0), "bfloat16")
    # Exact products, float32 sums in another order: close to float32's rounding of the sum.
    bound = 1e-6 * float(jnp.abs(w_NxK.astype(jnp.float32)).sum(axis=1).max()) * np.sqrt(k)
    np.testing.assert_allclose(jax.jit(native.matvec)(w_NxK, h_K), want, rtol=0, atol=bound)
    np.testing.assert_allclose(jax.jit(native.vecmat)(h_K, w_NxK.T), want, rtol=0, atol=bound)

  # Rows off the kernel's block of five, columns off its 64, an odd K (a padded pair).
  @parameterized.parameters((1, 5, 3), (7, 37, 11), (20, 803, 201), (100, 800, 200))
  def test_matmul_of_pairs_equals_xla_bfloat16_dot(self, b, n, k):
    rng = np.random.default_rng(b)
    w_KxN = jnp.asarray(rng.normal(size=(k, n)), jnp.bfloat16)
    h_BxK = jnp.asarray(rng.normal(size=(b, k)), jnp.float32)
    want = matmul.dot(h_BxK, w_KxN, (1, 0), "bfloat16")
    bound = 1e-6 * float(jnp.abs(w_KxN.astype(jnp.float32)).sum(axis=0).max()) * np.sqrt(k)
    got = jax.jit(lambda h, w: native.matmul(h, native.pairs(w)))(h_BxK, w_KxN)
    np.testing.assert_allclose(got, want, rtol=0, atol=bound)

  @parameterized.parameters((1, 5, 3), (7, 37, 11), (20, 803, 201), (100, 800, 200))
  def test_float32_products_equal_xla_float32_dot(self, b, n, k):
    rng = np.random.default_rng(b)
    w_KxN = jnp.asarray(rng.normal(size=(k, n)), jnp.float32)
    h_BxK = jnp.asarray(rng.normal(size=(b, k)), jnp.float32)
    want = jnp.dot(h_BxK, w_KxN, precision="highest")
    bound = 1e-6 * float(jnp.abs(w_KxN).sum(axis=0).max()) * np.sqrt(k)
    np.testing.assert_allclose(jax.jit(native.matmul_f32)(h_BxK, w_KxN), want, rtol=0,
                               atol=bound)
    np.testing.assert_allclose(jax.jit(native.matvec_f32)(w_KxN.T, h_BxK[0]), want[0], rtol=0,
                               atol=bound)

  def test_h_is_rounded_to_bfloat16_as_xla_does(self):
    # 1 + 2**-9 is not a bfloat16; round to nearest even makes it 1. Kept as float32, the sum
    # of 64 of them would be 64.125.
    w = jnp.ones((4, 64), jnp.bfloat16)
    h = jnp.full((64,), 1 + 2.0**-9, jnp.float32)
    np.testing.assert_array_equal(native.matvec(w, h), matmul.dot(w, h, (1, 0), "bfloat16"))
    np.testing.assert_array_equal(native.vecmat(h, w.T), np.full(4, 64.0, np.float32))
    np.testing.assert_array_equal(native.matmul(h[None], native.pairs(w.T)),
                                  np.full((1, 4), 64.0, np.float32))

  def test_under_vmap_each_member_gets_its_own_product(self):
    rng = np.random.default_rng(0)
    w_KxNxM = jnp.asarray(rng.normal(size=(3, 260, 40)), jnp.bfloat16)
    h_KxM = jnp.asarray(rng.normal(size=(3, 40)), jnp.float32)
    got = jax.jit(jax.vmap(native.matvec))(w_KxNxM, h_KxM)
    for member in range(3):
      np.testing.assert_allclose(got[member], native.matvec(w_KxNxM[member], h_KxM[member]))

  def test_gradients_are_those_of_the_product(self):
    rng = np.random.default_rng(1)
    w = jnp.asarray(rng.normal(size=(24, 9)), jnp.float32)
    h = jnp.asarray(rng.normal(size=(9,)), jnp.float32)
    probe = jnp.asarray(rng.normal(size=(24,)), jnp.float32)
    want = jax.grad(lambda w, h: probe @ matmul.dot(w, h, (1, 0), "bfloat16"), (0, 1))(w, h)
    for got in (jax.grad(lambda w, h: probe @ native.matvec(w, h), (0, 1))(w, h),
                jax.grad(lambda w, h: probe @ native.vecmat(h, w.T), (0, 1))(w, h),
                jax.grad(lambda w, h: probe @ native.matmul(h[None], native.pairs(w.T))[0],
                         (0, 1))(w, h),
                jax.grad(lambda w, h: probe @ native.matvec_f32(w, h), (0, 1))(w, h),
                jax.grad(lambda w, h: probe @ native.matmul_f32(h[None], w.T)[0], (0, 1))(w, h)):
      assert_close(got[0], want[0], "bfloat16", "dW")
      assert_close(got[1], want[1], "bfloat16", "dh")

  def test_a_failed_build_falls_back_to_xla(self):
    cache = self.create_tempdir().full_path
    try:
      with absltest.mock.patch.dict("os.environ", {"CXX": "/bin/false",
                                                   "ZAREMBA_JAX_CACHE": cache}):
        native.reset()
        self.assertIn("the build failed", native.load())
        plan = plan_lib.plan_for(dtype="bfloat16", batch_size=1, vocab_size=50,
                                 stream_tokens=1, backend="cpu")
        self.assertEqual(plan.recurrent_product, "xla_vector")
        self.assertFalse(plan.native_one_row_products)
      with absltest.mock.patch.dict("os.environ", {"ZAREMBA_JAX_NATIVE": "0"}):
        native.reset()
        self.assertEqual(native.offers(), frozenset())
        self.assertEqual(native.load(), "ZAREMBA_JAX_NATIVE=0")
    finally:
      native.reset()
    self.assertIsNone(native.load())


# Plans a CPU run makes without any native product, each in a fresh process whose compiler
# ($CXX) records that it ran; the last one's plan does use them (the check can fail).
_NO_NATIVE_PLANS = """
import sys
from zaremba_jax import config as config_lib, model as model_lib
import jax, numpy as np
case = sys.argv[1]
if case == "float32 large":  # W_hh over NATIVE_F32_MAX_WEIGHT_BYTES: XLA's products
  config = config_lib.preset("large")
elif case == "reference":
  config = config_lib.preset("small", dtype="bfloat16", kernels="reference")
else:  # "ZAREMBA_JAX_NATIVE=0" or "bfloat16 small"
  config = config_lib.preset("small", dtype="bfloat16")
model = model_lib.make_model(config, 10000)
for rows, tokens in ((config.batch_size, 700), (1, 82430), (1, 1)):
  planned = model_lib.planned_for(model, rows, tokens)
  assert not planned.plan.native_precisions, planned.plan
if case != "float32 large":  # and a forward pass of a small model under each of those plans
  tiny = model_lib.make_model(config.replace(hidden_size=8, num_layers=1), 11)
  carry = model_lib.zero_state(1, 1, 8)
  tokens = np.zeros((1, 3), np.int32)
  params = tiny.init(jax.random.key(0), tokens, carry, train=False)["params"]
  for model in (tiny, model_lib.planned_for(tiny, 1, 3), model_lib.planned_for(tiny, 1, 1)):
    jax.block_until_ready(model.apply({"params": params}, tokens[:, :1], carry, train=False))
"""


class NoBuildTest(absltest.TestCase):
  """A run whose plans use no native product never starts the C++ compiler."""

  def run_case(self, case, **environ):
    folder = pathlib.Path(self.create_tempdir().full_path)
    record = folder / "compiler_ran"
    compiler = folder / "cxx"
    compiler.write_text(f"#!/bin/sh\necho \"$@\" >> {record}\nexit 1\n")
    compiler.chmod(0o755)
    env = dict(os.environ, CXX=str(compiler), ZAREMBA_JAX_CACHE=str(folder / "cache"),
               JAX_PLATFORMS="cpu", ZAREMBA_JAX_NATIVE="1")
    env.update(environ)
    result = subprocess.run([sys.executable, "-c", _NO_NATIVE_PLANS, case], env=env,
                            capture_output=True, text=True, timeout=300, check=False,
                            cwd=helpers.REPO)
    return result, record.exists()

  def test_plans_without_native_products_never_build(self):
    reason = native.missing("bfloat16")  # the subprocesses set $CXX and ZAREMBA_JAX_NATIVE
    if reason and not reason.startswith(("ZAREMBA_JAX_NATIVE", "no C++ compiler")):
      self.skipTest(f"the control needs a CPU with the native products: {reason}")
    for case, environ in (("float32 large", {}), ("reference", {}),
                          ("ZAREMBA_JAX_NATIVE=0", {"ZAREMBA_JAX_NATIVE": "0"})):
      with self.subTest(case):
        result, compiled = self.run_case(case, **environ)
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        self.assertFalse(compiled, f"{case}: the compiler ran")
    # The control: the same harness, with plans that use the native products, calls it (whose
    # failure leaves those plans without them, so the script's own checks pass).
    result, compiled = self.run_case("bfloat16 small")
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    self.assertTrue(compiled)
    self.assertIn("the native kernels did not build", result.stderr)


class PlanTest(parameterized.TestCase):
  """`resolve`: each choice on exactly where it was measured to pay."""

  def test_cpu_float32_training_window(self):
    plan = plan_lib.resolve(dtype="float32", batch_size=20, vocab_size=10000,
                            stream_tokens=400, backend="cpu")
    self.assertEqual(plan, kernels.Plan(factors_in_forward_loop=True, fold_output_bias=True))

  @parameterized.named_parameters(("native", BOTH, "native_bf16_pairs", True),
                                  ("xla", frozenset(), "xla_transposed", False))
  def test_cpu_bfloat16_char_window(self, offers, product, one_row):
    plan = plan_lib.resolve(dtype="bfloat16", batch_size=100, vocab_size=50,
                            stream_tokens=5000, backend="cpu", native_offers=offers)
    self.assertEqual(plan, kernels.Plan(dtype="bfloat16", first_layer_per_vocab_row=True,
                                        recurrent_product=product,
                                        native_one_row_products=one_row,
                                        weight_grads_via_gather=True,
                                        factors_in_forward_loop=True))

  def test_output_in_row_blocks_only_where_it_paid(self):
    def rows(dtype, hidden, vocab=10000):
      return plan_lib.resolve(dtype=dtype, batch_size=20, vocab_size=vocab, stream_tokens=700,
                              hidden_size=hidden, backend="cpu").output_rows_per_block
    self.assertEqual(rows("bfloat16", 200), plan_lib.OUTPUT_BLOCK_ROWS)  # small: 4 MB
    self.assertEqual(rows("bfloat16", 650), 0)  # medium: 13 MB
    self.assertEqual(rows("float32", 200), 0)
    self.assertEqual(rows("bfloat16", 200, vocab=50), 0)  # characters: nothing to gain

  def test_cpu_batch_one_test_stream(self):
    def product(dtype, hidden=None, offers=BOTH):
      return plan_lib.resolve(dtype=dtype, batch_size=1, vocab_size=10000, stream_tokens=82430,
                              hidden_size=hidden, backend="cpu",
                              native_offers=offers).recurrent_product
    # W^T h on vectors: one transposition, many steps.
    self.assertEqual(product("float32"), "xla_matrix_first")  # no size: XLA's product
    self.assertEqual(product("float32", 200), "native_f32_matvec")
    self.assertEqual(product("bfloat16"), "native_bf16_matvec")
    self.assertEqual(product("bfloat16", offers=frozenset()), "xla_matrix_first")
    self.assertEqual(product("bfloat16", offers=frozenset({"float32"})), "xla_matrix_first")
    self.assertTrue(plan_lib.resolve(batch_size=1, vocab_size=10000, stream_tokens=82430,
                                     backend="cpu").first_layer_per_vocab_row)

  @parameterized.parameters(1, 20)
  def test_native_products_where_they_won(self, batch):
    def native_precisions(dtype, hidden, offers=BOTH):
      return plan_lib.resolve(dtype=dtype, batch_size=batch, vocab_size=10000, stream_tokens=700,
                              hidden_size=hidden, backend="cpu",
                              native_offers=offers).native_precisions
    self.assertEqual(native_precisions("bfloat16", 1500), {"bfloat16"})
    self.assertEqual(native_precisions("float32", 650), {"float32"})
    self.assertEqual(native_precisions("float32", 1500), set())  # large: XLA's was faster
    self.assertEqual(native_precisions("float32", 650, frozenset({"bfloat16"})), set())
    self.assertEqual(native_precisions("bfloat16", 200, frozenset({"float32"})), set())
    self.assertEqual(native_precisions("bfloat16", 200, frozenset()), set())

  @parameterized.product(dtype=("float32", "bfloat16"), offers=(BOTH, frozenset()))
  def test_cpu_one_token_at_a_time(self, dtype, offers):
    # serve, query and sample: a transposition per call would cost more than its product saves,
    # so h W on vectors (float32: XLA's, faster than the native block kernel on one row).
    plan = plan_lib.resolve(dtype=dtype, batch_size=1, vocab_size=50, stream_tokens=1,
                            hidden_size=200, backend="cpu", native_offers=offers)
    native_bf16 = dtype == "bfloat16" and bool(offers)
    self.assertEqual(plan.recurrent_product,
                     "native_bf16_vecmat" if native_bf16 else "xla_vector")
    self.assertEqual(plan.native_one_row_products, native_bf16)

  def test_resolve_builds_nothing(self):
    plan = plan_lib.resolve(dtype="bfloat16", batch_size=1, vocab_size=50, stream_tokens=1,
                            backend="cpu")  # no native_offers: XLA's products
    self.assertEqual(plan.native_precisions, frozenset())

  def test_plan_for_takes_the_native_products_where_they_run(self):
    plan = plan_lib.plan_for(dtype="bfloat16", batch_size=20, vocab_size=10000,
                             stream_tokens=700, backend="cpu")
    self.assertEqual(plan.recurrent_product == "native_bf16_pairs", native_runs("bfloat16"))

  def test_a_product_of_another_precision_is_refused(self):
    with self.assertRaisesRegex(ValueError, "'native_bf16_pairs' is a bfloat16 product"):
      kernels.Plan(recurrent_product="native_bf16_pairs")
    with self.assertRaisesRegex(ValueError, "'cudnn' is unknown"):
      kernels.Plan(recurrent_product="cudnn")

  @parameterized.parameters("gpu", "tpu")
  def test_accelerators_take_the_plain_forms(self, backend):
    for dtype in ("float32", "bfloat16"):
      plan = plan_lib.resolve(dtype=dtype, batch_size=1, vocab_size=10000, stream_tokens=400,
                              backend=backend)
      self.assertEqual(plan, kernels.Plan(dtype=dtype))

  def test_reference_takes_no_fast_form(self):
    plan = plan_lib.resolve(kernels="reference", dtype="bfloat16", batch_size=1, vocab_size=50,
                            stream_tokens=5000, backend="cpu")
    self.assertEqual(plan, kernels.Plan(kernels="reference", dtype="bfloat16"))

  def test_unknown_kernels_are_refused(self):
    with self.assertRaisesRegex(ValueError, "--kernels='cudnn' is unknown"):
      kernels.Plan(kernels="cudnn")


class ModelFormsTest(parameterized.TestCase):
  """The whole model: the first layer fed per vocabulary row, bfloat16, reference vs fast."""

  def test_table_path_equals_lookup_then_project(self):
    self.enter_context(jax.default_matmul_precision("highest"))
    rng = np.random.default_rng(5)
    t, b, v, d, h = 7, 4, 9, 5, 6
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

    for dtype in ("float32", "bfloat16"):
      layer = layer.clone(plan=kernels.Plan(dtype=dtype))
      got = jax.value_and_grad(loss, argnums=(0, 1))(params, table_VxD, True)
      want = jax.value_and_grad(loss, argnums=(0, 1))(params, table_VxD, False)
      for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert_close(g, e, dtype, dtype)

  def test_a_projected_table_with_dropout_is_refused(self):
    model = model_lib.LanguageModel(vocab_size=9, hidden_size=8, num_layers=1, dropout=0.5,
                                    init_scale=0.1)
    tokens = jnp.zeros((2, 3), jnp.int32)
    carry = model_lib.zero_state(1, 2, 8)
    params = model.init(jax.random.key(0), tokens, carry, train=False)["params"]
    table = model_lib.first_layer_table(params, model.plan)
    with self.assertRaisesRegex(ValueError, "without dropout"):
      model.apply({"params": params}, tokens, carry, train=True, xw_table_Vx4H=table,
                  rngs={"dropout": jax.random.key(1)})

  def test_bfloat16_stays_close_and_state_stays_float32(self):
    model = model_lib.LanguageModel(vocab_size=50, hidden_size=32, num_layers=2, dropout=0.0,
                                    init_scale=0.1)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 50, size=(4, 8)), jnp.int32)
    carry = model_lib.zero_state(2, 4, 32)
    params = model.init(jax.random.key(0), tokens, carry, train=False)["params"]
    full, _ = model.apply({"params": params}, tokens, carry, train=False)
    half, carry_bf16 = model.clone(plan=kernels.Plan(dtype="bfloat16")).apply(
        {"params": params}, tokens, carry, train=False)
    self.assertEqual(half.dtype, jnp.float32)
    self.assertEqual(carry_bf16.c_LxBxH.dtype, jnp.float32)
    np.testing.assert_allclose(half, full, atol=2e-2)
    self.assertGreater(np.abs(np.asarray(half) - np.asarray(full)).max(), 0)  # really bf16

  def test_nll_path_equals_logits_path(self):
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


class TrainWithBothKernelsTest(parameterized.TestCase):
  """A few SGD steps with the fast kernels and with the reference: the same parameters."""

  @parameterized.parameters("float32", "bfloat16")
  def test_same_parameters_after_steps(self, dtype):
    config = helpers.tiny_config(dtype=dtype, dropout=0.3)
    rng = np.random.default_rng(0)
    tokens_KxBxT = jnp.asarray(rng.integers(0, 13, size=(6, 4, 6)), jnp.int32)
    results = {}
    for name in ("fast", "reference"):
      model = model_lib.make_model(config.replace(kernels=name), 13)
      tx = train_lib.make_optimizer(config, 100)
      state = train_lib.create_train_state(config, model, tx, jax.random.key(0))
      steps = jax.jit(functools.partial(train_lib.train_steps, model=model, tx=tx))
      state, metrics = steps(
          state, tokens_KxBxT[:, :, :-1], tokens_KxBxT[:, :, 1:])
      results[name] = (state.params, metrics["nll_sum"])
    (fast_params, fast_nll), (ref_params, ref_nll) = results["fast"], results["reference"]
    tol = 1e-4 if dtype == "float32" else 3e-2
    np.testing.assert_allclose(fast_nll, ref_nll, rtol=tol)
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(fast_params),
                                 jax.tree.leaves(ref_params)):
      np.testing.assert_allclose(got, want, rtol=tol, atol=tol * float(jnp.abs(want).max()),
                                 err_msg=jax.tree_util.keystr(path))


if __name__ == "__main__":
  absltest.main()
