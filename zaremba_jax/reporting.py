"""Progress lines on stdout and one JSON object a line in WORKDIR/metrics.jsonl.

On a terminal (and where tqdm is installed) a progress bar for the current epoch runs below the
lines; the lines themselves, and everything written to a file, a pipe or metrics.jsonl, are the
same with or without it.
"""

import json
import math
import os
import sys
import time

# Mean characters per word (with its separator) in PTB, the course's factor to turn a per-character
# loss into a word-level perplexity comparable across models.
CHARS_PER_WORD = 5.6

# The epoch's bar: steps done of the epoch's, time spent and left; the train number and speed of the
# last progress line follow (tqdm's own rate would count steps, not words).
BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} steps [{elapsed}<{remaining}{postfix}]"


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

  def __init__(self, workdir: str | None, stream=None, level: str = "word", on_record=None,
               bar: bool | None = None):
    """
    Args:
      workdir: where metrics.jsonl goes (None: no file).
      stream: where the lines go (default: stdout).
      level: "word" or "char" (the run sets it).
      on_record: called with a copy of every record after it is written (each progress line
        and each evaluation result); `api.train` hangs a notebook's callback here.
      bar: a tqdm bar for the current epoch: None (default) when `stream` is a terminal, True
        wherever tqdm is installed (a notebook), False never. Without tqdm there is none.
    """
    self.stream = stream or sys.stdout
    self.path = os.path.join(workdir, "metrics.jsonl") if workdir else None
    if self.path:
      os.makedirs(workdir, exist_ok=True)
    self.level = level
    self.start = time.time()
    self.records = []
    self.on_record = on_record
    self._tqdm = _tqdm_class() if (bar or (bar is None and _isatty(self.stream))) else None
    self._bar = None  # the open bar, and the epoch it counts
    self._bar_epoch = None

  def minutes(self) -> float:
    return (time.time() - self.start) / 60.0

  def say(self, line: str) -> None:
    if self._bar is not None:  # above the bar, which is drawn again below the line
      self._tqdm.write(line, file=self.stream)
      self.stream.flush()
    else:
      print(line, file=self.stream, flush=True)

  def log(self, record: dict) -> None:
    self.records.append(record)
    if self.path:
      with open(self.path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
    if self.on_record is not None:
      self.on_record(dict(record))

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
    measure = text
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
    if self._tqdm is not None:
      self._advance_bar(step, epoch, fraction, measure, f"{unit} {words_per_sec:.0f}")

  def _advance_bar(self, step, epoch, fraction, measure: str, speed: str) -> None:
    """Moves the epoch's bar to `fraction`, opening it at the epoch's first line.

    The epoch's length in steps follows from the global step: every epoch before this one ran all
    its windows, so step = (epoch - 1 + fraction) * steps_per_epoch.
    """
    steps_per_epoch = max(1, round(step / (epoch - 1 + fraction)))
    done = round(fraction * steps_per_epoch)
    postfix = f"{' '.join(measure.split())}, {speed}"
    if done >= steps_per_epoch:  # the epoch's last line: validation comes next, not more steps
      self.close_bar()
      return
    if self._bar is None or self._bar_epoch != epoch:
      self.close_bar()
      try:
        self._bar = self._tqdm(total=steps_per_epoch, initial=done, desc=f"epoch {epoch}",
                               postfix=postfix, file=self.stream, leave=False,
                               dynamic_ncols=True, bar_format=BAR_FORMAT)
      except Exception:  # pylint: disable=broad-except
        self._tqdm = None  # a bar that cannot be drawn here (a notebook without widgets)
        return
      self._bar_epoch = epoch
      return
    self._bar.set_postfix_str(postfix, refresh=False)
    self._bar.n = done
    self._bar.refresh()

  def close_bar(self) -> None:
    """Closes the epoch's bar, if one is open (the lines stay)."""
    if self._bar is not None:
      self._bar.close()
      self._bar, self._bar_epoch = None, None

  def eval_result(self, *, step, epoch, split, nll_sum, count, learning_rate,
                  member_nll=None) -> float:
    """An evaluation line; `nll_sum` is the ensemble's, `member_nll` each member's."""
    self.close_bar()
    fields, text, headline = self.measures(nll_sum, count)
    member_fields, spread = self.member_measures(member_nll, count)
    fields.update(member_fields)
    text += spread
    self.say(f"epoch {epoch:3d}  {split} {text}"
             f"  ({int(count)} tokens)  since beginning {self.minutes():.1f} min")
    self.log({"step": step, "epoch": epoch, "split": split, **fields,
              "learning_rate": learning_rate, "tokens": int(count), "minutes": self.minutes()})
    return headline


def _isatty(stream) -> bool:
  try:
    return bool(stream.isatty())
  except (AttributeError, ValueError):  # no isatty, or a closed stream
    return False


def in_jupyter_kernel() -> bool:
  """Whether this process is a Jupyter kernel (a notebook's), as tqdm.auto tells one.

  Not merely whether ipykernel was imported: jupyter_client imports it to find kernelspecs.
  """
  return "ipykernel.zmqshell" in sys.modules


def _tqdm_class():
  """tqdm's bar class (a widget in a notebook, text on a terminal), or None without tqdm.

  Also None in a notebook without ipywidgets: there tqdm.auto falls back to a text bar, whose every
  frame would pile up in the cell's output (saved with the notebook) between the progress lines.
  """
  try:
    if in_jupyter_kernel():
      from tqdm.notebook import IProgress  # pylint: disable=import-outside-toplevel
      if IProgress is None:  # no ipywidgets
        return None
    from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None
  return tqdm
