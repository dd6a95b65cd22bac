"""Orbax checkpoints in WORKDIR: the latest few, and the best by validation perplexity.

A checkpoint holds the whole TrainState (params, optimizer state, the LSTM carry, the PRNG key,
the step) and, as JSON, the run's config, vocabulary, position in the data and metrics so far:
everything a continuation needs to be bit-identical to a run that never stopped.

Orbax writes each checkpoint into a temporary folder and renames it when complete, so a run
killed mid-save leaves the earlier checkpoints intact; a damaged one is skipped on restore.
"""

import dataclasses
import os
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging

from zaremba_jax import config as config_lib
from zaremba_jax import model as model_lib

LATEST = "checkpoints"
BEST = "best"


# Flags that change a parameter's shape or the data a position refers to: fixed for a run.
# (--corpus may change, a folder moved, say: the vocabulary and the training text are checked.)
FIXED_ON_RESUME = ("level", "num_layers", "hidden_size", "batch_size", "num_steps", "members",
                   *config_lib.REGULARIZER_SHAPE_FIELDS)  # regularizers.py: tying, the projection


class CheckpointError(RuntimeError):
  """A checkpoint could not be written or read. The message says what to do."""


class ResumeError(ValueError):
  """The checkpoint in the workdir does not fit the flags given. The message says what to do."""


def check_vocab(vocab, saved_vocab, remedy: str) -> None:
  """Refuses a corpus whose vocabulary is not the one the checkpoint was trained on."""
  if list(saved_vocab) != list(vocab):
    raise ResumeError(f"the corpus's vocabulary ({len(vocab)} tokens) differs from the"
                      f" checkpoint's ({len(saved_vocab)}); pass the --corpus (or --data_dir) the"
                      f" run was trained on{remedy}")


def check_train_text(meta: dict, digest: str, tokens: int) -> None:
  """Refuses to resume on another training text, even one with the same vocabulary (checkpoints
  from before the digest was saved are not checked)."""
  saved = meta.get("train_sha256")
  if saved is not None and saved != digest:
    raise ResumeError(f"the training text ({tokens} tokens) is not the one the checkpoint was"
                      f" trained on; pass the --corpus (and --split, --max_vocab, --min_count) it"
                      f" was trained on, or add --restart to start over")


def check_resumable(saved: dict, config, vocab, saved_vocab, say) -> None:
  """The resume policy: refuses flags that change shapes or data; logs the others that changed.

  Args:
    saved: the checkpoint's config, as a dict.
    config: the Config of the run that resumes.
    vocab, saved_vocab: the corpus's vocabulary and the checkpoint's.
    say: where the changed flags are logged.
  """
  defaults = config_lib.Config()
  for name in FIXED_ON_RESUME:
    was = saved.get(name, getattr(defaults, name))  # older checkpoints lack newer flags
    if was != getattr(config, name):
      raise ResumeError(f"--{name}={getattr(config, name)} differs from the checkpoint's"
                        f" --{name}={was}; rerun with --{name}={was} to resume,"
                        f" or add --restart to discard the checkpoints and start over")
  check_vocab(vocab, saved_vocab, ", or add --restart to start over")
  for name, value in config.to_dict().items():
    if name in saved and saved[name] != value and name != "mode":
      say(f"resuming with --{name} changed: {saved[name]} -> {value}")


def abstract(tree, shardings=None):
  """Shapes and dtypes of `tree`, placed with `shardings` (a matching pytree) or, by default, on
  this process's first device.

  Naming the placement explicitly is what lets a checkpoint written on a GPU restore on a CPU
  (and the reverse), and one written on N devices restore on M: without it Orbax would try the
  saving machine's placement.
  """
  if shardings is None:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: device, tree)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree,
                      shardings)


def _reason(error: Exception) -> str:
  """The part of a (long, nested) storage error a person needs."""
  text = str(error)
  if "No space left on device" in text or getattr(error, "errno", None) == 28:
    return "No space left on device"
  return f"{type(error).__name__}: {text[:300]}"


def _filled_fields(state, like=None) -> dict:
  """{name: value} of the dataclass `state`'s fields that are not None in `like` (default: in
  `state` itself), e.g. a TrainState without NT-ASGD's `average`."""
  like = state if like is None else like
  return {f.name: getattr(state, f.name) for f in dataclasses.fields(like)
          if getattr(like, f.name) is not None}


