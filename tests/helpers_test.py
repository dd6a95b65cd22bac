"""Where the tests find real PTB: $ZAREMBA_JAX_TEST_PTB, ../shared/data/ptb, the download cache."""

import os
from unittest import mock

from absl.testing import absltest

from zaremba_jax import data as data_lib
from tests import helpers


class FindPTBTest(absltest.TestCase):

  def folder(self, complete: bool) -> str:
    """A folder with the three PTB files, or with the training file alone."""
    path = self.create_tempdir().full_path
    for split in ("train", "valid", "test") if complete else ("train",):
      with open(os.path.join(path, f"ptb.{split}.txt"), "w") as f:
        f.write(" a b \n")
    return path

  def test_resolution_order(self):
    env, shared, cache = self.folder(True), self.folder(True), self.folder(True)
    partial_shared, partial_cache = self.folder(False), self.folder(False)
    with mock.patch.object(data_lib, "DEFAULT_CACHE", cache):  # the cache is data.py's
      find = lambda environ, shared: helpers.find_ptb(environ, shared)
      var = {helpers.TEST_PTB_VAR: env}
      self.assertEqual(find(var, shared), env)  # the variable first, whatever else is there
      self.assertEqual(find({}, shared), shared)  # then ../shared/data/ptb
      self.assertEqual(find({}, partial_shared), cache)  # then the download cache
      self.assertFalse(helpers.has_ptb(partial_shared))
    with mock.patch.object(data_lib, "DEFAULT_CACHE", partial_cache):
      self.assertFalse(helpers.has_ptb(find({}, partial_shared)))  # none complete: skip
      self.assertFalse(helpers.has_ptb(helpers.find_ptb(
          {helpers.TEST_PTB_VAR: partial_cache}, shared)))  # a set variable is not overridden

  def test_have_ptb_matches_the_folder_found(self):
    self.assertEqual(helpers.PTB_DIR, helpers.find_ptb())
    self.assertEqual(helpers.HAVE_PTB, helpers.has_ptb(helpers.PTB_DIR))


if __name__ == "__main__":
  absltest.main()
