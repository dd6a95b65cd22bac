"""The LSTM language model of Zaremba et al. (2014): embedding, stacked LSTMs, softmax.

``LanguageModel.apply({'params': p}, tokens_BxT, carry, train=...)`` is a pure function
``(params, tokens, carry) -> (logits_BxTxV, carry)``. The carry (c and h of every layer) goes in
and comes out explicitly, so the caller decides when it is reset (each epoch) and where
gradients stop (each window: the carry is an input, never differentiated).
"""

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp


class LSTMState(NamedTuple):
  """The state carried between windows: cell and hidden state of every layer."""

  c_LxBxH: jax.Array
  h_LxBxH: jax.Array


def zero_state(num_layers: int, batch_size: int, hidden_size: int) -> LSTMState:
  shape = (num_layers, batch_size, hidden_size)
  # Two buffers, not one: a donated train state must not hold the same buffer twice.
  return LSTMState(jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.float32))


def symmetric_uniform(scale: float):
  """U(-scale, scale), the paper's initialiser for every parameter.

  (Flax's ``initializers.uniform(scale)`` draws from [0, scale).)
  """
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, minval=-scale, maxval=scale)
  return init


def lstm_gates(gates_Bx4H: jax.Array, c_BxH: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The paper's cell update from pre-activations ordered [i, f, o, g]: returns (c, h)."""
  i, f, o, g = jnp.split(gates_Bx4H, 4, axis=-1)
  c_BxH = jax.nn.sigmoid(f) * c_BxH + jax.nn.sigmoid(i) * jnp.tanh(g)
  h_BxH = jax.nn.sigmoid(o) * jnp.tanh(c_BxH)
  return c_BxH, h_BxH


def lstm_recurrence(xw_TxBx4H, w_hh_Hx4H, c_BxH, h_BxH):
  """Runs the recurrence over time given the input projections x_t W_ih + b of every step.

  Returns:
    (h_TxBxH, (c_BxH, h_BxH)): every step's output and the final state.
  """
  def step(carry, xw_Bx4H):
    c, h = carry
    c, h = lstm_gates(xw_Bx4H + h @ w_hh_Hx4H, c)
    return (c, h), h

  (c_BxH, h_BxH), h_TxBxH = jax.lax.scan(step, (c_BxH, h_BxH), xw_TxBx4H)
  return h_TxBxH, (c_BxH, h_BxH)


class LSTMLayer(nn.Module):
  """One LSTM layer: gates = [x, h] @ [W_ih; W_hh] + b, no extra forget-gate bias."""

  hidden_size: int
  init_scale: float

  @nn.compact
  def __call__(self, x_TxBxD, c_BxH, h_BxH):
    init = symmetric_uniform(self.init_scale)
    four_h = 4 * self.hidden_size
    w_ih = self.param("w_ih", init, (x_TxBxD.shape[-1], four_h))
    w_hh = self.param("w_hh", init, (self.hidden_size, four_h))
    b = self.param("b", init, (four_h,))
    # The input half of the affine map does not depend on the recurrence: one big matmul.
    xw_TxBx4H = x_TxBxD @ w_ih + b
    return lstm_recurrence(xw_TxBx4H, w_hh, c_BxH, h_BxH)


class LanguageModel(nn.Module):
  """Embedding -> dropout -> num_layers x (LSTM -> dropout) -> linear softmax.

  Dropout (probability `dropout` of dropping) sits on the non-recurrent connections only: on
  each layer's input and before the softmax, as in section 3 of the paper.
  """

  vocab_size: int
  hidden_size: int
  num_layers: int
  dropout: float
  init_scale: float

  @nn.compact
  def __call__(self, tokens_BxT, carry: LSTMState, *, train: bool):
    init = symmetric_uniform(self.init_scale)
    drop = nn.Dropout(self.dropout, deterministic=not train or self.dropout == 0.0)
    embedding_VxH = self.param("embedding", init, (self.vocab_size, self.hidden_size))
    x_TxBxH = drop(embedding_VxH[tokens_BxT.T])
    new_c, new_h = [], []
    for layer in range(self.num_layers):
      h_TxBxH, (c, h) = LSTMLayer(self.hidden_size, self.init_scale, name=f"lstm_{layer}")(
          x_TxBxH, carry.c_LxBxH[layer], carry.h_LxBxH[layer])
      x_TxBxH = drop(h_TxBxH)
      new_c.append(c)
      new_h.append(h)
    w_out = self.param("softmax_w", init, (self.hidden_size, self.vocab_size))
    b_out = self.param("softmax_b", init, (self.vocab_size,))
    logits_BxTxV = jnp.swapaxes(x_TxBxH, 0, 1) @ w_out + b_out
    return logits_BxTxV, LSTMState(jnp.stack(new_c), jnp.stack(new_h))


def make_model(config, vocab_size: int) -> LanguageModel:
  return LanguageModel(vocab_size=vocab_size, hidden_size=config.hidden_size,
                       num_layers=config.num_layers, dropout=config.dropout,
                       init_scale=config.init_scale)
