"""Writes a checkpoint of a freshly initialised model, for timing inference (serve, sample) of
presets too large to train here; its predictions are of course meaningless.

  python -m scripts.untrained_checkpoint --flagfile=experiments/char_large.flags \
      --data_dir=../shared/data/ptb --workdir=/tmp/char_large_untrained   # from the repo root
"""

from absl import app
from absl import flags

from zaremba_jax import checkpoint as checkpoint_lib
from zaremba_jax import data as data_lib
from zaremba_jax import loop
from zaremba_jax import main as main_lib


def main(argv):
  del argv
  config = main_lib.config_from_flags()
  corpus = data_lib.corpus_for(config, flags.FLAGS.data_dir)
  run = loop.Run(config, corpus)
  ckpt = checkpoint_lib.Checkpointer(flags.FLAGS.workdir)
  ckpt.save(0, run.initial_state(), run.meta(loop.Progress(), []))
  ckpt.close()
  print(f"wrote {flags.FLAGS.workdir}/checkpoints/0")


if __name__ == "__main__":
  app.run(main, flags_parser=main_lib.parse_flags)  # main's flags, --preset=NAME included
