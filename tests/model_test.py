"""The LSTM against the paper's equations, computed another way."""

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest

from zaremba_jax import kernels
from zaremba_jax import model as model_lib


def sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def numpy_lstm_step(x, h, c, w_ih, w_hh, b):
  """The paper's equations written out gate by gate, order i, f, o, g."""
  n = h.shape[-1]
  a = x @ w_ih + h @ w_hh + b
  i, f, o, g = (a[:, k * n:(k + 1) * n] for k in range(4))
  c = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
  return sigmoid(o) * np.tanh(c), c


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

  def assert_matches_numpy_forward(self, batch, steps, seed, plan=kernels.Plan()):
    """The model from a random state over random tokens, against `numpy_forward`; the carry."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 11, size=(batch, steps)).astype(np.int32)
    c0 = rng.normal(size=(2, batch, 6)).astype(np.float32)
    h0 = rng.normal(size=(2, batch, 6)).astype(np.float32)
    logits, carry = self.model.clone(plan=plan).apply({"params": self.params}, tokens,
                                     model_lib.LSTMState(jnp.asarray(c0), jnp.asarray(h0)),
                                     train=False)
    want_logits, want_c, want_h = self.numpy_forward(tokens, c0, h0)
    np.testing.assert_allclose(logits, want_logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(carry.c_LxBxH, want_c, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(carry.h_LxBxH, want_h, rtol=1e-5, atol=1e-5)
    return carry

  def test_scan_matches_loop_over_time(self):
    # Every form a plan can choose (the recurrent product against W_hh^T, the first layer fed
    # per vocabulary row), and the reference kernels.
    plans = [kernels.Plan(), kernels.Plan(recurrent_product="xla_transposed"),
             kernels.Plan(first_layer_per_vocab_row=True, fold_output_bias=True),
             kernels.Plan(kernels="reference")]
    for plan in plans:
      with self.subTest(plan=plan):
        self.assert_matches_numpy_forward(self.batch, 7, seed=0, plan=plan)

  def test_batch_one_matches_loop_over_time(self):
    # Batch 1 (the test protocol) runs the recurrence on 1-D state vectors: check it separately.
    plan = kernels.Plan(recurrent_product="xla_matrix_first")
    carry = self.assert_matches_numpy_forward(1, 9, seed=2, plan=plan)
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



if __name__ == "__main__":
  absltest.main()
