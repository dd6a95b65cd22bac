"""The LSTM language model of Zaremba et al. (2014): embedding, stacked LSTMs, softmax.

``LanguageModel.apply({'params': p}, tokens_BxT, carry, train=...)`` is a pure function
``(params, tokens, carry) -> (logits_BxTxV, carry)``. The carry (c and h of every layer) goes in
and comes out explicitly, so the caller decides when it is reset (each epoch) and where
gradients stop (each window: the carry is an input, never differentiated).
"""

import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


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


def _dot(a, b, contract, dtype):
  """dot_general contracting a's axis contract[0] with b's contract[1], with inputs in `dtype`
  (bfloat16 or float32) and float32 accumulation and result.

  Written as one dot_general, never as a transpose and a matmul: XLA's CPU backend runs
  bfloat16 [M,K]x[K,N] and [M,K]x[N,K] products at twice the float32 speed, but turns a
  bfloat16 product whose operand is an explicit transpose back into a float32 one.
  """
  dims = (((contract[0],), (contract[1],)), ((), ()))
  return jax.lax.dot_general(a.astype(dtype), b.astype(dtype), dims,
                             preferred_element_type=jnp.float32)


def _matmul(a, b, dtype):
  """a @ b for a 2-D b: `_dot` over a's last axis and b's first."""
  return _dot(a, b, (a.ndim - 1, 0), dtype)


def _transpose_by_gather(a_MxK):
  """a.T, written as a gather so that XLA materialises it row-major instead of folding it."""
  m, k = a_MxK.shape
  index_KxM = np.arange(k)[:, None] + k * np.arange(m)[None, :]
  return a_MxK.reshape(-1)[index_KxM.reshape(-1)].reshape(k, m)


def _gathered_weight_grads(dtype):
  """Whether weight gradients go through `_transpose_by_gather`: only bfloat16 on the CPU gains."""
  return jnp.dtype(dtype) != jnp.float32 and jax.default_backend() == "cpu"


