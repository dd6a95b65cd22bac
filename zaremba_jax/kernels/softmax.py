"""The output layer's softmax cross-entropy, fused: -log softmax(x W + b)[target] per row.

Equal to `reference.softmax_nll` (log_softmax under autodiff) in value and gradient. The forward
pass keeps softmax - onehot (the gradient of the NLL with respect to the logits) in the plan's
dtype, so the backward is two matmuls and a sum: one pass over the N x V logits fewer than
autodiff of log_softmax, and never a log-probability array.
"""

import functools

import jax
import jax.numpy as jnp

from zaremba_jax.kernels import matmul


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def softmax_nll(x_NxH, w_HxV, b_V, targets_N, plan):
  """-log softmax(x W + b)[target] per row (nll_N), without keeping the logits around.

  Outside a gradient (evaluation), with `plan.fold_output_bias` the bias rides in the product
  as one more row of W against a column of ones, and with `plan.output_rows_per_block` the rows
  go through in blocks whose logits stay in cache.
  """
  if plan.fold_output_bias:
    w_HxV = jnp.concatenate([w_HxV, b_V[None]], axis=0)
  w_HxV = w_HxV.astype(plan.dtype)  # cast once, not per block

  def nll(x_RxH, targets_R):
    if not plan.fold_output_bias:
      return _nll_from_logits(matmul.matmul(x_RxH, w_HxV, plan.dtype) + b_V, targets_R)[0]
    ones_Rx1 = jnp.ones((x_RxH.shape[0], 1), x_RxH.dtype)
    logits_RxV = matmul.matmul(jnp.concatenate([x_RxH, ones_Rx1], axis=1), w_HxV, plan.dtype)
    return _nll_from_logits(logits_RxV, targets_R)[0]

  rows = plan.output_rows_per_block
  if not rows:
    return nll(x_NxH, targets_N)
  n = x_NxH.shape[0]
  pad = -n % rows  # padded rows (target 0) are dropped below
  x_MxRxH = jnp.pad(x_NxH, ((0, pad), (0, 0))).reshape(-1, rows, x_NxH.shape[1])
  targets_MxR = jnp.pad(targets_N, (0, pad)).reshape(-1, rows)
  return jax.lax.map(lambda block: nll(*block), (x_MxRxH, targets_MxR)).reshape(-1)[:n]


def _nll_from_logits(logits_NxV, targets_N):
  """(nll_N, lse_N): -log softmax(logits)[target] per row, and the rows' logsumexp."""
  lse_N = jax.nn.logsumexp(logits_NxV, axis=-1)
  target_logit_N = jnp.take_along_axis(logits_NxV, targets_N[:, None], axis=-1)[:, 0]
  return lse_N - target_logit_N, lse_N


def _nll_and_dlogits(logits_NxV, targets_N, dtype):
  """Each row's NLL and its gradient with respect to the logits, softmax - onehot, in `dtype`."""
  nll_N, lse_N = _nll_from_logits(logits_NxV, targets_N)
  onehot_NxV = jax.nn.one_hot(targets_N, logits_NxV.shape[-1], dtype=jnp.float32)
  return nll_N, (jnp.exp(logits_NxV - lse_N[:, None]) - onehot_NxV).astype(dtype)


def _softmax_nll_fwd(x_NxH, w_HxV, b_V, targets_N, plan):
  logits_NxV = matmul.matmul(x_NxH, w_HxV, plan.dtype) + b_V
  nll_N, dlogits_NxV = _nll_and_dlogits(logits_NxV, targets_N, plan.dtype)
  return nll_N, (x_NxH, w_HxV, dlogits_NxV)


def _softmax_nll_bwd(plan, residuals, g_N):
  x_NxH, w_HxV, dlogits_NxV = residuals
  d_NxV = dlogits_NxV * g_N[:, None].astype(plan.dtype)
  dx_NxH = matmul.dot(d_NxV, w_HxV, (1, 1), plan.dtype)
  dw_HxV = matmul.weight_grad(x_NxH, d_NxV, plan)
  return dx_NxH, dw_HxV, d_NxV.astype(jnp.float32).sum(0), None


softmax_nll.defvjp(_softmax_nll_fwd, _softmax_nll_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def softmax_nll_tied(x_NxH, e_VxH, b_V, targets_N, plan):
  """`softmax_nll` with the output weights given as a tied embedding [V, H] (W = E^T).

  The same numbers; the gradient of E is made in E's own [V, H] layout, as d^T x. (The gradient
  of W = E^T from `softmax_nll`, transposed back, is a bfloat16 product in a layout that XLA's
  CPU backend cannot run when `plan.weight_grads_via_gather` builds it.)
  """
  return softmax_nll(x_NxH, e_VxH.T, b_V, targets_N, plan)


def _softmax_nll_tied_fwd(x_NxH, e_VxH, b_V, targets_N, plan):
  logits_NxV = matmul.dot(x_NxH, e_VxH, (1, 1), plan.dtype) + b_V
  nll_N, dlogits_NxV = _nll_and_dlogits(logits_NxV, targets_N, plan.dtype)
  return nll_N, (x_NxH, e_VxH, dlogits_NxV)


def _softmax_nll_tied_bwd(plan, residuals, g_N):
  x_NxH, e_VxH, dlogits_NxV = residuals
  d_NxV = dlogits_NxV * g_N[:, None].astype(plan.dtype)
  dx_NxH = matmul.dot(d_NxV, e_VxH, (1, 0), plan.dtype)
  de_VxH = matmul.dot(d_NxV, x_NxH, (0, 0), plan.dtype)
  return dx_NxH, de_VxH, d_NxV.astype(jnp.float32).sum(0), None


softmax_nll_tied.defvjp(_softmax_nll_tied_fwd, _softmax_nll_tied_bwd)
