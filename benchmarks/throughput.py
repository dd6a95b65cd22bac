"""Training and evaluation speed of the presets, JAX against a PyTorch nn.LSTM of the same model.

  pip install -r requirements-bench.txt
  python -m benchmarks.throughput --presets=small,medium,large --json=bench.json   # repo root
  python -m benchmarks.throughput --presets=small,medium --members=2,5   # K members vs K runs

For each preset it measures, after compilation: training words/s (median of --repeats runs of
--steps steps), evaluation words/s at the training batch, the batch-1 test protocol's words/s,
compile time and memory; for JAX in float32 and bfloat16 and for PyTorch in float32 and under
bfloat16 autocast, alternating the systems within each repeat so that a noisy machine affects all
of them alike. Tokens are random (speed does not depend on them). Prints a table; --json writes
the numbers. The batch-1 test runs a 4,096-token stream unless --test_len says otherwise;
`--test_len=full` runs the PTB test set's length, as the paper's protocol does.

What is timed is what the package runs: training is `train.train_steps` with the model of
`model.make_model` (planned for the training window), called --steps_per_call windows at a time as
the training loop does; evaluation (10 windows at the training batch) and the batch-1 test each
run `train.evaluate` with the model re-planned for its own stream by `model.planned_for`, as
`evaluation.Evaluator` does. A plan depends on the stream's length: a stream longer than the vocabulary
gets the first layer's projection per vocabulary row, so the word-level evaluation stream here
(10 windows, fewer tokens than the 10,000 words) runs without it, unlike the full validation set.

To compare two checkouts (A/B of a change), run this in each from its own root with --no_torch
and --json, in turn and then in reverse (A B B A) so that drift on the machine hits both alike,
and compare the train_wps of the JSON files.
"""

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import time

from absl import flags
import jax
import numpy as np

from zaremba_jax import main as main_lib
from zaremba_jax import members as members_lib
from zaremba_jax import model as model_lib
from zaremba_jax import train as train_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = {"word": 10_000, "char": 50}
# The PTB test set's length in tokens (words and <eos>; characters and <eos>): what the paper's
# batch-1 protocol runs over. A stream longer than the vocabulary is planned to project the first
# layer's input once per vocabulary row, so short streams understate our batch-1 speed a little.
TEST_SET_TOKENS = {"word": 82_430, "char": 442_423}


def test_tokens(spec, level):
  """--test_len: a number of tokens, or "full" for the test set's length at this level."""
  return TEST_SET_TOKENS[level] if spec == "full" else int(spec)


def preset_config(name):
  flags.FLAGS.unparse_flags()
  flags.FLAGS(["bench", f"--flagfile={os.path.join(REPO, 'experiments', name + '.flags')}"])
  return main_lib.config_from_flags()


def timed(fn):
  tic = time.perf_counter()
  fn()
  return time.perf_counter() - tic


def alternating_medians(fns, args, repeats):
  """{name: median seconds of fn(*args)} after one warm-up call each; the fns take turns within
  every repeat, so drift on a noisy machine hits all of them alike."""
  for fn in fns.values():
    jax.block_until_ready(fn(*args))
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      times[name].append(timed(lambda: jax.block_until_ready(fn(*args))))  # pylint: disable=cell-var-from-loop
  return {name: statistics.median(t) for name, t in times.items()}


