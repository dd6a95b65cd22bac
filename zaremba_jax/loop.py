"""The training run: epochs of train steps, validation after each, the test pass at the end."""

import time

import jax
import numpy as np

from zaremba_jax import data as data_lib
from zaremba_jax import model as model_lib
from zaremba_jax import reporting
from zaremba_jax import train as train_lib


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

  def __call__(self, params, split: str) -> tuple[float, float]:
    nll_sum, count = self.evaluate(params, *self.windows[split])
    return float(nll_sum), float(count)


def train_and_evaluate(config, data_dir: str | None, workdir: str | None,
                       reporter: reporting.Reporter | None = None) -> dict:
  """Trains `config`'s model on PTB, validating each epoch, then runs the test pass.

  Returns:
    {'valid': perplexity, 'test': perplexity, 'minutes': wall time, 'words_per_sec': mean
    training speed, 'state': the final TrainState}.
  """
  reporter = reporter or reporting.Reporter(workdir)
  corpus = data_lib.load_corpus(data_lib.resolve_data_dir(data_dir), config.level)
  rows_BxL = data_lib.batchify(corpus.train, config.batch_size)
  steps_per_epoch = data_lib.num_train_windows(rows_BxL, config.num_steps)
  if steps_per_epoch < 1:
    raise ValueError(f"the training split is too short for --num_steps={config.num_steps} at"
                     f" --batch_size={config.batch_size}")
  model = model_lib.make_model(config, corpus.vocab_size)
  tx = train_lib.make_optimizer(config, steps_per_epoch)
  state = train_lib.create_train_state(config, model, tx, jax.random.key(config.seed))
  n_params = sum(p.size for p in jax.tree.leaves(state.params))
  reporter.say(f"{config.level}-level PTB: vocabulary {corpus.vocab_size}, train/valid/test tokens"
               f" {len(corpus.train)}/{len(corpus.valid)}/{len(corpus.test)}; {n_params:,} parameters;"
               f" {steps_per_epoch} steps an epoch on {jax.devices()[0].platform}")
  train_step = train_lib.jit_train_step(model, tx)
  evaluator = Evaluator(config, corpus, model)
  log_every = max(1, steps_per_epoch // config.log_per_epoch)
  words_per_step = config.batch_size * config.num_steps

  step = 0
  train_seconds, train_words = 0.0, 0
  valid_ppl = float("nan")
  epoch = 0
  for epoch in range(1, config.max_max_epoch + 1):
    lr = train_lib.learning_rate_for_epoch(epoch, config.learning_rate, config.max_epoch,
                                           config.lr_decay)
    state = state.replace(carry=model_lib.zero_state(config.num_layers, config.batch_size,
                                                     config.hidden_size))
    epoch_nll, epoch_count = 0.0, 0
    pending = []
    tic, words_since = time.time(), 0
    for i in range(steps_per_epoch):
      inputs_BxT, targets_BxT = data_lib.train_window(rows_BxL, i, config.num_steps)
      state, metrics = train_step(state, inputs_BxT, targets_BxT)
      pending.append(metrics)
      step += 1
      words_since += words_per_step
      done = config.max_train_steps and step >= config.max_train_steps
      if (i + 1) % log_every == 0 or i + 1 == steps_per_epoch or done:
        fetched = jax.device_get(pending)
        pending = []
        epoch_nll += sum(float(m["nll_sum"]) for m in fetched)
        epoch_count += len(fetched) * words_per_step
        seconds = time.time() - tic
        train_seconds += seconds
        train_words += words_since
        reporter.train_progress(step=step, epoch=epoch, fraction=(i + 1) / steps_per_epoch,
                                nll_sum=epoch_nll, count=epoch_count,
                                words_per_sec=words_since / seconds, learning_rate=lr,
                                grad_norm=float(fetched[-1]["grad_norm"]))
        tic, words_since = time.time(), 0
      if done:
        break
    valid_ppl = reporter.eval_result(step=step, epoch=epoch, split="valid",
                                     **_as_kwargs(evaluator(state.params, "valid")),
                                     learning_rate=lr)
    if config.max_train_steps and step >= config.max_train_steps:
      reporter.say(f"stopping after --max_train_steps={config.max_train_steps}")
      break
  test_ppl = reporter.eval_result(step=step, epoch=epoch, split="test",
                                  **_as_kwargs(evaluator(state.params, "test")),
                                  learning_rate=float("nan"))
  words_per_sec = train_words / train_seconds if train_seconds else 0.0
  minutes = reporter.minutes()
  reporter.say(f"summary: valid ppl {valid_ppl:.2f}  test ppl {test_ppl:.2f}  wall time"
               f" {minutes:.1f} min  train words/s {words_per_sec:.0f}")
  return {"valid": valid_ppl, "test": test_ppl, "minutes": minutes,
          "words_per_sec": words_per_sec, "state": state}


def _as_kwargs(result):
  nll_sum, count = result
  return {"nll_sum": nll_sum, "count": count}
