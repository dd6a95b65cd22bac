"""The LSTM language model of Zaremba, Sutskever & Vinyals (2014): embedding, stacked LSTMs, softmax.

Section 3 of the paper, for each layer l and time step t (gates ordered [i, f, o, g]):

    i, f, o = sigmoid(x_t W_ih + h_{t-1} W_hh + b)
    g       = tanh(x_t W_ih + h_{t-1} W_hh + b)
    c_t     = f * c_{t-1} + i * g
    h_t     = o * tanh(c_t)

where x_t is the embedding of token t for the first layer and the layer below's h_t after it.
Dropout acts on the non-recurrent connections only: the embedding's output, between layers and
before the softmax; never on h_{t-1} or c_{t-1} inside the recurrence. (The successors'
regularizers, `regularizers.py`, each off by default, add masks held over the window, one on
h_{t-1} W_hh among them, whole embedding rows dropped, and DropConnect on W_hh.)

``LanguageModel.apply({'params': p}, tokens_BxT, carry, train=...)`` is a pure function
``(params, tokens, carry) -> (logits_BxTxV, carry)``. The carry (c and h of every layer) goes in
and comes out explicitly, so the caller decides when it is reset (each epoch) and where
gradients stop (each window). The loop over time and the output layer's loss are `kernels`:
`kernels/reference.py` writes the equations above as they stand; the default, faster kernels
compute the same numbers. Which forms run is the model's `plan` (see `kernels/plan.py`).
"""

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from zaremba_jax import kernels
from zaremba_jax import regularizers


class LSTMState(NamedTuple):
  """The state carried between windows: cell and hidden state of every layer."""

  c_LxBxH: jax.Array
  h_LxBxH: jax.Array


def zero_state(num_layers: int, batch_size: int, hidden_size: int,
               members: int | None = None) -> LSTMState:
  """Zeros, [L, B, H], or [K, L, B, H] for `members` models."""
  shape = (num_layers, batch_size, hidden_size)
  if members is not None:
    shape = (members, *shape)
  # Two buffers, not one: a donated train state must not hold the same buffer twice.
  return LSTMState(jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.float32))


def symmetric_uniform(scale: float):
  """U(-scale, scale), the paper's initialiser for every parameter.

  (Flax's ``initializers.uniform(scale)`` draws from [0, scale).)
  """
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, minval=-scale, maxval=scale)
  return init


