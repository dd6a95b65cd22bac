"""Using a trained model: next-token distributions, sampling, query_sentences, the serve protocol.

Everything runs one token (or one prompt) at a time with the LSTM state carried explicitly, on
whatever device jax picks (a CPU is enough).
"""

import functools
import sys

import jax
import numpy as np

from zaremba_jax import data as data_lib
from zaremba_jax import kernels
from zaremba_jax import members as members_lib
from zaremba_jax import model as model_lib

UNK = "<unk>"


class Predictor:
  """A trained model's next-token log-probabilities, with the state carried between calls.

  A checkpoint of several members predicts with their average: the log of the mean of the
  members' next-token probabilities, each member carrying its own state.
  """

  def __init__(self, trained):
    self.trained = trained
    self.vocab = list(trained.vocab)
    self.index = {token: i for i, token in enumerate(self.vocab)}
    model = model_lib.planned_for(trained.model, batch_size=1, stream_tokens=1)
    self._feed = jax.jit(functools.partial(_feed, model=model))
    self.params = kernels.cast_weights(trained.params, model.plan)  # cast once, not per token
    self.zero = model_lib.zero_state(model.num_layers, 1, model.hidden_size,
                                     members=members_lib.count(trained.params))

  def start(self):
    """The state before any token (zeros, as at the start of the test stream)."""
    return self.zero

  def feed(self, ids, carry):
    """Feeds token ids in order; returns (log-probabilities of the next token, new carry)."""
    tokens_1xT = np.asarray(ids, np.int32)[None, :]
    logprobs_V, carry = self._feed(self.params, tokens_1xT, carry)
    return logprobs_V, carry


def _feed(params, tokens_1xT, carry, *, model):
  def one_member(p, carry):
    logits_1xTxV, carry = model.apply({"params": p}, tokens_1xT, carry, train=False)
    return jax.nn.log_softmax(logits_1xTxV[0, -1]), carry
  logprobs_KxV, carry = members_lib.lift(one_member, (0, 0))(params, carry)
  return members_lib.mean_logprobs(logprobs_KxV), carry


# The default temperatures, one place for the command line and the API: sampling draws from the
# model's own distribution (softmax at temperature 1), a query completes greedily (the course's
# query protocol: the most likely word each time).
SAMPLE_TEMPERATURE = 1.0
QUERY_TEMPERATURE = 0.0


def choose(logprobs_V, temperature: float, top_k: int, rng: np.random.Generator) -> int:
  """argmax for temperature 0; otherwise a draw from softmax(logprobs / T) over the top k."""
  logprobs = np.asarray(logprobs_V, np.float64)
  if temperature <= 0:
    return int(np.argmax(logprobs))
  scaled = logprobs / temperature
  if 0 < top_k < len(scaled):
    cutoff = np.partition(scaled, -top_k)[-top_k]
    scaled = np.where(scaled >= cutoff, scaled, -np.inf)
  p = np.exp(scaled - scaled.max())
  return int(rng.choice(len(p), p=p / p.sum()))


def generate(predictor: Predictor, prompt_ids, n: int, temperature: float = 0.0,
             top_k: int = 0, seed: int = 0, carry=None):
  """Runs the prompt through the model, then feeds back each chosen token; returns the new ids."""
  rng = np.random.default_rng(seed)
  carry = predictor.start() if carry is None else carry
  if not len(prompt_ids):
    prompt_ids = [predictor.index.get(data_lib.EOS, 0)]  # start as after a sentence end
  logprobs, carry = predictor.feed(prompt_ids, carry)
  out = []
  for _ in range(n):
    token = choose(logprobs, temperature, top_k, rng)
    out.append(token)
    logprobs, carry = predictor.feed([token], carry)
  return out


def query_sentences(trained, queries, temperature: float = QUERY_TEMPERATURE, top_k: int = 0, seed: int = 0,
                    max_query_len: int = 100, warn=lambda message: None):
  """Completes each query "N word1 word2 ..." with N predicted words.

  Args:
    trained: a word-level model from `checkpoint.load_trained`.
    queries: strings such as "5 the company said".
    temperature, top_k, seed: greedy (argmax) at temperature 0, else sampling.
    max_query_len: N above this is capped (with a warning).
    warn: called with notes (unknown words, capped N).

  Returns:
    The completed strings: the query's words followed by the N predictions.

  Raises:
    ValueError: a query is empty or its first token is not a positive integer.
  """
  predictor = trained if isinstance(trained, Predictor) else Predictor(trained)
  completed = []
  for query in queries:
    parts = query.split()
    if not parts:
      raise ValueError("empty query; write: N word1 word2 ... (N = words to predict)")
    if not parts[0].isdigit() or int(parts[0]) < 1:
      raise ValueError(f"query {query.strip()!r} must start with a positive integer, the number of"
                       f" words to predict: N word1 word2 ...")
    n, words = int(parts[0]), parts[1:]
    if n > max_query_len:
      warn(f"predicting {max_query_len} words, not {n} (--max_query_len)")
      n = max_query_len
    unknown = [w for w in words if w not in predictor.index]
    if unknown:
      warn(f"not in the vocabulary, read as {UNK}: {' '.join(unknown)}")
    ids = [predictor.index.get(w, predictor.index.get(UNK, 0)) for w in words]
    new = generate(predictor, ids, n, temperature, top_k, seed)
    completed.append(" ".join(words + [predictor.vocab[i] for i in new]))
  return completed


