"""`--mode=score`: the log-probability a trained model gives a text, token by token.

The text is read as training read its corpus (`data.tokenize`: words, or characters, with <eos>
at each line end) and fed from the zero state after an <eos>, as `sample` starts, so every token
of the text is predicted, the first one included. A token outside the vocabulary is read as
<unk> (and named). A checkpoint of several members scores with their average: the log of the
mean of the members' probabilities for each token.
"""

import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np

from zaremba_jax import data as data_lib
from zaremba_jax import kernels
from zaremba_jax import members as members_lib
from zaremba_jax import model as model_lib

CHUNK = 1024  # tokens per jitted call (one compiled shape; the tail is padded)


def _chunk_logprobs(params, inputs_1xT, targets_1xT, carry, *, model):
  """Every member's log-probability of each target in one chunk: ([K, T], carry)."""
  def one_member(p, carry):
    logits_1xTxV, carry = model.apply({"params": p}, inputs_1xT, carry, train=False)
    logprobs_TxV = jax.nn.log_softmax(logits_1xTxV[0].astype(jnp.float32))
    return jnp.take_along_axis(logprobs_TxV, targets_1xT[0][:, None], axis=1)[:, 0], carry
  return members_lib.lift(one_member, (0, 0))(params, carry)


class Scorer:
  """A trained model's per-token log-probabilities of id streams, jitted once per model."""

  def __init__(self, trained, chunk: int = CHUNK):
    self.trained, self.chunk = trained, chunk
    model = model_lib.planned_for(trained.model, batch_size=1, stream_tokens=chunk)
    self._step = jax.jit(functools.partial(_chunk_logprobs, model=model))
    self.params = kernels.cast_weights(trained.params, model.plan)
    self.members = members_lib.count(trained.params)
    self.zero = model_lib.zero_state(model.num_layers, 1, model.hidden_size, members=self.members)

  def member_logprobs(self, ids) -> np.ndarray:
    """[K, len(ids) - 1]: each member's log-probability of ids[t + 1] after ids[: t + 1]."""
    ids = np.asarray(ids, np.int32)
    n = len(ids) - 1
    out, carry = [], self.zero
    for start in range(0, n, self.chunk):
      inputs = ids[start: start + self.chunk]
      targets = ids[start + 1: start + 1 + self.chunk]
      real = len(targets)
      pad = self.chunk - real  # padding after the real tokens cannot change them (causal)
      logprobs_KxT, carry = self._step(self.params, np.pad(inputs[:real], (0, pad))[None],
                                       np.pad(targets, (0, pad))[None], carry)
      out.append(np.asarray(logprobs_KxT, np.float64)[:, :real])
    return np.concatenate(out, axis=1) if out else np.zeros((self.members, 0))

  def logprobs(self, ids) -> np.ndarray:
    """The ensemble's log-probability of each ids[t + 1] (one member: its own), float64."""
    member_KxN = self.member_logprobs(ids)
    if self.members == 1:
      return member_KxN[0]
    return np.logaddexp.reduce(member_KxN, axis=0) - math.log(self.members)


def text_ids(trained, text: str) -> tuple[list[str], list[int], list[str]]:
  """(tokens, their ids, the distinct unknown tokens) of `text`, read as the model's corpus was.

  Raises:
    DataError: a token is unknown and the vocabulary has no <unk> to read it as.
  """
  config = trained.config
  tokens = data_lib.tokenize(text, config.level, data_lib.char_style(config))
  index = {t: i for i, t in enumerate(trained.vocab)}
  unknown = sorted({t for t in tokens if t not in index})
  if unknown and data_lib.UNK not in index:
    shown = " ".join(repr(t) for t in unknown[:10])
    raise data_lib.DataError(f"the text has {len(unknown)} token(s) outside the model's vocabulary"
                             f" ({shown}), which has no {data_lib.UNK}; score text made of the"
                             f" training corpus's {config.level}s")
  return tokens, [index.get(t, index.get(data_lib.UNK)) for t in tokens], unknown


def score_text(trained, text: str, scorer: Scorer | None = None) -> dict:
  """The log-probability of `text` under `trained` (natural logs).

  Returns:
    {'tokens', 'logprobs' (one per token), 'total_logprob', 'count', 'perplexity',
    'bits_per_token', 'unknown' (tokens read as <unk>), 'members'}.
  """
  scorer = scorer or Scorer(trained)
  tokens, ids, unknown = text_ids(trained, text)
  start = trained.vocab.index(data_lib.EOS) if data_lib.EOS in trained.vocab else 0
  logprobs = scorer.logprobs([start] + ids)
  total = float(logprobs.sum())
  count = len(tokens)
  return {"tokens": tokens, "logprobs": [float(x) for x in logprobs], "total_logprob": total,
          "count": count, "perplexity": math.exp(-total / count),
          "bits_per_token": -total / count / math.log(2), "unknown": unknown,
          "members": scorer.members}


def run_score(trained, payload: bytes, name: str, as_json: bool, stdout, stderr) -> int:
  """Prints the score of the text in `payload`: a table (token, log-probability) and a summary
  line, or one JSON object."""
  result = score_text(trained, data_lib.decode_text(payload, name))
  if result["unknown"]:
    print(f"note: not in the vocabulary, read as {data_lib.UNK}:"
          f" {' '.join(result['unknown'][:20])}", file=stderr, flush=True)
  if as_json:
    stdout.write(json.dumps(result) + "\n")
    return 0
  for token, logprob in zip(result["tokens"], result["logprobs"]):
    stdout.write(f"{token!r}\t{logprob:.6f}\n" if trained.config.level == "char" else
                 f"{token}\t{logprob:.6f}\n")
  unit = "bits per character" if trained.config.level == "char" else "bits per word"
  stdout.write(f"total log-probability {result['total_logprob']:.4f} nats over {result['count']}"
               f" tokens; perplexity {result['perplexity']:.4f}; {result['bits_per_token']:.4f}"
               f" {unit}\n")
  stdout.flush()
  return 0
