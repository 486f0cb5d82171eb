"""Trains a LLaMA on C4 with GaLore.

  python -m train.main --config=configs/default.py --workdir=runs/default \
      [--config.optimizer.rank=64 ...]

Resumes automatically from the newest checkpoint in --workdir.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from train import trainer

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "runs/default", "Directory for checkpoints and logs.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
  trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
