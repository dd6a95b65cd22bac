"""Progress lines on stdout and one JSON object a line in WORKDIR/metrics.jsonl."""

import json
import math
import os
import sys
import time

# Mean characters per word (with its separator) in PTB, the course's factor to turn a per-character
# loss into a word-level perplexity comparable across models.
CHARS_PER_WORD = 5.6


def perplexity(nll_sum: float, count: float) -> float:
  """exp(total NLL / total tokens); inf rather than an overflow error for a diverged run."""
  mean = nll_sum / count
  return math.exp(mean) if mean < 700 else math.inf


def char_metrics(nll_sum: float, count: float) -> dict:
  """Bits per character and the course's word-level perplexity exp(5.6 x mean NLL in nats)."""
  mean = nll_sum / count
  return {"bpc": mean / math.log(2),
          "course_perplexity": math.exp(CHARS_PER_WORD * mean) if mean < 100 else math.inf}


class Reporter:
  """Writes what a run measures, for people (stdout) and for programs (metrics.jsonl).

  Word runs report perplexity. Char runs report bits per character and the course perplexity;
  their headline number (returned by `eval_result`, used for the best checkpoint and the
  summary) is the course perplexity.
  """

  def __init__(self, workdir: str | None, stream=None, level: str = "word"):
    self.stream = stream or sys.stdout
    self.path = os.path.join(workdir, "metrics.jsonl") if workdir else None
    if self.path:
      os.makedirs(workdir, exist_ok=True)
    self.level = level
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

  def measures(self, nll_sum: float, count: float) -> tuple[dict, str, float]:
    """(fields for metrics.jsonl, text for people, headline number) of a loss total."""
    fields = {"perplexity": perplexity(nll_sum, count)}
    if self.level == "char":
      fields.update(char_metrics(nll_sum, count))
      text = f"bpc {fields['bpc']:.4f}  course ppl {fields['course_perplexity']:8.2f}"
      return fields, text, fields["course_perplexity"]
    return fields, f"ppl {fields['perplexity']:9.2f}", fields["perplexity"]

  def member_measures(self, member_nll, count: float) -> tuple[dict, str]:
    """(member_* lists for metrics.jsonl, the members' spread for people); empty for one."""
    if member_nll is None or len(member_nll) < 2:
      return {}, ""
    per_member = [self.measures(nll, count) for nll in member_nll]
    fields = {f"member_{name}": [m[0][name] for m in per_member] for name in per_member[0][0]}
    headlines = [m[2] for m in per_member]
    return fields, f"  members {min(headlines):.2f}-{max(headlines):.2f}"

  def headline_name(self) -> str:
    return "course ppl" if self.level == "char" else "ppl"

  def train_progress(self, *, step, epoch, fraction, nll_sum, count, words_per_sec,
                     learning_rate, grad_norm, member_nll=None) -> None:
    """A progress line; with several members, `nll_sum` is their mean and the spread follows."""
    fields, text, _ = self.measures(nll_sum, count)
    member_fields, spread = self.member_measures(member_nll, count)
    fields.update(member_fields)
    text += spread
    unit = "cps" if self.level == "char" else "wps"
    self.say(f"epoch {epoch:3d}  {100 * fraction:5.1f}%  train {text}  "
             f"{unit} {words_per_sec:7.0f}  lr {learning_rate:.4g}  grad norm {grad_norm:6.2f}  "
             f"since beginning {self.minutes():.1f} min")
    self.log({"step": step, "epoch": epoch, "split": "train", **fields,
              "learning_rate": learning_rate, "words_per_sec": words_per_sec,
              "grad_norm": grad_norm, "minutes": self.minutes()})

  def eval_result(self, *, step, epoch, split, nll_sum, count, learning_rate,
                  member_nll=None) -> float:
    """An evaluation line; `nll_sum` is the ensemble's, `member_nll` each member's."""
    fields, text, headline = self.measures(nll_sum, count)
    member_fields, spread = self.member_measures(member_nll, count)
    fields.update(member_fields)
    text += spread
    self.say(f"epoch {epoch:3d}  {split} {text}"
             f"  ({int(count)} tokens)  since beginning {self.minutes():.1f} min")
    self.log({"step": step, "epoch": epoch, "split": split, **fields,
              "learning_rate": learning_rate, "tokens": int(count), "minutes": self.minutes()})
    return headline
