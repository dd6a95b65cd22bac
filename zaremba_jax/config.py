"""Run configuration: one frozen dataclass, validated on construction.

This module imports neither jax nor absl, so the configuration can be built and
checked anywhere (a notebook, a test, the command line).
"""

import dataclasses
import importlib.util
import pathlib

MODES = ("train", "evaluate", "query", "serve", "sample", "score", "export")
LEVELS = ("word", "char")
DTYPES = ("float32", "bfloat16")
KERNELS = ("fast", "reference")
# The regularizers' fields (regularizers.py): all of them, and those that change a parameter's
# shape (fixed for a run, as hidden_size is).
REGULARIZER_FIELDS = ("tie_weights", "projection_reg", "locked_dropout", "dropout_between_layers",
                      "dropout_recurrent", "dropout_embedding", "weight_drop", "weight_decay",
                      "nt_asgd", "nonmono")
# (weight_decay and nt_asgd add parts to the optimizer's or the train state.)
REGULARIZER_SHAPE_FIELDS = ("tie_weights", "projection_reg", "weight_decay", "nt_asgd")


@dataclasses.dataclass(frozen=True)
class Config:
  """Everything that defines a run. Defaults are the paper's small model."""

  mode: str = "train"            # what main does: train, evaluate
  level: str = "word"            # tokenisation of PTB: word or char
  batch_size: int = 20           # rows the token stream is cut into
  num_steps: int = 20            # BPTT window (time steps per minibatch)
  num_layers: int = 2            # stacked LSTM layers
  hidden_size: int = 200         # LSTM units per layer = embedding size
  dropout: float = 0.0           # probability of dropping a non-recurrent activation
  init_scale: float = 0.1        # every parameter ~ U(-init_scale, init_scale)
  learning_rate: float = 1.0     # SGD rate for the first max_epoch epochs
  max_epoch: int = 4             # epochs at the full learning rate
  max_max_epoch: int = 13        # epochs in all
  lr_decay: float = 2.0          # divisor applied after each epoch past max_epoch
  max_grad_norm: float = 5.0     # clip the global gradient norm to this
  seed: int = 0                  # the one seed every PRNG key derives from
  max_train_steps: int = 0       # stop after this many steps (0: no cap)
  log_per_epoch: int = 10        # progress lines per epoch
  test_chunk: int = 1024         # tokens per scan chunk in the batch-1 test pass
  dtype: str = "float32"         # matmul inputs: float32 or bfloat16 (state and sums stay float32)
  checkpoint_every_steps: int = 1000  # save every this many steps (and at each epoch end)
  keep_checkpoints: int = 3      # recent checkpoints kept (the best is kept besides)
  steps_per_call: int = 10       # train steps per jitted call (one loop over that many windows)
  kernels: str = "fast"          # fast kernels, or the reference (the paper's cell under autodiff)
  members: int = 1               # models trained together (seeds seed..seed+members-1), averaged
  mesh: str = ""                 # devices per axis, "members=M,batch=N" ("": members first)
  tensorboard: bool = False      # also write the metrics as TensorBoard events (needs tensorboardX)
  # --- The successors' regularizers (regularizers.py), all off by default ---
  tie_weights: bool = False      # softmax weights = embedding^T (Press & Wolf; Inan et al.)
  projection_reg: float = 0.0    # >0: projection P [H,H] before the tied softmax, loss + this * sum(P^2)
  # --- The corpus (data.py): PTB by default; any folder or file, or WikiText-2, with --corpus ---
  corpus: str = ""               # "": PTB; a folder of train/valid/test, one text file, or wikitext-2
  split: str = "0.9,0.05,0.05"   # a single --corpus file: train, valid, test fractions of its tokens
  max_vocab: int = 0             # a --corpus: keep the most frequent words (0: all); chars: a cap
  min_count: int = 1             # a --corpus: words seen fewer times in train become <unk>
  locked_dropout: bool = False   # the non-recurrent dropout masks: one per row for the window (Gal)
  dropout_between_layers: float = -1.0  # dropout between layers (<0: --dropout) (Merity's dropouth)
  dropout_recurrent: float = 0.0  # drop units of h_{t-1} in h_{t-1} W_hh, one mask per row (Gal)
  dropout_embedding: float = 0.0  # drop whole rows (words) of the embedding per window (Merity)
  weight_drop: float = 0.0       # DropConnect on W_hh, one mask per window (Merity)
  weight_decay: float = 0.0      # SGD weight decay: the update adds this * params after clipping
  nt_asgd: bool = False          # average the iterates once validation stops improving (Merity)
  nonmono: int = 5               # NT-ASGD: validations to look back before triggering

  def __post_init__(self):
    errors = []
    if self.mode not in MODES:
      errors.append(f"--mode={self.mode!r} is unknown; use one of {', '.join(MODES)}")
    if self.level not in LEVELS:
      errors.append(f"--level={self.level!r} is unknown; use one of {', '.join(LEVELS)}")
    for name in ("batch_size", "num_steps", "num_layers", "hidden_size",
                 "max_epoch", "max_max_epoch", "log_per_epoch", "test_chunk",
                 "checkpoint_every_steps", "keep_checkpoints", "steps_per_call", "members"):
      value = getattr(self, name)
      if value < 1:
        errors.append(f"--{name}={value} must be at least 1")
    if self.dtype not in DTYPES:
      errors.append(f"--dtype={self.dtype!r} is unknown; use one of {', '.join(DTYPES)}")
    if self.kernels not in KERNELS:
      errors.append(f"--kernels={self.kernels!r} is unknown; use one of {', '.join(KERNELS)}")
    if not 0.0 <= self.dropout < 1.0:
      errors.append(f"--dropout={self.dropout} must be in [0, 1) (it is the probability of dropping)")
    for name in ("init_scale", "learning_rate", "max_grad_norm"):
      value = getattr(self, name)
      if not value > 0:
        errors.append(f"--{name}={value} must be positive")
    if not self.lr_decay >= 1.0:
      errors.append(f"--lr_decay={self.lr_decay} must be >= 1 (it divides the learning rate)")
    if self.max_train_steps < 0:
      errors.append(f"--max_train_steps={self.max_train_steps} must be >= 0 (0 means no cap)")
    if self.max_vocab < 0:
      errors.append(f"--max_vocab={self.max_vocab} must be >= 0 (0 means no limit)")
    if self.min_count < 1:
      errors.append(f"--min_count={self.min_count} must be at least 1")
    errors.extend(self._regularizer_errors())
    if errors:
      raise ValueError("; ".join(errors))

  def _regularizer_errors(self) -> list[str]:
    """The regularizers' flags (regularizers.py): what is wrong with them, for people."""
    errors = []
    if self.projection_reg < 0:
      errors.append(f"--projection_reg={self.projection_reg} must be >= 0 (0: no projection)")
    if self.projection_reg > 0 and not self.tie_weights:
      errors.append(f"--projection_reg={self.projection_reg} regularizes the projection before a"
                    f" tied softmax (Press & Wolf); add --tie_weights")
    for name in ("dropout_recurrent", "dropout_embedding", "weight_drop"):
      value = getattr(self, name)
      if not 0.0 <= value < 1.0:
        errors.append(f"--{name}={value} must be in [0, 1) (it is the probability of dropping)")
    if not (self.dropout_between_layers == -1.0 or 0.0 <= self.dropout_between_layers < 1.0):
      errors.append(f"--dropout_between_layers={self.dropout_between_layers} must be in [0, 1),"
                    f" or -1 for the same as --dropout")
    if self.locked_dropout and self.dropout == 0.0 and self.dropout_between_layers <= 0.0:
      errors.append("--locked_dropout locks the masks of --dropout (and"
                    " --dropout_between_layers), which are 0 here; give a --dropout")
    if self.weight_decay < 0:
      errors.append(f"--weight_decay={self.weight_decay} must be >= 0 (0: none)")
    if self.nonmono < 1:
      errors.append(f"--nonmono={self.nonmono} must be at least 1")
    return errors

  def replace(self, **changes) -> "Config":
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


