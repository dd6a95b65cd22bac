"""The model written out from the paper, for tests to compare against, and known dropout masks."""

from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np


def lstm_forward(params, tokens_BxT, carry, masks_BxTxH=None, keep=1.0):
  """The model written out from the paper, one time step and one layer at a time, in jax.numpy
  (so that jax.grad runs through it), from the state `carry` = (c_LxBxH, h_LxBxH).

  Each layer: gates [i, f, o, g] = x W_ih + h W_hh + b; c = f c + i g; h = o tanh(c). With
  `masks_BxTxH` (num_layers + 1 boolean arrays), dropout as x * mask / keep on the embedding's
  output (mask 0) and on each layer's output (mask l + 1; the last feeds the softmax), and never
  on the recurrent h or c.

  Returns:
    (logits_BxTxV, (c_LxBxH, h_LxBxH)).
  """
  c_LxBxH, h_LxBxH = carry
  num_layers = len(c_LxBxH)
  c, h = list(c_LxBxH), list(h_LxBxH)

  def drop(x_BxH, k, t):
    return x_BxH if masks_BxTxH is None else jnp.where(masks_BxTxH[k][:, t], x_BxH / keep, 0.0)

  logits = []
  for t in range(tokens_BxT.shape[1]):
    x = drop(params["embedding"][tokens_BxT[:, t]], 0, t)
    for layer in range(num_layers):
      q = params[f"lstm_{layer}"]
      i, f, o, g = jnp.split(x @ q["w_ih"] + h[layer] @ q["w_hh"] + q["b"], 4, axis=-1)
      c[layer] = jax.nn.sigmoid(f) * c[layer] + jax.nn.sigmoid(i) * jnp.tanh(g)
      h[layer] = jax.nn.sigmoid(o) * jnp.tanh(c[layer])
      x = drop(h[layer], layer + 1, t)
    logits.append(x @ params["softmax_w"] + params["softmax_b"])
  return jnp.stack(logits, axis=1), (jnp.stack(c), jnp.stack(h))


def random_carry(rng: np.random.Generator, num_layers: int, batch: int, hidden: int, scale=1.0):
  """A non-zero (c_LxBxH, h_LxBxH), h in (-1, 1) as an LSTM's output is."""
  c = scale * rng.normal(size=(num_layers, batch, hidden))
  h = np.tanh(scale * rng.normal(size=(num_layers, batch, hidden)))
  return jnp.asarray(c, jnp.float32), jnp.asarray(h, jnp.float32)


class KnownDropoutMasks:
  """Hands dropout the given keep masks instead of random ones, and records what it asked for.

  Flax's nn.Dropout draws its keep mask with jax.random.bernoulli(key, p=keep, shape=...); inside
  this context that call returns masks_BxTxH[0], [1], ... in call order (transposed when the
  activation is laid out TxBxH), so a reference can apply the same masks by position. A draw of
  any other shape (say, of a BxH recurrent state) or one more than given fails the test.
  """

  def __init__(self, masks_BxTxH):
    self.masks_BxTxH = [np.asarray(m, bool) for m in masks_BxTxH]
    self.requests = []  # (shape, p) of each draw

  def __enter__(self):
    self._patch = mock.patch.object(jax.random, "bernoulli", self._draw)
    self._patch.__enter__()
    return self

  def __exit__(self, *exc):
    return self._patch.__exit__(*exc)

  def _draw(self, key, p=0.5, shape=None, mode=None):
    del key, mode
    shape = tuple(shape)
    k = len(self.requests)
    self.requests.append((shape, float(p)))
    if k >= len(self.masks_BxTxH):
      raise AssertionError(f"dropout drew mask {k + 1} (shape {shape}); the model should draw"
                           f" {len(self.masks_BxTxH)}: the embedding's output and each layer's")
    m = self.masks_BxTxH[k]
    if shape == m.shape:
      return jnp.asarray(m)
    if shape == (m.shape[1], m.shape[0], m.shape[2]):
      return jnp.asarray(m.transpose(1, 0, 2))
    raise AssertionError(f"dropout mask {k + 1} has shape {shape}, not that of a BxTxH (or TxBxH)"
                         f" activation {m.shape}: dropout on something else than the embedding's"
                         f" and the layers' outputs")
