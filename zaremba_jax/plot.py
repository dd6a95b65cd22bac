"""Training curves of one or more runs, from their metrics.jsonl.

  python -m zaremba_jax.plot runs/small [runs/small_bf16 ...] --out curves.png

Train and valid perplexity (bits per character for char runs) against the epoch, every run on one
figure labelled by its folder's name, the learning rate on a second (log) axis, and as a dashed line
the number the run's preset was made to reach (the paper's Table 1, or the course seed's). Needs
matplotlib (`pip install matplotlib`); the rest of the package does not.
"""

import argparse
import dataclasses
import json
import math
import os
import sys

from zaremba_jax.reporting import CHARS_PER_WORD


def course_to_bpc(course_perplexity: float) -> float:
  """The bits per character of a course perplexity exp(5.6 x mean NLL per character)."""
  return math.log(course_perplexity) / CHARS_PER_WORD / math.log(2)


# The validation number each preset was made to reach, in the plot's unit (perplexity for words,
# bits per character for characters).
REFERENCES = {
    "small": ("paper valid 120.7", 120.7),
    "medium": ("paper valid 86.2", 86.2),
    "large": ("paper valid 82.2", 82.2),
    "word200": ("course seed valid 105", 105.0),
    "char_small": ("course seed valid 282 (%.4f bpc)" % course_to_bpc(282.0), course_to_bpc(282.0)),
    "char_large": ("course seed valid 220.7 (%.4f bpc)" % course_to_bpc(220.7),
                   course_to_bpc(220.7)),
    # The successors' rows (regularizers.py; each preset's header names its paper).
    "small_tied_pr": ("Press & Wolf valid 104.9", 104.9),
    # Another corpus (data.py, --corpus); its preset's header names the anchors.
    "wt2_medium": ("Inan et al. 650 tied valid 92.3", 92.3),
    "small_variational_tied": ("Inan et al. valid 89.9", 89.9),
    "medium_variational": ("Gal & Ghahramani valid 81.9", 81.9),
    "large_variational_tied": ("Press & Wolf valid 75.8", 75.8),
    "awd_lstm": ("Merity et al. valid 60.0", 60.0),
}

# What makes a run one of the presets: the model, the data it reads and the schedule. Speed-only
# flags (dtype, kernels, steps_per_call, ...), the seed and the number of members may differ.
PRESET_FIELDS = ("level", "batch_size", "num_steps", "num_layers", "hidden_size", "dropout",
                 "init_scale", "learning_rate", "max_epoch", "max_max_epoch", "lr_decay",
                 "max_grad_norm")


class PlotError(ValueError):
  """The runs cannot be plotted as asked. The message says why."""