# Presets: the flagfiles in the repository's experiments/ folder, the one source of them. An installed
# package ships that folder as zaremba_jax/experiments (pyproject.toml maps it there, no copy).
PRESET_SUFFIX = ".flags"


def presets_folder() -> pathlib.Path:
  """The folder of the preset flagfiles: the installed package's, else the checkout's experiments/."""
  # Installed (or installed editable), zaremba_jax.experiments is a package of data files (a namespace
  # package: experiments/ holds no __init__.py); in a plain checkout it does not exist.
  spec = importlib.util.find_spec("zaremba_jax.experiments")
  for location in (spec.submodule_search_locations or []) if spec else []:
    if pathlib.Path(location).is_dir():
      return pathlib.Path(location)
  return pathlib.Path(__file__).resolve().parent.parent / "experiments"


def preset_names() -> tuple[str, ...]:
  """The presets' names (small, medium, large, word200, char_small, char_large), sorted."""
  folder = presets_folder()
  if not folder.is_dir():
    return ()
  return tuple(sorted(entry.name[:-len(PRESET_SUFFIX)] for entry in folder.iterdir()
                      if entry.name.endswith(PRESET_SUFFIX) and entry.is_file()))


def preset_flags(name: str) -> list[str]:
  """The flags of preset NAME, as `--flag=value` strings in file order, nested flagfiles expanded.

  Reads the flagfile as absl's --flagfile does: one flag a line, blank lines and whole-line comments
  (starting with # or //) skipped. A nested `--flagfile=experiments/X.flags` (a path relative to the
  repository root, as the files are written) is read as preset X from the same folder, wherever the
  command runs. Raises ValueError for an unknown name (listing the known ones) or a nested flagfile
  that is not a preset.
  """
  return _read_preset(name, ())


