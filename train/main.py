"""Trains a LLaMA on C4 with GaLore.

  python -m train.main --config=configs/default.py --workdir=runs/default \
      [--config.optimizer.rank=64 ...]
  python -m train.main --config=configs/default.py --print_config   # every field, with comments

Resumes automatically from the newest checkpoint in --workdir. A config or run-time mistake is
reported in one line (`train/cli.py`); --verbose shows the traceback.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from train import cli, host_memory, trainer

_CONFIG = config_flags.DEFINE_config_file("config", cli.DEFAULT_CONFIG, lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "runs/default", "Directory for checkpoints and logs.")
_PRINT_CONFIG = flags.DEFINE_bool(
  "print_config", False, "Print every config field with its value and comment, then exit."
)
flags.DEFINE_bool(
  "verbose", False, f"Show tracebacks of config and run-time errors (or {cli.TRACEBACK_ENV}=1)."
)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if _PRINT_CONFIG.value:
    print(cli.format_config(_CONFIG.value, cli.config_file(sys.argv[1:])))
    return
  logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
  host_memory.keep_freed_memory()  # before jax starts: no per-step page faults on CPU
  trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(cli.guarded(main), flags_parser=cli.parse_flags)