class LSTMLayer(nn.Module):
  """One LSTM layer over a window: pre-activations x W_ih + h W_hh + b, no extra forget bias."""

  hidden_size: int
  init_scale: float
  plan: kernels.Plan = kernels.Plan()
  # regularizers.py, in training only: Gal's recurrent dropout on h_{t-1} W_hh (one mask per row
  # for the window) and Merity's weight drop (DropConnect on W_hh, one mask for the window).
  dropout_recurrent: float = 0.0
  weight_drop: float = 0.0

  @nn.compact
  def __call__(self, c_BxH, h_BxH, *, x_TxBxD=None, table_VxD=None, tokens_TxB=None,
               xw_table_Vx4H=None, train: bool = False):
    """Runs the layer from state (c, h) over inputs x_TxBxD, or over table_VxD[tokens_TxB].

    Given a table (an embedding without dropout) and tokens, the layer projects the V table rows
    once and gathers the results: (E W_ih + b)[tokens] equals E[tokens] W_ih + b row by row.
    `xw_table_Vx4H`, if given, is that projection already made (`first_layer_table`). With
    `train`, the layer's recurrent masks (if any) are drawn from the "dropout" key.

    Returns:
      (h_TxBxH, (c_BxH, h_BxH)): every step's output and the final state.
    """
    init = symmetric_uniform(self.init_scale)
    four_h = 4 * self.hidden_size
    d = (x_TxBxD if table_VxD is None else table_VxD).shape[-1]
    w_ih = self.param("w_ih", init, (d, four_h))
    w_hh = self.param("w_hh", init, (self.hidden_size, four_h))
    b = self.param("b", init, (four_h,))
    if table_VxD is None:
      xw_TxBx4H = kernels.input_projection(x_TxBxD, w_ih, b, self.plan)
    else:
      if xw_table_Vx4H is None:
        xw_table_Vx4H = kernels.table_projection(table_VxD, w_ih, b, self.plan)
      xw_TxBx4H = xw_table_Vx4H[tokens_TxB]
    if not (train and (self.dropout_recurrent > 0 or self.weight_drop > 0)):
      return kernels.lstm_recurrence(xw_TxBx4H, w_hh, c_BxH, h_BxH, self.plan)
    if self.weight_drop > 0:
      w_hh = regularizers.drop_weights(self.make_rng("dropout"), w_hh, self.weight_drop)
    h_mask_BxH = None
    if self.dropout_recurrent > 0:
      h_mask_BxH = regularizers.recurrent_mask(self.make_rng("dropout"), self.dropout_recurrent,
                                               *h_BxH.shape)
    return kernels.lstm_recurrence(xw_TxBx4H, w_hh, c_BxH, h_BxH, self.plan, h_mask_BxH)


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
  plan: kernels.Plan = kernels.Plan()  # kernels, matmul dtype, forms; parameters stay float32
  # The successors' regularizers (regularizers.py); the defaults are the paper's model.
  options: regularizers.Options = regularizers.Options()

  @nn.compact
  def __call__(self, tokens_BxT, carry: LSTMState, *, train: bool, targets_BxT=None,
               xw_table_Vx4H=None):
    """Logits_BxTxV for every position, or, given targets_BxT, the NLL_BxT of each target.

    The NLL path (`kernels.softmax_nll`) never builds log-probabilities. `xw_table_Vx4H` (from
    `first_layer_table`, without dropout only) feeds the first layer a projection made once.

    Returns:
      (logits_BxTxV or nll_BxT, the carry after the window's last token).
    """
    init = symmetric_uniform(self.init_scale)
    opts = self.options
    drop = nn.Dropout(self.dropout, deterministic=not train or self.dropout == 0.0)

    def dropout_at(rate):  # the paper's `drop`, unless a regularizer changes the rate or the mask
      if rate == self.dropout and not opts.locked_dropout:
        return drop
      # Locked: the [T, B, H] activation's mask is one [1, B, H] for every step of the window.
      return nn.Dropout(rate, broadcast_dims=(0,) if opts.locked_dropout else (),
                        deterministic=not train or rate == 0.0)
    drop_outside = dropout_at(self.dropout)  # the embedding's output and before the softmax
    drop_between = dropout_at(opts.between_layers(self.dropout))
    embedding_VxH = self.param("embedding", init, (self.vocab_size, self.hidden_size))
    table_VxH = embedding_VxH  # what the first layer reads; the tied softmax reads the embedding
    if train and opts.dropout_embedding > 0:
      table_VxH = regularizers.drop_embedding_rows(self.make_rng("dropout"), embedding_VxH,
                                                   opts.dropout_embedding)
    if xw_table_Vx4H is not None and not (drop_outside.deterministic and table_VxH is embedding_VxH):
      raise ValueError("xw_table_Vx4H skips the embedding's dropout: pass it without dropout only")
    if drop_outside.deterministic and (xw_table_Vx4H is not None or
                                       self.plan.first_layer_per_vocab_row):
      x_input = dict(table_VxD=table_VxH, tokens_TxB=tokens_BxT.T, xw_table_Vx4H=xw_table_Vx4H)
    else:
      x_input = dict(x_TxBxD=drop_outside(table_VxH[tokens_BxT.T]))
    new_c, new_h = [], []
    for layer in range(self.num_layers):
      h_TxBxH, (c, h) = LSTMLayer(self.hidden_size, self.init_scale, self.plan,
                                  opts.dropout_recurrent, opts.weight_drop,
                                  name=f"lstm_{layer}")(
          carry.c_LxBxH[layer], carry.h_LxBxH[layer], train=train, **x_input)
      x_TxBxH = (drop_outside if layer == self.num_layers - 1 else drop_between)(h_TxBxH)
      x_input = dict(x_TxBxD=x_TxBxH)
      new_c.append(c)
      new_h.append(h)
    # --- regularizers.py: tying and the projection before the tied softmax (Press & Wolf) ---
    if self.options.output_projection:
      x_TxBxH = kernels.input_projection(
          x_TxBxH, self.param("projection_w", init, (self.hidden_size, self.hidden_size)),
          self.param("projection_b", init, (self.hidden_size,)), self.plan)
    if self.options.tie_weights:
      w_out = embedding_VxH.T
    else:
      w_out = self.param("softmax_w", init, (self.hidden_size, self.vocab_size))
    b_out = self.param("softmax_b", init, (self.vocab_size,))
    carry = LSTMState(jnp.stack(new_c), jnp.stack(new_h))
    x_BxTxH = jnp.swapaxes(x_TxBxH, 0, 1)
    if targets_BxT is None:
      return kernels.output_logits(x_BxTxH, w_out, b_out, self.plan), carry
    batch, steps = targets_BxT.shape
    if self.options.tie_weights:
      nll_N = kernels.softmax_nll_tied(x_BxTxH.reshape(batch * steps, -1), embedding_VxH, b_out,
                                       targets_BxT.reshape(-1), self.plan)
      return nll_N.reshape(batch, steps), carry
    nll_N = kernels.softmax_nll(x_BxTxH.reshape(batch * steps, -1), w_out, b_out,
                                targets_BxT.reshape(-1), self.plan)
    return nll_N.reshape(batch, steps), carry


