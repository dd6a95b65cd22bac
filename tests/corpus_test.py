"""--corpus: folders and single files at word and char level, the vocabulary, WikiText-2's download,
and the one-line errors for bad input."""

import hashlib
import io
import os
import tempfile
import types
import zipfile

import numpy as np
from absl.testing import absltest
from absl.testing import parameterized

from zaremba_jax import config as config_lib
from zaremba_jax import data as data_lib
from zaremba_jax import sample as sample_lib
from tests import helpers


def write(path: str, text: str, encoding: str = "utf-8") -> str:
  with open(path, "w", encoding=encoding, newline="") as f:
    f.write(text)
  return path


class TextCorpusTest(parameterized.TestCase):

  def test_folder_words_by_hand(self):
    folder = self.create_tempdir().full_path
    write(os.path.join(folder, "train.txt"), "a b a\nc a\n")
    write(os.path.join(folder, "valid.txt"), "a z\n")  # z: not in train -> <unk>
    write(os.path.join(folder, "test.txt"), "b\n")
    corpus = data_lib.load_text_corpus(folder, "word")
    self.assertEqual(corpus.vocab, ("a", "b", "<eos>", "c", "<unk>"))
    np.testing.assert_array_equal(corpus.train, [0, 1, 0, 2, 3, 0, 2])
    np.testing.assert_array_equal(corpus.valid, [0, 4, 2])
    np.testing.assert_array_equal(corpus.test, [1, 2])

  @parameterized.named_parameters(("ptb_names", "ptb.{split}.txt"),
                                  ("wikitext_names", "wiki.{split}.tokens"))
  def test_other_layouts(self, layout):
    folder = self.create_tempdir().full_path
    for split in data_lib.SPLITS:
      write(os.path.join(folder, layout.format(split=split)), f"x {split}\n")
    corpus = data_lib.load_text_corpus(folder, "word", min_count=1)
    self.assertEqual(corpus.vocab[:3], ("x", "train", "<eos>"))
    self.assertEqual(corpus.vocab[-1], "<unk>")  # valid and test words are unseen

  def test_single_file_characters_as_they_are(self):
    path = write(os.path.join(self.create_tempdir().full_path, "t.txt"),
                 "ab ba\r\n" * 10)  # 60 characters and 10 line ends; \r\n read as one line end
    corpus = data_lib.load_text_corpus(path, "char", split="0.8,0.1,0.1")
    self.assertEqual(corpus.vocab, ("a", "b", " ", "<eos>"))
    self.assertEqual((len(corpus.train), len(corpus.valid), len(corpus.test)), (48, 6, 6))
    np.testing.assert_array_equal(corpus.train[:7], [0, 1, 2, 1, 0, 3, 0])
    # The three splits are the stream's consecutive pieces.
    whole = np.concatenate([corpus.train, corpus.valid, corpus.test])
    np.testing.assert_array_equal(whole, np.tile([0, 1, 2, 1, 0, 3], 10))

  def test_non_ascii_characters(self):
    path = write(os.path.join(self.create_tempdir().full_path, "t.txt"), "né 日本\n" * 20)
    corpus = data_lib.load_text_corpus(path, "char")
    self.assertEqual(corpus.vocab, ("n", "é", " ", "日", "本", "<eos>"))

  def test_max_vocab_and_min_count(self):
    folder = self.create_tempdir().full_path
    write(os.path.join(folder, "train.txt"), "c a b a b a d\n")  # a x3, b x2, c x1, d x1
    write(os.path.join(folder, "valid.txt"), "a b c d\n")
    write(os.path.join(folder, "test.txt"), "a\n")
    # max_vocab=4: <eos>, then the most frequent a, b, and room kept for <unk>.
    corpus = data_lib.load_text_corpus(folder, "word", max_vocab=4)
    self.assertEqual(corpus.vocab, ("a", "b", "<eos>", "<unk>"))  # first-seen order kept
    np.testing.assert_array_equal(corpus.valid, [0, 1, 3, 3, 2])
    corpus = data_lib.load_text_corpus(folder, "word", min_count=2)
    self.assertEqual(corpus.vocab, ("a", "b", "<eos>", "<unk>"))
    corpus = data_lib.load_text_corpus(folder, "word")
    self.assertEqual(corpus.vocab, ("c", "a", "b", "d", "<eos>"))  # nothing unknown: no <unk>

  def test_ptb_through_corpus_is_the_default_corpus(self):
    if not helpers.HAVE_PTB:
      self.skipTest(helpers.NO_PTB_REASON)
    default = data_lib.load_corpus(helpers.PTB_DIR, "word")
    given = data_lib.corpus_for(config_lib.Config(corpus=helpers.PTB_DIR))
    self.assertEqual(given.vocab, default.vocab)
    for split in data_lib.SPLITS:
      np.testing.assert_array_equal(given.split(split), default.split(split))

  def test_resume_on_other_training_text_is_refused(self):
    from zaremba_jax import checkpoint as checkpoint_lib  # pylint: disable=import-outside-toplevel
    saved = {"train_sha256": data_lib.stream_digest(np.array([3, 1, 2]))}
    checkpoint_lib.check_train_text(saved, data_lib.stream_digest(np.array([3, 1, 2])), 3)
    with self.assertRaisesRegex(checkpoint_lib.ResumeError, r"training text \(3 tokens\) is not"):
      checkpoint_lib.check_train_text(saved, data_lib.stream_digest(np.array([3, 2, 1])), 3)
    checkpoint_lib.check_train_text({}, "anything", 3)  # saved before the digest: not checked

  def test_char_style_follows_the_corpus(self):
    self.assertEqual(data_lib.char_style(config_lib.Config(level="char")), "ptb")
    self.assertEqual(data_lib.char_style(config_lib.Config(level="char", corpus="/x")), "text")
    self.assertEqual(data_lib.tokenize("a b\n", "char", "ptb"), ["a", "_", "b", "<eos>"])
    self.assertEqual(data_lib.tokenize("a b\n", "char", "text"), ["a", " ", "b", "<eos>"])


