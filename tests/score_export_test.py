"""--mode=score against a plain numpy LSTM, and --mode=export read back as PyTorch's nn.LSTM computes.

The PyTorch test runs where torch is importable (the benchmark requirements' environment:
`pip install -r requirements-bench.txt`) and skips with its reason elsewhere.
"""

import functools
import json
import math
import os
import tempfile

import jax
import numpy as np
from absl.testing import absltest
from absl.testing import parameterized

from zaremba_jax import api
from zaremba_jax import checkpoint as checkpoint_lib
from zaremba_jax import export as export_lib
from zaremba_jax import score as score_lib
from tests import helpers

try:
  import torch  # pylint: disable=g-import-not-at-top
  NO_TORCH = None
except ImportError as e:
  torch, NO_TORCH = None, f"torch is not installed here ({e}); pip install -r requirements-bench.txt"

STREAM_TOKENS = 1000


def sigmoid(x):
  return 1 / (1 + np.exp(-x))


def log_softmax(logits):
  return logits - np.logaddexp.reduce(logits)


def text_for(level: str, seed: int, lines: int) -> str:
  """Counting sentences ("w3 w4 w5"), learnable; as characters, "the 3 4 5." lines."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(lines):
    start, length = int(rng.integers(0, 6)), int(rng.integers(3, 5))
    if level == "word":  # with an <unk> now and then, as PTB has
      out.append(" ".join(f"w{i}" for i in range(start, start + length))
                 + (" <unk>" if rng.random() < 0.1 else ""))
    else:
      out.append("the " + " ".join(str(i) for i in range(start, start + length)) + ".")
  return "\n".join(out) + "\n"


@functools.lru_cache(maxsize=None)
def trained_run(level: str, members: int = 1) -> str:
  """A tiny model trained 40 steps on generated text, at `level`; its workdir."""
  root = tempfile.mkdtemp(prefix=f"score_{level}_{members}_")  # fresh each session
  corpus = os.path.join(root, "corpus")
  os.makedirs(corpus, exist_ok=True)
  for split, n in (("train", 600), ("valid", 60), ("test", 60)):
    with open(os.path.join(corpus, f"{split}.txt"), "w", encoding="utf-8") as f:
      f.write(text_for(level, {"train": 0, "valid": 1, "test": 2}[split], n))
  config = helpers.tiny_config(level=level, corpus=corpus, init_scale=0.3, max_train_steps=40,
                               members=members, steps_per_call=5)
  api.train(config, os.path.join(root, "run"), progress=False)
  return os.path.join(root, "run")


def stream_text(level: str) -> str:
  """Text of STREAM_TOKENS tokens or a few more (the test scores exactly the first 1,000)."""
  return text_for(level, 7, 300 if level == "word" else 100)


def numpy_logprobs(params, ids):
  """Our model's equations (model.py: gates [i, f, o, g], one bias) in float64, one token a time."""
  p = {k: np.asarray(v, np.float64) if not isinstance(v, dict) else
       {kk: np.asarray(vv, np.float64) for kk, vv in v.items()} for k, v in params.items()}
  layers = sorted(k for k in p if k.startswith("lstm_"))
  hidden = p["embedding"].shape[1]
  h = [np.zeros(hidden) for _ in layers]
  c = [np.zeros(hidden) for _ in layers]
  out = []
  for t in range(len(ids) - 1):
    x = p["embedding"][ids[t]]
    for l, name in enumerate(layers):
      a = x @ p[name]["w_ih"] + h[l] @ p[name]["w_hh"] + p[name]["b"]
      i, f, o, g = np.split(a, 4)
      c[l] = sigmoid(f) * c[l] + sigmoid(i) * np.tanh(g)
      h[l] = sigmoid(o) * np.tanh(c[l])
      x = h[l]
    out.append(log_softmax(x @ p["softmax_w"] + p["softmax_b"])[ids[t + 1]])
  return np.array(out)


