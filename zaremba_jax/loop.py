"""The training run: resume or start, epochs of train steps, validation after each, the test pass.

With a workdir, the run checkpoints as it goes (see `checkpoint.py`) and running the same
command again continues from the newest checkpoint, bit-exactly.
"""

import dataclasses
import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from zaremba_jax import checkpoint as checkpoint_lib
from zaremba_jax import data as data_lib
from zaremba_jax import evaluation
from zaremba_jax import hosts
from zaremba_jax import members as members_lib
from zaremba_jax import mesh as mesh_lib
from zaremba_jax import model as model_lib
from zaremba_jax import regularizers
from zaremba_jax import reporting
from zaremba_jax import train as train_lib

@dataclasses.dataclass
class Progress:
  """Where a run is, beyond the TrainState: saved with every checkpoint as JSON."""

  epoch: int = 1            # the epoch being trained (1-based)
  window: int = 0           # the next window of that epoch
  epoch_nll: list = dataclasses.field(default_factory=list)  # each member's training NLL so far
  epoch_count: int = 0      # tokens behind each epoch_nll
  best_valid: float = float("inf")
  last_valid: float = float("nan")
  last_valid_step: int = -1
  train_seconds: float = 0.0
  train_words: int = 0
  minutes: float = 0.0
  # NT-ASGD (--nt_asgd): each member's validation NLL per token at each epoch's end, until its
  # averaging starts (Merity et al.'s `logs`).
  valid_history: list = dataclasses.field(default_factory=list)

  def start_epoch(self, members: int) -> None:
    self.epoch_nll, self.epoch_count = [0.0] * members, 0

  def add_nll(self, nll_sums_KxS, tokens_per_step: int) -> None:
    """Adds each member's per-step NLL sums, in step order."""
    # One float at a time, so the sum does not depend on where a checkpoint fell.
    for k, nll_sums in enumerate(nll_sums_KxS):
      for nll_sum in nll_sums:
        self.epoch_nll[k] += float(nll_sum)
    self.epoch_count += tokens_per_step * len(nll_sums_KxS[0])

  def add_time(self, seconds: float, words: int) -> None:
    self.train_seconds += seconds
    self.train_words += words

  def words_per_sec(self) -> float:
    return self.train_words / self.train_seconds if self.train_seconds else 0.0

  def validated(self, perplexity: float, step: int) -> bool:
    """Records a validation result; whether it is the best so far."""
    self.last_valid, self.last_valid_step = perplexity, step
    improved = perplexity < self.best_valid
    self.best_valid = min(self.best_valid, perplexity)
    return improved

  def next_epoch(self) -> None:
    self.epoch += 1
    self.window = 0


def check_long_enough(config, corpus: data_lib.Corpus) -> None:
  """Refuses, in one line, a corpus too short for one training window or one validation row."""
  b, t = config.batch_size, config.num_steps
  need = b * (t + 1)  # every row needs a window of inputs and its last target
  if len(corpus.train) < need:
    raise data_lib.DataError(
        f"the training split has {len(corpus.train)} tokens, too few for one window of"
        f" --batch_size={b} x --num_steps={t} (needs {need}); use more text, or lower --batch_size"
        f" or --num_steps")
  if len(corpus.valid) < 2 * b:
    raise data_lib.DataError(
        f"the validation split has {len(corpus.valid)} tokens, too few for --batch_size={b} rows"
        f" of two (needs {2 * b}); give it more text (or a larger --split share), or lower"
        f" --batch_size")


