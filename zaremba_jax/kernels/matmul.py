"""Matmul forms: products with float32 accumulation in the forms XLA runs fastest.

Each product is one `dot_general`, never a transpose and a matmul: XLA's CPU backend runs
bfloat16 [M,K]x[K,N] and [M,K]x[N,K] products at twice the float32 speed, but turns a bfloat16
product whose operand is an explicit transpose back into a float32 one.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from zaremba_jax.kernels import native


def dot(a, b, contract, dtype):
  """dot_general contracting a's axis contract[0] with b's contract[1], with inputs in `dtype`
  and float32 accumulation and result."""
  dims = (((contract[0],), (contract[1],)), ((), ()))
  return jax.lax.dot_general(a.astype(dtype), b.astype(dtype), dims,
                             preferred_element_type=jnp.float32)


def matmul(a, b, dtype):
  """a @ b for a 2-D b: `dot` over a's last axis and b's first."""
  return dot(a, b, (a.ndim - 1, 0), dtype)


def _native_one_row(x, plan):
  """Whether x @ w is a single row and the plan has `native_one_row_products` (bfloat16)."""
  return plan.native_one_row_products and math.prod(x.shape[:-1]) == 1


def one_row_or_matmul(x, w, plan):
  """x @ w; a single bfloat16 row (`_native_one_row`) as `native.vecmat`, which reads w as
  bfloat16 (XLA converts it to float32 on every call)."""
  if _native_one_row(x, plan):
    return native.vecmat(x.reshape(-1), w).reshape(*x.shape[:-1], w.shape[1])
  return matmul(x, w, plan.dtype)


def transpose_by_gather(a_MxK):
  """a.T, written as a gather so that XLA materialises it row-major instead of folding it."""
  m, k = a_MxK.shape
  index_KxM = np.arange(k)[:, None] + k * np.arange(m)[None, :]
  return a_MxK.reshape(-1)[index_KxM.reshape(-1)].reshape(k, m)


def weight_grad(x_MxK, dy_MxN, plan):
  """x^T dy: the gradient of w in y = x @ w, summed over the M rows.

  As one dot_general, x^T dy contracts x's first axis, a form XLA's CPU backend runs in float32
  even for bfloat16 inputs; with `plan.weight_grads_via_gather`, x^T is materialised first (a
  gather, which XLA does not fold back into the product) and the product stays bfloat16.
  """
  if not plan.weight_grads_via_gather:
    return dot(x_MxK, dy_MxN, (0, 0), plan.dtype)
  return dot(transpose_by_gather(x_MxK.astype(plan.dtype)), dy_MxN, (1, 0), plan.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def project(x_NxD, w_DxK, plan):
  """x @ w for a 2-D x, with the weight gradient of `weight_grad`."""
  return matmul(x_NxD, w_DxK, plan.dtype)


def _project_fwd(x_NxD, w_DxK, plan):
  return matmul(x_NxD, w_DxK, plan.dtype), (x_NxD, w_DxK)


def _project_bwd(plan, residuals, dy_NxK):
  x_NxD, w_DxK = residuals
  return dot(dy_NxK, w_DxK, (1, 1), plan.dtype), weight_grad(x_NxD, dy_NxK, plan)


project.defvjp(_project_fwd, _project_bwd)


def input_projection(x_TxBxD, w_Dx4H, b_4H, plan):
  """x_t W_ih + b for every step at once, as one matmul outside the recurrence's loop.

  Autodiff's products are the fast ones unless `plan.weight_grads_via_gather`, which routes the
  weight gradient through `project`. One token with `plan.native_one_row_products` takes
  `one_row_or_matmul`.
  """
  if _native_one_row(x_TxBxD, plan):
    return one_row_or_matmul(x_TxBxD, w_Dx4H, plan) + b_4H
  if not plan.weight_grads_via_gather:
    return matmul(x_TxBxD, w_Dx4H, plan.dtype) + b_4H
  t, batch, d = x_TxBxD.shape
  return project(x_TxBxD.reshape(t * batch, d), w_Dx4H, plan).reshape(t, batch, -1) + b_4H


def table_projection(table_VxD, w_Dx4H, b_4H, plan):
  """table W + b: the input projection of every vocabulary row."""
  return matmul(table_VxD, w_Dx4H, plan.dtype) + b_4H


def output_logits(x_BxTxH, w_HxV, b_V, plan):
  """x W + b: logits for every position."""
  return one_row_or_matmul(x_BxTxH, w_HxV, plan) + b_V
