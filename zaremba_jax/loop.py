"""The training run: resume or start, epochs of train steps, validation after each, the test pass.

With a workdir, the run checkpoints as it goes (see `checkpoint.py`) and running the same
command again continues from the newest checkpoint, bit-exactly.
"""

import dataclasses
import os
import time

import jax
import numpy as np

from zaremba_jax import checkpoint as checkpoint_lib
from zaremba_jax import data as data_lib
from zaremba_jax import mesh as mesh_lib
from zaremba_jax import model as model_lib
from zaremba_jax import reporting
from zaremba_jax import train as train_lib

ResumeError = checkpoint_lib.ResumeError  # the resume policy lives beside the checkpoints


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

  @classmethod
  def from_dict(cls, saved: dict) -> "Progress":
    """A saved Progress; one from before members (a float epoch_nll) is one member's."""
    saved = dict(saved)
    if not isinstance(saved["epoch_nll"], list):
      saved["epoch_nll"] = [saved["epoch_nll"]]
    return cls(**saved)

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


class Evaluator:
  """Validation (training batch and window) and the paper's batch-1 test, each jitted once.

  Each split's model is planned for its stream (`model_lib.planned_for`).
  """

  def __init__(self, config, corpus: data_lib.Corpus, model, mesh=None):
    self.mesh = mesh
    self.windows = {
        "valid": data_lib.eval_windows(data_lib.batchify(corpus.valid, config.batch_size),
                                       config.num_steps),
        "test": data_lib.eval_windows(data_lib.batchify(corpus.test, 1), config.test_chunk),
    }
    self.evaluate = {}
    for split, (inputs_NxBxT, _, _) in self.windows.items():
      planned = model_lib.planned_for(model, inputs_NxBxT.shape[1], inputs_NxBxT.size)
      self.evaluate[split] = train_lib.jit_evaluate_members(planned)

  def __call__(self, params, split: str, tokens: bool = False) -> dict:
    """{'nll_sum' (the ensemble's), 'count', 'member_nll'} over `split`, and with `tokens` the
    NLL of every target under each member ('token_nll' [K, positions], 'mask' [positions])."""
    windows = self.windows[split]
    if self.mesh is not None:  # the same windows on every device and process
      windows = mesh_lib.put(windows, jax.tree.map(lambda _: mesh_lib.replicated(self.mesh),
                                                   windows))
    member_nll_K, nll_NxKxBxT, count = to_host(self.mesh,
                                               self.evaluate[split](params, *windows))
    result = {"member_nll": [float(x) for x in member_nll_K], "count": float(count)}
    nll_KxP = np.moveaxis(np.asarray(nll_NxKxBxT), 1, 0).reshape(len(member_nll_K), -1)
    mask_P = np.asarray(self.windows[split][2]).reshape(-1)
    # One member is its own ensemble: its sum as `evaluate` makes it.
    result["nll_sum"] = (result["member_nll"][0] if len(member_nll_K) == 1 else
                         train_lib.ensemble_nll(nll_KxP, mask_P))
    if tokens:
      result.update(token_nll=nll_KxP, mask=mask_P)
    return result


def to_host(mesh, tree):
  """Arrays as numpy on the host (on a mesh of several processes, gathered on every one)."""
  return jax.device_get(tree) if mesh is None else mesh_lib.to_host(tree)


