"""The regularizers of the papers that extended Zaremba et al. (2014) on the same LSTM.

Each is a switch, off by default (every existing preset keeps its numbers bit for bit):
- weight tying (Press & Wolf 2017, arXiv:1608.05859; Inan et al. 2017, arXiv:1611.01462): the
  softmax's weights are the embedding, transposed; embedding size = hidden size;
- projection regularization (Press & Wolf 2017): a projection x P + p_b [H, H] before the tied
  softmax, and lambda * ||P||^2 added to the loss;
- variational ("locked") dropout (Gal & Ghahramani 2016, arXiv:1512.05287): the non-recurrent
  dropout masks are drawn once per sequence (batch row) and held over the whole window, and
  `dropout_recurrent` drops units of h_{t-1} in h_{t-1} W_hh with one mask per row and window;
- embedding dropout (Merity et al. 2017, arXiv:1708.02182; Gal's word dropout): whole rows of the
  embedding matrix (word types) dropped for the window, the rest scaled by 1 / (1 - p);
- weight drop (Merity et al.): DropConnect on W_hh, one mask per layer and window;
- dropout between layers at its own rate (Merity's dropouth).
Weight decay and NT-ASGD act in the optimizer and the loop (`train.py`, `loop.py`).

Every mask is drawn from the step's dropout key (`train.train_step` folds the step number into
the run's key), so each window gets fresh masks and a resumed run draws the same ones.

`Options` is what the model reads (`model.options`); `options_from_config` makes it from a Config.
`penalty` is the loss term `train.train_step` adds.
"""

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Options:
  """What the model does beyond the paper. The defaults are the paper's model."""

  # The softmax's weights are embedding^T (no softmax_w parameter).
  tie_weights: bool = False
  # > 0: a projection (params projection_w [H, H], projection_b [H]) before the softmax, and
  # projection_reg * sum(projection_w ** 2) added to the loss.
  projection_reg: float = 0.0
  # The non-recurrent dropout masks (embedding output, between layers, before the softmax) are
  # one per row for the whole window instead of one per position.
  locked_dropout: bool = False
  # Between layers, this probability instead of the model's `dropout` (< 0: the same).
  dropout_between_layers: float = -1.0
  # Probability of dropping a unit of h_{t-1} in h_{t-1} W_hh; one mask per row, layer, window.
  dropout_recurrent: float = 0.0
  # Probability of dropping a word (a row of the embedding matrix) for the window.
  dropout_embedding: float = 0.0
  # Probability of dropping an entry of W_hh for the window (DropConnect), per layer.
  weight_drop: float = 0.0

  @property
  def output_projection(self) -> bool:
    return self.projection_reg > 0

  def between_layers(self, dropout: float) -> float:
    """The dropout probability between layers, given the model's `dropout`."""
    return dropout if self.dropout_between_layers < 0 else self.dropout_between_layers


def options_from_config(config) -> Options:
  """The model's Options from a Config (or anything with its fields; absent ones are off)."""
  defaults = Options()
  return Options(**{f.name: getattr(config, f.name, getattr(defaults, f.name))
                    for f in dataclasses.fields(Options)})


def keep_mask(key, rate: float, shape) -> jax.Array:
  """Inverted dropout's multiplier: 0 with probability `rate`, else 1 / (1 - rate), float32."""
  keep = 1.0 - rate
  return jnp.where(jax.random.bernoulli(key, keep, shape), jnp.float32(1.0 / keep),
                   jnp.float32(0.0))


def recurrent_mask(key, rate: float, batch: int, hidden: int) -> jax.Array:
  """Gal's recurrent mask, [B, H]: one per row (sequence), used at every step of the window."""
  return keep_mask(key, rate, (batch, hidden))


def drop_embedding_rows(key, embedding_VxH, rate: float):
  """Embedding dropout (Merity et al. 2017, section 4.3): each word's row of the embedding kept
  whole, scaled by 1 / (1 - rate), or zeroed whole, the same for every occurrence in the window."""
  return embedding_VxH * keep_mask(key, rate, (embedding_VxH.shape[0], 1))


def drop_weights(key, w, rate: float):
  """DropConnect on a weight matrix (Merity et al.'s weight drop on W_hh): each entry kept and
  scaled by 1 / (1 - rate) or zeroed, one mask for the window."""
  return w * keep_mask(key, rate, w.shape)


def nt_asgd_triggers(logs: list[float], value: float, nonmono: int) -> bool:
  """NT-ASGD's condition (Merity et al. 2017, Algorithm 1): with the validation results `logs`
  before this one, averaging starts when there are more than `nonmono` of them and `value` is
  worse (higher) than the best of all but the last `nonmono`."""
  return len(logs) > nonmono and value > min(logs[:-nonmono])


def penalty(params, options: Options):
  """The loss terms on the weights themselves (0.0 when there are none).

  Projection regularization, as Press & Wolf's released code (ptb_word_lm_WT_PR.py) adds it:
  `tf.nn.l2_loss(proj) / (batch_size * 6.5)`, i.e. lambda * sum(P^2) with lambda = 1 / 260 for
  batch 20, on the loss that `train.sequence_loss` differentiates (NLL summed over the window's
  time steps, averaged over its rows).
  """
  if not options.output_projection:
    return 0.0
  return options.projection_reg * jnp.sum(jnp.square(params["projection_w"]))
