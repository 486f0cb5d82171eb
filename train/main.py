"""Trains a LLaMA on C4 with GaLore.

  python -m train.main --config=configs/default.py --workdir=runs/default \
      [--config.optimizer.rank=64 ...]
  python -m train.main --config=configs/default.py --print_config   # every field, with comments

Resumes automatically from the newest checkpoint in --workdir. SIGTERM or Ctrl-C saves a
checkpoint after the current step and exits with code 75 (`preemption.EXIT_CODE`); the same
command resumes. A second trainer on the same --workdir exits at once with code 1, naming the
process that holds it. A config or run-time mistake is reported in one line (`train/cli.py`);
--verbose shows the traceback.
"""

import shlex
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from train import cli, dirlock, host_memory, preemption, trainer

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
  try:
    trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except dirlock.DirectoryInUse as e:
    sys.exit(f"train.main: error: {e}")
  except preemption.Preempted as e:
    print(e, file=sys.stderr)
    print(
      f"To resume, run the same command: python -m train.main {shlex.join(sys.argv[1:])}",
      file=sys.stderr,
      flush=True,
    )
    sys.exit(preemption.EXIT_CODE)


if __name__ == "__main__":
  app.run(cli.guarded(main), flags_parser=cli.parse_flags)
