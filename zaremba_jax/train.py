"""Optimisation for one model: the learning-rate schedule, the train state, the step functions.

Everything here is a pure function of its arguments, written for one model; `members.lift` runs
any of them for K members at once, and the caller jits it (`loop.py`, `evaluation.py`).
"""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from zaremba_jax import model as model_lib
from zaremba_jax import regularizers


def learning_rate_for_epoch(epoch: int, learning_rate: float, max_epoch: int,
                            lr_decay: float) -> float:
  """The paper's rate for 1-based `epoch`: full for epochs 1..max_epoch, then / lr_decay per epoch.

  Zaremba et al. (2014), section 4.1, large model: "we train for 14 epochs with a learning rate
  of 1 and then ... we reduce the learning rate by a factor of 1.15 after each epoch", so epoch 15
  runs at 1/1.15. The TensorFlow PTB tutorial agrees; the paper's Torch code decays one epoch
  later (epoch 16 is the first at 1/1.15). We follow the paper.
  """
  return learning_rate / lr_decay ** max(0, epoch - max_epoch)


def make_schedule(learning_rate: float, max_epoch: int, lr_decay: float,
                  steps_per_epoch: int) -> optax.Schedule:
  """`learning_rate_for_epoch` as an optax schedule of the global step (0-based)."""
  def schedule(step):
    epoch = step // steps_per_epoch + 1
    exponent = jnp.maximum(0, epoch - max_epoch).astype(jnp.float32)
    return learning_rate / jnp.power(jnp.float32(lr_decay), exponent)
  return schedule


def make_optimizer(config, steps_per_epoch: int) -> optax.GradientTransformation:
  """Clip the global gradient norm, then SGD under the paper's schedule.

  With `config.weight_decay` (regularizers.py), `add_decayed_weights` sits between the clipping
  and SGD: the update is -lr (clip(g) + wd theta), as PyTorch's SGD(weight_decay=wd) makes it in
  Merity et al.'s AWD-LSTM code (their gradient is clipped before the optimizer adds the decay),
  i.e. an L2 term wd/2 ||theta||^2 whose gradient escapes the clipping. (Gal's Torch code
  subtracts wd theta after the update, not scaled by lr: the same at lr 1.)
  """
  schedule = make_schedule(config.learning_rate, config.max_epoch, config.lr_decay,
                           steps_per_epoch)
  if getattr(config, "weight_decay", 0.0) > 0:
    return optax.chain(optax.clip_by_global_norm(config.max_grad_norm),
                       optax.add_decayed_weights(config.weight_decay),
                       optax.sgd(schedule))
  return optax.chain(optax.clip_by_global_norm(config.max_grad_norm),
                     optax.sgd(schedule))


@flax.struct.dataclass
class TrainState:
  """Everything a training run carries from step to step, as one pytree."""

  step: jax.Array                       # global step, int32 scalar
  params: Any
  opt_state: optax.OptState
  carry: model_lib.LSTMState            # LSTM state carried into the next window
  key: jax.Array                        # dropout key; each step folds in its step number
  # NT-ASGD (`--nt_asgd`): {"params": the average, "count": iterates in it, "active": whether
  # averaging has started}; None without it (the state is then what it always was).
  average: Any = None


def create_train_state(config, model: model_lib.LanguageModel, tx, key: jax.Array) -> TrainState:
  """One model's fresh state: parameters drawn from `key`, a zero carry, the dropout key."""
  init_key, dropout_key = jax.random.split(key)
  params = model_lib.init_params(model, init_key, config.batch_size, config.num_steps)
  carry = model_lib.zero_state(config.num_layers, config.batch_size, config.hidden_size)
  average = None
  if getattr(config, "nt_asgd", False):
    average = {"params": jax.tree.map(jnp.copy, params), "count": jnp.zeros((), jnp.int32),
               "active": jnp.zeros((), jnp.bool_)}
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    carry=carry, key=dropout_key, average=average)


def update_average(average, params):
  """NT-ASGD's running mean after a step: once `average["active"]`, the mean of the parameters
  after each step since then (Merity et al. 2017, Algorithm 1; PyTorch's ASGD with t0=0,
  lambd=0); before, the parameters themselves, so that evaluating the average is evaluating them.
  """
  active = average["active"]
  count = average["count"] + active.astype(jnp.int32)
  weight = 1.0 / jnp.maximum(count, 1).astype(jnp.float32)
  mean = jax.tree.map(lambda a, p: jnp.where(active, a + (p - a) * weight, p), average["params"],
                      params)
  return {"params": mean, "count": count, "active": active}


def evaluated_params(state: TrainState):
  """The parameters a run evaluates and keeps as its model: NT-ASGD's average, else the params."""
  return state.params if state.average is None else state.average["params"]


