"""Optimisation: the learning-rate schedule, the train state, and the jitted step functions.

Everything here is a pure function of its arguments; the epoch loop lives in `loop.py`.
"""

import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
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
  """Clip the global gradient norm, then SGD under the paper's schedule."""
  schedule = make_schedule(config.learning_rate, config.max_epoch, config.lr_decay,
                           steps_per_epoch)
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


def create_train_state(config, model: model_lib.LanguageModel, tx, key: jax.Array) -> TrainState:
  init_key, dropout_key = jax.random.split(key)
  carry = model_lib.zero_state(config.num_layers, config.batch_size, config.hidden_size)
  tokens = jnp.zeros((config.batch_size, config.num_steps), jnp.int32)
  params = model.init(init_key, tokens, carry, train=False)["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    carry=carry, key=dropout_key)


def create_members(config, model: model_lib.LanguageModel, tx) -> TrainState:
  """`config.members` TrainStates stacked on a leading member axis.

  Member i starts as a single run with seed `config.seed + i` would: its own initial parameters
  and its own dropout key.
  """
  members = [create_train_state(config, model, tx, jax.random.key(config.seed + i))
             for i in range(config.members)]
  return jax.tree.map(lambda *leaves: jnp.stack(leaves), *members)


def abstract_train_state(config, model: model_lib.LanguageModel, tx) -> TrainState:
  """Shapes and dtypes of fresh members' TrainState (nothing is computed): a restore target."""
  return jax.eval_shape(lambda: create_members(config, model, tx))


def over_members(fn, plan, in_axes):
  """`fn` applied to each member: the arguments with in_axes 0 have a leading member axis, those
  with None are shared by every member; every output gets a leading member axis.

  The members run side by side (`jax.vmap`) or, where the plan says so, one after another
  (`lax.map`) with the one-model kernels. One member runs as a plain call of `fn`.
  """
  def mapped(*args):
    member_args = [a for a, axis in zip(args, in_axes) if axis == 0]
    members = jax.tree.leaves(member_args)[0].shape[0]
    if members == 1:
      one = [jax.tree.map(lambda x: x[0], a) if axis == 0 else a for a, axis in zip(args, in_axes)]
      return jax.tree.map(lambda x: x[None], fn(*one))
    if not plan.members_one_by_one:
      return jax.vmap(fn, in_axes=in_axes)(*args)

    def one_member(member):
      it = iter(member)
      return fn(*[next(it) if axis == 0 else a for a, axis in zip(args, in_axes)])
    return jax.lax.map(one_member, tuple(member_args))
  return mapped


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
  return new_state, metrics


def train_steps(state: TrainState, inputs_KxBxT, targets_KxBxT, *, model, tx):
  """K `train_step`s on K consecutive windows in one call: a `lax.scan` over the windows.

  One call for many steps saves more than the dispatch: inside the loop XLA updates the
  parameters and optimizer state in place (+40% words/s for the small model on a 2-core CPU).
  Returns the final state and the metrics of every step, each with a leading K axis.
  """
  def body(state, window):
    return train_step(state, *window, model=model, tx=tx)
  return jax.lax.scan(body, state, (inputs_KxBxT, targets_KxBxT))


def member_train_steps(state: TrainState, inputs_SxBxT, targets_SxBxT, *, model, tx):
  """`train_steps` for every member on the same windows: metrics get a leading member axis.

  Each member has its own loss, gradient, clipping norm and schedule: exactly separate runs.
  """
  steps = functools.partial(train_steps, model=model, tx=tx)
  return over_members(steps, model.plan, (0, None, None))(state, inputs_SxBxT, targets_SxBxT)


def evaluate(params, inputs_NxBxT, targets_NxBxT, mask_NxBxT, *, model):
  """Total NLL and token count over windows run in order, the state carried from a zero start.

  With batch 1 and the whole stream this is the paper's test protocol: the state runs token by
  token from the first token to the last. One scan over all windows, so one dispatch in all.
  `model` is planned for this stream (`model_lib.planned_for`).
  """
  carry = model_lib.zero_state(model.num_layers, inputs_NxBxT.shape[1], model.hidden_size)
  # The first layer's input projection of every vocabulary row, made once for all windows.
  xw_table_Vx4H = (model_lib.first_layer_table(params, model.plan)
                   if model.plan.first_layer_per_vocab_row else None)

  def body(carry, window):
    inputs_BxT, targets_BxT, mask_BxT = window
    nll_BxT, carry = model.apply({"params": params}, inputs_BxT, carry, train=False,
                                 targets_BxT=targets_BxT, xw_table_Vx4H=xw_table_Vx4H)
    return carry, ((nll_BxT * mask_BxT).sum(), mask_BxT.sum())

  _, (nll_N, count_N) = jax.lax.scan(body, carry, (inputs_NxBxT, targets_NxBxT, mask_NxBxT))
  return nll_N.sum(), count_N.sum()


def evaluate_members(params, inputs_NxBxT, targets_NxBxT, mask_NxBxT, *, model):
  """Every member over the same windows, each with its own state from a zero start.

  Returns:
    (nll_K, nll_NxKxBxT, count): each member's total NLL (summed as `evaluate` sums it), every
    target's NLL under each member (0 where masked), and the token count. The ensemble's NLL,
    -log of the members' mean probability, is made from the second (`ensemble_nll`).
  """
  members = jax.tree.leaves(params)[0].shape[0]
  plan = model.plan
  zero = model_lib.zero_state(model.num_layers, inputs_NxBxT.shape[1], model.hidden_size)
  carry = jax.tree.map(lambda x: jnp.broadcast_to(x, (members, *x.shape)), zero)
  tables = (over_members(lambda p: model_lib.first_layer_table(p, plan), plan, (0,))(params)
            if plan.first_layer_per_vocab_row else None)

  def window(p, carry, table, inputs_BxT, targets_BxT):
    return model.apply({"params": p}, inputs_BxT, carry, train=False, targets_BxT=targets_BxT,
                       xw_table_Vx4H=table)
  windows = over_members(window, plan, (0, 0, 0 if tables is not None else None, None, None))

  def body(carry, xs):
    inputs_BxT, targets_BxT, mask_BxT = xs
    nll_KxBxT, carry = windows(params, carry, tables, inputs_BxT, targets_BxT)
    masked_KxBxT = nll_KxBxT * mask_BxT
    return carry, (jax.vmap(jnp.sum)(masked_KxBxT), masked_KxBxT, mask_BxT.sum())

  _, (nll_NxK, nll_NxKxBxT, count_N) = jax.lax.scan(
      body, carry, (inputs_NxBxT, targets_NxBxT, mask_NxBxT))
  return nll_NxK.sum(0), nll_NxKxBxT, count_N.sum()


def ensemble_nll(nll_KxN, weights_N=None) -> float:
  """Total NLL of the members' averaged prediction: -sum_n log(mean_k exp(-nll[k, n])).

  In float64 on the host; `weights_N` (the mask) zeroes positions that are padding.
  """
  nll_KxN = np.asarray(nll_KxN, np.float64)
  log_mean_p_N = np.logaddexp.reduce(-nll_KxN, axis=0) - np.log(nll_KxN.shape[0])
  if weights_N is not None:
    log_mean_p_N = log_mean_p_N * np.asarray(weights_N, np.float64)
  return float(-log_mean_p_N.sum())


def jit_train_steps(model, tx):
  return jax.jit(functools.partial(train_steps, model=model, tx=tx), donate_argnums=0)


def jit_member_train_steps(model, tx, shardings=None):
  """The jitted `member_train_steps`; `shardings` = (state's, inputs', metrics') on a mesh."""
  steps = functools.partial(member_train_steps, model=model, tx=tx)
  if shardings is None:
    return jax.jit(steps, donate_argnums=0)
  state, inputs, metrics = shardings
  return jax.jit(steps, donate_argnums=0, in_shardings=(state, inputs, inputs),
                 out_shardings=(state, metrics))


def jit_evaluate(model):
  return jax.jit(functools.partial(evaluate, model=model))


def jit_evaluate_members(model):
  return jax.jit(functools.partial(evaluate_members, model=model))
