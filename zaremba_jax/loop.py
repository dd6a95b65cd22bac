"""The training run: epochs of train steps, validation after each, the test pass at the end.

With a workdir, the run checkpoints as it goes (see `checkpoint.py`) and running the same
command again continues from the newest checkpoint, bit-exactly.
"""

import dataclasses
import time

import jax

from zaremba_jax import checkpoint as checkpoint_lib
from zaremba_jax import config as config_lib
from zaremba_jax import data as data_lib
from zaremba_jax import model as model_lib
from zaremba_jax import reporting
from zaremba_jax import train as train_lib

# Flags that change a parameter's shape or the data a position refers to: fixed for a run.
FIXED_ON_RESUME = ("level", "num_layers", "hidden_size", "batch_size", "num_steps")


class ResumeError(ValueError):
  """The checkpoint in the workdir does not fit the flags given. The message says what to do."""


@dataclasses.dataclass
class Progress:
  """Where a run is, beyond the TrainState: saved with every checkpoint as JSON."""

  epoch: int = 1            # the epoch being trained (1-based)
  window: int = 0           # the next window of that epoch
  epoch_nll: float = 0.0    # training NLL summed over the epoch so far
  epoch_count: int = 0      # tokens behind epoch_nll
  best_valid: float = float("inf")
  last_valid: float = float("nan")
  last_valid_step: int = -1
  train_seconds: float = 0.0
  train_words: int = 0
  minutes: float = 0.0


class Evaluator:
  """Validation (training batch and window) and the paper's batch-1 test, each jitted once."""

  def __init__(self, config, corpus: data_lib.Corpus, model):
    self.config = config
    self.windows = {
        "valid": data_lib.eval_windows(data_lib.batchify(corpus.valid, config.batch_size),
                                       config.num_steps),
        "test": data_lib.eval_windows(data_lib.batchify(corpus.test, 1), config.test_chunk),
    }
    self.evaluate = train_lib.jit_evaluate(model)

  def __call__(self, params, split: str) -> dict:
    nll_sum, count = self.evaluate(params, *self.windows[split])
    return {"nll_sum": float(nll_sum), "count": float(count)}


class Run:
  """The pieces of a run that depend on the config and the corpus, built once."""

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

  def initial_state(self) -> train_lib.TrainState:
    return train_lib.create_train_state(self.config, self.model, self.tx,
                                        jax.random.key(self.config.seed))

  def abstract_state(self):
    return train_lib.abstract_train_state(self.config, self.model, self.tx)

  def zero_carry(self):
    c = self.config
    return model_lib.zero_state(c.num_layers, c.batch_size, c.hidden_size)


def load_corpus(config, data_dir):
  return data_lib.load_corpus(data_lib.resolve_data_dir(data_dir), config.level)


def check_vocab(vocab, saved_vocab, remedy: str) -> None:
  """Refuses a corpus whose vocabulary is not the one the checkpoint was trained on."""
  if list(saved_vocab) != list(vocab):
    raise ResumeError(f"the corpus's vocabulary differs from the checkpoint's; pass the --data_dir"
                      f" the run was trained on{remedy}")


