"""Under pytest, absl flags are never parsed by app.run: parse the defaults once."""

from absl import flags


def pytest_configure(config):
  del config
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
