"""The LSTM recurrence with a hand-written backward pass, as cuDNN does it.

Equal to `reference.lstm_recurrence` (the paper's cell under autodiff) in value and gradient;
the tests hold it to that. Three things make it faster:
- the gates are one tanh over the whole 4H pre-activation, with sigmoid(a) = 0.5 tanh(a/2) + 0.5
  folded into pre-scaled weights (scaling by 0.5 is exact, so no rounding changes);
- the backward's loop over time carries only dh and dc and emits the gates' gradients, so the
  gradient of W_hh is ONE matmul over all T*B rows instead of a small one per step;
- the step-local factors of the backward are made where the `plan` says is cheaper.

With a recurrent dropout mask (Gal & Ghahramani 2016, `regularizers.py`), each step's product is
(h_{t-1} * m) W_hh with one mask m per row for the whole window; the backward carries the same
mask into dh_{t-1} and into the gradient of W_hh.
"""

import dataclasses
import functools
from typing import Callable

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


@dataclasses.dataclass(frozen=True)
class Product:
  """One form of the forward loop's recurrent product h W_hh (a `Plan.recurrent_product`).

  W_hh is prepared once per call: scaled by the gate scale (unless `scale_product`), cast to the
  plan's dtype, then laid out by `layout`; each step computes `multiply(h, prepared, dtype)`.
  """

  # How the prepared W is laid out: "as is" [H, 4H], "transposed" [4H, H], or "pairs"
  # (`native.pairs`).
  layout: str
  # (h, prepared W, dtype) -> h W_hh [.., 4H], float32.
  multiply: Callable
  # The product runs on 1-D state vectors (batch 1), and `rows` names the form for a state of
  # several rows.
  vector: bool = False
  rows: str | None = None
  # The step scales its product (4H numbers) rather than the call scaling W (H x 4H, once per
  # call, which for one token at a time is once per token); scaling by 0.5 is exact either way.
  scale_product: bool = False
  # A loop under a gradient (which emits the backward's factors or gates) runs this XLA form,
  # on the state's [B, H] rows, instead (the native kernels run forward only).
  under_gradient: str = "xla"
  # The precision of the native kernel it calls (None: XLA's product).
  native: str | None = None


def _xla(h, w, dtype):  # h W: h's last axis against W's first
  return matmul.dot(h, w, (h.ndim - 1, 0), dtype)


def _xla_transposed(h, w_t, dtype):  # h W from W^T: both last axes
  return matmul.dot(h, w_t, (h.ndim - 1, 1), dtype)


# Every recurrent product a plan can name; `plan.resolve` says which one runs where.
PRODUCTS = {
    "xla": Product("as is", _xla),
    "xla_transposed": Product("transposed", _xla_transposed, under_gradient="xla_transposed"),
    # Batch 1: h W on vectors, and W^T h with the matrix first (the matrix-vector form XLA runs
    # fastest).
    "xla_vector": Product("as is", _xla, vector=True, rows="xla", scale_product=True),
    "xla_matrix_first": Product("transposed",
                                lambda h, w_t, dtype: matmul.dot(w_t, h, (1, 0), dtype),
                                vector=True, rows="xla_transposed",
                                under_gradient="xla_transposed"),
    # The native kernels (native.py): a batch's rows against W in row pairs (bfloat16) or as it
    # is (float32), and at batch 1 W^T h or h W.
    "native_bf16_pairs": Product("pairs", lambda h, p, dtype: native.matmul(h, p),
                                 under_gradient="xla_transposed", native="bfloat16"),
    "native_f32_matmul": Product("as is", lambda h, w, dtype: native.matmul_f32(h, w),
                                 native="float32"),
    "native_bf16_matvec": Product("transposed", lambda h, w_t, dtype: native.matvec(w_t, h),
                                  vector=True, rows="native_bf16_pairs",
                                  under_gradient="xla_transposed", native="bfloat16"),
    "native_bf16_vecmat": Product("as is", lambda h, w, dtype: native.vecmat(h, w), vector=True,
                                  rows="native_bf16_pairs", scale_product=True,
                                  native="bfloat16"),
    "native_f32_matvec": Product("transposed", lambda h, w_t, dtype: native.matvec_f32(w_t, h),
                                 vector=True, rows="native_f32_matmul",
                                 under_gradient="xla_transposed", native="float32"),
}


