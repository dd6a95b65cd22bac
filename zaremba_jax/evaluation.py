"""Evaluation: validation at the training batch, the paper's batch-1 test, and `--mode=evaluate`.

`Evaluator` runs one model's `train.evaluate`, lifted to every member, over a split's windows;
the ensemble's number is the mean of the members' next-token probabilities. `evaluate_checkpoint`
loads the parameters of one or several runs (no optimizer) and reports each member and their
average.
"""

import functools
import time

import jax
import numpy as np

from zaremba_jax import checkpoint as checkpoint_lib
from zaremba_jax import data as data_lib
from zaremba_jax import members as members_lib
from zaremba_jax import mesh as mesh_lib
from zaremba_jax import model as model_lib
from zaremba_jax import reporting
from zaremba_jax import test_time
from zaremba_jax import train as train_lib


def evaluate_members(params, inputs_NxBxT, targets_NxBxT, mask_NxBxT, *, model):
  """`train.evaluate` for every member over the same windows, each from its own zero state:
  (nll_K, nll_KxNxBxT, count_K)."""
  evaluate = functools.partial(train_lib.evaluate, model=model)
  return members_lib.lift(evaluate, (0, None, None, None))(params, inputs_NxBxT, targets_NxBxT,
                                                           mask_NxBxT)


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
    if mesh is not None:  # the same windows on every device and process, placed once
      self.placed = {split: mesh_lib.put(w, jax.tree.map(lambda _: mesh_lib.replicated(mesh), w))
                     for split, w in self.windows.items()}
    else:
      self.placed = self.windows
    self.evaluate = {}
    for split, (inputs_NxBxT, _, _) in self.windows.items():
      planned = model_lib.planned_for(model, inputs_NxBxT.shape[1], inputs_NxBxT.size)
      self.evaluate[split] = jax.jit(functools.partial(evaluate_members, model=planned))

  def __call__(self, params, split: str, tokens: bool = False) -> dict:
    """{'nll_sum' (the ensemble's), 'count', 'member_nll'} over `split`, and with `tokens` the
    NLL of every target under each member ('token_nll' [K, positions], 'mask' [positions])."""
    member_nll_K, nll_KxNxBxT, count_K = mesh_lib.fetch(
        self.mesh, self.evaluate[split](params, *self.placed[split]))
    members = len(member_nll_K)
    result = {"member_nll": [float(x) for x in member_nll_K], "count": float(count_K[0])}
    nll_KxP = np.asarray(nll_KxNxBxT).reshape(members, -1)
    mask_P = np.asarray(self.windows[split][2]).reshape(-1)
    # One member is its own ensemble: its sum as `train.evaluate` makes it.
    result["nll_sum"] = (result["member_nll"][0] if members == 1 else
                         members_lib.ensemble_nll(nll_KxP, mask_P))
    if tokens:
      result.update(token_nll=nll_KxP, mask=mask_P)
    return result


def _load_runs(workdirs: list[str], step, say, dtype) -> list[checkpoint_lib.Trained]:
  """Each run's trained parameters; runs to be averaged must share the level and vocabulary."""
  if step is not None and len(workdirs) > 1:
    raise checkpoint_lib.CheckpointError("--checkpoint_step picks a checkpoint of one run; leave"
                                         " it out to average the best checkpoints of several")
  runs = [checkpoint_lib.load_trained(w, step, say=say, dtype=dtype) for w in workdirs]
  first = runs[0]
  for name, trained in zip(workdirs[1:], runs[1:]):
    if trained.config.level != first.config.level or trained.vocab != first.vocab:
      what = ("is " + trained.config.level + "-level" if trained.config.level != first.config.level
              else "has another vocabulary")
      raise checkpoint_lib.ResumeError(f"{name} {what} than {workdirs[0]}; average runs of one"
                                       f" level trained on one corpus")
  return runs


