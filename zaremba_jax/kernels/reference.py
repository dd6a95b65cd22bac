"""The reference kernels: the paper's equations written plainly, differentiated by autodiff.

Selected with `--kernels=reference`; the fast kernels are tested against these (values and
gradients, float32 and bfloat16). Products take inputs in the plan's dtype and accumulate in
float32, as the fast kernels do; everything else is float32.
"""

import jax
import jax.numpy as jnp


def _product(a, b, dtype):
  return jnp.matmul(a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)


def lstm_cell(carry, xw_Bx4H, w_hh_Hx4H, dtype="float32", h_mask_BxH=None):
  """One step of the LSTM of Zaremba et al. (2014), section 3.1, gates ordered [i, f, o, g]:

    i, f, o = sigmoid(x W_ih + h W_hh + b)   (input, forget and output gates)
    g       = tanh(x W_ih + h W_hh + b)      (the candidate cell)
    c       = f * c + i * g
    h       = o * tanh(c)

  `xw_Bx4H` is x W_ih + b, made for every step before the loop. With Gal & Ghahramani's (2016)
  recurrent dropout, h W_hh is (h * m) W_hh, m = `h_mask_BxH` (the same mask at every step).
  """
  c_BxH, h_BxH = carry
  h_in_BxH = h_BxH if h_mask_BxH is None else h_BxH * h_mask_BxH
  a_Bx4H = xw_Bx4H + _product(h_in_BxH, w_hh_Hx4H, dtype)
  a_i, a_f, a_o, a_g = jnp.split(a_Bx4H, 4, axis=-1)
  i, f, o, g = jax.nn.sigmoid(a_i), jax.nn.sigmoid(a_f), jax.nn.sigmoid(a_o), jnp.tanh(a_g)
  c_BxH = f * c_BxH + i * g
  h_BxH = o * jnp.tanh(c_BxH)
  return (c_BxH, h_BxH), h_BxH


def lstm_recurrence(xw_TxBx4H, w_hh_Hx4H, c_BxH, h_BxH, plan, h_mask_BxH=None):
  """`lstm_cell` over time with `lax.scan`: (h_TxBxH, (c_BxH, h_BxH))."""
  step = lambda carry, xw_Bx4H: lstm_cell(carry, xw_Bx4H, w_hh_Hx4H, plan.dtype, h_mask_BxH)
  (c_BxH, h_BxH), h_TxBxH = jax.lax.scan(step, (c_BxH, h_BxH), xw_TxBx4H)
  return h_TxBxH, (c_BxH, h_BxH)


def input_projection(x_TxBxD, w_Dx4H, b_4H, plan):
  """x W_ih + b for every step."""
  return _product(x_TxBxD, w_Dx4H, plan.dtype) + b_4H


def output_logits(x_BxTxH, w_HxV, b_V, plan):
  """x W + b for every position."""
  return _product(x_BxTxH, w_HxV, plan.dtype) + b_V


def softmax_nll(x_NxH, w_HxV, b_V, targets_N, plan):
  """-log softmax(x W + b)[target] per row."""
  logprobs_NxV = jax.nn.log_softmax(output_logits(x_NxH, w_HxV, b_V, plan), axis=-1)
  return -jnp.take_along_axis(logprobs_NxV, targets_N[:, None], axis=-1)[:, 0]
