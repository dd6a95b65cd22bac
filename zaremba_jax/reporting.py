"""Progress lines on stdout and one JSON object a line in WORKDIR/metrics.jsonl."""

import json
import math
import os
import sys
import time


def perplexity(nll_sum: float, count: float) -> float:
  """exp(total NLL / total tokens); inf rather than an overflow error for a diverged run."""
  mean = nll_sum / count
  return math.exp(mean) if mean < 700 else math.inf


class Reporter:
  """Writes what a run measures, for people (stdout) and for programs (metrics.jsonl)."""

  def __init__(self, workdir: str | None, stream=None):
    self.stream = stream or sys.stdout
    self.path = os.path.join(workdir, "metrics.jsonl") if workdir else None
    if self.path:
      os.makedirs(workdir, exist_ok=True)
    self.start = time.time()
    self.records = []

  def minutes(self) -> float:
    return (time.time() - self.start) / 60.0

  def say(self, line: str) -> None:
    print(line, file=self.stream, flush=True)

  def log(self, record: dict) -> None:
    self.records.append(record)
    if self.path:
      with open(self.path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")

  def restore(self, records: list[dict]) -> None:
    """Continues from a checkpoint: metrics.jsonl becomes exactly the records saved with it."""
    self.records = list(records)
    if self.path:
      tmp = self.path + ".tmp"
      with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in self.records)
      os.replace(tmp, self.path)

  def train_progress(self, *, step, epoch, fraction, nll_sum, count, words_per_sec,
                     learning_rate, grad_norm) -> None:
    ppl = perplexity(nll_sum, count)
    self.say(f"epoch {epoch:3d}  {100 * fraction:5.1f}%  train ppl {ppl:9.2f}  "
             f"wps {words_per_sec:7.0f}  lr {learning_rate:.4g}  grad norm {grad_norm:6.2f}  "
             f"since beginning {self.minutes():.1f} min")
    self.log({"step": step, "epoch": epoch, "split": "train", "perplexity": ppl,
              "learning_rate": learning_rate, "words_per_sec": words_per_sec,
              "grad_norm": grad_norm, "minutes": self.minutes()})

  def eval_result(self, *, step, epoch, split, nll_sum, count, learning_rate) -> float:
    ppl = perplexity(nll_sum, count)
    self.say(f"epoch {epoch:3d}  {split} ppl {ppl:.2f}  ({int(count)} tokens)  "
             f"since beginning {self.minutes():.1f} min")
    self.log({"step": step, "epoch": epoch, "split": split, "perplexity": ppl,
              "learning_rate": learning_rate, "tokens": int(count), "minutes": self.minutes()})
    return ppl