def read_metrics(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.isfile(path):
    raise PlotError(f"no metrics.jsonl in {workdir}; give the --workdir of a training run")
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def recognise(saved_config: dict | None) -> str | None:
  """The preset a run's saved config is (on PRESET_FIELDS), or None."""
  if not saved_config:
    return None
  from zaremba_jax import config as config_lib  # pylint: disable=import-outside-toplevel
  defaults = config_lib.Config().to_dict()
  fields = PRESET_FIELDS + config_lib.REGULARIZER_FIELDS + ("corpus",)  # PTB is corpus ""
  for name in config_lib.preset_names():
    wanted = config_lib.preset(name).to_dict()
    # A field newer than the run (a regularizer's) has its default, as the run had it.
    if all(saved_config.get(field, defaults[field]) == wanted[field] for field in fields):
      return name
  return None


def steps_per_epoch(records: list[dict], config: dict | None = None) -> float:
  """Train steps in one epoch: as the records say (`steps_per_epoch`, written by every run since
  2026-12-03), else read from older records' step and epoch.

  For older records: a run's global step is (epoch - 1) x steps_per_epoch + the window in the
  epoch, and an epoch's last progress line comes at its last window. So an epoch followed by
  another (or ended by its validation at the same step, short of a --max_train_steps cap) gives the
  number exactly. A run stopped inside its first epoch never saw an epoch end: the number is
  estimated from the spacing of its progress lines (steps_per_epoch // log_per_epoch steps apart),
  good to log_per_epoch steps; with one line it cannot be told (the step itself is used).
  """
  recorded = [r["steps_per_epoch"] for r in records if r.get("steps_per_epoch")]
  if recorded:
    return recorded[-1]
  train = [r for r in records if r["split"] == "train"]
  if not train:
    raise PlotError("no train records in metrics.jsonl: the run has not logged a progress line yet")
  last_of_epoch = {}
  for r in train:
    last_of_epoch[r["epoch"]] = r["step"]
  epochs = sorted(last_of_epoch)
  if len(epochs) > 1:  # the first epoch ran to its end
    return last_of_epoch[epochs[0]] / epochs[0]
  epoch, step = epochs[0], last_of_epoch[epochs[0]]
  capped = bool(config and config.get("max_train_steps") and step >= config["max_train_steps"])
  validated = any(r["split"] == "valid" and r["step"] == step for r in records)
  if validated and not capped:
    return step / epoch
  steps = [r["step"] for r in train]
  log_per_epoch = (config or {}).get("log_per_epoch", 10)
  estimate = steps[0] * log_per_epoch if len(steps) > 1 and epoch == 1 else 0
  return max(step / epoch, estimate)


@dataclasses.dataclass
class Curves:
  """One run's numbers as plotted."""

  name: str
  level: str
  train_x: list[float]
  train_y: list[float]
  learning_rate: list[float]
  valid_x: list[float]
  valid_y: list[float]
  member_valid_y: list[list[float]]  # one list per member; empty for one model
  preset: str | None


def read_curves(workdir: str, name: str, preset: str | None = None) -> Curves:
  """A run's curves; its preset is `preset` or the one its newest checkpoint's config matches."""
  records = read_metrics(workdir)
  config = None
  if os.path.isdir(os.path.join(workdir, "checkpoints")) or os.path.isdir(
      os.path.join(workdir, "best")):
    from zaremba_jax import checkpoint as checkpoint_lib  # pylint: disable=import-outside-toplevel
    config = checkpoint_lib.saved_config(workdir)
  level = "char" if any("bpc" in r for r in records) else "word"
  key = "bpc" if level == "char" else "perplexity"
  per_epoch = steps_per_epoch(records, config)
  train = [r for r in records if r["split"] == "train"]
  valid = {}
  for r in records:  # --mode=evaluate appends the checkpoint it read again: keep the first
    if r["split"] == "valid":
      valid.setdefault(r["step"], r)
  valid = [valid[step] for step in sorted(valid)]
  members = [r[f"member_{key}"] for r in valid if f"member_{key}" in r]
  member_valid_y = ([[number(y) for y in ys] for ys in zip(*members)]
                    if len(members) == len(valid) else [])
  epoch_of = lambda r: r.get("fractional_epoch", r["step"] / per_epoch)
  return Curves(
      name=name, level=level,
      train_x=[epoch_of(r) for r in train], train_y=[number(r.get(key)) for r in train],
      learning_rate=[number(r.get("learning_rate")) for r in train],
      valid_x=[epoch_of(r) for r in valid], valid_y=[number(r.get(key)) for r in valid],
      member_valid_y=member_valid_y,
      preset=preset if preset is not None else recognise(config))


def number(value) -> float:
  """A record's number; null (a value that was not finite: a diverged run) or absent as NaN."""
  return math.nan if value is None else value


def run_names(workdirs: list[str]) -> list[str]:
  """Each run's folder name; the paths as given where two folders share a name."""
  names = [os.path.basename(os.path.normpath(w)) for w in workdirs]
  return [n if names.count(n) == 1 else os.path.normpath(w) for n, w in zip(names, workdirs)]


def plot(workdirs: list[str], out: str | None = None, preset: str | None = None,
         members: bool = True):
  """Draws the runs' curves on one figure (Agg, no window) and returns it.

  Args:
    workdirs: run folders (each with metrics.jsonl).
    out: write the figure here (.png, .pdf, .svg), if given.
    preset: the preset of every run, for the reference line (default: each run's own, read from its
      newest checkpoint).
    members: thin lines for each member's validation number, for runs of several members.

  Returns:
    The matplotlib Figure: axes[0] holds the curves (lines labelled "NAME train", "NAME valid",
    "_NAME valid member I" and the reference), axes[1] the learning rates ("NAME learning rate").
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=import-outside-toplevel
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  from matplotlib.ticker import LogFormatter  # pylint: disable=import-outside-toplevel

  runs = [read_curves(w, name, preset) for w, name in zip(workdirs, run_names(workdirs))]
  levels = {run.level for run in runs}
  if len(levels) > 1:
    raise PlotError("these runs mix word and character models; plot each level on its own figure")
  char = levels == {"char"}
  fig = Figure(figsize=(9, 5.5), layout="constrained")
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  lr_ax = ax.twinx()
  colors = [f"C{i % 10}" for i in range(len(runs))]
  for run, color in zip(runs, colors):
    ax.plot(run.train_x, run.train_y, color=color, linewidth=1, alpha=0.7, label=f"{run.name} train",
            marker="o" if len(run.train_x) == 1 else None, markersize=3)  # one point: no line
    ax.plot(run.valid_x, run.valid_y, color=color, linewidth=2, marker="o", markersize=3,
            label=f"{run.name} valid")
    if members:
      for i, ys in enumerate(run.member_valid_y):
        ax.plot(run.valid_x, ys, color=color, linewidth=0.6, alpha=0.4,
                label=f"_{run.name} valid member {i}")
    lr_ax.plot(run.train_x, run.learning_rate, color=color, linewidth=1, linestyle=":",
               label=f"{run.name} learning rate")
  for name in dict.fromkeys(run.preset for run in runs if run.preset in REFERENCES):
    label, value = REFERENCES[name]
    ax.axhline(value, color="0.3", linestyle="--", linewidth=1, label=f"{name}: {label}")
  ax.set_xlabel("epoch")
  ax.set_ylabel("bits per character" if char else "perplexity")
  if not char:  # perplexities as 200, 300, not 2 x 10^2
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))
    ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False))
  ax.grid(True, which="both", alpha=0.3)
  lr_ax.set_yscale("log")
  lr_ax.set_ylabel("learning rate (dotted)")
  handles, labels = ax.get_legend_handles_labels()
  lr_handles, lr_labels = lr_ax.get_legend_handles_labels()
  ax.legend(handles + lr_handles, labels + lr_labels, fontsize="small", loc="best")
  ax.set_title(("bits per character" if char else "perplexity") + ": train and valid")
  if out:
    fig.savefig(out, dpi=120)
  return fig


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m zaremba_jax.plot", description=__doc__.split(
      "\n")[0])
  parser.add_argument("workdirs", nargs="+", metavar="WORKDIR", help="run folders (metrics.jsonl)")
  parser.add_argument("--out", required=True, help="the image to write, e.g. curves.png")
  parser.add_argument("--preset", default=None, help="the runs' preset, for the reference line"
                      " (default: recognised from each run's newest checkpoint)")
  parser.add_argument("--no_members", action="store_true", help="no lines for single members")
  args = parser.parse_args(argv)
  try:
    import matplotlib  # pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    print("error: the plot needs matplotlib: pip install matplotlib", file=sys.stderr)
    return 1
  if args.preset is not None and args.preset not in REFERENCES:
    print(f"error: --preset={args.preset!r} has no reference number; use one of"
          f" {', '.join(REFERENCES)}", file=sys.stderr)
    return 1
  try:
    plot(args.workdirs, args.out, args.preset, members=not args.no_members)
  except (PlotError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
