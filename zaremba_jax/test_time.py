"""Test-time methods on a trained model: the neural cache and dynamic evaluation.

Both read a stream token by token, batch 1 (the paper's test protocol), and never look at a
target before it is scored.

- The continuous cache (Grave, Joulin & Usunier 2017, arXiv:1612.04426): position t mixes the
  model's softmax with a distribution over the words that followed the `window` previous
  positions, each weighted by exp(theta * h_t . h_i), h being the top LSTM layer's output:
      p(w) = (1 - lambda) p_model(w) + lambda * sum_i [x_{i+1} = w] softmax_i(theta h_t . h_i).
  Where no earlier position exists (the stream's first token) the model's p stands alone.
- Dynamic evaluation (Krause, Kahembwe, Murray & Renals 2018, arXiv:1709.07432): the stream is
  cut into segments of `segment` tokens; each segment is scored, then the parameters take one
  gradient step on it and decay toward the trained ones:
      SGD form: theta <- theta - lr * g + decay * (theta_0 - theta)
      RMS form: theta <- theta - lr * g / (sqrt(MS) + eps) + min(1, decay * r) * (theta_0 - theta)
  where MS is the mean squared gradient over training windows and r = sqrt(MS) / mean(sqrt(MS))
  (the mean over every parameter), as in their code's RMS decay.

Everything here is written for one model and lifted to members by `members.lift`; the caller
jits. An ensemble adapts each member on its own, then averages their probabilities.
"""

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from zaremba_jax import data as data_lib
from zaremba_jax import members as members_lib
from zaremba_jax import model as model_lib


@dataclasses.dataclass(frozen=True)
class Cache:
  """The continuous cache's settings; window 0 (or lam 0) is the plain model."""

  window: int = 0
  theta: float = 0.3
  lam: float = 0.1

  def __post_init__(self):
    if self.window < 0 or self.theta < 0 or not 0.0 <= self.lam <= 1.0:
      raise ValueError(f"cache settings out of range: window {self.window} (>= 0), theta"
                       f" {self.theta} (>= 0), lambda {self.lam} (in [0, 1])")

  @property
  def on(self) -> bool:
    return self.window > 0


@dataclasses.dataclass(frozen=True)
class Dynamic:
  """Dynamic evaluation's settings; None means off. lr 0 is the plain model, segment by segment."""

  lr: float = 0.002
  decay: float = 0.02
  segment: int = 5
  rms: bool = True
  eps: float = 0.001
  ms_windows: int = 200    # training windows (batch `ms_batch` x `segment`) that estimate MS
  ms_batch: int = 20

  def __post_init__(self):
    if self.lr < 0 or self.decay < 0 or self.segment < 1 or self.eps <= 0 or self.ms_windows < 1:
      raise ValueError(f"dynamic evaluation settings out of range: lr {self.lr} (>= 0), decay"
                       f" {self.decay} (>= 0), segment {self.segment} (>= 1), eps {self.eps}"
                       f" (> 0), ms_windows {self.ms_windows} (>= 1)")


def _top_layer(model):
  """capture_intermediates' filter: the top LSTM layer's call (its outputs h_TxBxH and state)."""
  name = f"lstm_{model.num_layers - 1}"
  return lambda module, method: module.name == name and method == "__call__"


def apply_with_hidden(params, inputs_BxT, targets_BxT, carry, *, model):
  """One window without dropout: (nll_BxT, the top layer's h_BxTxH, the carry after it)."""
  (nll_BxT, carry), state = model.apply(
      {"params": params}, inputs_BxT, carry, train=False, targets_BxT=targets_BxT,
      capture_intermediates=_top_layer(model), mutable=["intermediates"])
  h_TxBxH = state["intermediates"][f"lstm_{model.num_layers - 1}"]["__call__"][0][0]
  return nll_BxT, jnp.swapaxes(h_TxBxH, 0, 1), carry