class CharTextSampleTest(absltest.TestCase):
  """Generation reads and writes a --corpus's characters as they are; PTB's keep "_" for a space."""

  def test_prime_and_render(self):
    vocab = ("a", " ", "_", "<eos>")
    text = types.SimpleNamespace(vocab=vocab, config=config_lib.Config(level="char", corpus="/x"))
    ids = sample_lib.prime_ids(text, "a _\na", warn=self.fail)
    self.assertEqual(ids, [0, 1, 2, 3, 0])
    self.assertEqual(sample_lib.render(text, ids), "a _\na")
    ptb = types.SimpleNamespace(vocab=vocab, config=config_lib.Config(level="char"))
    ids = sample_lib.prime_ids(ptb, "a  a", warn=self.fail)
    self.assertEqual(ids, [0, 2, 0])
    self.assertEqual(sample_lib.render(ptb, ids), "a a")


class BadInputTest(parameterized.TestCase):
  """Each bad input is a DataError whose one line names the problem and what to do."""

  def test_missing_split(self):
    folder = self.create_tempdir().full_path
    write(os.path.join(folder, "train.txt"), "a\n")
    write(os.path.join(folder, "test.txt"), "a\n")
    with self.assertRaisesRegex(data_lib.DataError, r"has train.txt but no valid.txt; add the"
                                                    r" missing split, or give one file"):
      data_lib.load_text_corpus(folder)

  def test_folder_without_training_file(self):
    with self.assertRaisesRegex(data_lib.DataError, "has no training file .*train.txt, ptb.train"):
      data_lib.load_text_corpus(self.create_tempdir().full_path)

  def test_missing_path(self):
    with self.assertRaisesRegex(data_lib.DataError, "is neither a folder nor a file"):
      data_lib.load_text_corpus("/nonexistent/corpus.txt")

  def test_empty_file(self):
    path = write(os.path.join(self.create_tempdir().full_path, "t.txt"), " \n\n")
    with self.assertRaisesRegex(data_lib.DataError, "t.txt is empty; give a file with text"):
      data_lib.load_text_corpus(path)

  def test_not_utf8(self):
    path = write(os.path.join(self.create_tempdir().full_path, "t.txt"), "caf\xe9\n", "latin-1")
    with self.assertRaisesRegex(data_lib.DataError, r"not UTF-8 text \(byte 0xe9 at offset 3\);"
                                                    r" convert it"):
      data_lib.load_text_corpus(path, "char")

  def test_char_vocabulary_over_max_vocab(self):
    path = write(os.path.join(self.create_tempdir().full_path, "t.txt"), "abcdef\n" * 10)
    with self.assertRaisesRegex(data_lib.DataError, "7 distinct characters .* more than"
                                                    " --max_vocab=5; raise --max_vocab"):
      data_lib.load_text_corpus(path, "char", max_vocab=5)
    self.assertLen(data_lib.load_text_corpus(path, "char", max_vocab=7).vocab, 7)

  def test_file_too_short_for_the_split(self):
    path = write(os.path.join(self.create_tempdir().full_path, "t.txt"), "a b c\n")
    with self.assertRaisesRegex(data_lib.DataError, "too few for --split=0.9,0.05,0.05"):
      data_lib.load_text_corpus(path)

  @parameterized.parameters("0.9,0.1", "1,1,1", "a,b,c", "0.9,0,0.1")
  def test_bad_split(self, split):
    path = write(os.path.join(self.create_tempdir().full_path, "t.txt"), "a b c\n" * 100)
    with self.assertRaisesRegex(data_lib.DataError, "must be three positive fractions"):
      data_lib.load_text_corpus(path, split=split)

  def test_corpus_too_short_for_one_window(self):
    from zaremba_jax import loop  # pylint: disable=import-outside-toplevel
    path = write(os.path.join(self.create_tempdir().full_path, "t.txt"), "abcd\n" * 40)
    config = helpers.tiny_config(level="char", corpus=path, batch_size=4, num_steps=50)
    corpus = data_lib.corpus_for(config)  # 0.9 of 200 tokens train; one window needs 4 x 51
    with self.assertRaisesRegex(data_lib.DataError, "has 180 tokens, too few for one window of"
                                                    r" --batch_size=4 x --num_steps=50 \(needs 204\)"):
      loop.Run(config, corpus)


