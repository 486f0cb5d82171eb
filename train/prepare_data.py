r"""Prepares C4 JSON-lines shards as tfds `c4/en:3.1.0` (array_record) for the input pipeline.

Inputs are allenai/c4 shards (`c4-train.00000-of-01024.json.gz`) or any `.json`/`.jsonl` file,
gzipped or not, with a `text` field and optional `url` and `timestamp` (or `date`).

Examples:

  # The sample bundled in data/ (2,000 train + 300 validation documents) into data/tfds:
  python -m train.prepare_data --bundled

  # allenai/c4 shards downloaded to ~/c4/en (the validation shards are a separate split):
  python -m train.prepare_data --output_dir=~/tensorflow_datasets \
    --train='~/c4/en/c4-train.*-of-01024.json.gz' \
    --validation='~/c4/en/c4-validation.*-of-00008.json.gz'

  # One file, with 1% of its documents (chosen by a hash of their text) for validation:
  python -m train.prepare_data --output_dir=/tmp/tfds --train=docs.jsonl \
    --validation_fraction=0.01

The summary printed at the end counts documents per split and the bad records skipped
(malformed JSON, empty text) or repaired (invalid UTF-8); `--strict` stops at the first bad
record instead, naming its file and line.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

from train import c4_builder

_OUTPUT_DIR = flags.DEFINE_string(
  "output_dir",
  os.fspath(c4_builder.BUNDLED_DATA_DIR),
  "tfds data dir to write to; the dataset goes to <output_dir>/c4/en/3.1.0.",
)
_TRAIN = flags.DEFINE_list("train", [], "Comma-separated files or globs of training documents.")
_VALIDATION = flags.DEFINE_list(
  "validation", [], "Comma-separated files or globs of validation documents."
)
_VALIDATION_FRACTION = flags.DEFINE_float(
  "validation_fraction",
  0.0,
  "Also send this fraction of the training documents to validation, chosen by a hash of "
  "their text (deterministic; independent of file order).",
)
_BUNDLED = flags.DEFINE_bool(
  "bundled",
  False,
  "Prepare the C4 sample bundled in data/ (the default when no --train is given).",
)
_STRICT = flags.DEFINE_bool(
  "strict", False, "Fail on the first malformed, empty or non-UTF-8 record (file:line)."
)
_OVERWRITE = flags.DEFINE_bool(
  "overwrite", False, "Replace a dataset already prepared in --output_dir."
)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments {argv[1:]}; give inputs with --train/--validation.")
  if _BUNDLED.value or not (_TRAIN.value or _VALIDATION.value):
    if _TRAIN.value or _VALIDATION.value or _VALIDATION_FRACTION.value:
      raise app.UsageError("--bundled takes no --train/--validation/--validation_fraction.")
    train = [os.fspath(p) for p in c4_builder.BUNDLED_TRAIN_FILES]
    validation = [os.fspath(p) for p in c4_builder.BUNDLED_VALIDATION_FILES]
  else:
    train, validation = _TRAIN.value, _VALIDATION.value
  output_dir = os.path.expanduser(_OUTPUT_DIR.value)
  try:
    summary = c4_builder.prepare(
      output_dir,
      train_patterns=train,
      validation_patterns=validation,
      validation_fraction=_VALIDATION_FRACTION.value,
      strict=_STRICT.value,
      overwrite=_OVERWRITE.value,
    )
  except (FileNotFoundError, ValueError) as e:  # Bad inputs: one clear line, no traceback.
    sys.exit(f"prepare_data: error: {e}")
  if summary is None:
    print(
      f"C4 is already prepared in {c4_builder.dataset_dir(output_dir)}; nothing to do "
      "(--overwrite rebuilds it)."
    )
  else:
    print(summary)


if __name__ == "__main__":
  app.run(main)
