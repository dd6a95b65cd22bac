"""The package from Python: what the command line runs, a few lines each, for a notebook.

Each function is a thin layer over the module the command line uses (`loop`, `checkpoint`,
`sample`); nothing here trains, evaluates or samples in a way of its own.

  import zaremba_jax
  config = zaremba_jax.preset("small").replace(max_train_steps=200)
  result = zaremba_jax.train(config, workdir="runs/try", callback=print)
  trained = zaremba_jax.load("runs/try")
  zaremba_jax.next_token_distribution(trained, "the company", top=5)
"""

import os
import sys

import numpy as np

from zaremba_jax import checkpoint as checkpoint_lib
from zaremba_jax import config as config_lib
from zaremba_jax import data as data_lib
from zaremba_jax import evaluation
from zaremba_jax import export as export_lib
from zaremba_jax import loop
from zaremba_jax import mesh as mesh_lib
from zaremba_jax import reporting
from zaremba_jax import sample as sample_lib
from zaremba_jax import score as score_lib

Config = config_lib.Config
Trained = checkpoint_lib.Trained


class StopTraining(Exception):
  """Raised by a `train` callback to stop the run cleanly (as returning True does)."""


def preset(name: str, **changes) -> Config:
  """The Config of a preset in experiments/ (small, medium, large, word200, char_small, char_large).

  Change fields with `Config.replace`:

    config = preset("small").replace(max_train_steps=200, dtype="bfloat16")
  """
  return config_lib.preset(name, **changes)


def preset_names() -> tuple[str, ...]:
  """The presets' names, e.g. ("char_large", "char_small", "large", "medium", "small", "word200")."""
  return config_lib.preset_names()


def _note(message: str) -> None:
  print(f"note: {message}", file=sys.stderr, flush=True)


class _Stopper:
  """Calls the user's callback with each record; remembers a request to stop.

  The reporter calls it (`Reporter.on_record`) and the loop asks it after each call of train steps
  (`stop_requested`), the way the command line's signal handler is asked.
  """

  REASON = "stopped by the callback"

  def __init__(self, callback):
    self.callback = callback
    self.reason = None

  def __call__(self, record: dict) -> None:
    if self.callback is None:
      return
    try:
      stop = self.callback(record)
    except StopTraining:
      stop = True
    if stop is True and not self.reason:
      self.reason = self.REASON

  def requested(self, step: int):
    del step
    return self.reason


def _in_notebook() -> bool:
  return reporting.in_jupyter_kernel()


def train(config: Config, workdir: str | None = None, data_dir: str | None = None,
          callback=None, progress: bool = True, restart: bool = False) -> dict:
  """Trains `config`'s model as `python -m zaremba_jax.main --mode=train` does (loop.train_and_evaluate).

  With a workdir it checkpoints as it goes, and calling `train` again with the same workdir resumes
  (`restart=True` starts over).

  Args:
    config: a Config, e.g. `preset("small").replace(max_train_steps=200)`.
    workdir: where metrics.jsonl and checkpoints go (None: neither).
    data_dir: PTB's folder (None: $ZAREMBA_JAX_DATA, else the download cache).
    callback: called with every metrics record (a dict: each progress line's, each validation and
      test result's, as written to metrics.jsonl). Returning True, or raising StopTraining, stops the
      run after the current call of train steps, with a checkpoint saved as on SIGTERM (once
      training is over, at the final validation or test, there is nothing left to stop).
    progress: print the progress lines (and a tqdm bar for the epoch on a terminal or in a
      notebook with ipywidgets, where tqdm is installed); False prints nothing.
    restart: discard the workdir's checkpoints and metrics first.

  Returns:
    {'records': every metrics record of the run, 'stopped': None or why it stopped early}, and for a
    run that ended: 'valid', 'test' (perplexities; course perplexity for characters), 'minutes',
    'words_per_sec', 'state' (the final TrainState).

  Example:
    curve = []
    result = train(preset("small"), "runs/small",
                   callback=lambda r: curve.append(r["perplexity"]) if r["split"] == "train" else None)
  """
  stopper = _Stopper(callback)
  primary = mesh_lib.is_primary()  # one process writes the lines and the metrics
  quiet = not (progress and primary)
  stream = open(os.devnull, "w", encoding="utf-8") if quiet else sys.stdout
  reporter = reporting.Reporter(workdir if primary else None, stream, on_record=stopper,
                                bar=False if quiet else (True if _in_notebook() else None))
  try:
    result = loop.train_and_evaluate(config, data_dir, workdir, reporter, restart=restart,
                                     stop_requested=stopper.requested)
  finally:
    reporter.close_bar()
    if quiet:
      stream.close()
  # A stop asked for after the last train step (at the test result, say) finds the run done.
  stopped = stopper.reason if result is None else None
  return {**(result or {}), "records": list(reporter.records), "stopped": stopped}


def load(workdir: str, step: int | None = None) -> Trained:
  """The best checkpoint of a run (the latest if none is marked best), or the one at `step`.

    trained = load("runs/small")
    trained.config.hidden_size, trained.step, len(trained.vocab)
  """
  return checkpoint_lib.load_trained(workdir, step, say=_note)


