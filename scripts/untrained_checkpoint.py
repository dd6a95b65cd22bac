"""Writes a checkpoint of a freshly initialised model, for timing inference (serve, sample) of
presets too large to train here; its predictions are of course meaningless.

  python scripts/untrained_checkpoint.py --flagfile=experiments/char_large.flags \
      --data_dir=../shared/data/ptb --workdir=/tmp/char_large_untrained
"""

import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags

from zaremba_jax import checkpoint as checkpoint_lib
from zaremba_jax import loop
from zaremba_jax import main as main_lib


def main(argv):
  del argv
  config = main_lib.config_from_flags()
  corpus = loop.load_corpus(config, flags.FLAGS.data_dir)
  run = loop.Run(config, corpus)
  ckpt = checkpoint_lib.Checkpointer(flags.FLAGS.workdir)
  meta = {"config": config.to_dict(), "vocab": list(corpus.vocab),
          "progress": dataclasses.asdict(loop.Progress()), "metrics": []}
  ckpt.save(0, run.initial_state(), meta)
  ckpt.close()
  print(f"wrote {flags.FLAGS.workdir}/checkpoints/0")


if __name__ == "__main__":
  app.run(main)