class CommandLineErrorTest(parameterized.TestCase):
  """Each bad input through the command line: status 1, one line, the saved run untouched."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    from tests import main_test  # pylint: disable=import-outside-toplevel
    root = tempfile.mkdtemp()
    cls.run_dir = os.path.join(root, "run")
    text = os.path.join(root, "text.txt")
    write(text, "abc ab\n" * 300)
    # A run to resume: one char model stopped after its first step (and saved).
    from zaremba_jax import loop, reporting  # pylint: disable=import-outside-toplevel
    config = helpers.tiny_config(level="char", corpus=text, num_layers=1, hidden_size=8,
                                 steps_per_call=1)
    loop.train_and_evaluate(config, None, cls.run_dir,
                            reporting.Reporter(cls.run_dir, io.StringIO()),
                            stop_requested=lambda step: "stop")
    cls.saved = cls.saved_run()
    assert cls.saved[0], "the run to resume saved no checkpoint"
    folder = os.path.join(root, "no_valid")
    os.makedirs(folder)
    write(os.path.join(folder, "train.txt"), "a b\n")
    write(os.path.join(folder, "test.txt"), "a b\n")
    files = {name: write(os.path.join(root, name), content, encoding) for name, content, encoding in (
        ("empty.txt", "\n", "utf-8"), ("latin1.txt", "caf\xe9 " * 100, "latin-1"),
        ("short.txt", "abc\n" * 30, "utf-8"), ("other_chars.txt", "xyzw xy\n" * 300, "utf-8"),
        ("same_chars.txt", "abc ba\n" * 300, "utf-8"))}
    char = ("--level=char", "--num_layers=1", "--hidden_size=8", "--batch_size=4",
            "--num_steps=5")
    train = ("--mode=train", f"--workdir={os.path.join(root, 'fresh')}")
    resume = ("--mode=train", f"--workdir={cls.run_dir}", *char)
    cases = {
        "missing_split": (*train, f"--corpus={folder}"),
        "empty_file": (*train, f"--corpus={files['empty.txt']}"),
        "not_utf8": (*train, f"--corpus={files['latin1.txt']}", "--level=char"),
        "char_vocab_over_max_vocab": (*train, f"--corpus={text}", "--level=char",
                                      "--max_vocab=3"),
        "too_short_for_a_window": (*train, f"--corpus={files['short.txt']}", *char[:3],
                                   "--batch_size=20", "--num_steps=35"),
        "resume_other_vocabulary": (*resume, f"--corpus={files['other_chars.txt']}"),
        "resume_other_text": (*resume, f"--corpus={files['same_chars.txt']}"),
        "score_not_utf8": ("--mode=score", f"--workdir={cls.run_dir}",
                           f"--input={files['latin1.txt']}"),
        "export_bad_extension": ("--mode=export", f"--workdir={cls.run_dir}",
                                 f"--output={os.path.join(root, 'm.pt')}"),
    }
    running = {name: main_test.start(*args) for name, args in cases.items()}
    cls.results = {name: main_test.finish(proc) for name, proc in running.items()}

  @parameterized.named_parameters(
      (case, case, message) for case, message in (
          ("missing_split", r"has train.txt but no valid.txt; add the missing split"),
          ("empty_file", r"empty.txt is empty; give a file with text in it"),
          ("not_utf8", r"latin1.txt is not UTF-8 text \(byte 0xe9 at offset 3\); convert it"),
          ("char_vocab_over_max_vocab", r"5 distinct characters \(with <eos>\), more than"
                                        r" --max_vocab=3; raise --max_vocab"),
          ("too_short_for_a_window", r"the training split has 108 tokens, too few for one window"
                                     r" of --batch_size=20 x --num_steps=35 \(needs 720\)"),
          ("resume_other_vocabulary", r"vocabulary \(6 tokens\) differs from the checkpoint's"
                                      r" \(5\); pass the --corpus"),
          ("resume_other_text", r"the training text \(1890 tokens\) is not the one the checkpoint"
                                r" was trained on; pass the --corpus"),
          ("score_not_utf8", r"latin1.txt is not UTF-8 text"),
          ("export_bad_extension", r"must end in .safetensors \(PyTorch\) or .npz")))
  def test_status_1_one_line_nothing_lost(self, case, message):
    rc, _, stderr = self.results[case]
    self.assertEqual(rc, 1, stderr)
    lines = stderr.splitlines()
    self.assertLen(lines, 1, f"stderr should be one line:\n{stderr[-1000:]}")
    self.assertRegex(lines[0], "^error: ")
    self.assertRegex(lines[0], message)
    self.assertEqual(self.saved_run(), self.saved)

  @classmethod
  def saved_run(cls):
    """The run's checkpoints (steps) and the bytes of every file in them."""
    folder = os.path.join(cls.run_dir, "checkpoints")
    return sorted(os.listdir(folder)), helpers.folder_bytes(folder)