def torch_convention_logprobs(sd, ids):
  """PyTorch's nn.LSTM equations (gates [i, f, g, o], b_ih + b_hh, weights [4H, in]) on a
  state_dict, float64: what PyTorch computes, without PyTorch."""
  sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
  layers = sum(k.startswith("lstm.weight_ih_l") for k in sd)
  hidden = sd["embedding.weight"].shape[1]
  h, c = np.zeros((layers, hidden)), np.zeros((layers, hidden))
  out = []
  for t in range(len(ids) - 1):
    x = sd["embedding.weight"][ids[t]]
    for l in range(layers):
      a = (sd[f"lstm.weight_ih_l{l}"] @ x + sd[f"lstm.bias_ih_l{l}"]
           + sd[f"lstm.weight_hh_l{l}"] @ h[l] + sd[f"lstm.bias_hh_l{l}"])
      i, f, g, o = np.split(a, 4)
      c[l] = sigmoid(f) * c[l] + sigmoid(i) * np.tanh(g)
      h[l] = sigmoid(o) * np.tanh(c[l])
      x = h[l]
    out.append(log_softmax(sd["decoder.weight"] @ x + sd["decoder.bias"])[ids[t + 1]])
  return np.array(out)


def first_ids(trained, level):
  """<eos> then the first STREAM_TOKENS tokens of the stream: what score_text feeds."""
  _, ids, _ = score_lib.text_ids(trained, stream_text(level))
  return [trained.vocab.index("<eos>")] + ids[:STREAM_TOKENS]


class ScoreTest(parameterized.TestCase):

  @parameterized.named_parameters(("word", "word"), ("char", "char"))
  def test_score_equals_a_numpy_lstm(self, level):
    trained = checkpoint_lib.load_trained(trained_run(level), say=lambda _: None)
    ids = first_ids(trained, level)[:201]
    got = score_lib.Scorer(trained, chunk=64).logprobs(ids)  # 200 targets: 4 chunks, one padded
    params = jax.tree.map(lambda x: np.asarray(x)[0], trained.params)  # the one member
    np.testing.assert_allclose(got, numpy_logprobs(params, ids), atol=2e-5)

  def test_score_text_totals_and_unknown_words(self):
    trained = checkpoint_lib.load_trained(trained_run("word"), say=lambda _: None)
    result = score_lib.score_text(trained, "w1 w2 zzz\nw3\n")
    self.assertEqual(result["tokens"], ["w1", "w2", "zzz", "<eos>", "w3", "<eos>"])
    self.assertEqual(result["unknown"], ["zzz"])
    self.assertAlmostEqual(result["total_logprob"], sum(result["logprobs"]), places=9)
    self.assertAlmostEqual(result["perplexity"], math.exp(-result["total_logprob"] / 6), places=9)
    # The first token is predicted after <eos> from the zero state, as generation starts.
    ids = [trained.vocab.index(t) for t in ("<eos>", "w1")]
    self.assertAlmostEqual(result["logprobs"][0],
                           float(score_lib.Scorer(trained).logprobs(ids)[0]), places=6)

  def test_members_average_probabilities(self):
    trained = checkpoint_lib.load_trained(trained_run("word", members=2), say=lambda _: None)
    scorer = score_lib.Scorer(trained)
    ids = first_ids(trained, "word")[:50]
    member_KxN = scorer.member_logprobs(ids)
    self.assertGreater(np.abs(member_KxN[0] - member_KxN[1]).max(), 1e-3)  # two models
    np.testing.assert_allclose(scorer.logprobs(ids),
                               np.log(np.exp(member_KxN).mean(axis=0)), atol=1e-12)