class Run:
  """The pieces of a run that depend on the config and the corpus, built once.

  With several devices (or processes) the members and batch rows are laid out over a mesh
  (`mesh.py`); on one device nothing is placed and the mesh is None.
  """

  def __init__(self, config, corpus: data_lib.Corpus):
    self.config = config
    self.corpus = corpus
    check_long_enough(config, corpus)
    self.rows_BxL = data_lib.batchify(corpus.train, config.batch_size)
    self.steps_per_epoch = data_lib.num_train_windows(self.rows_BxL, config.num_steps)
    self.model = model_lib.make_model(config, corpus.vocab_size)
    self.tx = train_lib.make_optimizer(config, self.steps_per_epoch)
    self.mesh = (mesh_lib.make_mesh(config.members, config.batch_size, config.mesh or None)
                 if jax.device_count() > 1 or config.mesh else None)
    self.log_every = max(1, self.steps_per_epoch // config.log_per_epoch)
    self.words_per_step = config.batch_size * config.num_steps

  def fresh_members(self) -> train_lib.TrainState:
    """`config.members` TrainStates stacked on a leading member axis: member i starts as a single
    run with seed `config.seed + i` would, with its own parameters and dropout key."""
    c = self.config
    make_one = functools.partial(train_lib.create_train_state, c, self.model, self.tx)
    return members_lib.create(make_one, range(c.seed, c.seed + c.members))

  def initial_state(self) -> train_lib.TrainState:
    # One jitted program: run eagerly, the initializers' ~50 small operations each compiled on
    # their own (~1.5 s of a cold start); the values are the same bit for bit.
    return self.place(jax.jit(self.fresh_members)())

  def state_shardings(self):
    """Where each leaf of the state goes on the mesh (None without one)."""
    if self.mesh is None:
      return None
    return mesh_lib.state_sharding(self.mesh, self.abstract_state())

  def place(self, state):
    """A host or one-device state laid out over the mesh (as it is without one)."""
    return state if self.mesh is None else mesh_lib.put(state, self.state_shardings())

  def place_windows(self, array_SxBxT):
    return array_SxBxT if self.mesh is None else mesh_lib.put_batch(self.mesh, array_SxBxT)

  def jit_train_steps(self):
    """`train.train_steps` for every member on the same windows, jitted (on the mesh, if any)."""
    steps = members_lib.lift(functools.partial(train_lib.train_steps, model=self.model,
                                               tx=self.tx), (0, None, None))
    if self.mesh is None:
      return jax.jit(steps, donate_argnums=0)
    state, inputs = self.state_shardings(), mesh_lib.batch_sharding(self.mesh)
    return jax.jit(steps, donate_argnums=0, in_shardings=(state, inputs, inputs),
                   out_shardings=(state, mesh_lib.member_sharding(self.mesh)))

  def abstract_state(self):
    """Shapes and dtypes of fresh members' TrainState (nothing is computed): a restore target."""
    return jax.eval_shape(self.fresh_members)

  def zero_carry(self, members: int):
    """Every member's zero state, [K, L, B, H]: the carry at each epoch's start."""
    c = self.config
    carry = model_lib.zero_state(c.num_layers, c.batch_size, c.hidden_size, members=members)
    if self.mesh is not None:
      carry = mesh_lib.put(carry, jax.tree.map(lambda _: mesh_lib.carry_sharding(self.mesh),
                                               carry))
    return carry

  def learning_rate(self, epoch: int) -> float:
    c = self.config
    return train_lib.learning_rate_for_epoch(epoch, c.learning_rate, c.max_epoch, c.lr_decay)

  def meta(self, progress: Progress, records: list) -> dict:
    """What a checkpoint holds beside the TrainState."""
    return {"config": self.config.to_dict(), "vocab": list(self.corpus.vocab),
            "progress": dataclasses.asdict(progress), "metrics": records,
            "train_sha256": self.train_digest}

  @functools.cached_property
  def train_digest(self) -> str:
    """sha256 of the training token ids: a resume on other text (same vocabulary) is refused."""
    return data_lib.stream_digest(self.corpus.train)


def start_or_resume(run: Run, ckpt, reporter, restart: bool):
  """(state, progress): the newest readable checkpoint's, or a fresh start.

  With `restart`, the workdir's checkpoints and metrics are discarded first.
  """
  config, corpus = run.config, run.corpus
  if ckpt and restart:
    gone = ckpt.discard()
    reporter.restore([])
    reporter.say(f"--restart: discarded {'; '.join(gone) if gone else 'no checkpoints'} and the"
                 f" metrics in {ckpt.name}")
  elif ckpt and ckpt.steps():
    def check(meta):
      checkpoint_lib.check_resumable(meta["config"], config, corpus.vocab, meta["vocab"],
                                     reporter.say)
      checkpoint_lib.check_train_text(meta, run.train_digest, len(corpus.train))
    restored = ckpt.restore(run.abstract_state(), check=check, say=reporter.say,
                            shardings=run.state_shardings())
    if restored:
      state, meta, saved_step = restored
      progress = Progress(**meta["progress"])
      reporter.restore(meta["metrics"])
      reporter.start = time.time() - 60 * progress.minutes
      reporter.say(f"resuming from {ckpt.name}/checkpoints/{saved_step}: epoch"
                   f" {progress.epoch}, window {progress.window} of {run.steps_per_epoch}")
      return state, progress
    # A fresh start here would train over them unseen: Orbax keeps no step older than the newest,
    # so no save would land until the run passed it, and then the old ones would be pruned.
    raise checkpoint_lib.CheckpointError(
        f"no checkpoint in {ckpt.name}/checkpoints (steps {', '.join(map(str, ckpt.steps()))}) could"
        f" be read (the warnings above say why); nothing was changed: rerun with the version of"
        f" zaremba_jax that wrote them, or pass --restart to discard them and start over")
  return run.initial_state(), Progress()


class Training:
  """A run in progress: the TrainState, its Progress, and when to log, save and stop."""

  def __init__(self, run: Run, state, progress: Progress, ckpt, reporter):
    self.run, self.config = run, run.config
    self.state, self.progress = state, progress
    self.ckpt, self.reporter = ckpt, reporter
    self.train_steps = run.jit_train_steps()
    self.tic, self.words_since = time.time(), 0  # since the last progress line
    self.evaluator = evaluation.Evaluator(run.config, run.corpus, run.model, run.mesh)
    # A host copy of the step (every member's is the same): reading state.step would wait for
    # the device each step.
    self.step = int(mesh_lib.fetch(run.mesh, state.step)[0])

  def capped(self) -> bool:
    return bool(self.config.max_train_steps and self.step >= self.config.max_train_steps)

  def steps_this_call(self) -> int:
    """config.steps_per_call windows in one call, or 1 where the host must act sooner (a
    progress line, a checkpoint, the epoch's end, the step cap): two compiled shapes in all."""
    c, run, window = self.config, self.run, self.progress.window
    room = [run.steps_per_epoch - window, run.log_every - window % run.log_every]
    if self.ckpt:
      room.append(c.checkpoint_every_steps - self.step % c.checkpoint_every_steps)
    if c.max_train_steps:
      room.append(c.max_train_steps - self.step)
    return c.steps_per_call if c.steps_per_call <= min(room) else 1

  def save(self, best: bool = False) -> None:
    if self.ckpt:
      self.progress.minutes = self.reporter.minutes()
      self.ckpt.save(self.step, self.state, self.run.meta(self.progress, self.reporter.records),
                     best=best)

  def evaluate(self, split: str, epoch: int, learning_rate: float) -> float:
    # NT-ASGD's average once it runs (train.evaluated_params), else the parameters.
    self.last_eval = self.evaluator(train_lib.evaluated_params(self.state), split)
    return self.reporter.eval_result(step=self.step, epoch=epoch, split=split,
                                     learning_rate=learning_rate, **self.last_eval)

  def train_epoch(self, stop_requested) -> str | None:
    """Trains the rest of the current epoch (or up to the step cap), logging and checkpointing.

    Returns:
      The reason the run was asked to stop (after saving), or None.
    """
    progress, run = self.progress, self.run
    lr = run.learning_rate(progress.epoch)
    if progress.window == 0:
      members = members_lib.count(self.state.params)
      self.state = self.state.replace(carry=run.zero_carry(members))
      progress.start_epoch(members)
    pending = []  # per-call metrics, still on the device
    self.tic, self.words_since = time.time(), 0
    while progress.window < run.steps_per_epoch:
      count = self.steps_this_call()
      inputs_KxBxT, targets_KxBxT = data_lib.train_windows(run.rows_BxL, progress.window,
                                                           count, self.config.num_steps)
      self.state, metrics = self.train_steps(self.state, run.place_windows(inputs_KxBxT),
                                             run.place_windows(targets_KxBxT))
      pending.append(metrics)
      progress.window += count
      self.words_since += count * run.words_per_step
      self.step += count
      self.reporter.tick(self.step, progress.epoch, progress.window / run.steps_per_epoch, metrics)
      at_end = progress.window == run.steps_per_epoch
      # A line every log_every windows, and one at the epoch's end (not one just before it).
      near_end = run.steps_per_epoch - progress.window < run.log_every // 2
      if (progress.window % run.log_every == 0 and not near_end) or at_end or self.capped():
        self._report_progress(pending, lr)
      reason = stop_requested(self.step)
      if reason or self.capped() or (self.ckpt and not at_end and
                                     self.step % self.config.checkpoint_every_steps == 0):
        self._flush(pending)
        self.save()
      if reason:
        return reason
      if self.capped():
        return None
    return None

  def _report_progress(self, pending: list, learning_rate: float) -> None:
    """A progress line: the epoch's training perplexity so far, the speed since the last line."""
    progress, run = self.progress, self.run
    last = self._flush(pending)
    seconds = time.time() - self.tic
    progress.add_time(seconds, self.words_since)
    self.reporter.train_progress(
        step=self.step, epoch=progress.epoch, fraction=progress.window / run.steps_per_epoch,
        nll_sum=sum(progress.epoch_nll) / len(progress.epoch_nll), count=progress.epoch_count,
        member_nll=progress.epoch_nll, words_per_sec=self.words_since / seconds,
        learning_rate=learning_rate, grad_norm=float(np.mean(last["grad_norm"])))
    self.tic, self.words_since = time.time(), 0

  def _flush(self, pending: list) -> dict | None:
    """Adds the pending metrics' NLL to the epoch's; returns the last step's metrics."""
    last = None
    for metrics in mesh_lib.fetch(self.run.mesh, pending):
      self.progress.add_nll(metrics["nll_sum"], self.run.words_per_step)
      last = {name: values[:, -1] for name, values in metrics.items()}  # [members]
    pending.clear()
    return last

  def end_epoch(self) -> None:
    """Validates, moves to the next epoch, and checkpoints (as the best, if it is)."""
    progress = self.progress
    ppl = self.evaluate("valid", progress.epoch, self.run.learning_rate(progress.epoch))
    improved = progress.validated(ppl, self.step)
    if self.state.average is not None:
      self._trigger_averaging()
    progress.next_epoch()
    self.save(best=improved)

  def _trigger_averaging(self) -> None:
    """NT-ASGD's trigger (Merity et al. 2017, Algorithm 1, L = one epoch), member by member: a
    member not yet averaging starts when this validation is worse than the best of all but its
    last `nonmono` ones; the history grows until it starts."""
    c, progress, run = self.config, self.progress, self.run
    nll_K = [nll / self.last_eval["count"] for nll in self.last_eval["member_nll"]]
    if not progress.valid_history:
      progress.valid_history = [[] for _ in nll_K]
    active_K = np.asarray(mesh_lib.fetch(run.mesh, self.state.average["active"]))
    started = active_K.copy()
    for k, (nll, logs) in enumerate(zip(nll_K, progress.valid_history)):
      if active_K[k]:
        continue
      if regularizers.nt_asgd_triggers(logs, nll, c.nonmono):
        started[k] = True
        self.reporter.say(f"NT-ASGD: member {k} averages from step {self.step} on (validation"
                          f" {np.exp(nll):.2f} is above {np.exp(min(logs[:-c.nonmono])):.2f}, the"
                          f" best before the last {c.nonmono})")
      logs.append(float(nll))
    if (started != active_K).any():
      active = started.astype(bool)
      active = (jnp.asarray(active) if run.mesh is None else
                mesh_lib.put(active, mesh_lib.member_sharding(run.mesh)))
      self.state = self.state.replace(average={**self.state.average, "active": active})

  def stopped(self, reason: str) -> None:
    if self.ckpt:
      self.ckpt.wait()
      line = (f"{reason}: saved step {self.step} in {self.ckpt.name}; run the same command again"
              f" to resume")
      if hosts.active():
        line = (f"{reason}: every process saved step {self.step} in {self.ckpt.name} together;"
                f" run the same commands again to resume")
    else:
      line = f"{reason}: stopped at step {self.step} (no --workdir, nothing saved)"
    self.reporter.say(line)
    if hosts.active() and not mesh_lib.is_primary():  # process 0's reporter prints for it
      print(line, flush=True)

  def final_evaluation(self) -> tuple[float, float]:
    """(valid, test) perplexities of the final state; the test pass is the paper's batch 1."""
    progress = self.progress
    final_epoch = min(progress.epoch, self.config.max_max_epoch)
    valid_ppl = progress.last_valid
    if progress.last_valid_step != self.step:
      # Stopped inside an epoch: validate the final state (logged, but not checkpointed, so a
      # continuation's metrics stay those of an uninterrupted run).
      valid_ppl = self.evaluate("valid", final_epoch, self.run.learning_rate(final_epoch))
      if self.ckpt and (valid_ppl < progress.best_valid or
                        not self.ckpt.steps(checkpoint_lib.BEST)):
        self.save(best=True)
    test_ppl = self.evaluate("test", final_epoch, float("nan"))
    return valid_ppl, test_ppl


def corpus_name(config) -> str:
  """The corpus as the run's first line names it."""
  return config.corpus or "PTB"


def train_and_evaluate(config, data_dir: str | None, workdir: str | None,
                       reporter: reporting.Reporter | None = None, *, restart: bool = False,
                       stop_requested=lambda step: None) -> dict | None:
  """Trains `config`'s model on PTB, validating each epoch, then runs the batch-1 test pass.

  Args:
    config: the run's Config.
    data_dir: folder with the PTB files, or None to use $ZAREMBA_JAX_DATA or the download cache.
    workdir: where metrics.jsonl and checkpoints go (None: neither, nothing resumes).
    reporter: where progress goes (default: stdout and workdir/metrics.jsonl).
    restart: discard the workdir's checkpoints and start over.
    stop_requested: called with the global step after each call of train steps; returns a
      reason (e.g. 'SIGTERM') when the run should checkpoint and stop.

  Returns:
    {'valid', 'test': perplexities, 'minutes': wall time, 'words_per_sec': training speed,
    'state': the final TrainState}, or None when stopped on request (after saving).
  """
  if reporter is None:  # one process writes the log and the metrics
    primary = mesh_lib.is_primary()
    reporter = reporting.Reporter(workdir if primary else None,
                                  None if primary else open(os.devnull, "w", encoding="utf-8"))
  reporter.level = config.level
  corpus = data_lib.corpus_for(config, data_dir)
  hosts.check_same_run(config, corpus, restart=restart)  # several processes: all alike, or none
  run = Run(config, corpus)
  reporter.steps_per_epoch = run.steps_per_epoch  # each record's fractional epoch
  if config.tensorboard:
    reporter.open_tensorboard()
  ckpt = checkpoint_lib.Checkpointer(workdir, config.keep_checkpoints) if workdir else None
  try:
    state, progress = start_or_resume(run, ckpt, reporter, restart)
    training = Training(run, state, progress, ckpt, reporter)
    corpus, count = run.corpus, members_lib.count(state.params)
    n_params = sum(p.size for p in jax.tree.leaves(state.params)) // count
    reporter.say(f"{config.level}-level {corpus_name(config)}: vocabulary {corpus.vocab_size}, train/valid/test"
                 f" tokens {len(corpus.train)}/{len(corpus.valid)}/{len(corpus.test)};"
                 f" {n_params:,} parameters{f' x {count} members' if count > 1 else ''};"
                 f" {run.steps_per_epoch} steps an epoch on"
                 f" {mesh_lib.describe(run.mesh) if run.mesh else jax.devices()[0].platform}")
    while progress.epoch <= config.max_max_epoch and not training.capped():
      reason = training.train_epoch(stop_requested)
      if reason:
        training.stopped(reason)
        return None
      if progress.window == run.steps_per_epoch:
        training.end_epoch()
    if training.capped():
      reporter.say(f"stopping after --max_train_steps={config.max_train_steps}")
    valid_ppl, test_ppl = training.final_evaluation()
  except Exception as e:
    hosts.leave_if_peer_lost(e)  # a peer gone: a few lines and exit, before the cleanup waits on it
    raise
  finally:
    if ckpt:
      ckpt.close()
    reporter.close_tensorboard()
  minutes = reporter.minutes()
  reporter.summary(valid_ppl, test_ppl, f"wall time {minutes:.1f} min  train {config.level}s/s"
                   f" {progress.words_per_sec():.0f}")
  return {"valid": valid_ppl, "test": test_ppl, "minutes": minutes,
          "words_per_sec": progress.words_per_sec(), "state": training.state}