def forward_loop(xw_TxBx4H, w_hh_Hx4H, c_BxH, h_BxH, plan, emit=None, h_mask_BxH=None):
  """The loop over time: (final (c, h), per-step outputs), as `lstm_recurrence` runs it outside a
  gradient (emit=None) and as its gradient's forward pass does (the benchmarks time it alone).
  `h_mask_BxH` (optional) multiplies h_{t-1} in every step's product h_{t-1} W_hh.

  The per-step outputs are h_TxBxH alone when `emit` is None; (h, da_from_d, dc_from_dh, f) when
  it is "factors"; (h, c, gates [i, f, o, g]) when it is "gates".
  """
  dtype = plan.dtype
  scale_4H = _gate_scale(w_hh_Hx4H.shape[0])
  offset_4H = 0.5 - 0.5 * (scale_4H == 1.0)  # 0.5 for i, f, o; 0 for g
  product = PRODUCTS[plan.recurrent_product]
  if emit is not None:
    product = PRODUCTS[product.under_gradient]
  if product.vector and h_BxH.shape[0] != 1:
    product = PRODUCTS[product.rows]
  w = (w_hh_Hx4H if product.scale_product else w_hh_Hx4H * scale_4H).astype(dtype)  # cast once
  if product.layout == "transposed":
    w = w.T  # [4H, H]
  elif product.layout == "pairs":
    w = native.pairs(w)
  xw_TxBx4H = xw_TxBx4H * scale_4H
  mask = h_mask_BxH
  if mask is not None and product.vector:
    mask = mask[0]

  def step(carry, xw_Bx4H):
    c_prev, h_prev = carry
    hw = product.multiply(h_prev if mask is None else h_prev * mask, w, dtype)
    if product.scale_product:
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

  if product.vector:
    (c_H, h_H), h_TxH = jax.lax.scan(step, (c_BxH[0], h_BxH[0]), xw_TxBx4H[:, 0])
    return (c_H[None], h_H[None]), h_TxH[:, None]
  return jax.lax.scan(step, (c_BxH, h_BxH), xw_TxBx4H)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def lstm_recurrence(xw_TxBx4H, w_hh_Hx4H, c_BxH, h_BxH, plan, h_mask_BxH=None):
  """Runs the recurrence over time given the input projections x_t W_ih + b of every step.

  Args:
    xw_TxBx4H: input projections (bias included), gates ordered [i, f, o, g].
    w_hh_Hx4H: recurrent weights.
    c_BxH, h_BxH: the state before the first step.
    plan: a `Plan` (dtype and the forms of the products).
    h_mask_BxH: None, or the recurrent dropout mask (0 or 1/keep) that multiplies h_{t-1} in
      h_{t-1} W_hh at every step (the carried h itself is not masked). Not differentiated.

  Returns:
    (h_TxBxH, (c_BxH, h_BxH)): every step's output and the final state.
  """
  final, h_TxBxH = forward_loop(xw_TxBx4H, w_hh_Hx4H, c_BxH, h_BxH, plan, h_mask_BxH=h_mask_BxH)
  return h_TxBxH, final


def _recurrence_fwd(xw_TxBx4H, w_hh_Hx4H, c_BxH, h_BxH, plan, h_mask_BxH=None):
  if plan.factors_in_forward_loop:
    final, (h_TxBxH, *factors) = forward_loop(xw_TxBx4H, w_hh_Hx4H, c_BxH, h_BxH, plan, "factors",
                                              h_mask_BxH)
    saved = {"factors": tuple(factors)}
  else:
    final, (h_TxBxH, c_TxBxH, gates_TxBx4H) = forward_loop(
        xw_TxBx4H, w_hh_Hx4H, c_BxH, h_BxH, plan, "gates", h_mask_BxH)
    saved = {"c0": c_BxH, "c": c_TxBxH, "gates": gates_TxBx4H}
  if h_mask_BxH is not None:
    saved["h_mask"] = h_mask_BxH
  return (h_TxBxH, final), (w_hh_Hx4H, h_BxH, h_TxBxH, saved)


def _recurrence_bwd(plan, residuals, cotangents):
  w_hh_Hx4H, h0_BxH, h_TxBxH, saved = residuals
  mask_BxH = saved.get("h_mask")
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
    dh_prev = matmul.dot(da, w, (1, 1), plan.dtype)
    return (dc * f, dh_prev if mask_BxH is None else dh_prev * mask_BxH), da

  (dc0, dh0), da_TxBx4H = jax.lax.scan(
      step, (dc_BxH, dh_BxH), (dh_out_TxBxH, dc_from_dh_TxBxH, da_from_d_TxBx4H, f_TxBxH),
      reverse=True)
  h_prev_TxBxH = jnp.concatenate([h0_BxH[None], h_TxBxH[:-1]], axis=0)
  if mask_BxH is not None:  # W_hh saw the masked h_{t-1}
    h_prev_TxBxH = h_prev_TxBxH * mask_BxH
  hidden = h_prev_TxBxH.shape[-1]
  dw_hh = matmul.weight_grad(h_prev_TxBxH.reshape(-1, hidden), da_TxBx4H.reshape(-1, 4 * hidden),
                             plan)
  # The mask is not differentiated: its cotangent is zeros (None when there is no mask).
  return da_TxBx4H, dw_hh, dc0, dh0, None if mask_BxH is None else jnp.zeros_like(mask_BxH)


lstm_recurrence.defvjp(_recurrence_fwd, _recurrence_bwd)
