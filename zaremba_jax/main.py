"""Command line: flags -> Config -> the chosen mode.

  zaremba-jax --preset=small --workdir=runs/small    (the installed command)
  python -m zaremba_jax.main --flagfile=experiments/small.flags --workdir=runs/small
"""

import dataclasses
import functools
import itertools
import os
import signal
import sys
import warnings

from absl import app
from absl import flags
from absl import logging

from zaremba_jax import config as config_lib

_DEFAULTS = config_lib.Config()

flags.DEFINE_string("preset", None, "A preset of experiments/ by name (one of"
                    f" {', '.join(config_lib.preset_names())}): the same as"
                    " --flagfile=experiments/NAME.flags, from any folder and from an installed"
                    " package. It is the base: every other flag on the command line overrides it,"
                    " before or after it.")
flags.DEFINE_enum("mode", _DEFAULTS.mode, config_lib.MODES, "What to do.")
flags.DEFINE_enum("level", _DEFAULTS.level, config_lib.LEVELS, "Tokens: words or characters.")
flags.DEFINE_string("data_dir", None, "Folder with ptb.{train,valid,test}.txt. Default:"
                    " $ZAREMBA_JAX_DATA, else a cache filled by download.")
flags.DEFINE_string("workdir", None, "Where metrics.jsonl (and checkpoints) go. --mode=evaluate"
                    " takes several, comma-separated, and averages their members.")
flags.DEFINE_integer("batch_size", _DEFAULTS.batch_size, "Rows of the token stream.", lower_bound=1)
flags.DEFINE_integer("num_steps", _DEFAULTS.num_steps, "Unrolled time steps per window.",
                     lower_bound=1)
flags.DEFINE_integer("num_layers", _DEFAULTS.num_layers, "Stacked LSTM layers.", lower_bound=1)
flags.DEFINE_integer("hidden_size", _DEFAULTS.hidden_size, "LSTM units (= embedding size).",
                     lower_bound=1)
flags.DEFINE_float("dropout", _DEFAULTS.dropout, "Probability of dropping a non-recurrent"
                   " activation, in [0, 1).", lower_bound=0.0)
flags.DEFINE_float("init_scale", _DEFAULTS.init_scale, "Parameters ~ U(-init_scale, init_scale).")
flags.DEFINE_float("learning_rate", _DEFAULTS.learning_rate, "Initial SGD learning rate.")
flags.DEFINE_integer("max_epoch", _DEFAULTS.max_epoch, "Epochs at the initial learning rate.",
                     lower_bound=1)
flags.DEFINE_integer("max_max_epoch", _DEFAULTS.max_max_epoch, "Epochs in all.", lower_bound=1)
flags.DEFINE_float("lr_decay", _DEFAULTS.lr_decay, "Divide the learning rate by this after each"
                   " epoch past --max_epoch.", lower_bound=1.0)
flags.DEFINE_float("max_grad_norm", _DEFAULTS.max_grad_norm, "Clip the global gradient norm.")
flags.DEFINE_integer("seed", _DEFAULTS.seed, "Seed of every PRNG key.")
flags.DEFINE_integer("max_train_steps", _DEFAULTS.max_train_steps, "Stop after this many steps"
                     " (0: no cap); for smoke runs.", lower_bound=0)
flags.DEFINE_enum("dtype", _DEFAULTS.dtype, config_lib.DTYPES, "Matmul input type; bfloat16 is"
                  " faster where the hardware has it (parameters and state stay float32). Given"
                  " with --mode=evaluate, query, serve or sample, it overrides the checkpoint's.")
flags.DEFINE_enum("kernels", _DEFAULTS.kernels, config_lib.KERNELS, "fast: the tuned kernels;"
                  " reference: the paper's equations under autodiff (each step's numbers within"
                  " float tolerance, slower).")
flags.DEFINE_integer("members", _DEFAULTS.members, "Models trained together, member i with seed"
                     " --seed+i, all on the same data; evaluation reports each and their average"
                     " (the mean of their next-token probabilities).", lower_bound=1)
flags.DEFINE_string("mesh", _DEFAULTS.mesh, "Devices per mesh axis, e.g. members=2,batch=2 (default:"
                    " members spread over the devices first, then the batch rows).")