def run_query(trained, stdin, stdout, stderr, temperature, top_k, seed, max_query_len) -> int:
  """The interactive loop: one completed line per query line; errors on stderr; EOF ends."""
  predictor = Predictor(trained)
  prompt = stdin.isatty()
  warn = lambda message: print(f"note: {message}", file=stderr, flush=True)
  while True:
    if prompt:
      print("Query: len word1 word2 etc", file=stdout, flush=True)
    line = stdin.readline()
    if not line:
      return 0
    try:
      (answer,) = query_sentences(predictor, [line], temperature, top_k, seed, max_query_len,
                                  warn)
    except ValueError as e:
      print(f"error: {e}", file=stderr, flush=True)
      continue
    print(answer, file=stdout, flush=True)


def run_serve(trained, stdin, stdout, stderr) -> int:
  """The course's next-character protocol.

  Prints "OK GO"; then for each input line (one token), feeds it with the state carried from all
  earlier lines and prints the natural-log probabilities of every vocabulary entry for the next
  token, in vocabulary order. An unknown token gets an error on stderr and the distribution from
  the state without it, so a client never waits in vain.
  """
  predictor = Predictor(trained)
  carry = predictor.start()
  logprobs = None
  jax.block_until_ready(predictor.feed([0], carry))  # compile now, not on the client's first token
  print("OK GO", file=stdout, flush=True)
  for line in stdin:
    token = line.strip()
    if token in predictor.index:
      logprobs, carry = predictor.feed([predictor.index[token]], carry)
    else:
      print(f"error: unknown token {token!r}; the vocabulary is:"
            f" {' '.join(predictor.vocab)}", file=stderr, flush=True)
      if logprobs is None:  # nothing fed yet: the distribution after a sentence end
        logprobs, _ = predictor.feed([predictor.index.get(data_lib.EOS, 0)], predictor.start())
    stdout.write(" ".join(f"{x:.6f}" for x in np.asarray(logprobs)) + "\n")
    stdout.flush()
  return 0


def prime_ids(trained, prime: str, warn) -> list[int]:
  """The prime text as token ids: words, or characters with spaces read as "_"."""
  index = {t: i for i, t in enumerate(trained.vocab)}
  if trained.config.level == "char":
    as_is = data_lib.char_style(trained.config) == "text"  # a --corpus: characters as they are
    tokens = []
    for k, line in enumerate(prime.split("\n")):
      if k:
        tokens.append(data_lib.EOS)
      tokens.extend(line if as_is else "_".join(line.split()))
  else:
    tokens = prime.split()
  unknown = sorted({t for t in tokens if t not in index})
  if unknown:
    warn(f"not in the vocabulary, read as {UNK if UNK in index else 'the first token'}:"
         f" {' '.join(unknown)}")
  return [index.get(t, index.get(UNK, 0)) for t in tokens]


def render(trained, ids) -> str:
  """Token ids as text: <eos> as a line break; PTB's characters with "_" as a space."""
  tokens = [trained.vocab[i] for i in ids]
  if trained.config.level == "char":
    space = "_" if data_lib.char_style(trained.config) == "ptb" else " "  # PTB's space is "_"
    return "".join("\n" if t == data_lib.EOS else " " if t == space else t for t in tokens)
  return " ".join(tokens).replace(f" {data_lib.EOS} ", "\n").replace(data_lib.EOS, "\n")


def run_sample(trained, prime: str, sample_len: int, temperature: float, top_k: int, seed: int,
               stdout=sys.stdout, stderr=sys.stderr) -> int:
  warn = lambda message: print(f"note: {message}", file=stderr, flush=True)
  ids = prime_ids(trained, prime, warn)
  new = generate(Predictor(trained), ids, sample_len, temperature, top_k, seed)
  text = render(trained, ids + new)
  stdout.write(text.rstrip(" ") + "\n")
  stdout.flush()
  return 0