class Checkpointer:
  """Two Orbax managers in `workdir`: `checkpoints/` (the last `keep`) and `best/` (one)."""

  def __init__(self, workdir: str, keep: int = 3):
    self.name = workdir  # as given, for messages
    self.workdir = os.path.abspath(workdir)
    self.keep = keep
    self._managers = {}

  def _manager(self, kind: str) -> ocp.CheckpointManager:
    if kind not in self._managers:
      # The two managers save the same step at an epoch's end: in a multi-process run Orbax's
      # barriers are named by step ("_async_write_complete.90"), so each manager gets its own
      # prefix, or the second save's barrier fails as "already ongoing" and the run hangs.
      options = ocp.CheckpointManagerOptions(
          max_to_keep=self.keep if kind == LATEST else 1, enable_async_checkpointing=True,
          cleanup_tmp_directories=True, create=True,
          multiprocessing_options=ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=kind))
      self._managers[kind] = ocp.CheckpointManager(os.path.join(self.workdir, kind),
                                                   options=options)
    return self._managers[kind]

  def steps(self, kind: str = LATEST) -> list[int]:
    if not os.path.isdir(os.path.join(self.workdir, kind)):
      return []
    return sorted(self._manager(kind).all_steps())

  def save(self, step: int, state, meta: dict, best: bool = False) -> None:
    """Starts writing `state` and `meta` in the background (the arrays are copied first)."""
    for kind in (LATEST, BEST) if best else (LATEST,):
      manager = self._manager(kind)
      try:
        if step in manager.all_steps():
          continue
        saved = manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                           meta=ocp.args.JsonSave(meta)))
      except Exception as e:  # pylint: disable=broad-except
        self._fail(kind, e)
      if not saved:  # Orbax writes no step older than its newest, and says so only by this
        raise CheckpointError(
            f"step {step} was not written in {os.path.join(self.workdir, kind)}: it holds the newer"
            f" step {max(manager.all_steps())}; train in another --workdir, or pass --restart")

  def wait(self) -> None:
    """Blocks until every save in flight is on disk."""
    for kind, manager in self._managers.items():
      try:
        manager.wait_until_finished()
      except Exception as e:  # pylint: disable=broad-except
        self._fail(kind, e)

  def _fail(self, kind, error):
    kept = self.steps(LATEST)
    raise CheckpointError(
        f"could not write a checkpoint in {os.path.join(self.workdir, kind)}"
        f" ({_reason(error)}); the complete checkpoints are intact"
        f" ({'latest: step ' + str(kept[-1]) if kept else 'none yet'}); free disk space and"
        f" rerun the same command to resume") from error

  def restore(self, target, kind: str = LATEST, step: int | None = None, check=None,
              target_from_meta=None, say=print, shardings=None, partial: bool = False):
    """Restores (state, meta) from the newest readable checkpoint of `kind` (or exactly `step`).

    Args:
      target: a pytree like the saved state (arrays or ShapeDtypeStructs).
      kind: LATEST or BEST.
      step: restore this step only.
      check: called with the checkpoint's meta before its arrays are read; raise to refuse.
      target_from_meta: builds the target from the checkpoint's meta (instead of `target`).
      say: where warnings go.
      shardings: where the arrays go (a pytree like `target`; default: the first device).
      partial: the target names only some of the saved state's fields (e.g. {'params': ...}):
        only those are read.

    Unreadable checkpoints (a truncated or deleted file) are skipped with a warning naming them.

    A dataclass target (the TrainState) is read field by field, its None fields left None: a
    checkpoint written before a field existed (e.g. `average`, which only --nt_asgd fills) still
    restores, and one with the field filled restores into a target that leaves it None.

    Returns:
      (state, meta, step), or None when there is no readable checkpoint.
    """
    template = None
    if dataclasses.is_dataclass(target):
      template, target, partial = target, _filled_fields(target), True
      shardings = None if shardings is None else _filled_fields(shardings, like=template)
    candidates = [step] if step is not None else self.steps(kind)[::-1]
    for candidate in candidates:
      path = os.path.join(self.workdir, kind, str(candidate))
      try:
        meta = self.read_meta(kind, candidate)
      except Exception as e:  # pylint: disable=broad-except
        self._skip(path, e, say)
        continue
      if check:
        check(meta)
      goal = abstract(target_from_meta(meta) if target_from_meta else target, shardings)
      if partial:
        args = ocp.args.PyTreeRestore(item=goal, partial_restore=True,
                                      restore_args=ocp.checkpoint_utils.construct_restore_args(goal))
      else:
        args = ocp.args.StandardRestore(goal)
      try:
        state = self._manager(kind).restore(candidate, args=ocp.args.Composite(state=args)).state
        if partial:  # the manager now knows "state" as a PyTree item; saves are StandardSave
          self._managers.pop(kind).close()
        if template is not None:
          state = template.replace(**state)
        return state, meta, candidate
      except Exception as e:  # pylint: disable=broad-except
        self._skip(path, e, say)
    return None

  @staticmethod
  def _skip(path, error, say):
    message = f"skipping unreadable checkpoint {path}: {type(error).__name__}: {str(error)[:160]}"
    say(f"warning: {message}")

  def read_meta(self, kind: str, step: int) -> dict:
    return self._manager(kind).restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore())).meta

  def discard(self) -> list[str]:
    """Deletes every checkpoint; returns what was deleted, for the message."""
    self.close()
    gone = []
    for kind in (LATEST, BEST):
      path = os.path.join(self.workdir, kind)
      if os.path.isdir(path):
        gone.append(f"{kind}/ (steps {', '.join(map(str, sorted(self._steps_on_disk(path))))})")
        shutil.rmtree(path)
    return gone

  @staticmethod
  def _steps_on_disk(path):
    return [int(n) for n in os.listdir(path) if n.isdigit()]

  def close(self) -> None:
    for manager in self._managers.values():
      manager.wait_until_finished()
      manager.close()
    self._managers = {}