def init_params(model: LanguageModel, key: jax.Array, batch_size: int = 1, num_steps: int = 1):
  """Fresh parameters for `model` from `key` (their values do not depend on the shapes given)."""
  carry = zero_state(model.num_layers, batch_size, model.hidden_size)
  tokens_BxT = jnp.zeros((batch_size, num_steps), jnp.int32)
  return model.init(key, tokens_BxT, carry, train=False)["params"]


def first_layer_table(params, plan: kernels.Plan):
  """E W_ih + b: the first layer's input projection of every vocabulary row, for `xw_table_Vx4H`
  (evaluation, where it serves every window of a stream)."""
  layer_0 = params["lstm_0"]
  return kernels.table_projection(params["embedding"], layer_0["w_ih"], layer_0["b"], plan)


def make_model(config, vocab_size: int, *, batch_size: int | None = None,
               stream_tokens: int | None = None) -> LanguageModel:
  """`config`'s model, its kernels planned for `batch_size` rows (default: the config's) over
  `stream_tokens` tokens (default: one training window)."""
  batch_size = batch_size or config.batch_size
  plan = kernels.plan_for(kernels=config.kernels, dtype=config.dtype, batch_size=batch_size,
                          vocab_size=vocab_size,
                          stream_tokens=stream_tokens or batch_size * config.num_steps,
                          hidden_size=config.hidden_size)
  return LanguageModel(vocab_size=vocab_size, hidden_size=config.hidden_size,
                       num_layers=config.num_layers, dropout=config.dropout,
                       init_scale=config.init_scale, plan=plan,
                       options=regularizers.options_from_config(config))


def planned_for(model: LanguageModel, batch_size: int, stream_tokens: int) -> LanguageModel:
  """`model` with its kernels planned for another use (a validation or test stream, generation)."""
  return model.clone(plan=model.plan.resolved_for(batch_size=batch_size,
                                                  vocab_size=model.vocab_size,
                                                  stream_tokens=stream_tokens,
                                                  hidden_size=model.hidden_size))
