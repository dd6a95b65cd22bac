"""Reading, vocabulary, batching and fetching of PTB."""

import hashlib
import io
import os
import tarfile
import warnings

import numpy as np
from absl.testing import absltest

from zaremba_jax import data as data_lib
from tests import helpers


class RealPTBTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    if not helpers.HAVE_PTB:
      self.skipTest(helpers.NO_PTB_REASON)

  def test_token_counts_and_vocabulary(self):
    corpus = data_lib.load_corpus(helpers.PTB_DIR)
    # Counts published with the corpus (words plus one <eos> a line).
    self.assertEqual(len(corpus.train), 929_589)
    self.assertEqual(len(corpus.valid), 73_760)
    self.assertEqual(len(corpus.test), 82_430)
    self.assertEqual(corpus.vocab_size, 10_000)
    self.assertIn("<unk>", corpus.vocab)
    self.assertIn("<eos>", corpus.vocab)

  def test_given_folder_is_used_without_warning(self):
    with warnings.catch_warnings():
      warnings.simplefilter("error")
      self.assertEqual(data_lib.resolve_data_dir(helpers.PTB_DIR), helpers.PTB_DIR)


class BatchingTest(absltest.TestCase):

  def test_batchify_by_hand(self):
    stream = np.arange(11)
    rows = data_lib.batchify(stream, 3)  # 11 // 3 = 3 tokens a row; token 9 and 10 dropped
    np.testing.assert_array_equal(rows, [[0, 1, 2], [3, 4, 5], [6, 7, 8]])

  def test_train_windows_by_hand(self):
    rows = data_lib.batchify(np.arange(20), 2)  # [[0..9], [10..19]]
    self.assertEqual(data_lib.num_train_windows(rows, 4), 2)  # (10 - 1) // 4
    x, y = data_lib.train_windows(rows, 1, 1, 4)
    np.testing.assert_array_equal(x, [[[4, 5, 6, 7], [14, 15, 16, 17]]])
    np.testing.assert_array_equal(y, [[[5, 6, 7, 8], [15, 16, 17, 18]]])
    x, y = data_lib.train_windows(rows, 0, 2, 4)  # both windows at once, in order
    np.testing.assert_array_equal(x, [[[0, 1, 2, 3], [10, 11, 12, 13]],
                                      [[4, 5, 6, 7], [14, 15, 16, 17]]])
    np.testing.assert_array_equal(y[:, :, -1], [[4, 14], [8, 18]])

  def test_eval_windows_cover_every_prediction_once(self):
    rows = data_lib.batchify(np.arange(7), 1)  # one row 0..6: 6 predictions
    x, y, m = data_lib.eval_windows(rows, 4)   # two windows, the second padded
    np.testing.assert_array_equal(x[:, 0], [[0, 1, 2, 3], [4, 5, 0, 0]])
    np.testing.assert_array_equal(y[:, 0], [[1, 2, 3, 4], [5, 6, 0, 0]])
    np.testing.assert_array_equal(m[:, 0], [[1, 1, 1, 1], [1, 1, 0, 0]])

  def test_words_and_eos(self):
    folder = self.create_tempdir().full_path
    path = os.path.join(folder, "f.txt")
    with open(path, "w") as f:
      f.write(" a b \n c\n")
    self.assertEqual(data_lib.read_words(path), ["a", "b", "<eos>", "c", "<eos>"])

  def test_unknown_eval_token_is_a_clear_error(self):
    folder = helpers.write_tiny_corpus(self.create_tempdir().full_path)
    with open(os.path.join(folder, "ptb.test.txt"), "a") as f:
      f.write(" zebra \n")
    with self.assertRaisesRegex(data_lib.DataError, "zebra"):
      data_lib.load_corpus(folder)


class FetchTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.payloads = {n: f"contents of {n}\n".encode() for n in data_lib.SHA256}
    self.enter_context(absltest.mock.patch.dict(
        data_lib.SHA256, {n: hashlib.sha256(p).hexdigest() for n, p in self.payloads.items()}))

  def test_download_verifies_and_caches(self):
    folder = self.create_tempdir().full_path
    data_lib.download_ptb(folder, fetch=lambda url: self.payloads[url.rsplit("/", 1)[1]])
    for name, payload in self.payloads.items():
      with open(os.path.join(folder, name), "rb") as f:
        self.assertEqual(f.read(), payload)

  def test_falls_back_to_the_tarball(self):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
      for name, payload in self.payloads.items():
        info = tarfile.TarInfo(data_lib.TGZ_MEMBER.format(name=name))
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))

    def fetch(url):
      if url == data_lib.TGZ_URL:
        return buf.getvalue()
      raise OSError("unreachable")

    folder = self.create_tempdir().full_path
    data_lib.download_ptb(folder, fetch=fetch)
    self.assertCountEqual(os.listdir(folder), list(self.payloads))

  def test_wrong_digest_leaves_nothing_behind(self):
    folder = self.create_tempdir().full_path
    with self.assertRaisesRegex(data_lib.DataError, "--data_dir"):
      data_lib.download_ptb(folder, fetch=lambda url: b"<html>rate limited</html>")
    self.assertEqual(os.listdir(folder), [])

  def test_cache_is_filled_once_then_reused(self):
    cache = self.create_tempdir().full_path
    calls = []

    def fetch(url):
      calls.append(url)
      return self.payloads[url.rsplit("/", 1)[1]]

    with absltest.mock.patch.object(data_lib, "DEFAULT_CACHE", cache), \
         absltest.mock.patch.dict(os.environ, {data_lib.ENV_VAR: ""}):
      self.assertEqual(data_lib.resolve_data_dir(None, fetch=fetch), cache)
      self.assertEqual(data_lib.resolve_data_dir(None, fetch=fetch), cache)
    self.assertLen(calls, 3)

  def test_other_corpus_in_data_dir_warns_but_loads(self):
    folder = helpers.write_tiny_corpus(self.create_tempdir().full_path)
    with self.assertWarnsRegex(UserWarning, "not be comparable"):
      self.assertEqual(data_lib.resolve_data_dir(folder), folder)

  def test_missing_file_in_data_dir_is_named(self):
    folder = self.create_tempdir().full_path
    with self.assertRaisesRegex(data_lib.DataError, "ptb.train.txt"):
      data_lib.resolve_data_dir(folder)


if __name__ == "__main__":
  absltest.main()
