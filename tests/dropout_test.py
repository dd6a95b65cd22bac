"""Dropout's placement: the embedding's output, between layers and before the softmax, never on
the recurrent h or c; checked against the paper's model written out with the same masks."""

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest

from zaremba_jax import model as model_lib
from tests import helpers
from tests import reference

VOCAB, BATCH, STEPS, HIDDEN, LAYERS, DROPOUT = 11, 3, 5, 6, 2, 0.4


class DropoutPlacementTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    config = helpers.tiny_config(batch_size=BATCH, num_steps=STEPS, hidden_size=HIDDEN,
                                 num_layers=LAYERS, dropout=DROPOUT, init_scale=0.5)
    cls.model = model_lib.make_model(config, VOCAB)
    rng = np.random.default_rng(7)
    cls.tokens = rng.integers(0, VOCAB, size=(BATCH, STEPS)).astype(np.int32)
    cls.targets = rng.integers(0, VOCAB, size=(BATCH, STEPS)).astype(np.int32)
    cls.carry = model_lib.LSTMState(*reference.random_carry(rng, LAYERS, BATCH, HIDDEN))
    cls.params = cls.model.init(jax.random.key(0), cls.tokens, cls.carry, train=False)["params"]
    # Keep masks for the embedding's output and each layer's output, 40% of each dropped.
    cls.masks = [rng.random((BATCH, STEPS, HIDDEN)) >= DROPOUT for _ in range(LAYERS + 1)]

  def setUp(self):
    super().setUp()
    self.enter_context(jax.default_matmul_precision("highest"))

  def train_apply(self, **kwargs):
    """A train=True apply with the known masks; checks the model drew exactly those."""
    with reference.KnownDropoutMasks(self.masks) as known:
      out, carry = self.model.apply({"params": self.params}, self.tokens, self.carry, train=True,
                                    rngs={"dropout": jax.random.key(1)}, **kwargs)
    self.assertLen(known.requests, LAYERS + 1, known.requests)
    for _, p in known.requests:
      self.assertAlmostEqual(p, 1.0 - DROPOUT, places=6, msg="bernoulli's p is the keep rate")
    return out, carry

  def assert_carry_close(self, got, want):
    for name, g, w in zip(("c", "h"), got, want):
      np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5, err_msg=f"carry {name}")

  def test_logits_and_carry_match_the_reference_with_the_same_masks(self):
    logits, carry = self.train_apply()
    want_logits, want_carry = reference.lstm_forward(self.params, self.tokens, self.carry,
                                                        self.masks, keep=1.0 - DROPOUT)
    np.testing.assert_allclose(logits, want_logits, rtol=1e-5, atol=1e-5)
    self.assert_carry_close(carry, want_carry)
    # The masks matter: without them the reference's logits and carry are elsewhere.
    plain_logits, plain_carry = reference.lstm_forward(self.params, self.tokens, self.carry)
    self.assertGreater(np.abs(np.asarray(plain_logits) - np.asarray(want_logits)).max(), 1e-2)
    self.assertGreater(np.abs(np.asarray(plain_carry[1]) - np.asarray(want_carry[1])).max(), 1e-2)

  def test_training_nll_matches_the_reference_with_the_same_masks(self):
    # The path training differentiates: the NLL of each target, never the logits.
    nll, carry = self.train_apply(targets_BxT=self.targets)
    want_logits, want_carry = reference.lstm_forward(self.params, self.tokens, self.carry,
                                                        self.masks, keep=1.0 - DROPOUT)
    want_nll = -jnp.take_along_axis(jax.nn.log_softmax(want_logits), self.targets[..., None],
                                    axis=-1)[..., 0]
    np.testing.assert_allclose(nll, want_nll, rtol=1e-5, atol=1e-5)
    self.assert_carry_close(carry, want_carry)


if __name__ == "__main__":
  absltest.main()
