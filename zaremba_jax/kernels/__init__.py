"""The kernels the model calls: the recurrence, the projections and the output layer's loss.

Each function takes a `Plan` (see `plan.py`; `plan_for` makes one for a use of the model) and runs
the fast form or, for a plan with kernels="reference", the plain one in `reference.py`. The model
needs nothing else from here.
"""

import jax

from zaremba_jax.kernels import matmul
from zaremba_jax.kernels import recurrence
from zaremba_jax.kernels import reference
from zaremba_jax.kernels import softmax
from zaremba_jax.kernels.plan import (  # pylint: disable=unused-import
    KERNELS, Plan, plan_for, resolve)


# The parameters the kernels read only through a matmul, which casts them to the plan's dtype first.
MATMUL_WEIGHTS = ("embedding", "w_ih", "w_hh", "softmax_w")


def cast_weights(params, plan: Plan):
  """params with every weight matrix already in the plan's matmul dtype; biases stay float32.

  The same numbers as `params` (each kernel casts these matrices before any use), for callers
  that run many calls on the same weights: one token at a time (serve, query, sample), a call's
  casts would otherwise read every float32 weight again for each token.
  """
  if plan.dtype == "float32":
    return params
  return jax.tree_util.tree_map_with_path(
      lambda path, x: x.astype(plan.dtype) if path[-1].key in MATMUL_WEIGHTS else x, params)


def lstm_recurrence(xw_TxBx4H, w_hh_Hx4H, c_BxH, h_BxH, plan: Plan, h_mask_BxH=None):
  """The LSTM over time from its input projections: (h_TxBxH, (c_BxH, h_BxH)); `h_mask_BxH`, if
  given, is the recurrent dropout mask on h_{t-1} in h_{t-1} W_hh (one per row, every step)."""
  if h_mask_BxH is None:  # the paper's recurrence, called exactly as before the masks existed
    if plan.kernels == "reference":
      return reference.lstm_recurrence(xw_TxBx4H, w_hh_Hx4H, c_BxH, h_BxH, plan)
    return recurrence.lstm_recurrence(xw_TxBx4H, w_hh_Hx4H, c_BxH, h_BxH, plan)
  if plan.kernels == "reference":
    return reference.lstm_recurrence(xw_TxBx4H, w_hh_Hx4H, c_BxH, h_BxH, plan, h_mask_BxH)
  return recurrence.lstm_recurrence(xw_TxBx4H, w_hh_Hx4H, c_BxH, h_BxH, plan, h_mask_BxH)


def input_projection(x_TxBxD, w_Dx4H, b_4H, plan: Plan):
  """x W_ih + b for every step, outside the recurrence's loop."""
  if plan.kernels == "reference":
    return reference.input_projection(x_TxBxD, w_Dx4H, b_4H, plan)
  return matmul.input_projection(x_TxBxD, w_Dx4H, b_4H, plan)


def table_projection(table_VxD, w_Dx4H, b_4H, plan: Plan):
  """table W_ih + b: the input projection of every vocabulary row."""
  return matmul.table_projection(table_VxD, w_Dx4H, b_4H, plan)


def output_logits(x_BxTxH, w_HxV, b_V, plan: Plan):
  """x W + b: the logits of every position."""
  if plan.kernels == "reference":
    return reference.output_logits(x_BxTxH, w_HxV, b_V, plan)
  return matmul.output_logits(x_BxTxH, w_HxV, b_V, plan)


def softmax_nll(x_NxH, w_HxV, b_V, targets_N, plan: Plan):
  """-log softmax(x W + b)[target] per row."""
  if plan.kernels == "reference":
    return reference.softmax_nll(x_NxH, w_HxV, b_V, targets_N, plan)
  return softmax.softmax_nll(x_NxH, w_HxV, b_V, targets_N, plan)


def softmax_nll_tied(x_NxH, e_VxH, b_V, targets_N, plan: Plan):
  """-log softmax(x E^T + b)[target] per row, the softmax's weights tied to the embedding E."""
  if plan.kernels == "reference":
    return reference.softmax_nll(x_NxH, e_VxH.T, b_V, targets_N, plan)
  if plan.weight_grads_via_gather:  # bfloat16 on the CPU: E's gradient in its own layout
    return softmax.softmax_nll_tied(x_NxH, e_VxH, b_V, targets_N, plan)
  return softmax.softmax_nll(x_NxH, e_VxH.T, b_V, targets_N, plan)