def _weight_grad(x_MxK, dy_MxN, dtype):
  """x^T dy: the gradient of w in y = x @ w, summed over the M rows.

  As one dot_general, x^T dy contracts x's first axis, a form XLA's CPU backend runs in float32
  even for bfloat16 inputs. For bfloat16 on the CPU, x^T is therefore materialised first (by a
  gather, which XLA does not fold back into the product; a transpose it would) and the product
  runs as a bfloat16 [K,M]x[M,N]: 1.6-1.9x faster for this model's weight gradients, measured
  by benchmarks/weight_grad.py. float32 products gain nothing from it and keep the one dot_general.
  """
  if not _gathered_weight_grads(dtype):
    return _dot(x_MxK, dy_MxN, (0, 0), dtype)
  return _dot(_transpose_by_gather(x_MxK.astype(dtype)), dy_MxN, (1, 0), dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _project(x_NxD, w_DxK, dtype):
  """x @ w for a 2-D x, with the weight gradient of `_weight_grad`."""
  return _matmul(x_NxD, w_DxK, dtype)


def _project_fwd(x_NxD, w_DxK, dtype):
  return _matmul(x_NxD, w_DxK, dtype), (x_NxD, w_DxK)


def _project_bwd(dtype, residuals, dy_NxK):
  x_NxD, w_DxK = residuals
  return _dot(dy_NxK, w_DxK, (1, 1), dtype), _weight_grad(x_NxD, dy_NxK, dtype)


_project.defvjp(_project_fwd, _project_bwd)


def input_projection(x_TxBxD, w_Dx4H, b_4H, dtype):
  """x_t W_ih + b for every step at once: the half of the gates that does not depend on the
  recurrence, as one big matmul outside its loop. Autodiff's products are the fast ones except
  for bfloat16 on the CPU, which gets `_project`'s weight gradient."""
  if not _gathered_weight_grads(dtype):
    return _matmul(x_TxBxD, w_Dx4H, dtype) + b_4H
  t, batch, d = x_TxBxD.shape
  return _project(x_TxBxD.reshape(t * batch, d), w_Dx4H, dtype).reshape(t, batch, -1) + b_4H


def _gate_scale(hidden):
  """[0.5]*3H + [1]*H: sigmoid(a) = 0.5 * tanh(0.5 * a) + 0.5 for i, f, o; tanh(a) for g.

  One tanh over the whole 4H gate vector, instead of three sigmoids and a tanh on slices,
  is the cheapest form of the gates inside the loop (where XLA cannot batch over time).
  """
  return jnp.concatenate([jnp.full((3 * hidden,), 0.5, jnp.float32),
                          jnp.ones((hidden,), jnp.float32)])


def _factors_in_loop():
  """Whether the forward loop computes the backward's per-step factors (see `_step_factors`).

  On a CPU it does: the step has the gates at hand, and the backward then reads the factors once
  instead of re-reading every stored gate in a separate pass (char_small bf16 training +4.5%
  here). On a GPU each step of the loop is bound by latency, not arithmetic, so the extra work in
  it costs time (small -10%, large -4% on an H200); there the forward stores c and the gates and
  the backward computes the factors over all steps at once, before its loop.
  """
  return jax.default_backend() == "cpu"


def _step_factors(c_prev, act, tanh_c):
  """The backward's step-local factors, for one step (BxH) or all steps at once (TxBxH).

  From the gate activations act = [i, f, o, g], the cell before the step and tanh of the cell
  after it: d(pre-activation) = [dc, dc, dh, dc] * da_from_d gate by gate (each gate's derivative
  times its partner in c = f c_prev + i g), dc/dh through h = o tanh(c), and f (dc_prev = dc f).
  """
  i, f, o, g = jnp.split(act, 4, axis=-1)
  da_from_d = jnp.concatenate([g * i * (1.0 - i), c_prev * f * (1.0 - f),
                               tanh_c * o * (1.0 - o), i * (1.0 - g * g)], axis=-1)
  dc_from_dh = o * (1.0 - tanh_c * tanh_c)
  return da_from_d, dc_from_dh, f


def _transposed_recurrent_product(dtype):
  """Whether the forward loop's h @ W_hh is written against W_hh^T ([4H, H], contracting the
  last axes of both) instead of W_hh: bfloat16 on the CPU, where XLA's YNNPACK products then
  run faster for the 1500-unit models (same-process A/B of whole training steps: large +14%,
  char_large +7-9%; evaluation at batch 20, large +26%) and as fast for the others (small,
  medium, char_small within 1.5%). float32 keeps the plain form (large -3% with this one), and
  so does the batch-1 matrix-vector loop (bfloat16 batch-1 came out 9-19% slower with it).
  """
  return _gathered_weight_grads(dtype)


def _recurrence_forward(xw_TxBx4H, w_hh_Hx4H, c_BxH, h_BxH, dtype, emit=None):
  """The loop over time: (final (c, h), per-step outputs).

  The per-step outputs are h_TxBxH alone when `emit` is None; (h, da_from_d, dc_from_dh, f) when
  it is "factors"; (h, c, gates [i, f, o, g]) when it is "gates".
  """
  scale_4H = _gate_scale(w_hh_Hx4H.shape[0])
  offset_4H = 0.5 - 0.5 * (scale_4H == 1.0)  # 0.5 for i, f, o; 0 for g
  # Scaling by 0.5 is exact, so the pre-scaled weights and inputs change no rounding.
  w = (w_hh_Hx4H * scale_4H).astype(dtype)  # cast once, outside the loop
  xw_TxBx4H = xw_TxBx4H * scale_4H
  # Batch 1 (the test protocol) on the CPU: the same step on 1-D state vectors, which XLA's CPU
  # backend runs as a matrix-vector product ~5% faster than a 1-row matmul (not measured on GPUs).
  vector = h_BxH.shape[0] == 1 and emit is None and jax.default_backend() == "cpu"
  transposed = _transposed_recurrent_product(dtype) and not vector
  if transposed:
    w = w.T  # [4H, H]

  def step(carry, xw_Bx4H):
    c_prev, h_prev = carry
    hw = _dot(h_prev, w, (h_prev.ndim - 1, 1 if transposed else 0), dtype)
    act = jnp.tanh(xw_Bx4H + hw) * scale_4H + offset_4H
    i, f, o, g = jnp.split(act, 4, axis=-1)
    c = f * c_prev + i * g
    tanh_c = jnp.tanh(c)
    h = o * tanh_c
    if emit == "factors":
      return (c, h), (h, *_step_factors(c_prev, act, tanh_c))
    if emit == "gates":
      return (c, h), (h, c, act)
    return (c, h), h

  if vector:
    (c_H, h_H), h_TxH = jax.lax.scan(step, (c_BxH[0], h_BxH[0]), xw_TxBx4H[:, 0])
    return (c_H[None], h_H[None]), h_TxH[:, None]
  return jax.lax.scan(step, (c_BxH, h_BxH), xw_TxBx4H)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def lstm_recurrence(xw_TxBx4H, w_hh_Hx4H, c_BxH, h_BxH, dtype=jnp.float32):
  """Runs the recurrence over time given the input projections x_t W_ih + b of every step.

  The backward pass is written by hand, as cuDNN does it: its loop over time carries only dh
  and dc and emits the gates' gradients; the gradient of W_hh is then ONE matmul over all T*B
  rows instead of a small one per step (what autodiff of `lax.scan` would do).

  Args:
    xw_TxBx4H: input projections (bias included), gates ordered [i, f, o, g].
    w_hh_Hx4H: recurrent weights.
    c_BxH, h_BxH: the state before the first step.
    dtype: matmul input type (float32, or bfloat16 for speed); state and sums stay float32.

  Returns:
    (h_TxBxH, (c_BxH, h_BxH)): every step's output and the final state.
  """
  final, h_TxBxH = _recurrence_forward(xw_TxBx4H, w_hh_Hx4H, c_BxH, h_BxH, dtype)
  return h_TxBxH, final


def _recurrence_fwd(xw_TxBx4H, w_hh_Hx4H, c_BxH, h_BxH, dtype):
  if _factors_in_loop():
    final, (h_TxBxH, *factors) = _recurrence_forward(
        xw_TxBx4H, w_hh_Hx4H, c_BxH, h_BxH, dtype, "factors")
    saved = {"factors": tuple(factors)}
  else:
    final, (h_TxBxH, c_TxBxH, gates_TxBx4H) = _recurrence_forward(
        xw_TxBx4H, w_hh_Hx4H, c_BxH, h_BxH, dtype, "gates")
    saved = {"c0": c_BxH, "c": c_TxBxH, "gates": gates_TxBx4H}
  return (h_TxBxH, final), (w_hh_Hx4H, h_BxH, h_TxBxH, saved)


def _recurrence_bwd(dtype, residuals, cotangents):
  w_hh_Hx4H, h0_BxH, h_TxBxH, saved = residuals
  dh_out_TxBxH, (dc_BxH, dh_BxH) = cotangents
  if "factors" in saved:
    da_from_d_TxBx4H, dc_from_dh_TxBxH, f_TxBxH = saved["factors"]
  else:
    c_prev_TxBxH = jnp.concatenate([saved["c0"][None], saved["c"][:-1]], axis=0)
    da_from_d_TxBx4H, dc_from_dh_TxBxH, f_TxBxH = _step_factors(
        c_prev_TxBxH, saved["gates"], jnp.tanh(saved["c"]))
  w = w_hh_Hx4H.astype(dtype)  # cast once; used untransposed (see _dot)

  def step(carry, xs):
    dc, dh = carry
    dh_out, dc_from_dh, da_from_d, f = xs
    dh = dh + dh_out
    dc = dc + dh * dc_from_dh
    da = jnp.concatenate([dc, dc, dh, dc], axis=-1) * da_from_d
    return (dc * f, _dot(da, w, (1, 1), dtype)), da

  (dc0, dh0), da_TxBx4H = jax.lax.scan(
      step, (dc_BxH, dh_BxH), (dh_out_TxBxH, dc_from_dh_TxBxH, da_from_d_TxBx4H, f_TxBxH),
      reverse=True)
  h_prev_TxBxH = jnp.concatenate([h0_BxH[None], h_TxBxH[:-1]], axis=0)
  hidden = h_prev_TxBxH.shape[-1]
  dw_hh = _weight_grad(h_prev_TxBxH.reshape(-1, hidden), da_TxBx4H.reshape(-1, 4 * hidden), dtype)
  return da_TxBx4H, dw_hh, dc0, dh0


lstm_recurrence.defvjp(_recurrence_fwd, _recurrence_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def softmax_nll(x_NxH, w_HxV, b_V, targets_N, dtype=jnp.float32):
  """-log softmax(x W + b)[target] per row, without keeping the logits around.

  The forward pass keeps softmax - onehot (the gradient of the NLL with respect to the logits)
  in `dtype`, so the backward pass is two matmuls and a sum: one pass over the N x V logits
  fewer than autodiff of log_softmax, and bfloat16-friendly matmul forms throughout.

  Called outside a gradient (evaluation), in float32 on a CPU, the bias rides in the product as
  one more row of W against a column of ones: XLA's CPU backend otherwise adds it in a pass of
  its own over the N x V logits (batch-1 test: small +6-8%, medium +2%, large even; evaluation at
  batch 20, small +9%). Same numbers: the test NLLs of both forms came out identical here.
  """
  if not _fold_output_bias(dtype):
    return _softmax_nll_fwd(x_NxH, w_HxV, b_V, targets_N, dtype)[0]
  ones_Nx1 = jnp.ones((x_NxH.shape[0], 1), x_NxH.dtype)
  logits_NxV = _matmul(jnp.concatenate([x_NxH, ones_Nx1], axis=1),
                       jnp.concatenate([w_HxV, b_V[None]], axis=0), dtype)
  return _nll_from_logits(logits_NxV, targets_N)[0]


def _fold_output_bias(dtype):
  """Whether evaluation's softmax folds its bias into the product (see `softmax_nll`): float32
  on a CPU. In bfloat16 the bias would be rounded with the product's inputs; on a GPU the
  product's K would become H + 1, off the sizes its kernels are fastest at (not measured)."""
  return jnp.dtype(dtype) == jnp.float32 and jax.default_backend() == "cpu"


def _nll_from_logits(logits_NxV, targets_N):
  """(nll_N, lse_N): -log softmax(logits)[target] per row, and the rows' logsumexp."""
  lse_N = jax.nn.logsumexp(logits_NxV, axis=-1)
  target_logit_N = jnp.take_along_axis(logits_NxV, targets_N[:, None], axis=-1)[:, 0]
  return lse_N - target_logit_N, lse_N


def _softmax_nll_fwd(x_NxH, w_HxV, b_V, targets_N, dtype):
  logits_NxV = _matmul(x_NxH, w_HxV, dtype) + b_V
  nll_N, lse_N = _nll_from_logits(logits_NxV, targets_N)
  onehot_NxV = jax.nn.one_hot(targets_N, logits_NxV.shape[-1], dtype=jnp.float32)
  dlogits_NxV = (jnp.exp(logits_NxV - lse_N[:, None]) - onehot_NxV).astype(dtype)
  return nll_N, (x_NxH, w_HxV, dlogits_NxV)


def _softmax_nll_bwd(dtype, residuals, g_N):
  x_NxH, w_HxV, dlogits_NxV = residuals
  d_NxV = dlogits_NxV * g_N[:, None].astype(dtype)
  dx_NxH = _dot(d_NxV, w_HxV, (1, 1), dtype)
  dw_HxV = _weight_grad(x_NxH, d_NxV, dtype)
  return dx_NxH, dw_HxV, d_NxV.astype(jnp.float32).sum(0), None


softmax_nll.defvjp(_softmax_nll_fwd, _softmax_nll_bwd)


class LSTMLayer(nn.Module):
  """One LSTM layer: gates = [x, h] @ [W_ih; W_hh] + b, no extra forget-gate bias."""

  hidden_size: int
  init_scale: float
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, c_BxH, h_BxH, *, x_TxBxD=None, table_VxD=None, tokens_TxB=None,
               xw_table_Vx4H=None):
    """Runs the layer over inputs x_TxBxD, or over the rows table_VxD[tokens_TxB].

    Given a table (an embedding without dropout) and tokens, the layer projects the V table rows
    once and gathers the results: (E W_ih + b)[tokens] equals E[tokens] W_ih + b row by row, and
    costs V rows of matmul instead of T*B (50 instead of 5,000 for a character model's window),
    forward and backward. `xw_table_Vx4H`, if given, is that projection already made
    (`first_layer_table`), for a caller that reuses it across windows.
    """
    init = symmetric_uniform(self.init_scale)
    four_h = 4 * self.hidden_size
    d = (x_TxBxD if table_VxD is None else table_VxD).shape[-1]
    w_ih = self.param("w_ih", init, (d, four_h))
    w_hh = self.param("w_hh", init, (self.hidden_size, four_h))
    b = self.param("b", init, (four_h,))
    if table_VxD is None:
      xw_TxBx4H = input_projection(x_TxBxD, w_ih, b, self.dtype)
    else:
      if xw_table_Vx4H is None:
        xw_table_Vx4H = _project_table(table_VxD, w_ih, b, self.dtype)
      xw_TxBx4H = xw_table_Vx4H[tokens_TxB]
    return lstm_recurrence(xw_TxBx4H, w_hh, c_BxH, h_BxH, self.dtype)


def _project_table(table_VxD, w_ih_Dx4H, b_4H, dtype):
  return _matmul(table_VxD, w_ih_Dx4H, dtype) + b_4H


def first_layer_table(params, dtype=jnp.float32):
  """E W_ih + b: the first layer's input projection of every vocabulary row, for `xw_table_Vx4H`.

  Without dropout on the embedding (evaluation), a stream of more tokens than the vocabulary has
  rows is cheaper to run this way: V rows of matmul once, then a lookup per token, instead of
  one row per token (the word models' 82k test tokens against 10k rows: large's per-token input
  projection is 18 MFLOP of its ~100 in a batch-1 test pass).
  """
  layer_0 = params["lstm_0"]
  return _project_table(params["embedding"], layer_0["w_ih"], layer_0["b"], dtype)


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
  dtype: jnp.dtype = jnp.float32  # matmul inputs; parameters, state and sums are float32

  @nn.compact
  def __call__(self, tokens_BxT, carry: LSTMState, *, train: bool, targets_BxT=None,
               xw_table_Vx4H=None):
    """Logits_BxTxV for every position, or, given targets_BxT, the NLL_BxT of each target.

    The NLL path (`softmax_nll`) is faster to differentiate and never builds log-probabilities.
    `xw_table_Vx4H` (from `first_layer_table`, without dropout only) feeds the first layer a
    projection made once for many windows.
    """
    init = symmetric_uniform(self.init_scale)
    drop = nn.Dropout(self.dropout, deterministic=not train or self.dropout == 0.0)
    if xw_table_Vx4H is not None and not drop.deterministic:
      raise ValueError("xw_table_Vx4H skips the embedding's dropout: pass it without dropout only")
    embedding_VxH = self.param("embedding", init, (self.vocab_size, self.hidden_size))
    # Without dropout on the embedding, a vocabulary smaller than the window's token count (the
    # character models) is cheaper to project before the lookup than after (see LSTMLayer).
    project_table = drop.deterministic and (
        xw_table_Vx4H is not None or self.vocab_size < tokens_BxT.size)
    first_input = (dict(table_VxD=embedding_VxH, tokens_TxB=tokens_BxT.T,
                        xw_table_Vx4H=xw_table_Vx4H) if project_table else
                   dict(x_TxBxD=drop(embedding_VxH[tokens_BxT.T])))
    new_c, new_h = [], []
    for layer in range(self.num_layers):
      layer_input = first_input if layer == 0 else dict(x_TxBxD=x_TxBxH)
      h_TxBxH, (c, h) = LSTMLayer(self.hidden_size, self.init_scale, self.dtype,
                                  name=f"lstm_{layer}")(
          carry.c_LxBxH[layer], carry.h_LxBxH[layer], **layer_input)
      x_TxBxH = drop(h_TxBxH)
      new_c.append(c)
      new_h.append(h)
    w_out = self.param("softmax_w", init, (self.hidden_size, self.vocab_size))
    b_out = self.param("softmax_b", init, (self.vocab_size,))
    carry = LSTMState(jnp.stack(new_c), jnp.stack(new_h))
    x_BxTxH = jnp.swapaxes(x_TxBxH, 0, 1)
    if targets_BxT is None:
      return _matmul(x_BxTxH, w_out, self.dtype) + b_out, carry
    batch, steps = targets_BxT.shape
    nll_N = softmax_nll(x_BxTxH.reshape(batch * steps, -1), w_out, b_out,
                        targets_BxT.reshape(-1), self.dtype)
    return nll_N.reshape(batch, steps), carry


def make_model(config, vocab_size: int) -> LanguageModel:
  return LanguageModel(vocab_size=vocab_size, hidden_size=config.hidden_size,
                       num_layers=config.num_layers, dropout=config.dropout,
                       init_scale=config.init_scale, dtype=jnp.dtype(config.dtype))