flags.DEFINE_string("coordinator_address", None, "Several processes (hosts): host:port of process"
                    " 0; start the same command in every process with --num_processes and"
                    " --process_id.")
flags.DEFINE_integer("num_processes", None, "Several processes: how many.", lower_bound=1)
flags.DEFINE_integer("process_id", None, "Several processes: this one's index, from 0.",
                     lower_bound=0)
flags.DEFINE_integer("init_timeout", 300, "Several processes: seconds to wait at the start for"
                     " every process to join before giving up (naming those that never did).",
                     lower_bound=1)
flags.DEFINE_integer("peer_timeout", 100, "Several processes: seconds without a word from a peer"
                     " (killed, or its host gone) before the others stop too.", lower_bound=1)
flags.DEFINE_integer("checkpoint_every_steps", _DEFAULTS.checkpoint_every_steps,
                     "Checkpoint every this many steps (and at each epoch end).", lower_bound=1)
flags.DEFINE_integer("keep_checkpoints", _DEFAULTS.keep_checkpoints, "Recent checkpoints to keep"
                     " (the best by validation perplexity is kept besides).", lower_bound=1)
flags.DEFINE_integer("steps_per_call", _DEFAULTS.steps_per_call, "Train steps per jitted call,"
                     " run as one loop over that many windows (speed only: fewer dispatches"
                     " and buffers reused in place; the result does not depend on it).",
                     lower_bound=1)
flags.DEFINE_bool("tensorboard", _DEFAULTS.tensorboard, "Also write the metrics as TensorBoard"
                  " event files in WORKDIR/tensorboard (needs tensorboardX: pip install"
                  " tensorboardX); metrics.jsonl is written either way.")
flags.DEFINE_bool("restart", False, "Discard the checkpoints in --workdir and start over.")
flags.DEFINE_integer("checkpoint_step", None, "--mode=evaluate: this checkpoint, not the best.")
flags.DEFINE_list("ensemble_sizes", [], "--mode=evaluate: also report the average of the first k"
                  " members, for each k listed (e.g. 2,5 for a --members=10 run).")
flags.DEFINE_float("temperature", None, "query/sample: softmax temperature; 0 picks the most"
                   " likely token. Default: 1.0 for sample (the model's own distribution, as"
                   " api.sample), 0 for query (greedy, as api.query_sentences).", lower_bound=0.0)
flags.DEFINE_integer("top_k", 0, "query/sample: draw only from the k most likely tokens (0: all).",
                     lower_bound=0)
flags.DEFINE_integer("max_query_len", 100, "query: most words predicted per line.", lower_bound=1)
flags.DEFINE_integer("sample_len", 200, "sample: tokens to generate.", lower_bound=1)
flags.DEFINE_string("prime", "", "sample: text to start from.")
flags.DEFINE_integer("test_chunk", _DEFAULTS.test_chunk, "Tokens per scan chunk in the batch-1"
                     " test pass (speed and memory only; the result does not depend on it).",
                     lower_bound=1)
flags.DEFINE_integer("log_per_epoch", _DEFAULTS.log_per_epoch, "Progress lines per epoch.",
                     lower_bound=1)

# --- The successors' regularizers (zaremba_jax/regularizers.py), all off by default ---
flags.DEFINE_bool("tie_weights", _DEFAULTS.tie_weights, "The softmax's weights are the embedding,"
                  " transposed (Press & Wolf 2017; Inan et al. 2017).")
flags.DEFINE_float("projection_reg", _DEFAULTS.projection_reg, "Press & Wolf's projection"
                   " regularization: > 0 puts a projection P [hidden, hidden] (with a bias) before"
                   " the tied softmax and adds this * sum(P^2) to the loss (their code: 1/260)."
                   " Needs --tie_weights.", lower_bound=0.0)
flags.DEFINE_bool("locked_dropout", _DEFAULTS.locked_dropout, "Variational (locked) dropout (Gal &"
                  " Ghahramani 2016): the masks of --dropout and --dropout_between_layers are one"
                  " per sequence (batch row), held over the whole window.")
flags.DEFINE_float("dropout_between_layers", _DEFAULTS.dropout_between_layers, "Dropout between"
                   " the LSTM layers at its own rate (Merity et al. 2017's dropouth); -1: --dropout.")