def evaluate(workdir: str, data_dir: str | None = None, step: int | None = None,
             caches=(), dynamics=()) -> dict:
  """Valid and test perplexity of a run's best checkpoint, as `--mode=evaluate` (evaluation.evaluate_checkpoint).

  `workdir` may be several runs, "runs/a,runs/b": their members' probabilities are averaged.

    evaluate("runs/small")  # {'step': 17290, 'valid': 120.1, 'test': 115.0}

  Given test-time methods (`test_time.Cache`, `test_time.Dynamic`; several of each are a search
  on valid), the batch-1 rows of `evaluation.evaluate_test_time` instead:

    from zaremba_jax.test_time import Cache, Dynamic
    evaluate("runs/small", caches=[Cache(window=2000, theta=t, lam=0.1) for t in (0.3, 1.0)],
             dynamics=[Dynamic(lr=0.002, decay=0.02)])
    # {'plain': {'valid': ..., 'test': ..., 'settings': 'plain', ...}, 'cache': ..., 'both': ...}
  """
  if caches or dynamics:
    return evaluation.evaluate_test_time(workdir, data_dir, caches, dynamics, step, say=_note)
  return evaluation.evaluate_checkpoint(workdir, data_dir, step)


def _predictor(trained) -> sample_lib.Predictor:
  """One Predictor per loaded model, so that its jitted step compiles once, not on every call."""
  if isinstance(trained, sample_lib.Predictor):
    return trained
  cache = vars(trained)  # a frozen dataclass: the cache sits beside its fields, not among them
  if "_api_predictor" not in cache:
    cache["_api_predictor"] = sample_lib.Predictor(trained)
  return cache["_api_predictor"]


def query_sentences(trained: Trained, queries,
                    temperature: float = sample_lib.QUERY_TEMPERATURE, top_k: int = 0,
                    seed: int = 0, max_query_len: int = 100) -> list[str]:
  """Completes each "N word1 word2 ..." with N words, as `--mode=query` (sample.query_sentences).

    query_sentences(trained, ["5 the company said"])  # ['the company said it expects to report ...']
  """
  if isinstance(queries, str):
    queries = [queries]
  return sample_lib.query_sentences(_predictor(trained), queries, temperature, top_k, seed,
                                    max_query_len, warn=_note)


def sample(trained: Trained, prime: str = "", length: int = 200,
           temperature: float = sample_lib.SAMPLE_TEMPERATURE,
           top_k: int = 0, seed: int = 0) -> str:
  """The prime followed by `length` generated tokens, as `--mode=sample` prints them.

  Words are joined by spaces, characters as text ("_" back to a space); <eos> is a line break.
  Temperature 1 (the default, as `--mode=sample`'s) draws from the model's distribution, lower
  sharpens it, 0 takes the most likely token; the same seed gives the same text.

    print(sample(trained, prime="the company", length=30, temperature=0.8, seed=1))
  """
  ids = sample_lib.prime_ids(trained, prime, _note)
  new = sample_lib.generate(_predictor(trained), ids, length, temperature, top_k, seed)
  return sample_lib.render(trained, ids + new).rstrip(" ")


def next_token_distribution(trained: Trained, prompt: str, top: int | None = None
                            ) -> list[tuple[str, float]]:
  """The model's probability of each next token after `prompt`, most likely first.

  The prompt is read as `sample` reads a prime: words, or characters (a space is "_", a line break
  <eos>); an empty prompt is read as the start of a sentence. Tokens are the vocabulary's.

    next_token_distribution(trained, "the company", top=3)  # [('said', 0.21), ("'s", 0.08), ...]

  Args:
    trained: a loaded model (`load`).
    prompt: the text before the token.
    top: only the `top` most likely (None: the whole vocabulary, summing to 1).
  """
  predictor = _predictor(trained)
  ids = sample_lib.prime_ids(trained, prompt, _note)
  if not ids:  # as generate starts: after a sentence end
    ids = [predictor.index.get(data_lib.EOS, 0)]
  logprobs_V, _ = predictor.feed(ids, predictor.start())
  probs_V = np.exp(np.asarray(logprobs_V, np.float64))
  order = np.argsort(-probs_V, kind="stable")[:top]
  return [(predictor.vocab[i], float(probs_V[i])) for i in order]


def score(trained, text: str) -> dict:
  """The log-probability of `text` under a loaded model, token by token, as `--mode=score`
  (score.score_text): read as the model's corpus was, fed from the zero state after an <eos>.

    result = score(trained, "the company said it expects\n")
    result["logprobs"], result["total_logprob"], result["perplexity"]

  A model of several members scores with their average (the mean of their probabilities).
  """
  if "_api_scorer" not in vars(trained):  # one jitted scorer per loaded model, as _predictor
    vars(trained)["_api_scorer"] = score_lib.Scorer(trained)
  return score_lib.score_text(trained, text, vars(trained)["_api_scorer"])


def export(trained, path: str) -> dict:
  """Writes a loaded model's parameters as `--mode=export` does (export.export): a PyTorch
  nn.LSTM-layout state_dict in `path` ending .safetensors, or the same arrays in a .npz; the
  vocabulary goes with them. docs/corpora.md shows the PyTorch side.

    export(load("runs/small"), "small.safetensors")
  """
  return export_lib.export(trained, path)