def stream_outputs(params, inputs_NxT, targets_NxT, *, model):
  """A batch-1 stream cut into N windows of T, the state carried from a zero start:
  every target's NLL (nll_NxT) and the top layer's output at every position (h_NxTxH)."""
  carry = model_lib.zero_state(model.num_layers, 1, model.hidden_size)

  def body(carry, window):
    inputs_T, targets_T = window
    nll_1xT, h_1xTxH, carry = apply_with_hidden(params, inputs_T[None], targets_T[None], carry,
                                                model=model)
    return carry, (nll_1xT[0], h_1xTxH[0])

  _, (nll_NxT, h_NxTxH) = jax.lax.scan(body, carry, (inputs_NxT, targets_NxT))
  return nll_NxT, h_NxTxH


def cache_nll(nll_P, h_PxH, targets_P, theta, lam, *, window: int, block: int = 256):
  """Every position's NLL under the cache mixture (see the module's docstring), nll_P.

  Position t's cache holds the pairs (h_i, targets_i) for i in [t - window, t - 1]: targets_i is
  the token at i + 1 <= t, already read when t is scored. Computed in blocks of `block` queries,
  each against its `block + window` keys (one matrix product), so the memory is
  O(block * (block + window)), not O(P^2).
  """
  positions, hidden = h_PxH.shape
  blocks = -(-positions // block)
  padded = blocks * block
  h_pad = jnp.zeros((window + padded, hidden), jnp.float32).at[window:window + positions].set(
      h_PxH.astype(jnp.float32))
  t_pad = jnp.full((window + padded,), -1, jnp.int32).at[window:window + positions].set(targets_P)
  q_h = jnp.zeros((padded, hidden), jnp.float32).at[:positions].set(h_PxH.astype(jnp.float32))
  q_t = jnp.full((padded,), -2, jnp.int32).at[:positions].set(targets_P)
  q_nll = jnp.zeros((padded,), jnp.float32).at[:positions].set(nll_P)
  q_local = jnp.arange(block)[:, None]           # query t = start + q
  k_local = jnp.arange(block + window)[None, :]  # key i = start - window + k
  lam = jnp.float32(lam)

  def one_block(start):
    queries_QxH = jax.lax.dynamic_slice_in_dim(q_h, start, block)
    keys_KxH = jax.lax.dynamic_slice_in_dim(h_pad, start, block + window)
    key_targets_K = jax.lax.dynamic_slice_in_dim(t_pad, start, block + window)
    query_targets_Q = jax.lax.dynamic_slice_in_dim(q_t, start, block)
    nll_Q = jax.lax.dynamic_slice_in_dim(q_nll, start, block)
    # key i is in t's window: t - window <= i <= t - 1, i.e. q <= k < q + window; and i >= 0.
    valid_QxK = ((k_local >= q_local) & (k_local < q_local + window)
                 & (start - window + k_local >= 0))
    scores_QxK = jnp.float32(theta) * (queries_QxH @ keys_KxH.T)
    scores_QxK = jnp.where(valid_QxK, scores_QxK, -jnp.inf)
    any_Q = valid_QxK.any(axis=1)
    norm_Q = jax.nn.logsumexp(jnp.where(any_Q[:, None], scores_QxK, 0.0), axis=1)
    hits_QxK = valid_QxK & (key_targets_K[None, :] == query_targets_Q[:, None])
    log_cache_Q = jax.nn.logsumexp(jnp.where(hits_QxK, scores_QxK, -jnp.inf), axis=1) - norm_Q
    mixed_Q = -jnp.logaddexp(jnp.log1p(-lam) - nll_Q, jnp.log(lam) + log_cache_Q)
    return jnp.where(any_Q, mixed_Q, nll_Q)

  starts = jnp.arange(blocks) * block
  return jax.lax.map(one_block, starts).reshape(-1)[:positions]


def mean_square_gradients(params, inputs_NxBxT, targets_NxBxT, *, model):
  """MS: the mean over N training windows of the squared gradient of each window's mean NLL,
  every window from a zero state (Krause et al.'s statistics, gathered without updates)."""
  def one(window):
    inputs_BxT, targets_BxT = window
    carry = model_lib.zero_state(model.num_layers, inputs_BxT.shape[0], model.hidden_size)

    def loss(p):
      nll_BxT, _ = model.apply({"params": p}, inputs_BxT, carry, train=False,
                               targets_BxT=targets_BxT)
      return nll_BxT.mean()
    grads = jax.grad(loss)(params)
    return jax.tree.map(jnp.square, grads)

  def body(total, window):
    return jax.tree.map(jnp.add, total, one(window)), None

  zeros = jax.tree.map(jnp.zeros_like, params)
  total, _ = jax.lax.scan(body, zeros, (inputs_NxBxT, targets_NxBxT))
  return jax.tree.map(lambda x: x / inputs_NxBxT.shape[0], total)


def dynamic_outputs(params, ms, lr, decay, inputs_SxT, targets_SxT, mask_SxT, *, model,
                    settings: Dynamic):
  """Dynamic evaluation of a batch-1 stream cut into S segments of T: each segment's NLL (with
  the parameters as they stood before it) and top-layer outputs, nll_SxT and h_SxTxH.

  `ms` is `mean_square_gradients`' result (unused by the SGD form); `lr` and `decay` are
  arguments, not `settings`' fields, so that one compilation serves a search over them. Masked
  positions (the last segment's padding) are scored but neither counted nor learned from.
  """
  params_0 = params
  if settings.rms:
    rms = jax.tree.map(jnp.sqrt, ms)
    leaves = jax.tree.leaves(rms)
    mean_rms = sum(x.sum() for x in leaves) / sum(x.size for x in leaves)
    step_scale = jax.tree.map(lambda r: 1.0 / (r + settings.eps), rms)
    decay = jax.tree.map(lambda r: jnp.minimum(1.0, decay * r / mean_rms), rms)
  else:
    step_scale = jax.tree.map(lambda p: jnp.ones((), jnp.float32), params)
    decay = jax.tree.map(lambda p: jnp.asarray(decay, jnp.float32), params)
  carry = model_lib.zero_state(model.num_layers, 1, model.hidden_size)

  def body(state, segment):
    params, carry = state
    inputs_T, targets_T, mask_T = segment

    def loss(p):
      nll_1xT, h_1xTxH, new_carry = apply_with_hidden(p, inputs_T[None], targets_T[None], carry,
                                                      model=model)
      return (nll_1xT[0] * mask_T).sum() / jnp.maximum(mask_T.sum(), 1.0), (nll_1xT[0], h_1xTxH[0],
                                                                            new_carry)
    (_, (nll_T, h_TxH, carry)), grads = jax.value_and_grad(loss, has_aux=True)(params)
    params = jax.tree.map(
        lambda p, g, s, d, p0: p - lr * g * s + d * (p0 - p),
        params, grads, step_scale, decay, params_0)
    return (params, jax.lax.stop_gradient(carry)), (nll_T, h_TxH)

  _, (nll_SxT, h_SxTxH) = jax.lax.scan(body, (params, carry), (inputs_SxT, targets_SxT, mask_SxT))
  return nll_SxT, h_SxTxH


def segments(stream: np.ndarray, length: int):
  """A token stream as batch-1 windows of `length`: (inputs_NxT, targets_NxT, mask_NxT), the last
  window padded and masked."""
  inputs_NxBxT, targets_NxBxT, mask_NxBxT = data_lib.eval_windows(data_lib.batchify(stream, 1),
                                                                  length)
  return inputs_NxBxT[:, 0], targets_NxBxT[:, 0], mask_NxBxT[:, 0]


class Scorer:
  """Every member's per-token NLL and top-layer outputs over a stream, plain or dynamic, compiled
  once per shape; `with_cache` then mixes in the cache and `total_nll` averages the members.

  `seconds` holds the last call's time without its compilation (compiled ahead, timed apart).
  """

  def __init__(self, model, test_chunk: int):
    self.model = model
    self.test_chunk = test_chunk
    self._compiled = {}
    self.seconds = 0.0

  def _run(self, key, fn, in_axes, args, **kwargs):
    """`fn` lifted to the members, compiled once per `key` (what the kwargs and shapes depend
    on), then run on `args` and timed."""
    if key not in self._compiled:
      lifted = jax.jit(members_lib.lift(functools.partial(fn, **kwargs), in_axes))
      self._compiled[key] = lifted.lower(*args).compile()
    start = time.perf_counter()
    out = jax.block_until_ready(self._compiled[key](*args))
    self.seconds = time.perf_counter() - start
    return out

  def outputs(self, params, stream: np.ndarray, dynamic: Dynamic | None = None, ms=None):
    """(nll_KxP, h_KxPxH, targets_P): per member, each target's NLL and the top layer's output."""
    length = dynamic.segment if dynamic else self.test_chunk
    inputs_NxT, targets_NxT, mask_NxT = segments(stream, length)
    shape = inputs_NxT.shape
    if dynamic is None:
      model = model_lib.planned_for(self.model, 1, inputs_NxT.size)
      nll, h = self._run(("plain", shape), stream_outputs, (0, None, None),
                         (params, inputs_NxT, targets_NxT), model=model)
    else:
      model = model_lib.planned_for(self.model, 1, length)
      static = dataclasses.replace(dynamic, lr=0.0, decay=0.0)  # both are traced arguments
      nll, h = self._run(("dynamic", shape, static), dynamic_outputs,
                         (0, 0, None, None, None, None, None),
                         (params, ms, np.float32(dynamic.lr), np.float32(dynamic.decay),
                          inputs_NxT, targets_NxT, mask_NxT), model=model, settings=static)
    members, positions = nll.shape[0], int(mask_NxT.sum())
    nll_KxP = np.asarray(nll).reshape(members, -1)[:, :positions]
    h_KxPxH = jnp.reshape(h, (members, -1, h.shape[-1]))[:, :positions]
    return nll_KxP, h_KxPxH, targets_NxT.reshape(-1)[:positions]

  def mean_square_gradients(self, params, train_stream: np.ndarray, dynamic: Dynamic):
    """Each member's MS over the first `dynamic.ms_windows` training windows."""
    rows_BxL = data_lib.batchify(train_stream, dynamic.ms_batch)
    count = min(dynamic.ms_windows, data_lib.num_train_windows(rows_BxL, dynamic.segment))
    inputs, targets = data_lib.train_windows(rows_BxL, 0, count, dynamic.segment)
    model = model_lib.planned_for(self.model, dynamic.ms_batch, dynamic.ms_batch * dynamic.segment)
    return self._run(("ms", inputs.shape), mean_square_gradients, (0, None, None),
                     (params, inputs, targets), model=model)


@functools.lru_cache(maxsize=None)
def _mixer(window: int):
  """`cache_nll` for K members at once, jitted once per window (theta and lambda are traced)."""
  return jax.jit(jax.vmap(functools.partial(cache_nll, window=window),
                          in_axes=(0, 0, None, None, None)))


def with_cache(nll_KxP, h_KxPxH, targets_P, cache: Cache) -> np.ndarray:
  """Every member's per-token NLL under `cache` (the input itself when the cache is off)."""
  if not cache.on:
    return nll_KxP
  return np.asarray(_mixer(cache.window)(jnp.asarray(nll_KxP), h_KxPxH, jnp.asarray(targets_P),
                                         np.float32(cache.theta), np.float32(cache.lam)))


def total_nll(nll_KxP) -> float:
  """The members' averaged prediction's total NLL (one member: its own), in float64."""
  return members_lib.ensemble_nll(nll_KxP)