def _read_preset(name: str, seen: tuple[str, ...]) -> list[str]:
  names = preset_names()
  if name not in names:
    raise ValueError(f"--preset={name!r} is unknown; use one of {', '.join(names) or '(none found)'}")
  if name in seen:
    raise ValueError(f"preset {seen[0]!r}: flagfiles nest in a cycle: {' -> '.join(seen + (name,))}")
  text = presets_folder().joinpath(name + PRESET_SUFFIX).read_text(encoding="utf-8")
  out = []
  for line in text.splitlines():
    line = line.strip()
    if not line or line.startswith("#") or line.startswith("//"):
      continue
    if line.startswith("--flagfile="):
      nested = line[len("--flagfile="):]
      base = nested.replace("\\", "/").rsplit("/", 1)[-1]
      if not base.endswith(PRESET_SUFFIX) or base[:-len(PRESET_SUFFIX)] not in names:
        raise ValueError(f"preset {name!r} nests {line}, which is not one of the presets"
                         f" ({', '.join(names)})")
      out.extend(_read_preset(base[:-len(PRESET_SUFFIX)], seen + (name,)))
    else:
      out.append(line)
  return out


def _parse_value(field: dataclasses.Field, text: str):
  if field.type is bool:
    if text.lower() in ("true", "1"):
      return True
    if text.lower() in ("false", "0"):
      return False
    raise ValueError(f"--{field.name}={text} is not a boolean")
  return field.type(text)


def preset(name: str, **changes) -> Config:
  """The Config of preset NAME (what `--preset=NAME` gives), with CHANGES applied on top.

  e.g. `preset("small")`, `preset("word200").num_steps == 50`, `preset("large", dtype="bfloat16")`.
  """
  fields = {f.name: f for f in dataclasses.fields(Config)}
  values = {}
  for flag in preset_flags(name):
    if not flag.startswith("--"):
      raise ValueError(f"preset {name!r}: {flag!r} is not a --flag")
    key, has_value, text = flag[2:].partition("=")
    if not has_value and key.startswith("no") and key[2:] in fields:  # --noflag, a boolean
      key, text = key[2:], "false"
    elif not has_value:  # --flag, a boolean
      text = "true"
    if key not in fields:
      raise ValueError(f"preset {name!r}: --{key} is not a field of Config")
    try:
      values[key] = _parse_value(fields[key], text)
    except ValueError as e:
      raise ValueError(f"preset {name!r}: {flag}: {e}") from None
  values.update(changes)
  return Config(**values)
