"""Fingerprints of the compiled programs a training run executes, to compare two checkouts.

  python -m benchmarks.micro.hlo_fingerprint --presets=small,medium   # in each checkout's root

For each preset and dtype it compiles what the training loop runs (the members' train step with
steps_per_call windows, validation at the training batch, the batch-1 test pass, each with the
model planned for its stream) and prints a sha256 of XLA's optimised HLO with the debug
information (source files, lines, function names) removed. Equal fingerprints in two checkouts
mean XLA runs the same program: a refactoring that keeps them changed neither the numbers nor the
speed. Nothing is run; compiling takes a few seconds per program.
"""

import argparse
import functools
import hashlib
import os
import re

from absl import flags
import jax
import numpy as np

from zaremba_jax import evaluation
from zaremba_jax import main as main_lib
from zaremba_jax import members as members_lib
from zaremba_jax import model as model_lib
from zaremba_jax import train as train_lib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VOCAB = {"word": 10_000, "char": 50}
# Windows of the PTB validation and test streams (word level) for the default presets' shapes.
VALID_WINDOWS, TEST_WINDOWS = 184, 81
DEBUG_TABLES = ("FileNames", "FunctionNames", "FileLocations", "StackFrames")


def normalise(hlo: str) -> str:
  """The HLO text without the debug tables and the stack-frame ids that point into them."""
  kept, skipping = [], False
  for line in hlo.splitlines():
    if line in DEBUG_TABLES:
      skipping = True
      continue
    if skipping and line.startswith(("%", "ENTRY", "HloModule")):
      skipping = False
    if not skipping:
      kept.append(line)
  text = "\n".join(kept)
  text = re.sub(r"metadata=\{[^}]*\}", "", text)
  return re.sub(r",?\s*stack_frame_id=\d+", "", text)


def programs(preset: str, dtype: str) -> dict:
  """{name: compiled HLO text} of the train step and the two evaluation passes."""
  flags.FLAGS.unparse_flags()
  flags.FLAGS(["fp", f"--flagfile={os.path.join(REPO, 'experiments', preset + '.flags')}",
               f"--dtype={dtype}"])
  config = main_lib.config_from_flags()
  model = model_lib.make_model(config, VOCAB[config.level])
  tx = train_lib.make_optimizer(config, 1000)
  make_one = functools.partial(train_lib.create_train_state, config, model, tx)
  state = members_lib.create(make_one, range(config.members))
  b, t = config.batch_size, config.num_steps
  x = np.zeros((config.steps_per_call, b, t), np.int32)
  steps = members_lib.lift(functools.partial(train_lib.train_steps, model=model, tx=tx),
                           (0, None, None))
  texts = {"train": jax.jit(steps, donate_argnums=0).lower(state, x, x).compile().as_text()}
  for split, (rows, length, n) in {"valid": (b, t, VALID_WINDOWS),
                                   "test": (1, config.test_chunk, TEST_WINDOWS)}.items():
    windows = (np.zeros((n, rows, length), np.int32), np.zeros((n, rows, length), np.int32),
               np.ones((n, rows, length), np.float32))
    planned = model_lib.planned_for(model, rows, windows[0].size)
    evaluate = jax.jit(functools.partial(evaluation.evaluate_members, model=planned))
    texts[split] = evaluate.lower(state.params, *windows).compile().as_text()
  return texts


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--presets", default="small,medium")
  parser.add_argument("--dtypes", default="float32,bfloat16")
  args = parser.parse_args()
  flags.FLAGS.mark_as_parsed()
  for preset in args.presets.split(","):
    for dtype in args.dtypes.split(","):
      for name, text in programs(preset, dtype).items():
        digest = hashlib.sha256(normalise(text).encode()).hexdigest()[:16]
        print(f"{preset:<11} {dtype:<9} {name:<6} {digest}", flush=True)


if __name__ == "__main__":
  main()