def sequence_loss(nll_BxT):
  """The paper code's loss: cross-entropy averaged over the batch and summed over time.

  Returns:
    (loss, nll_sum): the differentiated loss and the total NLL in nats.
  """
  nll_sum = nll_BxT.sum()
  return nll_sum / nll_BxT.shape[0], nll_sum


def train_step(state: TrainState, inputs_BxT, targets_BxT, *, model, tx):
  """One SGD step on one window; the carry advances to the window's end (truncated BPTT)."""
  dropout_key = jax.random.fold_in(state.key, state.step)

  def loss_fn(params):
    nll_BxT, carry = model.apply({"params": params}, inputs_BxT, state.carry, train=True,
                                 targets_BxT=targets_BxT, rngs={"dropout": dropout_key})
    loss, nll_sum = sequence_loss(nll_BxT)
    if model.options != regularizers.Options():  # regularizers.py: terms on the weights
      loss = loss + regularizers.penalty(params, model.options)
    return loss, (carry, nll_sum)

  (_, (carry, nll_sum)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {"nll_sum": nll_sum, "grad_norm": optax.tree.norm(grads)}
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                            carry=jax.lax.stop_gradient(carry))
  if state.average is not None:
    new_state = new_state.replace(average=update_average(state.average, params))
  return new_state, metrics


def train_steps(state: TrainState, inputs_KxBxT, targets_KxBxT, *, model, tx):
  """K `train_step`s on K consecutive windows in one call, in a loop over the windows.

  One call for many steps saves more than the dispatch: inside the loop XLA updates the
  parameters and optimizer state in place (+40% words/s for the small model on a 2-core CPU).

  The loop's trip count is hidden from XLA (an optimization barrier), so every K compiles the
  same loop body and a run's bits do not depend on how its steps are grouped into calls
  (`--steps_per_call`, and the one-window calls before a progress line or a checkpoint). With
  a static count XLA removes a one-trip loop and fuses its step with the code around it; XLA's
  CPU backend always allows fused multiply-adds, so that step could round differently: with
  weight decay and NT-ASGD together, the first step whose gradient was clipped differed by an
  ulp between the one-window program and the K-window one, and the runs then diverged.

  Returns the final state and the metrics of every step, each with a leading K axis.
  """
  num_windows = inputs_KxBxT.shape[0]
  trips = jax.lax.optimization_barrier(jnp.int32(num_windows))

  def body(k, carry):
    state, metrics = carry
    state, step_metrics = train_step(state, inputs_KxBxT[k], targets_KxBxT[k], model=model,
                                     tx=tx)
    metrics = {name: metrics[name].at[k].set(value) for name, value in step_metrics.items()}
    return state, metrics

  one_step = jax.eval_shape(lambda s: train_step(s, inputs_KxBxT[0], targets_KxBxT[0],
                                                  model=model, tx=tx)[1], state)
  metrics = {name: jnp.zeros((num_windows, *m.shape), m.dtype) for name, m in one_step.items()}
  return jax.lax.fori_loop(0, trips, body, (state, metrics))


def evaluate(params, inputs_NxBxT, targets_NxBxT, mask_NxBxT, *, model):
  """Total NLL, every target's NLL and the token count over windows run in order, the state
  carried from a zero start.

  With batch 1 and the whole stream this is the paper's test protocol: the state runs token by
  token from the first token to the last. One scan over all windows, so one dispatch in all.
  `model` is planned for this stream (`model_lib.planned_for`).

  Returns:
    (nll_sum, nll_NxBxT, count): the NLL summed window by window, each target's NLL (0 where
    masked: what an ensemble averages, `members.ensemble_nll`), and the unmasked targets.
  """
  carry = model_lib.zero_state(model.num_layers, inputs_NxBxT.shape[1], model.hidden_size)
  # The first layer's input projection of every vocabulary row, made once for all windows.
  xw_table_Vx4H = (model_lib.first_layer_table(params, model.plan)
                   if model.plan.first_layer_per_vocab_row else None)

  def body(carry, window):
    inputs_BxT, targets_BxT, mask_BxT = window
    nll_BxT, carry = model.apply({"params": params}, inputs_BxT, carry, train=False,
                                 targets_BxT=targets_BxT, xw_table_Vx4H=xw_table_Vx4H)
    masked_BxT = nll_BxT * mask_BxT
    return carry, (masked_BxT.sum(), masked_BxT, mask_BxT.sum())

  _, (nll_N, nll_NxBxT, count_N) = jax.lax.scan(body, carry,
                                                (inputs_NxBxT, targets_NxBxT, mask_NxBxT))
  return nll_N.sum(), nll_NxBxT, count_N.sum()
