"""The LSTM recurrence with a hand-written backward pass, as cuDNN does it.

Equal to `reference.lstm_recurrence` (the paper's cell under autodiff) in value and gradient;
the tests hold it to that. Three things make it faster:
- the gates are one tanh over the whole 4H pre-activation, with sigmoid(a) = 0.5 tanh(a/2) + 0.5
  folded into pre-scaled weights (scaling by 0.5 is exact, so no rounding changes);
- the backward's loop over time carries only dh and dc and emits the gates' gradients, so the
  gradient of W_hh is ONE matmul over all T*B rows instead of a small one per step;
- the step-local factors of the backward are made where the `plan` says is cheaper.
"""

import functools

import jax
import jax.numpy as jnp

from zaremba_jax.kernels import matmul
from zaremba_jax.kernels import native


def _gate_scale(hidden):
  """[0.5]*3H + [1]*H: sigmoid(a) = 0.5 * tanh(0.5 * a) + 0.5 for i, f, o; tanh(a) for g."""
  return jnp.concatenate([jnp.full((3 * hidden,), 0.5, jnp.float32),
                          jnp.ones((hidden,), jnp.float32)])


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


def _forward(xw_TxBx4H, w_hh_Hx4H, c_BxH, h_BxH, plan, emit=None):
  """The loop over time: (final (c, h), per-step outputs).

  The per-step outputs are h_TxBxH alone when `emit` is None; (h, da_from_d, dc_from_dh, f) when
  it is "factors"; (h, c, gates [i, f, o, g]) when it is "gates".
  """
  dtype = plan.dtype
  scale_4H = _gate_scale(w_hh_Hx4H.shape[0])
  offset_4H = 0.5 - 0.5 * (scale_4H == 1.0)  # 0.5 for i, f, o; 0 for g
  vector = plan.batch1_as_vector and emit is None and h_BxH.shape[0] == 1
  # A vector's step scales its product (4H numbers) rather than the weights (H x 4H, once per
  # call, which for one token at a time is once per token); scaling by 0.5 is exact either way.
  scale_product = vector and not plan.recurrent_product_transposed
  w = (w_hh_Hx4H if scale_product else w_hh_Hx4H * scale_4H).astype(dtype)  # cast once
  xw_TxBx4H = xw_TxBx4H * scale_4H
  # The native kernels (native.py) outside a gradient. In bfloat16 they take every product
  # (a batch's rows read W in row pairs, made once here); in float32 a batch's and W^T h.
  native_products = plan.native_products and emit is None
  bf16 = dtype == "bfloat16"
  batch_product = native_products and not vector
  w_pairs = native.pairs(w) if batch_product and bf16 else None
  transposed = plan.recurrent_product_transposed and not batch_product
  if transposed:
    w = w.T  # [4H, H]

  def step(carry, xw_Bx4H):
    c_prev, h_prev = carry
    if batch_product:
      hw = native.matmul(h_prev, w_pairs) if bf16 else native.matmul_f32(h_prev, w)
    elif native_products and bf16:
      hw = native.matvec(w, h_prev) if transposed else native.vecmat(h_prev, w)
    elif native_products and transposed:
      hw = native.matvec_f32(w, h_prev)
    elif vector and transposed:  # W^T h, matrix first: the matrix-vector form XLA runs fastest
      hw = matmul.dot(w, h_prev, (1, 0), dtype)
    else:
      hw = matmul.dot(h_prev, w, (h_prev.ndim - 1, 1 if transposed else 0), dtype)
    if scale_product:
      hw = hw * scale_4H
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
def lstm_recurrence(xw_TxBx4H, w_hh_Hx4H, c_BxH, h_BxH, plan):
  """Runs the recurrence over time given the input projections x_t W_ih + b of every step.

  Args:
    xw_TxBx4H: input projections (bias included), gates ordered [i, f, o, g].
    w_hh_Hx4H: recurrent weights.
    c_BxH, h_BxH: the state before the first step.
    plan: a `Plan` (dtype and the forms of the products).

  Returns:
    (h_TxBxH, (c_BxH, h_BxH)): every step's output and the final state.
  """
  final, h_TxBxH = _forward(xw_TxBx4H, w_hh_Hx4H, c_BxH, h_BxH, plan)
  return h_TxBxH, final


def _recurrence_fwd(xw_TxBx4H, w_hh_Hx4H, c_BxH, h_BxH, plan):
  if plan.factors_in_forward_loop:
    final, (h_TxBxH, *factors) = _forward(xw_TxBx4H, w_hh_Hx4H, c_BxH, h_BxH, plan, "factors")
    saved = {"factors": tuple(factors)}
  else:
    final, (h_TxBxH, c_TxBxH, gates_TxBx4H) = _forward(
        xw_TxBx4H, w_hh_Hx4H, c_BxH, h_BxH, plan, "gates")
    saved = {"c0": c_BxH, "c": c_TxBxH, "gates": gates_TxBx4H}
  return (h_TxBxH, final), (w_hh_Hx4H, h_BxH, h_TxBxH, saved)


def _recurrence_bwd(plan, residuals, cotangents):
  w_hh_Hx4H, h0_BxH, h_TxBxH, saved = residuals
  dh_out_TxBxH, (dc_BxH, dh_BxH) = cotangents
  if "factors" in saved:
    da_from_d_TxBx4H, dc_from_dh_TxBxH, f_TxBxH = saved["factors"]
  else:
    c_prev_TxBxH = jnp.concatenate([saved["c0"][None], saved["c"][:-1]], axis=0)
    da_from_d_TxBx4H, dc_from_dh_TxBxH, f_TxBxH = _step_factors(
        c_prev_TxBxH, saved["gates"], jnp.tanh(saved["c"]))
  w = w_hh_Hx4H.astype(plan.dtype)  # cast once; used untransposed

  def step(carry, xs):
    dc, dh = carry
    dh_out, dc_from_dh, da_from_d, f = xs
    dh = dh + dh_out
    dc = dc + dh * dc_from_dh
    da = jnp.concatenate([dc, dc, dh, dc], axis=-1) * da_from_d
    return (dc * f, matmul.dot(da, w, (1, 1), plan.dtype)), da

  (dc0, dh0), da_TxBx4H = jax.lax.scan(
      step, (dc_BxH, dh_BxH), (dh_out_TxBxH, dc_from_dh_TxBxH, da_from_d_TxBx4H, f_TxBxH),
      reverse=True)
  h_prev_TxBxH = jnp.concatenate([h0_BxH[None], h_TxBxH[:-1]], axis=0)
  hidden = h_prev_TxBxH.shape[-1]
  dw_hh = matmul.weight_grad(h_prev_TxBxH.reshape(-1, hidden), da_TxBx4H.reshape(-1, 4 * hidden),
                             plan)
  return da_TxBx4H, dw_hh, dc0, dh0


lstm_recurrence.defvjp(_recurrence_fwd, _recurrence_bwd)