flags.DEFINE_float("dropout_recurrent", _DEFAULTS.dropout_recurrent, "Gal & Ghahramani's recurrent"
                   " dropout: the probability of dropping a unit of h_{t-1} in h_{t-1} W_hh, one"
                   " mask per sequence and layer for the window.", lower_bound=0.0)
flags.DEFINE_float("dropout_embedding", _DEFAULTS.dropout_embedding, "Embedding dropout (Merity et"
                   " al. 2017): the probability of dropping a word's whole embedding row for the"
                   " window (the rest are scaled by 1/(1-p)).", lower_bound=0.0)
flags.DEFINE_float("weight_drop", _DEFAULTS.weight_drop, "Weight drop (Merity et al. 2017):"
                   " DropConnect on W_hh, one mask per layer for the window.", lower_bound=0.0)
flags.DEFINE_float("weight_decay", _DEFAULTS.weight_decay, "Weight decay: each SGD update also"
                   " subtracts lr * this * params (after gradient clipping, as PyTorch's"
                   " SGD(weight_decay) in Merity et al.'s code).", lower_bound=0.0)
flags.DEFINE_bool("nt_asgd", _DEFAULTS.nt_asgd, "NT-ASGD (Merity et al. 2017): once a validation"
                  " is no better than the best before the last --nonmono, average the parameters"
                  " after every step; the average is what is evaluated and kept as the model.")
flags.DEFINE_integer("nonmono", _DEFAULTS.nonmono, "NT-ASGD's look-back, in validations (epochs).",
                     lower_bound=1)

# --- Other corpora (zaremba_jax/data.py), --mode=score and --mode=export ---
flags.DEFINE_string("corpus", _DEFAULTS.corpus, "Train on this instead of PTB: a folder with"
                    " train.txt, valid.txt and test.txt (or ptb.*.txt, wiki.*.tokens), one UTF-8"
                    " text file cut by --split, or wikitext-2 / wikitext-2-raw (downloaded into"
                    " the cache, sha256-checked). With --level=char every character is a token.")
flags.DEFINE_string("split", _DEFAULTS.split, "A single --corpus file: the train, valid and test"
                    " fractions of its tokens, in that order.")
flags.DEFINE_integer("max_vocab", _DEFAULTS.max_vocab, "A --corpus at word level: keep the most"
                     " frequent words, the rest become <unk> (0: all). At char level: the most"
                     " distinct characters allowed.", lower_bound=0)
flags.DEFINE_integer("min_count", _DEFAULTS.min_count, "A --corpus: words seen fewer times in"
                     " the training split become <unk>.", lower_bound=1)
flags.DEFINE_string("input", None, "--mode=score: the text file to score (default: stdin).")
flags.DEFINE_bool("json", False, "--mode=score: print one JSON object (total, per-token"
                  " log-probabilities, perplexity) instead of a table.")
flags.DEFINE_string("output", None, "--mode=export: the file to write, ending in .safetensors"
                    " (a PyTorch nn.LSTM state_dict) or .npz (the same arrays for numpy).")

# --- Test-time methods (zaremba_jax/test_time.py), --mode=evaluate; several values: a search ---
flags.DEFINE_list("cache_window", [], "--mode=evaluate: add the continuous cache (Grave et al."
                  " 2017) over this many previous positions. Several values, here or in"
                  " --cache_theta/--cache_lambda, are searched on valid; test is scored once.")
flags.DEFINE_list("cache_theta", ["1.0"], "--mode=evaluate: the cache's inverse temperature.")
flags.DEFINE_list("cache_lambda", ["0.1"], "--mode=evaluate: the cache's weight in the mixture,"
                  " in [0, 1].")
flags.DEFINE_list("dynamic_lr", [], "--mode=evaluate: add dynamic evaluation (Krause et al. 2018)"
                  " with this learning rate; several values (and --dynamic_decay's) are searched"
                  " on valid.")
flags.DEFINE_list("dynamic_decay", ["0.02"], "--mode=evaluate: dynamic evaluation's decay toward"
                  " the trained parameters.")