class JaxSystem:
  """Our train_steps and evaluate, exactly as the training loop runs them: training with the
  training window's plan, each evaluation stream with a model planned for it."""

  def __init__(self, config, vocab, dtype, test_len):
    self.name = f"jax {dtype}"
    config = config.replace(dtype=dtype)
    self.config = config
    self.model = model_lib.make_model(config, vocab)
    self.tx = train_lib.make_optimizer(config, 1000)
    rng = np.random.default_rng(0)
    b, t = config.batch_size, config.num_steps
    self.inputs = rng.integers(0, vocab, size=(b, t)).astype(np.int32)
    self.targets = rng.integers(0, vocab, size=(b, t)).astype(np.int32)
    self.state = train_lib.create_train_state(config, self.model, self.tx, jax.random.key(0))
    self.steps_fn = jax.jit(functools.partial(train_lib.train_steps, model=self.model,
                                              tx=self.tx), donate_argnums=0)
    self.per_call = config.steps_per_call
    stack = lambda a, k: np.repeat(a[None], k, axis=0)
    self.windows = {k: (stack(self.inputs, k), stack(self.targets, k)) for k in (self.per_call, 1)}
    n_eval = 10
    self.eval_windows = (rng.integers(0, vocab, size=(n_eval, b, t)).astype(np.int32),
                         rng.integers(0, vocab, size=(n_eval, b, t)).astype(np.int32),
                         np.ones((n_eval, b, t), np.float32))
    chunk = min(config.test_chunk, test_len)
    n_test = test_len // chunk
    self.test_windows = (rng.integers(0, vocab, size=(n_test, 1, chunk)).astype(np.int32),
                         rng.integers(0, vocab, size=(n_test, 1, chunk)).astype(np.int32),
                         np.ones((n_test, 1, chunk), np.float32))
    # As evaluation.Evaluator: each stream's model planned for its rows and its length in tokens.
    self.eval_model = model_lib.planned_for(self.model, b, self.eval_windows[0].size)
    self.test_model = model_lib.planned_for(self.model, 1, self.test_windows[0].size)
    self.eval_fn = jax.jit(functools.partial(train_lib.evaluate, model=self.eval_model))
    self.test_fn = jax.jit(functools.partial(train_lib.evaluate, model=self.test_model))
    self.eval_words = n_eval * b * t
    self.test_words = n_test * chunk
    self.words_per_step = b * t

  def compile(self):
    tic = time.perf_counter()
    lowered = self.steps_fn.lower(self.state, *self.windows[self.per_call])
    compiled = lowered.compile()
    seconds = time.perf_counter() - tic
    memory = compiled.memory_analysis()
    peak = None
    if memory is not None:
      peak = (memory.temp_size_in_bytes + memory.argument_size_in_bytes +
              memory.output_size_in_bytes)
    self.train(self.per_call + 1)  # both compiled shapes
    jax.block_until_ready(self.eval_fn(self.state.params, *self.eval_windows))
    jax.block_until_ready(self.test_fn(self.state.params, *self.test_windows))
    return seconds, peak

  def train(self, steps):
    """Like the training loop: calls of steps_per_call steps, the remainder one step a call."""
    calls = [self.per_call] * (steps // self.per_call) + [1] * (steps % self.per_call)
    for k in calls:
      self.state, metrics = self.steps_fn(self.state, *self.windows[k])
    jax.block_until_ready(metrics)

  def evaluate(self):
    jax.block_until_ready(self.eval_fn(self.state.params, *self.eval_windows))

  def test(self):
    jax.block_until_ready(self.test_fn(self.state.params, *self.test_windows))

  def device_peak(self):
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


class TorchSystem:
  """A plain PyTorch version of the same model: Embedding, nn.LSTM, dropout, Linear, SGD + clip."""

  def __init__(self, config, vocab, autocast, test_len):
    import torch  # pylint: disable=g-import-not-at-top
    from torch import nn  # pylint: disable=g-import-not-at-top
    self.torch = torch
    self.name = "torch bf16 autocast" if autocast else "torch float32"
    self.device = "cuda" if torch.cuda.is_available() else "cpu"
    self.autocast = autocast
    self.config = config
    h, p = config.hidden_size, config.dropout

    class Net(nn.Module):

      def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(vocab, h)
        self.drop = nn.Dropout(p)
        self.lstm = nn.LSTM(h, h, config.num_layers, dropout=p, batch_first=True)
        self.out = nn.Linear(h, vocab)
        for w in self.parameters():
          nn.init.uniform_(w, -config.init_scale, config.init_scale)

      def forward(self, x, state):
        y, state = self.lstm(self.drop(self.embed(x)), state)
        return self.out(self.drop(y)), state

    torch.manual_seed(0)
    self.net = Net().to(self.device)
    self.opt = torch.optim.SGD(self.net.parameters(), lr=config.learning_rate)
    b, t = config.batch_size, config.num_steps
    gen = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randint(0, vocab, shape, generator=gen).to(self.device)
    self.inputs, self.targets = rand(b, t), rand(b, t)
    zeros = lambda batch: torch.zeros(config.num_layers, batch, h, device=self.device)
    self.zeros = zeros
    self.state = (zeros(b), zeros(b))
    self.n_eval = 10
    self.eval_inputs, self.eval_targets = rand(self.n_eval, b, t), rand(self.n_eval, b, t)
    chunk = min(config.test_chunk, test_len)
    n_test = test_len // chunk
    self.test_inputs, self.test_targets = rand(n_test, 1, chunk), rand(n_test, 1, chunk)
    self.eval_words = self.n_eval * b * t
    self.test_words = n_test * chunk
    self.words_per_step = b * t
    self.loss_fn = nn.CrossEntropyLoss()

  def _ctx(self):
    if self.autocast:
      return self.torch.autocast(self.device, dtype=self.torch.bfloat16)
    return self.torch.autocast(self.device, enabled=False)

  def _sync(self):
    if self.device == "cuda":
      self.torch.cuda.synchronize()

  def compile(self):
    if self.device == "cuda":
      self.torch.cuda.reset_peak_memory_stats()
    seconds = timed(lambda: self.train(1))
    self.evaluate()
    self.test()
    return seconds, None

  def train(self, steps):
    self.net.train()
    t = self.config.num_steps
    for _ in range(steps):
      self.state = tuple(s.detach() for s in self.state)
      with self._ctx():
        logits, self.state = self.net(self.inputs, self.state)
        # Mean over the batch, summed over time: the paper code's loss.
        loss = self.loss_fn(logits.float().reshape(-1, logits.shape[-1]),
                            self.targets.reshape(-1)) * t
      self.opt.zero_grad(set_to_none=True)
      loss.backward()
      self.torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.config.max_grad_norm)
      self.opt.step()
    loss.item()
    self._sync()

  def _run_eval(self, inputs, targets):
    self.net.eval()
    total = 0.0
    with self.torch.no_grad(), self._ctx():
      state = (self.zeros(inputs.shape[1]), self.zeros(inputs.shape[1]))
      for x, y in zip(inputs, targets):
        logits, state = self.net(x, state)
        total = total + self.torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum")
    float(total)

  def evaluate(self):
    self._run_eval(self.eval_inputs, self.eval_targets)

  def test(self):
    self._run_eval(self.test_inputs, self.test_targets)

  def device_peak(self):
    if self.device == "cuda":
      return self.torch.cuda.max_memory_allocated()
    return None