def evaluate_checkpoint(workdir: str, data_dir: str | None, step: int | None = None,
                        reporter: reporting.Reporter | None = None,
                        ensemble_sizes: tuple[int, ...] = (), dtype: str | None = None,
                        corpus: str | None = None) -> dict:
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
    corpus: a --corpus to evaluate on instead of the one the checkpoint was trained on (its
      vocabulary must be the checkpoint's).

  Returns:
    {'valid', 'test': the ensemble's headline numbers, 'step': the checkpoint's step (one run)}.
  """
  workdirs = [w for w in workdir.split(",") if w]
  reporter = reporter or reporting.Reporter(workdirs[0] if len(workdirs) == 1 else None)
  runs = _load_runs(workdirs, step, reporter.say, dtype)
  first = runs[0]
  reporter.level = first.config.level
  corpus = data_lib.corpus_for(first.config if corpus is None else
                               first.config.replace(corpus=corpus), data_dir)
  for trained in runs:
    checkpoint_lib.check_vocab(corpus.vocab, trained.vocab, "")
  reporter.say(f"evaluating {', '.join(t.path for t in runs)} in {first.config.dtype}")
  evaluators = [Evaluator(first.config, corpus, t.model) for t in runs]
  members = sum(members_lib.count(t.params) for t in runs)
  for k in ensemble_sizes:
    if not 1 <= k <= members:
      raise checkpoint_lib.CheckpointError(f"--ensemble_sizes={k}: the checkpoints hold"
                                           f" {members} members; give sizes from 1 to {members}")
  epoch = first.epoch if len(runs) == 1 else 0
  result = {"step": first.step}
  for split in ("valid", "test"):
    parts = [ev(t.params, split, tokens=True) for ev, t in zip(evaluators, runs)]
    result[split] = _report_split(reporter, split, parts, first.step, epoch, ensemble_sizes)
  source = (f"checkpoint {first.step}" if len(runs) == 1 else
            f"{members} members of {len(runs)} runs")
  reporter.summary(result["valid"], result["test"], f"({source})")
  return result


def _report_split(reporter, split: str, parts: list[dict], step: int, epoch: int,
                  ensemble_sizes) -> float:
  """Reports the members of every run on `split` and their average (and the first k's)."""
  count, mask = parts[0]["count"], parts[0]["mask"]
  member_nll = [x for part in parts for x in part["member_nll"]]
  token_nll = np.concatenate([part["token_nll"] for part in parts])
  members = len(member_nll)
  nll_sum = parts[0]["nll_sum"] if members == 1 else members_lib.ensemble_nll(token_nll, mask)
  headline = reporter.eval_result(step=step, epoch=epoch, split=split,
                                  learning_rate=None, nll_sum=nll_sum, count=count,
                                  member_nll=member_nll)
  for k in ensemble_sizes:
    _, text, _ = reporter.measures(members_lib.ensemble_nll(token_nll[:k], mask), count)
    reporter.say(f"{split} {text}  (average of the first {k} of {members} members)")
  return headline


def evaluate_test_time(workdir: str, data_dir: str | None, caches=(), dynamics=(),
                       step: int | None = None, dtype: str | None = None, say=print,
                       bar: bool | None = None) -> dict:
  """The plain model and the test-time methods (`test_time.py`) on the batch-1 streams of valid
  and test, each method's settings chosen on valid alone, then test scored once with them.

  Reports the plain model, + cache (the best of `caches`), + dynamic evaluation (the best of
  `dynamics`) and + both (the best pair), the rows whose settings were given. Several runs
  ("runs/a,runs/b") are averaged: each member is adapted (dynamic) and mixed (cache) on its own,
  then their probabilities are averaged.

  Returns:
    {row: {'valid', 'test' (headline numbers), 'settings', 'test_seconds'}} for each row, row in
    'plain', 'cache', 'dynamic', 'both'.
  """
  caches, dynamics = list(caches), list(dynamics)
  workdirs = [w for w in workdir.split(",") if w]
  runs = _load_runs(workdirs, step, say, dtype)
  corpus = data_lib.corpus_for(runs[0].config, data_dir)
  for trained in runs:
    checkpoint_lib.check_vocab(corpus.vocab, trained.vocab, "")
  measure = reporting.Reporter(None, level=runs[0].config.level)
  scorers = [test_time.Scorer(t.model, t.config.test_chunk) for t in runs]
  streams = {"valid": corpus.valid, "test": corpus.test}
  ms_of_run = {}
  outputs_of = {}

  def outputs(split, dynamic):
    """Each run's (nll_KxP, h_KxPxH, targets_P) and the seconds they took (cached)."""
    if (split, dynamic) not in outputs_of:
      parts, seconds = [], 0.0
      for i, (scorer, trained) in enumerate(zip(scorers, runs)):
        ms = None
        if dynamic is not None and dynamic.rms:
          ms_key = (i, dynamic.ms_windows, dynamic.ms_batch, dynamic.segment)
          if ms_key not in ms_of_run:
            ms_of_run[ms_key] = scorer.mean_square_gradients(trained.params, corpus.train, dynamic)
          ms = ms_of_run[ms_key]
        parts.append(scorer.outputs(trained.params, streams[split], dynamic, ms))
        seconds += scorer.seconds
      outputs_of[(split, dynamic)] = (parts, seconds)
    return outputs_of[(split, dynamic)]

  def score(split, dynamic, cache):
    parts, seconds = outputs(split, dynamic)
    if split == "test":  # compiles the mixture apart from the timing
      test_time.with_cache(*parts[0], cache)
    start = time.perf_counter()
    nll_KxP = np.concatenate([test_time.with_cache(*part, cache) for part in parts])
    seconds += time.perf_counter() - start
    return measure.measures(test_time.total_nll(nll_KxP), nll_KxP.shape[1])[2], seconds

  off = test_time.Cache()
  rows = {"plain": [(None, off)]}
  if caches:
    rows["cache"] = [(None, c) for c in caches]
  if dynamics:
    rows["dynamic"] = [(d, off) for d in dynamics]
  if caches and dynamics:
    rows["both"] = [(d, c) for d in dynamics for c in caches]
  points = list(dict.fromkeys(p for candidates in rows.values() for p in candidates))
  say(f"test-time evaluation of {', '.join(t.path for t in runs)} in {runs[0].config.dtype}:"
      f" {len(points)} settings on the batch-1 validation stream, then test once per row")
  progress = reporting.progress_bar(len(points), "search on valid", bar)
  valid = {}
  for i, (dynamic, cache) in enumerate(points):
    valid[(dynamic, cache)], _ = score("valid", dynamic, cache)
    line = (f"valid {i + 1}/{len(points)}  {describe(dynamic, cache)}:"
            f" {measure.headline_name()} {valid[(dynamic, cache)]:.2f}")
    if progress is not None:
      progress.write(line)
      progress.update()
    else:
      say(line)
  if progress is not None:
    progress.close()
  result = {}
  for row, candidates in rows.items():
    best = min(candidates, key=lambda p: valid[p])
    test_value, seconds = score("test", *best)
    result[row] = {"valid": valid[best], "test": test_value, "settings": describe(*best),
                   "test_seconds": seconds}
  name = measure.headline_name()
  for row, r in result.items():
    say(f"{row:8s} valid {name} {r['valid']:8.2f}  test {name} {r['test']:8.2f}"
        f"  test {r['test_seconds']:6.1f} s  ({r['settings']})")
  return result


def describe(dynamic, cache) -> str:
  """A row's settings in words, e.g. 'cache window 2000 theta 0.3 lambda 0.1'."""
  parts = []
  if dynamic is not None:
    form = f"rms eps {dynamic.eps:g}" if dynamic.rms else "sgd"
    parts.append(f"dynamic lr {dynamic.lr:g} decay {dynamic.decay:g} segment {dynamic.segment}"
                 f" {form}")
  if cache.on:
    parts.append(f"cache window {cache.window} theta {cache.theta:g} lambda {cache.lam:g}")
  return ", ".join(parts) or "plain"