def check_resumable(saved: dict, config, vocab, saved_vocab, say) -> None:
  """Refuses flags that change shapes or data; logs the others that changed."""
  for name in FIXED_ON_RESUME:
    if saved[name] != getattr(config, name):
      raise ResumeError(f"--{name}={getattr(config, name)} differs from the checkpoint's"
                        f" --{name}={saved[name]}; rerun with --{name}={saved[name]} to resume,"
                        f" or add --restart to discard the checkpoints and start over")
  check_vocab(vocab, saved_vocab, ", or add --restart to start over")
  for name, value in config.to_dict().items():
    if name in saved and saved[name] != value and name != "mode":
      say(f"resuming with --{name} changed: {saved[name]} -> {value}")


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
  reporter = reporter or reporting.Reporter(workdir)
  reporter.level = config.level
  corpus = load_corpus(config, data_dir)
  run = Run(config, corpus)
  ckpt = checkpoint_lib.Checkpointer(workdir, config.keep_checkpoints) if workdir else None
  progress = Progress()
  state = None
  if ckpt and restart:
    gone = ckpt.discard()
    reporter.restore([])
    reporter.say(f"--restart: discarded {'; '.join(gone) if gone else 'no checkpoints'} and the"
                 f" metrics in {workdir}")
  elif ckpt and ckpt.steps():
    check = lambda meta: check_resumable(meta["config"], config, corpus.vocab, meta["vocab"],
                                         reporter.say)
    restored = ckpt.restore(run.abstract_state(), check=check, say=reporter.say)
    if restored:
      state, meta, saved_step = restored
      progress = Progress(**meta["progress"])
      reporter.restore(meta["metrics"])
      reporter.start = time.time() - 60 * progress.minutes
      reporter.say(f"resuming from {workdir}/checkpoints/{saved_step}: epoch {progress.epoch},"
                   f" window {progress.window} of {run.steps_per_epoch}")
  if state is None:
    state = run.initial_state()
  n_params = sum(p.size for p in jax.tree.leaves(state.params))
  reporter.say(f"{config.level}-level PTB: vocabulary {corpus.vocab_size}, train/valid/test tokens"
               f" {len(corpus.train)}/{len(corpus.valid)}/{len(corpus.test)}; {n_params:,}"
               f" parameters; {run.steps_per_epoch} steps an epoch on"
               f" {jax.devices()[0].platform}")

  train_steps = train_lib.jit_train_steps(run.model, run.tx)
  evaluator = Evaluator(config, corpus, run.model)
  log_every = max(1, run.steps_per_epoch // config.log_per_epoch)
  words_per_step = config.batch_size * config.num_steps
  step = int(state.step)  # a host copy: reading state.step would wait for the device each step
  capped = lambda: config.max_train_steps and step >= config.max_train_steps

  def steps_this_call():
    """config.steps_per_call windows in one call, or 1 where the host must act sooner (a
    progress line, a checkpoint, the epoch's end, the step cap): two compiled shapes in all."""
    room = [run.steps_per_epoch - progress.window, log_every - progress.window % log_every]
    if ckpt:
      room.append(config.checkpoint_every_steps - step % config.checkpoint_every_steps)
    if config.max_train_steps:
      room.append(config.max_train_steps - step)
    return config.steps_per_call if config.steps_per_call <= min(room) else 1

  def lr_for(epoch):
    return train_lib.learning_rate_for_epoch(epoch, config.learning_rate, config.max_epoch,
                                             config.lr_decay)

  def save(best=False):
    if ckpt:
      progress.minutes = reporter.minutes()
      meta = {"config": config.to_dict(), "vocab": list(corpus.vocab),
              "progress": dataclasses.asdict(progress), "metrics": reporter.records}
      ckpt.save(step, state, meta, best=best)

  def validate():
    ppl = reporter.eval_result(step=step, epoch=progress.epoch, split="valid",
                               learning_rate=lr_for(progress.epoch),
                               **evaluator(state.params, "valid"))
    progress.last_valid, progress.last_valid_step = ppl, step
    improved = ppl < progress.best_valid
    progress.best_valid = min(progress.best_valid, ppl)
    return improved

  try:
    while progress.epoch <= config.max_max_epoch and not capped():
      lr = lr_for(progress.epoch)
      if progress.window == 0:
        state = state.replace(carry=run.zero_carry())
        progress.epoch_nll, progress.epoch_count = 0.0, 0
      pending = []
      tic, words_since = time.time(), 0

      def flush():
        # One float at a time, so the sum does not depend on where a checkpoint fell.
        last = None
        for m in jax.device_get(pending):
          for nll_sum in m["nll_sum"]:
            progress.epoch_nll += float(nll_sum)
            progress.epoch_count += words_per_step
          last = {name: values[-1] for name, values in m.items()}
        pending.clear()
        return last

      while progress.window < run.steps_per_epoch:
        count = steps_this_call()
        inputs_KxBxT, targets_KxBxT = data_lib.train_windows(run.rows_BxL, progress.window,
                                                             count, config.num_steps)
        state, metrics = train_steps(state, inputs_KxBxT, targets_KxBxT)
        pending.append(metrics)
        progress.window += count
        words_since += count * words_per_step
        step += count
        at_end = progress.window == run.steps_per_epoch
        # A line every log_every windows, and one at the epoch's end (not one just before it).
        near_end = run.steps_per_epoch - progress.window < log_every // 2
        if (progress.window % log_every == 0 and not near_end) or at_end or capped():
          last = flush()
          seconds = time.time() - tic
          progress.train_seconds += seconds
          progress.train_words += words_since
          reporter.train_progress(step=step, epoch=progress.epoch,
                                  fraction=progress.window / run.steps_per_epoch,
                                  nll_sum=progress.epoch_nll, count=progress.epoch_count,
                                  words_per_sec=words_since / seconds, learning_rate=lr,
                                  grad_norm=float(last["grad_norm"]))
          tic, words_since = time.time(), 0
        reason = stop_requested(step)
        if reason or capped() or (ckpt and step % config.checkpoint_every_steps == 0
                                  and not at_end):
          flush()
          save()
        if reason:
          if ckpt:
            ckpt.wait()
            reporter.say(f"{reason}: saved step {step} in {workdir}; run the same command again"
                         f" to resume")
          else:
            reporter.say(f"{reason}: stopped at step {step} (no --workdir, nothing saved)")
          return None
        if capped():
          break
      if progress.window == run.steps_per_epoch:
        improved = validate()
        progress.epoch += 1
        progress.window = 0
        save(best=improved)
    if capped():
      reporter.say(f"stopping after --max_train_steps={config.max_train_steps}")
    final_epoch = min(progress.epoch, config.max_max_epoch)
    valid_ppl = progress.last_valid
    if progress.last_valid_step != step:
      # Stopped inside an epoch: validate the final state (logged, but not checkpointed, so a
      # continuation's metrics stay those of an uninterrupted run).
      valid_ppl = reporter.eval_result(step=step, epoch=final_epoch, split="valid",
                                       learning_rate=lr_for(final_epoch),
                                       **evaluator(state.params, "valid"))
      if ckpt and (valid_ppl < progress.best_valid or not ckpt.steps(checkpoint_lib.BEST)):
        save(best=True)
    test_ppl = reporter.eval_result(step=step, epoch=final_epoch, split="test",
                                    learning_rate=float("nan"), **evaluator(state.params, "test"))
  finally:
    if ckpt:
      ckpt.close()
  words_per_sec = progress.train_words / progress.train_seconds if progress.train_seconds else 0.0
  minutes = reporter.minutes()
  name = reporter.headline_name()
  reporter.say(f"summary: valid {name} {valid_ppl:.2f}  test {name} {test_ppl:.2f}  wall time"
               f" {minutes:.1f} min  train {config.level}s/s {words_per_sec:.0f}")
  return {"valid": valid_ppl, "test": test_ppl, "minutes": minutes,
          "words_per_sec": words_per_sec, "state": state}


def evaluate_checkpoint(workdir: str, data_dir: str | None, step: int | None = None,
                        reporter: reporting.Reporter | None = None) -> dict:
  """Evaluates the best checkpoint in `workdir` (or the one at `step`) on valid and test.

  The model's flags come from the checkpoint, so none need be given.
  """
  reporter = reporter or reporting.Reporter(workdir)
  trained = checkpoint_lib.load_trained(workdir, step, say=reporter.say)
  config = trained.config
  reporter.level = config.level
  corpus = load_corpus(config, data_dir)
  check_vocab(corpus.vocab, trained.vocab, "")
  reporter.say(f"evaluating {trained.path}")
  evaluator = Evaluator(config, corpus, trained.model)
  result = {"step": trained.step}
  for split in ("valid", "test"):
    result[split] = reporter.eval_result(step=trained.step, epoch=trained.epoch, split=split,
                                         learning_rate=float("nan"),
                                         **evaluator(trained.params, split))
  name = reporter.headline_name()
  reporter.say(f"summary: valid {name} {result['valid']:.2f}  test {name} {result['test']:.2f}"
               f"  (checkpoint {trained.step})")
  return result