def fake_zip(folder: str, files: str, texts: dict) -> bytes:
  buffer = io.BytesIO()
  with zipfile.ZipFile(buffer, "w") as archive:
    for split, text in texts.items():
      archive.writestr(f"{folder}/{files.format(split=split)}", text)
  return buffer.getvalue()


class WikiTextTest(absltest.TestCase):
  """The download path with a fake fetch (the tests never reach the network)."""

  def setUp(self):
    super().setUp()
    self.texts = {"train": " = A = \n the cat <unk> \n", "valid": " the cat \n",
                  "test": " cat the \n"}
    self.payload = fake_zip("wikitext-2", "wiki.{split}.tokens", self.texts)
    self.spec = dict(data_lib.WIKITEXT["wikitext-2"])
    self.enter_context(absltest.mock.patch.dict(
        data_lib.WIKITEXT, {"wikitext-2": {**self.spec,
                                           "sha256": hashlib.sha256(self.payload).hexdigest()}}))
    self.cache = self.create_tempdir().full_path
    self.urls = []

  def fetch(self, url):
    self.urls.append(url)
    return self.payload

  def test_downloads_verifies_extracts_once(self):
    folder = data_lib.resolve_wikitext("wikitext-2", self.cache, fetch=self.fetch)
    self.assertEqual(self.urls, ["https://s3.amazonaws.com/research.metamind.io/wikitext/"
                                 "wikitext-2-v1.zip"])
    with open(os.path.join(folder, "wiki.valid.tokens"), encoding="utf-8") as f:
      self.assertEqual(f.read(), self.texts["valid"])
    data_lib.resolve_wikitext("wikitext-2", self.cache, fetch=self.fetch)
    self.assertLen(self.urls, 1)  # cached: not fetched again
    corpus = data_lib.load_text_corpus(folder, "word")
    self.assertEqual(corpus.vocab, ("=", "A", "<eos>", "the", "cat", "<unk>"))

  def test_mirror_after_a_failure_and_bad_digest_caches_nothing(self):
    def flaky(url):
      self.urls.append(url)
      if "s3.amazonaws" in url:
        raise OSError("unreachable")
      return b"not the zip"
    with self.assertRaisesRegex(data_lib.DataError, r"could not download wikitext-2 .*unreachable;"
                                                    r" .*wikitext.smerity.com.*sha256 .*nothing"
                                                    r" was cached"):
      data_lib.resolve_wikitext("wikitext-2", self.cache, fetch=flaky)
    self.assertLen(self.urls, 2)
    self.assertFalse(os.path.exists(os.path.join(self.cache, "wikitext-2")))

  def test_preset(self):
    config = config_lib.preset("wt2_medium")
    self.assertEqual((config.corpus, config.hidden_size, config.level), ("wikitext-2", 650, "word"))


if __name__ == "__main__":
  absltest.main()
