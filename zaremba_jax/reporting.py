"""Progress lines on stdout and one JSON object a line in WORKDIR/metrics.jsonl.

On a terminal (and where tqdm is installed) a progress bar for the current epoch runs below the
lines, moved after every jitted call of train steps; the lines themselves, and everything written
to a file, a pipe or metrics.jsonl, are the same with or without it. metrics.jsonl is strict JSON
(a number that is not finite is written as null), and with `tensorboard` the same numbers also go to
TensorBoard event files in WORKDIR/tensorboard (tensorboardX, no TensorFlow needed).
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
# With --tensorboard: where the event files go (inside the workdir) and the record fields written,
# each as the scalar "SPLIT/FIELD" (train/perplexity, valid/bpc, ...) at the record's step.
TENSORBOARD_FOLDER = "tensorboard"
TENSORBOARD_SCALARS = ("perplexity", "bpc", "course_perplexity", "learning_rate", "words_per_sec",
                       "grad_norm", "fractional_epoch")

BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} steps [{elapsed}<{remaining}{postfix}]"


def perplexity(nll_sum: float, count: float) -> float:
  """exp(total NLL / total tokens); inf rather than an overflow error for a diverged run."""
  mean = nll_sum / count
  return math.exp(mean) if mean < 700 else math.inf


def finite_or_none(value):
  """`value` with every float that is NaN or infinite replaced by None (JSON's null), in lists too.

  Python's json writes NaN and Infinity, which are not JSON (JSON.parse and jq refuse them).
  """
  if isinstance(value, float) and not math.isfinite(value):
    return None
  if isinstance(value, (list, tuple)):
    return [finite_or_none(v) for v in value]
  return value


def char_metrics(nll_sum: float, count: float) -> dict:
  """Bits per character and the course's word-level perplexity exp(5.6 x mean NLL in nats)."""
  mean = nll_sum / count
  return {"bpc": mean / math.log(2),
          "course_perplexity": math.exp(CHARS_PER_WORD * mean) if mean < 100 else math.inf}


class Reporter:
  """Writes what a run measures, for people (stdout) and for programs (metrics.jsonl).

  Word runs report perplexity. Char runs report bits per character and the course perplexity;
  their headline number (returned by `eval_result`, used for the best checkpoint) is the course
  perplexity, and their summary line leads with bits per character.

  A training run sets `steps_per_epoch`; each record then carries it and its `fractional_epoch`
  (step / steps_per_epoch: 0.0226 after 30 steps of the small preset), which the plot reads.
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
    self._in_flight = None  # the last call's position and metrics, not yet waited for
    self._postfix = ""  # the last progress line's numbers, shown beside the bar
    self.steps_per_epoch = None  # set by a training run
    self.workdir = workdir
    self._tensorboard = None

  def open_tensorboard(self) -> None:
    """Also writes every record's numbers as TensorBoard scalars into WORKDIR/tensorboard.

    Needs tensorboardX (pip install tensorboardX, or requirements-dev.txt); without a workdir
    (another process of a multi-process run, say) there is nothing to write and nothing happens.
    """
    if not self.path or self._tensorboard is not None:
      return
    try:
      import tensorboardX  # pylint: disable=import-outside-toplevel
    except ImportError:
      raise ImportError("--tensorboard needs tensorboardX: pip install tensorboardX (it is in"
                        " requirements-dev.txt)") from None
    # Events are written by tensorboardX's own thread, to disk every 30 s and at close.
    self._tensorboard = tensorboardX.SummaryWriter(
        logdir=os.path.join(self.workdir, TENSORBOARD_FOLDER), flush_secs=30)

  def close_tensorboard(self) -> None:
    """Writes out the events still queued and closes the event file (the run's end)."""
    if self._tensorboard is not None:
      self._tensorboard.close()
      self._tensorboard = None

  def _write_tensorboard(self, record: dict) -> None:
    step, split = record.get("step"), record.get("split")
    for name in TENSORBOARD_SCALARS:
      value = record.get(name)
      if isinstance(value, (int, float)) and math.isfinite(value) and step is not None:
        self._tensorboard.add_scalar(f"{split}/{name}", value, step)

  def minutes(self) -> float:
    return (time.time() - self.start) / 60.0

  def say(self, line: str) -> None:
    if self._bar is not None:  # above the bar, which is drawn again below the line
      self._tqdm.write(line, file=self.stream)
      self.stream.flush()
    else:
      print(line, file=self.stream, flush=True)

  def log(self, record: dict) -> None:
    if self.steps_per_epoch and "step" in record:
      record["steps_per_epoch"] = self.steps_per_epoch
      record["fractional_epoch"] = record["step"] / self.steps_per_epoch
    record = {name: finite_or_none(value) for name, value in record.items()}
    self.records.append(record)
    if self.path:
      with open(self.path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, allow_nan=False) + "\n")
    if self._tensorboard is not None:
      self._write_tensorboard(record)
    if self.on_record is not None:
      self.on_record(dict(record))

  def restore(self, records: list[dict]) -> None:
    """Continues from a checkpoint: metrics.jsonl becomes exactly the records saved with it (those
    of older versions with NaN written as null)."""
    self.records = [{name: finite_or_none(value) for name, value in r.items()} for r in records]
    if self.path:
      tmp = self.path + ".tmp"
      with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, allow_nan=False) + "\n" for r in self.records)
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

  def summary(self, valid: float, test: float, rest: str) -> None:
    """The run's last line: `summary: valid ppl V  test ppl T  REST`; for characters, bits per
    character first and the course perplexity beside it (both from the headline numbers)."""
    def text(split, headline):
      if self.level != "char":
        return f"{split} ppl {headline:.2f}"
      bpc = math.log(headline) / CHARS_PER_WORD / math.log(2) if headline > 0 else math.nan
      return f"{split} bpc {bpc:.4f} (course ppl {headline:.2f})"
    self.say(f"summary: {text('valid', valid)}  {text('test', test)}  {rest}")

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
      self._in_flight = None  # the line's metrics were read: every call before it has finished
      self._postfix = f"{' '.join(measure.split())}, {unit} {words_per_sec:.0f}"
      self._advance_bar(step, epoch, fraction)

  def tick(self, step, epoch, fraction, metrics) -> None:
    """After each jitted call of train steps: moves the bar to where the previous call ended.

    Calls run asynchronously, so the bar waits for the previous call's `metrics` (device arrays)
    before showing its steps as done, leaving this one in flight: the device is never left idle,
    and the bar is at most one call behind. Without a bar this does nothing (and waits for
    nothing).
    """
    if self._tqdm is None:
      return
    previous, self._in_flight = self._in_flight, (step, epoch, fraction, metrics)
    if previous is None or previous[1] != epoch:
      return
    import jax  # pylint: disable=import-outside-toplevel
    jax.block_until_ready(previous[3])
    self._advance_bar(*previous[:3])

  def _advance_bar(self, step, epoch, fraction) -> None:
    """Moves the epoch's bar to `fraction`, opening it when the epoch's first steps are done.

    The epoch's length in steps is `steps_per_epoch` where the run set it; else it follows from the
    global step: every epoch before this one ran all its windows, so step = (epoch - 1 +
    fraction) * steps_per_epoch.
    """
    steps_per_epoch = self.steps_per_epoch or max(1, round(step / (epoch - 1 + fraction)))
    done = round(fraction * steps_per_epoch)
    postfix = self._postfix
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
    self._bar.update(done - self._bar.n)  # drawn at most every 0.1 s (tqdm's mininterval)

  def close_bar(self) -> None:
    """Closes the epoch's bar, if one is open (the lines stay)."""
    self._in_flight = None
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
    record = {"step": step, "epoch": epoch, "split": split, **fields}
    if learning_rate is not None and math.isfinite(learning_rate):  # a test has none
      record["learning_rate"] = learning_rate
    self.log({**record, "tokens": int(count), "minutes": self.minutes()})
    return headline


def _isatty(stream) -> bool:
  try:
    return bool(stream.isatty())
  except (AttributeError, ValueError):  # no isatty, or a closed stream
    return False


def progress_bar(total: int, desc: str, bar: bool | None = None, stream=None):
  """A tqdm bar counting to `total` on `stream` (default stderr) where it is a terminal, or where
  `bar`; None otherwise (or without tqdm): the caller prints lines instead."""
  stream = sys.stderr if stream is None else stream
  if bar is False or (bar is None and not _isatty(stream)):
    return None
  tqdm = _tqdm_class()
  return tqdm(total=total, desc=desc, file=stream, leave=False) if tqdm else None


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