class ExportTest(parameterized.TestCase):

  @parameterized.named_parameters(("word", "word"), ("char", "char"))
  def test_export_computes_what_score_does(self, level):
    trained = checkpoint_lib.load_trained(trained_run(level), say=lambda _: None)
    path = os.path.join(self.create_tempdir().full_path, "m.safetensors")
    export_lib.export(trained, path)
    tensors, metadata = export_lib.read_safetensors(path)
    self.assertEqual(json.loads(metadata["vocab"]), list(trained.vocab))
    ids = first_ids(trained, level)[:301]
    np.testing.assert_allclose(torch_convention_logprobs(tensors, ids),
                               score_lib.Scorer(trained).logprobs(ids), atol=1e-4)

  def test_npz_holds_the_same_arrays_and_the_vocabulary(self):
    trained = checkpoint_lib.load_trained(trained_run("word"), say=lambda _: None)
    folder = self.create_tempdir().full_path
    export_lib.export(trained, os.path.join(folder, "m.safetensors"))
    export_lib.export(trained, os.path.join(folder, "m.npz"))
    tensors, _ = export_lib.read_safetensors(os.path.join(folder, "m.safetensors"))
    with np.load(os.path.join(folder, "m.npz"), allow_pickle=False) as npz:
      self.assertEqual(list(npz["vocab"]), list(trained.vocab))
      for name, array in tensors.items():
        np.testing.assert_array_equal(npz[name], array)

  def test_safetensors_layout_by_hand(self):
    path = os.path.join(self.create_tempdir().full_path, "t.safetensors")
    export_lib.write_safetensors(path, {"a": np.arange(3, dtype=np.float32),
                                        "b": np.ones((2, 2), np.float32)}, {"k": "v"})
    with open(path, "rb") as f:
      payload = f.read()
    length = int.from_bytes(payload[:8], "little")
    self.assertEqual(length % 8, 0)
    header = json.loads(payload[8: 8 + length])
    self.assertEqual(header["a"], {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]})
    self.assertEqual(header["b"]["data_offsets"], [12, 28])
    self.assertEqual(header["__metadata__"], {"k": "v"})
    data = payload[8 + length:]
    self.assertLen(data, 28)
    np.testing.assert_array_equal(np.frombuffer(data[:12], "<f4"), [0, 1, 2])

  def test_bad_output_path(self):
    trained = checkpoint_lib.load_trained(trained_run("word"), say=lambda _: None)
    with self.assertRaisesRegex(export_lib.ExportError, "must end in .safetensors"):
      export_lib.export(trained, os.path.join(self.create_tempdir().full_path, "m.pt"))
    with self.assertRaisesRegex(export_lib.ExportError, "does not exist; create it first"):
      export_lib.export(trained, "/nonexistent/folder/m.npz")


class LSTMLanguageModel(torch.nn.Module if torch else object):
  """The PyTorch model an export loads into (docs/corpora.md shows the same)."""

  def __init__(self, vocab_size, hidden, layers):
    super().__init__()
    self.embedding = torch.nn.Embedding(vocab_size, hidden)
    self.lstm = torch.nn.LSTM(hidden, hidden, num_layers=layers, batch_first=True)
    self.decoder = torch.nn.Linear(hidden, vocab_size)

  def forward(self, ids_BxT):
    h_BxTxH, _ = self.lstm(self.embedding(ids_BxT))
    return torch.log_softmax(self.decoder(h_BxTxH), dim=-1)


class TorchTest(parameterized.TestCase):
  """The export loaded into torch.nn.LSTM gives --mode=score's log-probabilities (1,000 tokens)."""

  def setUp(self):
    super().setUp()
    if NO_TORCH:
      self.skipTest(NO_TORCH)

  @parameterized.named_parameters(("word", "word"), ("char", "char"))
  def test_torch_gives_the_same_logprobs(self, level):
    trained = checkpoint_lib.load_trained(trained_run(level), say=lambda _: None)
    path = os.path.join(self.create_tempdir().full_path, "m.safetensors")
    export_lib.export(trained, path)
    try:
      from safetensors.torch import load_file  # pylint: disable=g-import-not-at-top
      state = load_file(path)  # the format's own reader, where it is installed
    except ImportError:
      state = {k: torch.from_numpy(v.copy()) for k, v in export_lib.read_safetensors(path)[0].items()}
    model = LSTMLanguageModel(len(trained.vocab), trained.config.hidden_size,
                              trained.config.num_layers)
    model.load_state_dict(state, strict=True)  # every name and shape PyTorch's
    ids = first_ids(trained, level)
    self.assertLen(ids, STREAM_TOKENS + 1)
    with torch.no_grad():
      logprobs_TxV = model(torch.tensor([ids[:-1]]))[0].double()
    got = logprobs_TxV[torch.arange(STREAM_TOKENS), torch.tensor(ids[1:])].numpy()
    ours = score_lib.score_text(trained, stream_text(level))["logprobs"][:STREAM_TOKENS]
    np.testing.assert_allclose(got, ours, atol=1e-4)
    print(f"{level}: {STREAM_TOKENS} tokens, max |torch - score| = {np.abs(got - ours).max():.2e}")


if __name__ == "__main__":
  absltest.main()
