"""The regularizers of the papers that extended Zaremba et al. (2014) on the same LSTM.

Each is a switch, off by default (every existing preset keeps its numbers bit for bit):
- weight tying (Press & Wolf 2017, arXiv:1608.05859; Inan et al. 2017, arXiv:1611.01462): the
  softmax's weights are the embedding, transposed; embedding size = hidden size;
- projection regularization (Press & Wolf 2017): a projection x P + p_b [H, H] before the tied
  softmax, and lambda * ||P||^2 added to the loss.

`Options` is what the model reads (`model.options`); `options_from_config` makes it from a Config.
`penalty` is the loss term `train.train_step` adds.
"""

import dataclasses

import jax.numpy as jnp



@dataclasses.dataclass(frozen=True)
class Options:
  """What the model does beyond the paper. The defaults are the paper's model."""

  # The softmax's weights are embedding^T (no softmax_w parameter).
  tie_weights: bool = False
  # > 0: a projection (params projection_w [H, H], projection_b [H]) before the softmax, and
  # projection_reg * sum(projection_w ** 2) added to the loss.
  projection_reg: float = 0.0

  @property
  def output_projection(self) -> bool:
    return self.projection_reg > 0


def options_from_config(config) -> Options:
  """The model's Options from a Config (or anything with its fields; absent ones are off)."""
  defaults = Options()
  return Options(**{f.name: getattr(config, f.name, getattr(defaults, f.name))
                    for f in dataclasses.fields(Options)})


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