class MemberRuns:
  """K members trained in one program (`--members=K`) against the same K models trained as K
  single runs one after another, each with the training loop's calls of steps_per_call steps."""

  def __init__(self, config, vocab, members, dtype):
    config = config.replace(members=members, dtype=dtype)
    self.name, self.members = f"{members} members {dtype}", members
    model = model_lib.make_model(config, vocab)
    tx = train_lib.make_optimizer(config, 1000)
    rng = np.random.default_rng(0)
    b, t = config.batch_size, config.num_steps
    self.per_call = config.steps_per_call
    tokens = rng.integers(0, vocab, size=(self.per_call, b, t + 1)).astype(np.int32)
    self.window = (tokens[:, :, :-1], tokens[:, :, 1:])
    self.words_per_step = b * t
    make_one = functools.partial(train_lib.create_train_state, config, model, tx)
    self.together = members_lib.create(make_one, range(members))
    steps = functools.partial(train_lib.train_steps, model=model, tx=tx)
    self.together_fn = jax.jit(members_lib.lift(steps, (0, None, None)), donate_argnums=0)
    self.apart = [jax.tree.map(lambda x, i=i: x[i], self.together) for i in range(members)]
    self.apart_fn = jax.jit(steps, donate_argnums=0)

  def compile(self):
    self.train_together(self.per_call)
    self.train_apart(self.per_call)

  def train_together(self, steps):
    for _ in range(steps // self.per_call):
      self.together, metrics = self.together_fn(self.together, *self.window)
    jax.block_until_ready(metrics)

  def train_apart(self, steps):
    for i in range(self.members):
      for _ in range(steps // self.per_call):
        self.apart[i], metrics = self.apart_fn(self.apart[i], *self.window)
      jax.block_until_ready(metrics)


def bench_members(name, args):
  """Member-words/s (words a second, summed over the members) of K members in one program and of
  K single runs one after another, alternated within each repeat."""
  config = preset_config(name)
  steps = max(config.steps_per_call, args.steps.get(name, args.default_steps))
  rows = []
  for members in args.members:
    for dtype in ("float32",) if args.no_bf16 else ("float32", "bfloat16"):
      runs = MemberRuns(config, VOCAB[config.level], members, dtype)
      runs.compile()
      together, apart = [], []
      for _ in range(args.repeats):
        words = members * steps * runs.words_per_step
        together.append(words / timed(lambda: runs.train_together(steps)))  # pylint: disable=cell-var-from-loop
        apart.append(words / timed(lambda: runs.train_apart(steps)))  # pylint: disable=cell-var-from-loop
      rows.append({"members": members, "dtype": dtype, "together_wps": statistics.median(together),
                   "apart_wps": statistics.median(apart),
                   "ratio": statistics.median(a / b for a, b in zip(together, apart))})
  return {"preset": name, "steps_per_repeat": steps, "members": rows}


def print_members_table(results, out=sys.stdout):
  head = (f"{'preset':<11} {'members':>7} {'dtype':<9} {'one program w/s':>15}"
          f" {'K runs w/s':>10} {'ratio':>6}")
  print(head, file=out)
  print("-" * len(head), file=out)
  for result in results:
    for row in result["members"]:
      print(f"{result['preset']:<11} {row['members']:>7} {row['dtype']:<9}"
            f" {row['together_wps']:>15.0f} {row['apart_wps']:>10.0f} {row['ratio']:>5.2f}x",
            file=out)


def bench_preset(name, args):
  config = preset_config(name)
  vocab = VOCAB[config.level]
  test_len = test_tokens(args.test_len, config.level)
  systems = [JaxSystem(config, vocab, "float32", test_len)]
  if not args.no_torch:
    systems.append(TorchSystem(config, vocab, False, test_len))
  if not args.no_bf16:
    systems.append(JaxSystem(config, vocab, "bfloat16", test_len))
    if not args.no_torch:
      systems.append(TorchSystem(config, vocab, True, test_len))
  rows = {}
  for system in systems:
    compile_s, peak = system.compile()
    rows[system.name] = {"compile_s": compile_s, "peak_bytes": peak, "train": [], "eval": [],
                         "test": []}
  steps = args.steps.get(name, args.default_steps)
  if steps % systems[0].per_call:
    print(f"note: {name}: {steps} steps is not a multiple of steps_per_call={systems[0].per_call}; "
          "JAX runs the rest one step a call, which is slower than the training loop's calls",
          file=sys.stderr, flush=True)
  for _ in range(args.repeats):
    for system in systems:  # alternate, so drift hits every system alike
      row = rows[system.name]
      row["train"].append(steps * system.words_per_step / timed(lambda: system.train(steps)))
      row["eval"].append(system.eval_words / timed(system.evaluate))
      row["test"].append(system.test_words / timed(system.test))
  for system in systems:
    row = rows[system.name]
    for key in ("train", "eval", "test"):
      row[key + "_wps"] = statistics.median(row.pop(key))
    device_peak = system.device_peak()
    if device_peak:
      row["peak_bytes"] = device_peak
  return {"preset": name, "batch_size": config.batch_size, "num_steps": config.num_steps,
          "hidden_size": config.hidden_size, "steps_per_repeat": steps,
          "test_tokens": systems[0].test_words, "systems": rows}


# Each system is compared with PyTorch in the same precision: float32 with float32, our bfloat16
# with PyTorch's bfloat16 autocast.
SAME_PRECISION = {"jax float32": "torch float32", "jax bfloat16": "torch bf16 autocast"}


def print_table(results, out=sys.stdout):
  """Words/s of each system, and ours as a multiple of PyTorch's in the same precision."""
  head = (f"{'preset':<11} {'system':<20} {'train w/s':>10} {'x torch':>7} {'eval w/s':>10}"
          f" {'x torch':>7} {'test b=1 w/s':>12} {'x torch':>7} {'compile s':>9} {'peak MiB':>9}")
  print(head, file=out)
  print("-" * len(head), file=out)
  for result in results:
    rows = result["systems"]
    for name, row in rows.items():
      ref = rows.get(SAME_PRECISION.get(name))
      ratio = {key: f"{row[key] / ref[key]:.2f}x" if ref else "-"
               for key in ("train_wps", "eval_wps", "test_wps")}
      peak = f"{row['peak_bytes'] / 2**20:.0f}" if row.get("peak_bytes") else "-"
      print(f"{result['preset']:<11} {name:<20} {row['train_wps']:>10.0f} {ratio['train_wps']:>7}"
            f" {row['eval_wps']:>10.0f} {ratio['eval_wps']:>7} {row['test_wps']:>12.0f}"
            f" {ratio['test_wps']:>7} {row['compile_s']:>9.2f} {peak:>9}", file=out)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--presets", default="small,medium,large")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--default_steps", type=int, default=20)
  parser.add_argument("--steps", default="small=60,medium=20,large=10,char_small=30,char_large=10",
                      help="steps per timed repeat, per preset")
  parser.add_argument("--test_len", default="4096",
                      help='tokens in the batch-1 test (whole --test_chunk chunks of it), or "full": '
                           "the PTB test set's length, 82,430 words or 442,423 characters")
  parser.add_argument("--no_torch", action="store_true")
  parser.add_argument("--no_bf16", action="store_true")
  parser.add_argument("--json", default=None)
  parser.add_argument("--members", default="",
                      help="instead of the table against PyTorch: K members in one program"
                           " against K single runs one after another, for each K listed"
                           " (words/s summed over members; ratio = median of the paired ratios)")
  args = parser.parse_args()
  args.members = [int(k) for k in args.members.split(",") if k]
  args.steps = {k: int(v) for k, v in (kv.split("=") for kv in args.steps.split(",") if kv)}
  flags.FLAGS.mark_as_parsed()
  device = jax.devices()[0]
  info = {"jax": jax.__version__, "device": getattr(device, "device_kind", str(device)),
          "platform": device.platform, "cpu": platform.processor() or platform.machine(),
          "cores": os.cpu_count(), "date": time.strftime("%Y-%m-%d")}
  try:
    import torch  # pylint: disable=g-import-not-at-top
    info["torch"] = torch.__version__
    if torch.cuda.is_available():
      info["torch_device"] = torch.cuda.get_device_name()
  except ImportError:
    args.no_torch = True
  print(json.dumps(info), flush=True)
  if args.members:
    run_presets(args.presets.split(","), lambda name: bench_members(name, args),
                print_members_table, args.json, info, key="members")
    return
  run_presets(args.presets.split(","), lambda name: bench_preset(name, args), print_table,
              args.json, info)


def run_presets(names, measure, table, json_path, info, key="results"):
  """measure(name) for each preset, printing each one's table as it comes and writing the JSON
  after every preset (so a run cut short keeps what it measured); then the whole table."""
  results = []
  for name in names:
    results.append(measure(name))
    table(results[-1:])
    sys.stdout.flush()
    if json_path:
      with open(json_path, "w") as f:
        json.dump({"info": info, key: results}, f, indent=1)
  print()
  table(results)
  return results


if __name__ == "__main__":
  main()