flags.DEFINE_integer("dynamic_segment", 5, "--mode=evaluate: tokens per dynamic-evaluation step.",
                     lower_bound=1)
flags.DEFINE_enum("dynamic_form", "rms", ["rms", "sgd"], "--mode=evaluate: rms divides each"
                  " gradient by the root of its mean square over training windows (Krause et"
                  " al.'s RMS form, with their RMS-scaled decay); sgd is the plain step.")
flags.DEFINE_float("dynamic_eps", 0.001, "--mode=evaluate: the rms form's epsilon.",
                   lower_bound=0.0)
flags.DEFINE_integer("dynamic_ms_windows", 200, "--mode=evaluate: training windows (batch 20 x"
                     " --dynamic_segment) over which the rms form's mean squares are taken.",
                     lower_bound=1)

flags.register_validator("dropout", lambda v: 0.0 <= v < 1.0,
                         "--dropout must be in [0, 1): it is the probability of dropping")
for _name in ("init_scale", "learning_rate", "max_grad_norm"):
  flags.register_validator(_name, lambda v: v > 0, f"--{_name} must be positive")

FLAGS = flags.FLAGS


def config_from_flags() -> config_lib.Config:
  fields = {f.name for f in dataclasses.fields(config_lib.Config)}
  values = {name: FLAGS[name].value for name in fields if name in FLAGS}
  values["corpus"] = absolute_corpus(values.get("corpus", ""))
  return config_lib.Config(**values)


def absolute_corpus(corpus: str) -> str:
  """A --corpus path made absolute (a checkpoint then finds it from any folder); names such as
  wikitext-2 stay as they are."""
  from zaremba_jax import data as data_lib  # numpy only; jax is not imported
  if not corpus or corpus in data_lib.WIKITEXT:
    return corpus
  return os.path.abspath(os.path.expanduser(corpus))


def expand_presets(argv: list[str]) -> list[str]:
  """argv with each `--preset=NAME` (or `--preset NAME`) replaced by the preset's flags, put first.

  A preset is the base of a run: every other flag on the command line overrides it, whether it
  stands before or after --preset (`--hidden_size=64 --preset=small` trains 64 units). Several
  presets keep their order, the later winning. The flags land at the front, so absl's "later flags
  win" gives the command line's own flags (and their --flagfile's) the last word. The result keeps
  one `--preset=NAME` (the last), so FLAGS.preset says which. Raises ValueError for an unknown name.
  """
  presets, out = [], []
  rest = iter(argv[1:])
  for arg in rest:
    if arg == "--":  # everything after it is a positional argument
      out.append(arg)
      out.extend(rest)
      break
    if arg.startswith("--preset="):
      presets.append(arg[len("--preset="):])
    elif arg == "--preset":
      presets.append(next(rest, ""))
    else:
      out.append(arg)
  expanded = [flag for name in presets for flag in config_lib.preset_flags(name)]
  return [argv[0], *expanded, *([f"--preset={presets[-1]}"] if presets else []), *out]


def parse_flags(argv: list[str]) -> list[str]:
  """app.run's flag parser: expands --preset, then absl's parse. A bad flag or preset is one line
  on stderr and exit status 1 (absl adds a second line pointing at --helpshort)."""
  try:
    expanded = expand_presets(argv)
    rest = FLAGS(expanded)
  except (ValueError, flags.Error) as e:
    sys.stderr.write(f"error: {e}\n")
    sys.exit(1)
  if FLAGS.preset is not None and f"--preset={FLAGS.preset}" not in expanded:  # from a --flagfile
    sys.stderr.write(f"error: --preset={FLAGS.preset} inside a --flagfile is not read; give it on"
                     f" the command line, or nest --flagfile=experiments/{FLAGS.preset}.flags\n")
    sys.exit(1)
  return rest