class Run:
  """The pieces of a run that depend on the config and the corpus, built once.

  With several devices (or processes) the members and batch rows are laid out over a mesh
  (`mesh.py`); on one device nothing is placed and the mesh is None.
  """

  def __init__(self, config, corpus: data_lib.Corpus):
    self.config = config
    self.corpus = corpus
    self.rows_BxL = data_lib.batchify(corpus.train, config.batch_size)
    self.steps_per_epoch = data_lib.num_train_windows(self.rows_BxL, config.num_steps)
    if self.steps_per_epoch < 1:
      raise ValueError(f"the training split is too short for --num_steps={config.num_steps} at"
                       f" --batch_size={config.batch_size}")
    self.model = model_lib.make_model(config, corpus.vocab_size)
    self.tx = train_lib.make_optimizer(config, self.steps_per_epoch)
    self.mesh = (mesh_lib.make_mesh(config.members, config.batch_size, config.mesh or None)
                 if jax.device_count() > 1 or config.mesh else None)
    self.log_every = max(1, self.steps_per_epoch // config.log_per_epoch)
    self.words_per_step = config.batch_size * config.num_steps

  def initial_state(self) -> train_lib.TrainState:
    return self.place(train_lib.create_members(self.config, self.model, self.tx))

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
    shardings = None
    if self.mesh is not None:
      shardings = (self.state_shardings(), mesh_lib.batch_sharding(self.mesh),
                   mesh_lib.member_sharding(self.mesh))
    return train_lib.jit_member_train_steps(self.model, self.tx, shardings)

  def abstract_state(self):
    return train_lib.abstract_train_state(self.config, self.model, self.tx)

  def zero_carry(self):
    """Every member's zero state, [K, L, B, H]: the carry at each epoch's start."""
    c = self.config
    return model_lib.zero_state(c.num_layers, c.batch_size, c.hidden_size, members=c.members)

  def learning_rate(self, epoch: int) -> float:
    c = self.config
    return train_lib.learning_rate_for_epoch(epoch, c.learning_rate, c.max_epoch, c.lr_decay)

  def meta(self, progress: Progress, records: list) -> dict:
    """What a checkpoint holds beside the TrainState."""
    return {"config": self.config.to_dict(), "vocab": list(self.corpus.vocab),
            "progress": dataclasses.asdict(progress), "metrics": records}


def load_corpus(config, data_dir):
  return data_lib.load_corpus(data_lib.resolve_data_dir(data_dir), config.level)


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
    check = lambda meta: checkpoint_lib.check_resumable(meta["config"], config, corpus.vocab,
                                                        meta["vocab"], reporter.say)
    restored = ckpt.restore(run.abstract_state(), check=check, say=reporter.say,
                            shardings=run.state_shardings())
    if restored:
      state, meta, saved_step = restored
      if "members" not in meta["config"]:  # one model's, restored on one device
        state = run.place(state)
      progress = Progress.from_dict(meta["progress"])
      reporter.restore(meta["metrics"])
      reporter.start = time.time() - 60 * progress.minutes
      reporter.say(f"resuming from {ckpt.name}/checkpoints/{saved_step}: epoch"
                   f" {progress.epoch}, window {progress.window} of {run.steps_per_epoch}")
      return state, progress
  return run.initial_state(), Progress()


class Training:
  """A run in progress: the TrainState, its Progress, and when to log, save and stop."""

  def __init__(self, run: Run, state, progress: Progress, ckpt, reporter):
    self.run, self.config = run, run.config
    self.state, self.progress = state, progress
    self.ckpt, self.reporter = ckpt, reporter
    self.train_steps = run.jit_train_steps()
    self.evaluator = Evaluator(run.config, run.corpus, run.model, run.mesh)
    self.step = int(to_host(run.mesh, state.step)[0])  # a host copy (every member's is the same): reading state.step
    # would wait for the device each step

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
    return self.reporter.eval_result(step=self.step, epoch=epoch, split=split,
                                     learning_rate=learning_rate,
                                     **self.evaluator(self.state.params, split))

  def train_epoch(self, stop_requested) -> str | None:
    """Trains the rest of the current epoch (or up to the step cap), logging and checkpointing.

    Returns:
      The reason the run was asked to stop (after saving), or None.
    """
    progress, run = self.progress, self.run
    lr = run.learning_rate(progress.epoch)
    if progress.window == 0:
      carry = run.zero_carry()
      if run.mesh is not None:
        carry = mesh_lib.put(carry, jax.tree.map(lambda _: mesh_lib.carry_sharding(run.mesh),
                                                 carry))
      self.state = self.state.replace(carry=carry)
      progress.start_epoch(self.config.members)
    pending = []  # per-call metrics, still on the device
    tic, words_since = time.time(), 0
    while progress.window < run.steps_per_epoch:
      count = self.steps_this_call()
      inputs_KxBxT, targets_KxBxT = data_lib.train_windows(run.rows_BxL, progress.window,
                                                           count, self.config.num_steps)
      self.state, metrics = self.train_steps(self.state, run.place_windows(inputs_KxBxT),
                                             run.place_windows(targets_KxBxT))
      pending.append(metrics)
      progress.window += count
      words_since += count * run.words_per_step
      self.step += count
      at_end = progress.window == run.steps_per_epoch
      # A line every log_every windows, and one at the epoch's end (not one just before it).
      near_end = run.steps_per_epoch - progress.window < run.log_every // 2
      if (progress.window % run.log_every == 0 and not near_end) or at_end or self.capped():
        last = self._flush(pending)
        seconds = time.time() - tic
        progress.add_time(seconds, words_since)
        self.reporter.train_progress(
            step=self.step, epoch=progress.epoch, fraction=progress.window / run.steps_per_epoch,
            nll_sum=sum(progress.epoch_nll) / len(progress.epoch_nll), count=progress.epoch_count,
            member_nll=progress.epoch_nll,
            words_per_sec=words_since / seconds, learning_rate=lr,
            grad_norm=float(np.mean(last["grad_norm"])))
        tic, words_since = time.time(), 0
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

  def _flush(self, pending: list) -> dict | None:
    """Adds the pending metrics' NLL to the epoch's; returns the last step's metrics."""
    last = None
    for metrics in to_host(self.run.mesh, pending):
      self.progress.add_nll(metrics["nll_sum"], self.run.words_per_step)
      last = {name: values[:, -1] for name, values in metrics.items()}  # [members]
    pending.clear()
    return last

  def end_epoch(self) -> None:
    """Validates, moves to the next epoch, and checkpoints (as the best, if it is)."""
    progress = self.progress
    ppl = self.evaluate("valid", progress.epoch, self.run.learning_rate(progress.epoch))
    improved = progress.validated(ppl, self.step)
    progress.next_epoch()
    self.save(best=improved)

  def stopped(self, reason: str) -> None:
    if self.ckpt:
      self.ckpt.wait()
      self.reporter.say(f"{reason}: saved step {self.step} in {self.ckpt.name}; run the same command"
                        f" again to resume")
    else:
      self.reporter.say(f"{reason}: stopped at step {self.step} (no --workdir, nothing saved)")

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
  run = Run(config, load_corpus(config, data_dir))
  ckpt = checkpoint_lib.Checkpointer(workdir, config.keep_checkpoints) if workdir else None
  try:
    state, progress = start_or_resume(run, ckpt, reporter, restart)
    training = Training(run, state, progress, ckpt, reporter)
    corpus = run.corpus
    n_params = sum(p.size for p in jax.tree.leaves(state.params)) // config.members
    members = f" x {config.members} members" if config.members > 1 else ""
    reporter.say(f"{config.level}-level PTB: vocabulary {corpus.vocab_size}, train/valid/test"
                 f" tokens {len(corpus.train)}/{len(corpus.valid)}/{len(corpus.test)};"
                 f" {n_params:,} parameters{members};"
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
  finally:
    if ckpt:
      ckpt.close()
  minutes, name = reporter.minutes(), reporter.headline_name()
  reporter.say(f"summary: valid {name} {valid_ppl:.2f}  test {name} {test_ppl:.2f}  wall time"
               f" {minutes:.1f} min  train {config.level}s/s {progress.words_per_sec():.0f}")
  return {"valid": valid_ppl, "test": test_ppl, "minutes": minutes,
          "words_per_sec": progress.words_per_sec(), "state": training.state}


def evaluate_checkpoint(workdir: str, data_dir: str | None, step: int | None = None,
                        reporter: reporting.Reporter | None = None,
                        ensemble_sizes: tuple[int, ...] = (), dtype: str | None = None) -> dict:
  """Evaluates the best checkpoint in `workdir` (or the one at `step`) on valid and test.

  `workdir` may name several runs, comma-separated ("runs/a,runs/b"): their members are averaged
  together (the mean of their next-token probabilities). The runs must share the level and the
  vocabulary; sizes may differ. Every run is evaluated over the first run's validation windows
  and the batch-1 test stream. The model's flags come from the checkpoints, so none need be given.

  Args:
    workdir: one run's folder, or several separated by commas.
    data_dir: PTB's folder (None: $ZAREMBA_JAX_DATA or the download cache).
    step: this checkpoint instead of the best (one run only).
    reporter: where results go (default: stdout, and the run's metrics.jsonl for one run).
    ensemble_sizes: also report the average of the first k members for each k given.
    dtype: the matmul dtype to evaluate in, instead of each checkpoint's own.

  Returns:
    {'valid', 'test': the ensemble's headline numbers, 'step': the checkpoint's step (one run)}.
  """
  workdirs = [w for w in workdir.split(",") if w]
  if step is not None and len(workdirs) > 1:
    raise checkpoint_lib.CheckpointError("--checkpoint_step picks a checkpoint of one run; leave"
                                         " it out to average the best checkpoints of several")
  reporter = reporter or reporting.Reporter(workdirs[0] if len(workdirs) == 1 else None)
  runs = [checkpoint_lib.load_trained(w, step, say=reporter.say, dtype=dtype) for w in workdirs]
  first = runs[0]
  for name, trained in zip(workdirs[1:], runs[1:]):
    if trained.config.level != first.config.level or trained.vocab != first.vocab:
      what = ("is " + trained.config.level + "-level" if trained.config.level != first.config.level
              else "has another vocabulary")
      raise checkpoint_lib.ResumeError(f"{name} {what} than {workdirs[0]}; average runs of one"
                                       f" level trained on one corpus")
  config = first.config
  reporter.level = config.level
  corpus = load_corpus(config, data_dir)
  for trained in runs:
    checkpoint_lib.check_vocab(corpus.vocab, trained.vocab, "")
  reporter.say(f"evaluating {', '.join(t.path for t in runs)} in {config.dtype}")
  evaluators = [Evaluator(config, corpus, t.model) for t in runs]
  members = sum(jax.tree.leaves(t.params)[0].shape[0] for t in runs)
  epoch = first.epoch if len(runs) == 1 else 0
  result = {"step": first.step}
  for split in ("valid", "test"):
    parts = [ev(t.params, split, tokens=True) for ev, t in zip(evaluators, runs)]
    count, mask = parts[0]["count"], parts[0]["mask"]
    member_nll = [x for part in parts for x in part["member_nll"]]
    token_nll = np.concatenate([part["token_nll"] for part in parts])
    nll_sum = (parts[0]["nll_sum"] if members == 1 else
               train_lib.ensemble_nll(token_nll, mask))
    result[split] = reporter.eval_result(step=first.step, epoch=epoch, split=split,
                                         learning_rate=float("nan"), nll_sum=nll_sum,
                                         count=count, member_nll=member_nll)
    for k in ensemble_sizes:
      if not 1 <= k <= members:
        raise checkpoint_lib.CheckpointError(f"--ensemble_sizes={k}: the checkpoints hold"
                                             f" {members} members; give sizes from 1 to"
                                             f" {members}")
      _, text, _ = reporter.measures(train_lib.ensemble_nll(token_nll[:k], mask), count)
      reporter.say(f"{split} {text}  (average of the first {k} of {members} members)")
  name = reporter.headline_name()
  reporter.say(f"summary: valid {name} {result['valid']:.2f}  test {name} {result['test']:.2f}"
               f"  ({'checkpoint ' + str(first.step) if len(runs) == 1 else f'{members} members of {len(runs)} runs'})")
  return result
