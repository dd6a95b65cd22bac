"""Shared test fixtures: where real PTB is, tiny generated corpora, tiny configs."""

import json
import os

import numpy as np

from zaremba_jax import config as config_lib
from zaremba_jax import data as data_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_PTB = os.path.join(REPO, "..", "shared", "data", "ptb")
TEST_PTB_VAR = "ZAREMBA_JAX_TEST_PTB"


def has_ptb(folder: str | None) -> bool:
  """Whether `folder` holds the three PTB files."""
  return bool(folder) and all(os.path.isfile(os.path.join(folder, f"ptb.{s}.txt"))
                              for s in ("train", "valid", "test"))


def find_ptb(environ=os.environ, shared: str = SHARED_PTB, cache: str | None = None) -> str:
  """Where the tests read real PTB: $ZAREMBA_JAX_TEST_PTB if set (whatever it holds), else
  ../shared/data/ptb if it has the three files, else the download cache (data.DEFAULT_CACHE) if
  it has them, else ../shared/data/ptb (absent: the tests that need PTB skip)."""
  if environ.get(TEST_PTB_VAR):
    return environ[TEST_PTB_VAR]
  cache = data_lib.DEFAULT_CACHE if cache is None else cache
  for folder in (shared, cache):
    if has_ptb(folder):
      return folder
  return shared


PTB_DIR = find_ptb()
HAVE_PTB = has_ptb(PTB_DIR)
NO_PTB_REASON = (f"real PTB not found in ${TEST_PTB_VAR}={PTB_DIR}" if os.environ.get(TEST_PTB_VAR)
                 else f"real PTB not found in {SHARED_PTB} nor in {data_lib.DEFAULT_CACHE}; set"
                      f" {TEST_PTB_VAR} to its folder")


def write_tiny_corpus(folder: str, n_lines=(400, 40, 40), seed: int = 0) -> str:
  """Writes ptb.{train,valid,test}.txt of short, learnable sentences over a 12-word vocabulary.

  Each sentence counts up from a random start word ("w3 w4 w5 ..."), so the next word is
  predictable from the current one and a model that learns drives perplexity well below 12.
  """
  rng = np.random.default_rng(seed)
  words = [f"w{i}" for i in range(10)] + ["<unk>"]
  for split, n in zip(("train", "valid", "test"), n_lines):
    lines = []
    for _ in range(n):
      start = int(rng.integers(0, 6))
      length = int(rng.integers(3, 5))
      lines.append(" " + " ".join(words[start: start + length]) + " ")
    with open(os.path.join(folder, f"ptb.{split}.txt"), "w") as f:
      f.write("\n".join(lines) + "\n")
  return folder


def tiny_config(**changes) -> config_lib.Config:
  base = config_lib.Config(batch_size=4, num_steps=5, num_layers=2, hidden_size=16,
                           init_scale=0.1, max_epoch=2, max_max_epoch=3, log_per_epoch=2,
                           test_chunk=64)
  return base.replace(**changes)


def read_metrics(workdir: str) -> list[dict]:
  """The records of WORKDIR/metrics.jsonl."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def folder_bytes(folder: str) -> dict:
  """{path relative to `folder`: its bytes} for every file under `folder`."""
  contents = {}
  for dirpath, _, names in os.walk(folder):
    for name in names:
      with open(os.path.join(dirpath, name), "rb") as f:
        contents[os.path.relpath(os.path.join(dirpath, name), folder)] = f.read()
  return contents