class StopOnSignal:
  """SIGTERM and SIGINT ask the run to checkpoint and stop; a second one stops at once.

  With several processes (`preemption`, a hosts.Preemption), a signal on any one of them stops
  them all at the same step: this process's signal becomes JAX's preemption notice, and every
  process stops where JAX's preemption sync point says.
  """

  def __init__(self, preemption=None):
    self.reason = None
    self.preemption = preemption
    for signum in (signal.SIGTERM, signal.SIGINT):
      signal.signal(signum, self._handle)

  def _handle(self, signum, frame):
    del frame
    if self.reason:
      if self.preemption:
        from zaremba_jax import hosts
        hosts.leave_now(self.reason)
      raise KeyboardInterrupt
    self.reason = signal.Signals(signum).name

  def __call__(self, step):
    if self.preemption is None:
      return self.reason  # a signal can come at any step
    reached = self.preemption.reached(step)
    if self.reason:
      self.preemption.notice()
    if reached:
      return self.reason or "preempted (a signal on another process)"
    return None


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  try:
    config = config_from_flags()
  except ValueError as e:  # flags that each pass but do not go together
    raise app.UsageError(str(e)) from None
  warnings.formatwarning = lambda message, *args, **kwargs: f"warning: {message}\n"
  if not FLAGS["verbosity"].present:  # Orbax and jax log every save at INFO; -v 0 shows them
    logging.set_verbosity(logging.WARNING)
  if config.mode != "train" and not FLAGS.workdir:
    raise app.UsageError(f"--mode={config.mode} needs --workdir, the folder of a training run")
  if config.tensorboard and not FLAGS.workdir:
    raise app.UsageError("--tensorboard writes into --workdir; give one")
  if config.tensorboard:
    try:
      import tensorboardX  # pylint: disable=import-outside-toplevel,unused-import
    except ImportError:
      raise app.UsageError("--tensorboard needs tensorboardX: pip install tensorboardX (it is in"
                           " requirements-dev.txt)") from None
  # Imported here so that --help and flag errors don't wait for jax.
  from zaremba_jax import checkpoint as checkpoint_lib
  from zaremba_jax import data as data_lib
  from zaremba_jax import evaluation
  from zaremba_jax import export as export_lib
  from zaremba_jax import loop
  from zaremba_jax import mesh as mesh_lib
  from zaremba_jax import hosts
  # Before any other jax call: joins the processes of a multi-host run (hosts.py).
  try:
    several = hosts.start(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                          workdir=FLAGS.workdir, init_timeout=FLAGS.init_timeout,
                          peer_timeout=FLAGS.peer_timeout,
                          initialize=functools.partial(mesh_lib.initialize_distributed,
                                                       FLAGS.coordinator_address,
                                                       FLAGS.num_processes, FLAGS.process_id))
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  try:
    if config.mode == "train":
      stop = StopOnSignal(hosts.Preemption() if several else None)
      loop.train_and_evaluate(config, FLAGS.data_dir, FLAGS.workdir, restart=FLAGS.restart,
                              stop_requested=stop)
    elif config.mode == "evaluate" and (FLAGS.cache_window or FLAGS.dynamic_lr):
      caches, dynamics = test_time_settings()
      evaluation.evaluate_test_time(FLAGS.workdir, FLAGS.data_dir, caches, dynamics,
                                    FLAGS.checkpoint_step, dtype=dtype_override(),
                                    say=lambda line: print(line, flush=True))
    elif config.mode == "evaluate":
      evaluation.evaluate_checkpoint(FLAGS.workdir, FLAGS.data_dir, FLAGS.checkpoint_step,
                               ensemble_sizes=tuple(int(k) for k in FLAGS.ensemble_sizes),
                               dtype=dtype_override(),
                               corpus=config.corpus if FLAGS["corpus"].present else None)
    elif config.mode in ("score", "export"):
      return score_or_export(config.mode)
    else:
      return generate(config.mode)
  except (data_lib.DataError, checkpoint_lib.CheckpointError, checkpoint_lib.ResumeError,
          mesh_lib.MeshError, hosts.MismatchError, export_lib.ExportError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


def test_time_settings():
  """The cache and dynamic-evaluation settings the flags ask for: every combination of the values
  listed (a search), or none of a method whose flag is not given."""
  from zaremba_jax import test_time

  def numbers(name, kind):
    try:
      return [kind(v) for v in FLAGS[name].value]
    except ValueError:
      raise app.UsageError(f"--{name}={','.join(FLAGS[name].value)}: give"
                           f" {'whole numbers' if kind is int else 'numbers'}, comma-separated")
  try:
    caches = [test_time.Cache(window=w, theta=t, lam=l) for w, t, l in itertools.product(
        numbers("cache_window", int), numbers("cache_theta", float),
        numbers("cache_lambda", float))]
    dynamics = [test_time.Dynamic(lr=lr, decay=d, segment=FLAGS.dynamic_segment,
                                  rms=FLAGS.dynamic_form == "rms", eps=FLAGS.dynamic_eps,
                                  ms_windows=FLAGS.dynamic_ms_windows)
                for lr, d in itertools.product(numbers("dynamic_lr", float),
                                               numbers("dynamic_decay", float))]
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  return caches, dynamics


def dtype_override() -> str | None:
  """--dtype if given on the command line: a checkpoint is otherwise used in its own dtype."""
  return FLAGS.dtype if FLAGS["dtype"].present else None


def generate(mode: str) -> int:
  """query, serve, sample: load the best checkpoint and talk on stdin/stdout."""
  from zaremba_jax import checkpoint as checkpoint_lib
  from zaremba_jax import sample
  say = lambda line: print(line, file=sys.stderr, flush=True)
  trained = checkpoint_lib.load_trained(FLAGS.workdir, FLAGS.checkpoint_step, say=say,
                                        dtype=dtype_override())
  if mode == "query":
    if trained.config.level != "word":
      raise app.UsageError("--mode=query completes sentences with a word-level model; this"
                           f" checkpoint is {trained.config.level}-level (try --mode=serve)")
    return sample.run_query(trained, sys.stdin, sys.stdout, sys.stderr,
                            sample.QUERY_TEMPERATURE if FLAGS.temperature is None
                            else FLAGS.temperature, FLAGS.top_k, FLAGS.seed, FLAGS.max_query_len)
  if mode == "serve":
    if trained.config.level != "char":
      raise app.UsageError("--mode=serve speaks the course's next-character protocol; this"
                           " checkpoint is word-level (try --mode=query or --mode=sample)")
    return sample.run_serve(trained, sys.stdin, sys.stdout, sys.stderr)
  return sample.run_sample(trained, FLAGS.prime, FLAGS.sample_len,
                           sample.SAMPLE_TEMPERATURE if FLAGS.temperature is None
                           else FLAGS.temperature, FLAGS.top_k, FLAGS.seed)


def score_or_export(mode: str) -> int:
  """score: the log-probabilities of --input (or stdin) under the best checkpoint; export: its
  parameters as a PyTorch state_dict (.safetensors) or numpy arrays (.npz) in --output."""
  from zaremba_jax import checkpoint as checkpoint_lib
  say = lambda line: print(line, file=sys.stderr, flush=True)
  if mode == "export" and not FLAGS.output:
    raise app.UsageError("--mode=export needs --output=FILE.safetensors (PyTorch) or FILE.npz")
  trained = checkpoint_lib.load_trained(FLAGS.workdir, FLAGS.checkpoint_step, say=say,
                                        dtype=dtype_override())
  if mode == "export":
    from zaremba_jax import export as export_lib
    written = export_lib.export(trained, FLAGS.output)
    print(f"wrote {written['path']}: {written['tensors']} arrays ({written['members']} member(s),"
          f" vocabulary {written['vocab_size']}) from {trained.path}")
    return 0
  from zaremba_jax import score as score_lib
  if FLAGS.input:
    try:
      with open(FLAGS.input, "rb") as f:
        payload = f.read()
    except OSError as e:
      raise app.UsageError(f"--input={FLAGS.input}: {e.strerror}") from None
  else:
    payload = sys.stdin.buffer.read()
  return score_lib.run_score(trained, payload, FLAGS.input or "stdin", FLAGS.json, sys.stdout,
                             sys.stderr)


def main_one_line_errors(argv):
  """`main`, with a usage error as one line on stderr: app.run would print the whole flag help
  above it (--helpshort shows that on request)."""
  try:
    return main(argv)
  except app.UsageError as e:
    print(f"error: {e}", file=sys.stderr)
    return e.exitcode


def run():
  """The `zaremba-jax` command: the same as `python -m zaremba_jax.main`."""
  app.run(main_one_line_errors, flags_parser=parse_flags)


if __name__ == "__main__":
  run()
