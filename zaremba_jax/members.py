"""K models as one program: a one-model function lifted to K members on a leading axis.

Every pytree of K members (parameters, optimizer state, carry, keys) has a leading member axis of
size K. `lift` runs a function written for one model on every member: the members side by side
(`jax.vmap`) or one after another (`lax.map`, where the devices say so: `mesh.members_one_by_one`).
Each member computes exactly what it would alone: its own loss, gradient, clipping norm and
schedule. The ensemble of the members predicts with the mean of their next-token probabilities.

  state_K = members.create(functools.partial(train.create_train_state, config, model, tx), seeds)
  steps = members.lift(functools.partial(train.train_steps, model=model, tx=tx), (0, None, None))
  state_K, metrics_K = jax.jit(steps, donate_argnums=0)(state_K, inputs_SxBxT, targets_SxBxT)
"""

import jax
import jax.numpy as jnp
import numpy as np

from zaremba_jax import mesh as mesh_lib


def count(tree) -> int:
  """K, the members in a member-stacked pytree: its leading axis, the one source of the count."""
  return jax.tree.leaves(tree)[0].shape[0]


def stack(trees: list):
  """One pytree with a leading member axis from K pytrees of the same structure."""
  return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def create(make_one, seeds):
  """Members made by `make_one(key)` from `jax.random.key(seed)` for each seed, stacked: member i
  starts as a single run with seed `seeds[i]` would."""
  return stack([make_one(jax.random.key(seed)) for seed in seeds])


def lift(fn, in_axes, one_by_one: bool | None = None):
  """`fn` applied to each member.

  Args:
    fn: a function of one model's arguments.
    in_axes: per positional argument, 0 where it has a leading member axis, None where every
      member shares it. Every output gets a leading member axis.
    one_by_one: run the members one after another (`lax.map`, each with the one-model kernels)
      instead of side by side (`vmap`, whose batched products are other kernels); default: as
      `mesh.members_one_by_one` decides for the devices of this run. One member runs as a plain
      call of `fn`.
  """
  def lifted(*args):
    member_args = [a for a, axis in zip(args, in_axes) if axis == 0]
    if count(member_args) == 1:
      one = [jax.tree.map(lambda x: x[0], a) if axis == 0 else a for a, axis in zip(args, in_axes)]
      return jax.tree.map(lambda x: x[None], fn(*one))
    if not (mesh_lib.members_one_by_one() if one_by_one is None else one_by_one):
      return jax.vmap(fn, in_axes=in_axes)(*args)

    def one_member(member):
      it = iter(member)
      return fn(*[next(it) if axis == 0 else a for a, axis in zip(args, in_axes)])
    return jax.lax.map(one_member, tuple(member_args))
  return lifted


def mean_logprobs(logprobs_KxV):
  """The ensemble's log-probabilities: log of the members' mean probability."""
  return jax.nn.logsumexp(logprobs_KxV, axis=0) - jnp.log(logprobs_KxV.shape[0])


def ensemble_nll(nll_KxN, weights_N=None) -> float:
  """Total NLL of the members' averaged prediction: -sum_n log(mean_k exp(-nll[k, n])).

  In float64 on the host; `weights_N` (the mask) zeroes positions that are padding.
  """
  nll_KxN = np.asarray(nll_KxN, np.float64)
  log_mean_p_N = np.logaddexp.reduce(-nll_KxN, axis=0) - np.log(nll_KxN.shape[0])
  if weights_N is not None:
    log_mean_p_N = log_mean_p_N * np.asarray(weights_N, np.float64)
  return float(-log_mean_p_N.sum())
