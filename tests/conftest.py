"""Under pytest, absl flags are never parsed by app.run: parse the defaults once.

And the session's compiled programs go to a jax compilation cache of its own, which the
subprocesses that tests start share: the tests train the same tiny models again and again (each
run builds its jitted functions anew), and a program compiled once is then read back instead of
compiled again. The cache starts empty each session and is deleted after it; a
JAX_COMPILATION_CACHE_DIR already set is used as it is.
"""

import os
import shutil
import tempfile

from absl import flags

_CACHE_VAR = "JAX_COMPILATION_CACHE_DIR"
_own_cache = None


def pytest_configure(config):
  global _own_cache
  del config
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  if not os.environ.get(_CACHE_VAR):  # read by jax when it is imported, here and in subprocesses
    _own_cache = tempfile.mkdtemp(prefix="zaremba_jax_test_xla_cache_")
    os.environ[_CACHE_VAR] = _own_cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


def pytest_unconfigure(config):
  del config
  if _own_cache:
    os.environ.pop(_CACHE_VAR, None)
    shutil.rmtree(_own_cache, ignore_errors=True)