def saved_config(workdir: str) -> dict | None:
  """The config (as saved, a dict) of the newest readable checkpoint in `workdir`, or None.

  Reads without writing anything (Orbax's read-only mode: no folder made, no temporary folder
  cleaned up), so it is safe beside a run that is still saving there.
  """
  options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)  # Orbax warns that the folder is read only: we asked for it
  try:
    return _newest_config(workdir, options)
  finally:
    logging.set_verbosity(verbosity)


def _newest_config(workdir, options):
  for kind in (LATEST, BEST):
    path = os.path.join(os.path.abspath(workdir), kind)
    if not os.path.isdir(path):
      continue
    manager = ocp.CheckpointManager(path, options=options)
    try:
      for step in sorted(manager.all_steps(), reverse=True):
        try:
          meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
          return meta["config"]
        except Exception:  # pylint: disable=broad-except
          continue  # half written, or removed since it was listed: an older one will do
    finally:
      manager.close()
  return None


@dataclasses.dataclass(frozen=True)
class Trained:
  """A trained model loaded for evaluation or generation."""

  config: config_lib.Config
  vocab: tuple[str, ...]
  model: model_lib.LanguageModel
  params: Any
  step: int
  epoch: int
  path: str


def _model_of(meta: dict, dtype: str | None):
  """The Config (with `dtype`, if given, as its matmul dtype) and model a checkpoint was made by."""
  config = config_lib.Config(**meta["config"])
  if dtype is not None:
    config = config.replace(dtype=dtype)
  return config, model_lib.make_model(config, len(meta["vocab"]))


def _params_target(meta: dict) -> dict:
  """Shapes and dtypes of a checkpoint's parameters, every member's: what inference restores
  (for an NT-ASGD run, --nt_asgd, the average: its model)."""
  config, model = _model_of(meta, None)
  one = jax.eval_shape(lambda: model_lib.init_params(model, jax.random.key(0)))
  params = jax.tree.map(lambda x: jax.ShapeDtypeStruct((config.members, *x.shape), x.dtype), one)
  return {"average": {"params": params}} if config.nt_asgd else {"params": params}


def load_trained(workdir: str, step: int | None = None, say=print,
                 dtype: str | None = None) -> Trained:
  """Loads the best checkpoint in `workdir` (the latest if none is marked best), or `step`.

  Reads the parameters alone (no optimizer state, carry or keys). The model's flags and
  vocabulary come from the checkpoint itself; `dtype`, if given, replaces its matmul dtype (the
  parameters are float32 either way).

  Raises:
    CheckpointError: there is no such checkpoint, or none is readable.
  """
  ckpt = Checkpointer(workdir)
  try:
    latest, best = ckpt.steps(LATEST), ckpt.steps(BEST)
    if not (latest + best):
      raise CheckpointError(f"no checkpoint in {workdir}; train there first"
                            f" (--mode=train --workdir={workdir})")
    if step is not None and step not in latest + best:
      raise CheckpointError(f"no checkpoint {step} in {workdir}; it has steps"
                            f" {sorted(set(latest + best))}; pick one with --checkpoint_step")
    kind = (LATEST if step in latest else BEST) if step is not None else (BEST if best else LATEST)
    restored = ckpt.restore(None, kind=kind, step=step, target_from_meta=_params_target, say=say,
                            partial=True)
    if restored is None:
      raise CheckpointError(f"no readable checkpoint in {os.path.join(workdir, kind)}")
    state, meta, saved_step = restored
  finally:
    ckpt.close()
  config, model = _model_of(meta, dtype)
  progress = meta["progress"]
  return Trained(config=config, vocab=tuple(meta["vocab"]), model=model,
                 params=state["average"]["params"] if config.nt_asgd else state["params"],
                 step=saved_step,
                 # A checkpoint taken at an epoch's end (after its validation) already points
                 # at the next epoch's first window; one taken inside an epoch, at a later window.
                 epoch=max(1, progress["epoch"] - (progress["window"] == 0)),
                 path=os.path.join(workdir, kind, str(saved_step)))
