"""Turns C4 JSON shards into the tfds `c4/en:3.1.0` layout (array_record), without TensorFlow.

C4 is usually downloaded as the allenai/c4 JSON shards (`c4-train.00000-of-01024.json.gz`, one
JSON object per line with `text`, `url`, `timestamp`). The canonical tfds `c4` builder instead
recomputes C4 from Common Crawl with Apache Beam, which is out of reach for most users. `C4` here
is a small `GeneratorBasedBuilder` with the same name, config, version and features (five text
fields; allenai/c4 has no content-type/length: left empty). It reads such shards and writes
`<data_dir>/c4/en/3.1.0/c4-{train,validation}.array_record-*`, which
`tfds.data_source("c4/en", split=..., data_dir=...)` then reads by name, with random access.

Input lines may differ from allenai/c4 in the ways real copies do: `date` instead of `timestamp`,
no `url` or `timestamp`, `\\/` escapes, gzip or not, invalid UTF-8. Bad records are never dropped
silently: malformed JSON lines and empty documents are skipped and counted, invalid UTF-8 is
decoded with U+FFFD replacements and counted, and `strict=True` stops at the first bad record
with its file and line number.

Example::

  summary = prepare("data/tfds", train_patterns=["c4/en/c4-train.*.json.gz"],
                    validation_patterns=["c4/en/c4-validation.*.json.gz"])
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import tensorflow_datasets as tfds
import tqdm

from train import dirlock

NAME, CONFIG, VERSION = "c4", "en", "3.1.0"
SPLITS = ("train", "validation")
# The canonical tfds C4 features; allenai/c4 JSON has no content-type/length, written as "".
FEATURES = ("text", "url", "content-type", "content-length", "timestamp")

# The sample bundled in the repo's data/ folder (see data/README.md): paths relative to this
# file, so they work from any working directory.
BUNDLED_RAW_DIR = Path(__file__).resolve().parent.parent / "data"
BUNDLED_TRAIN_FILES = (
  BUNDLED_RAW_DIR / "c4-sample.00000-of-00001.json.gz",
  BUNDLED_RAW_DIR / "c4_en_train00000_first1000.jsonl",
)
BUNDLED_VALIDATION_FILES = (BUNDLED_RAW_DIR / "c4_demo.jsonl",)
BUNDLED_DATA_DIR = BUNDLED_RAW_DIR / "tfds"  # Where the bundled sample is prepared (gitignored).

_ISO_WITHOUT_T = re.compile(r"^(\d{4}-\d{2}-\d{2}) (\d{2}:\d{2}:\d{2})$")
_GLOB_CHARS = re.compile(r"[*?\[]")
_SURROGATE = re.compile("[\ud800-\udfff]")


class BadRecordError(ValueError):
  """A malformed, empty or non-UTF-8 record met in strict mode."""


class DamagedFileError(ValueError):
  """An input file that is truncated or corrupted: not one bad record but the file itself."""


@dataclasses.dataclass
class FileStats:
  """What reading one input file found."""

  documents: int = 0  # documents kept
  malformed: int = 0  # lines that are not a JSON object with a string `text` (skipped)
  empty: int = 0  # documents whose text is empty or whitespace only (skipped)
  non_utf8: int = 0  # lines with invalid UTF-8 (or lone surrogates), kept with U+FFFD


@dataclasses.dataclass
class PrepareSummary:
  """Document counts per split and bad-data counts per input file."""

  data_dir: Path
  documents: dict[str, int]
  files: dict[str, FileStats]

  def totals(self) -> FileStats:
    """Bad-data counts summed over files (`documents` counts each file once)."""
    total = FileStats()
    for stats in self.files.values():
      for field in dataclasses.fields(FileStats):
        setattr(total, field.name, getattr(total, field.name) + getattr(stats, field.name))
    return total

  def __str__(self) -> str:
    t = self.totals()
    docs = ", ".join(f"{split} {n:,}" for split, n in self.documents.items())
    return (
      f"Prepared C4 at {dataset_dir(self.data_dir)}: {docs} documents from "
      f"{len(self.files)} files. Skipped {t.malformed:,} malformed lines and {t.empty:,} "
      f"empty documents; {t.non_utf8:,} lines had invalid UTF-8 (kept, decoded with U+FFFD)."
    )


def dataset_dir(data_dir: str | os.PathLike) -> Path:
  """The folder tfds reads `c4/en:3.1.0` from, inside `data_dir`."""
  return Path(data_dir) / NAME / CONFIG / VERSION


def is_prepared(data_dir: str | os.PathLike) -> bool:
  """Whether `data_dir` holds a finished `c4/en:3.1.0` (tfds writes dataset_info.json last)."""
  return (dataset_dir(data_dir) / "dataset_info.json").is_file()


def expand_patterns(patterns: Sequence[str]) -> list[Path]:
  """Sorted files matching each glob, in pattern order; an error names a pattern that matches none.

  Args:
    patterns: file names or globs (`~` is expanded; `**` matches folders recursively).

  Returns:
    The matching files, each once.
  """
  files: dict[Path, None] = {}
  for pattern in patterns:
    expanded = os.path.expanduser(pattern)
    if not _GLOB_CHARS.search(expanded):
      if not os.path.isfile(expanded):
        raise FileNotFoundError(f"C4 input file not found: {pattern!r}")
      matches = [expanded]
    else:
      matches = sorted(p for p in glob.glob(expanded, recursive=True) if os.path.isfile(p))
      if not matches:
        raise FileNotFoundError(f"C4 input pattern {pattern!r} matched no files")
    files.update((Path(m).resolve(), None) for m in matches)
  return list(files)


def read_c4_json(
  path: str | os.PathLike,
  *,
  strict: bool = False,
  stats: FileStats | None = None,
  progress: tqdm.tqdm | None = None,
) -> Iterator[tuple[int, dict[str, str]]]:
  """Reads a C4 JSON-lines file (gzipped if its name ends in .gz).

  Args:
    path: the file.
    strict: raise `BadRecordError` naming `path:line` at the first bad record instead of
      skipping and counting it.
    stats: counts of kept and skipped records, updated in place.
    progress: a tqdm bar advanced by the bytes read from disk (compressed bytes for .gz).

  Yields:
    `(line_number, {"text", "url", "timestamp"})`, line numbers starting at 1. A missing `url`
    or `timestamp` becomes "", `date` is read as `timestamp`, and `YYYY-MM-DD hh:mm:ss`
    timestamps are written as C4 writes them, `YYYY-MM-DDThh:mm:ssZ`.

  Raises:
    DamagedFileError: the file is truncated (gzip that ends early, a last line cut inside a
      record) or corrupted (a failed gzip checksum or stream, NUL bytes), naming it.
  """
  stats = FileStats() if stats is None else stats
  with open(path, "rb") as raw:
    is_gzip = raw.read(2) == b"\x1f\x8b"  # by content: a misnamed file still reads
    raw.seek(0)
    lines = _checked_lines(gzip.GzipFile(fileobj=raw) if is_gzip else raw, path)
    position = 0
    for line_number, line in enumerate(lines, start=1):
      if progress is not None:
        progress.update(raw.tell() - position)
        position = raw.tell()
      where = f"{path}:{line_number}"
      if b"\0" in line:  # never in text (JSON escapes it): zeroed blocks or a binary file
        raise DamagedFileError(
          f"{where}: NUL bytes; the file is corrupted (a crash or a failed copy leaves zeroed "
          "blocks) or is not JSON-lines text. Copy or download it again."
        )
      try:
        decoded = line.decode("utf-8")
      except UnicodeDecodeError as e:
        if strict:
          raise BadRecordError(f"{where}: invalid UTF-8 ({e.reason})") from e
        stats.non_utf8 += 1
        decoded = line.decode("utf-8", errors="replace")
      record = _parse_record(decoded, where, strict=strict)
      if record is None and not line.endswith(b"\n"):  # only the last line can lack one
        raise DamagedFileError(
          f"{where}: the file ends inside a record (its last line is cut off): it is "
          "truncated, as an interrupted download or copy leaves it. Copy or download it again."
        )
      if record is None:
        stats.malformed += 1
        continue
      if (replaced := _without_surrogates(record)) is not None:
        if strict:
          raise BadRecordError(f"{where}: invalid Unicode (lone surrogate escape)")
        stats.non_utf8 += 1
        record = replaced
      if not record["text"].strip():
        if strict:
          raise BadRecordError(f"{where}: empty document")
        stats.empty += 1
        continue
      stats.documents += 1
      yield line_number, record


def _checked_lines(lines, path: str | os.PathLike) -> Iterator[bytes]:
  """`lines`, with gzip's errors for a truncated or corrupted stream as `DamagedFileError`."""
  line_number = 0
  try:
    for line_number, line in enumerate(lines, start=1):  # noqa: B007 (read in `except`)
      yield line
  except (EOFError, OSError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
    problem = (
      "truncated, as an interrupted download or copy leaves it"
      if isinstance(e, EOFError)
      else "corrupted (bad bytes from a failing disk, copy or transfer)"
    )
    raise DamagedFileError(
      f"{path}: the gzip stream is {problem}; read up to line {line_number} "
      f"({type(e).__name__}: {e}). Copy or download it again (`gzip -t` checks it)."
    ) from e


def _parse_record(line: str, where: str, *, strict: bool) -> dict[str, str] | None:
  """One JSON line as C4 features, or None (strict: an error) if it is not a C4 record."""
  try:
    obj = json.loads(line)
    if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
      raise ValueError('not a JSON object with a string "text" field')
  except ValueError as e:  # json.JSONDecodeError is a ValueError
    if strict:
      raise BadRecordError(f"{where}: malformed record: {e}") from e
    return None
  timestamp = str(obj.get("timestamp", obj.get("date")) or "")
  return {
    "text": obj["text"],
    "url": str(obj.get("url") or ""),
    "content-type": str(obj.get("content-type") or ""),
    "content-length": str(obj.get("content-length") or ""),
    "timestamp": _ISO_WITHOUT_T.sub(r"\1T\2Z", timestamp),
  }


def _without_surrogates(record: dict[str, str]) -> dict[str, str] | None:
  """The record with lone surrogates (from JSON `\\ud800` escapes) as U+FFFD, or None if none."""
  if not any(_SURROGATE.search(value) for value in record.values()):
    return None
  return {k: _SURROGATE.sub("\ufffd", v) for k, v in record.items()}


def in_validation_fraction(text: str, fraction: float) -> bool:
  """Whether a document belongs to a hash-based validation fraction.

  The first 8 bytes of the text's SHA-256, read as a number in [0, 1), are below `fraction`:
  the split of a document depends only on its text, not on file order or machine, and exact
  duplicates always fall on the same side.
  """
  digest = hashlib.sha256(text.encode("utf-8", errors="replace")).digest()
  return int.from_bytes(digest[:8], "big") / 2**64 < fraction


class C4(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """C4 (en) from JSON-lines shards, written as tfds `c4/en:3.1.0`."""

  name = NAME
  VERSION = tfds.core.Version(VERSION)
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=CONFIG, description="English C4 documents.")]

  def __init__(
    self,
    *,
    train_files: Sequence[Path] = (),
    validation_files: Sequence[Path] = (),
    validation_fraction: float = 0.0,
    strict: bool = False,
    **kwargs,
  ):
    super().__init__(**kwargs)
    self._files = {"train": list(train_files), "validation": list(validation_files)}
    self._validation_fraction = validation_fraction
    self._strict = strict
    self.file_stats: dict[str, FileStats] = {}
    self.split_documents: dict[str, int] = {}  # documents yielded per split, once it is read

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description=(
        "C4 (Colossal Clean Crawled Corpus, English) read from JSON-lines shards by "
        "galore-jax's train/c4_builder.py. C4: AllenAI, ODC-By 1.0; Common Crawl terms apply."
      ),
      features=tfds.features.FeaturesDict({name: tfds.features.Text() for name in FEATURES}),
      homepage="https://huggingface.co/datasets/allenai/c4",
      citation="Raffel et al., Exploring the Limits of Transfer Learning with a Unified "
      "Text-to-Text Transformer, JMLR 2020. https://arxiv.org/abs/1910.10683",
      # Keep the input order, so that the validation split reads in file order; training
      # order comes from grain's seeded shuffle.
      disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Unused: inputs are local files.
    return {split: self._generate_examples(split) for split in SPLITS}

  def _sources(self, split: str) -> list[tuple[Path, bool | None]]:
    """`(file, keep)` pairs: keep None takes every document, True/False those whose hash is/is
    not in the validation fraction (train files feed both splits when the fraction is > 0)."""
    if self._validation_fraction <= 0:
      return [(path, None) for path in self._files[split]]
    if split == "train":
      return [(path, False) for path in self._files["train"]]
    return [(p, None) for p in self._files["validation"]] + [
      (p, True) for p in self._files["train"]
    ]

  def _generate_examples(self, split: str):
    """Yields `(key, example)` for one split, with a progress bar over the bytes read."""
    sources = self._sources(split)
    total = sum(path.stat().st_size for path, _ in sources)
    count = 0
    with tqdm.tqdm(total=total, desc=f"c4 {split}", unit="B", unit_scale=True) as bar:
      for file_index, (path, keep) in enumerate(sources):
        stats = FileStats()
        for line_number, example in read_c4_json(
          path, strict=self._strict, stats=stats, progress=bar
        ):
          text = example["text"]
          if keep is None or keep == in_validation_fraction(text, self._validation_fraction):
            count += 1
            yield f"{file_index:05d}:{line_number:010d}", example
        self.file_stats[str(path)] = stats  # A file read for both splits counts the same twice.
    self.split_documents[split] = count

  def empty_split_error(self, split: str, data_dir: str | os.PathLike) -> ValueError:
    """The error for a split whose inputs gave no document, with their bad-record counts."""
    paths = [path for path, _ in self._sources(split)]
    counts = [f"{path.name}: {self.file_stats.get(str(path), FileStats())}" for path in paths]
    return ValueError(
      f"C4 split {split!r} would have no documents in {os.fspath(data_dir)}: its "
      f"{len(paths)} input files gave none ({'; '.join(counts)}). Nothing was prepared; give "
      "files with JSON lines that have a non-empty string `text`."
    )


def prepare(
  data_dir: str | os.PathLike,
  *,
  train_patterns: Sequence[str],
  validation_patterns: Sequence[str] = (),
  validation_fraction: float = 0.0,
  strict: bool = False,
  overwrite: bool = False,
) -> PrepareSummary | None:
  """Writes C4 JSON-lines files as tfds `c4/en:3.1.0` (array_record) under `data_dir`.

  Args:
    data_dir: the tfds data dir; the dataset goes to `data_dir/c4/en/3.1.0`.
    train_patterns: files or globs of training documents.
    validation_patterns: files or globs of validation documents.
    validation_fraction: in [0, 1); also move this fraction of the training documents to
      validation, chosen by a hash of their text (`in_validation_fraction`).
    strict: stop at the first bad record (`BadRecordError` naming file and line) instead of
      skipping and counting it.
    overwrite: replace a dataset already prepared there; otherwise return None and keep it.

  Returns:
    Document counts per split and bad-data counts per file, or None if `data_dir` already had
    the dataset and `overwrite` is False.
  """
  if not 0 <= validation_fraction < 1:
    raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
  train_files = expand_patterns(train_patterns)
  validation_files = expand_patterns(validation_patterns)
  if not train_files:
    raise ValueError("No training inputs: give at least one train file or glob")
  if not validation_files and validation_fraction == 0:
    raise ValueError("No validation inputs: give validation files or a validation fraction > 0")
  if both := sorted(set(train_files) & set(validation_files)):
    raise ValueError(f"Files given as both train and validation: {[str(p) for p in both]}")
  if is_prepared(data_dir) and not overwrite:
    return None
  # Built in a folder of its own and moved into place when complete: a failed or killed run
  # leaves nothing where the dataset goes, and --overwrite keeps the old one until then.
  data_dir = Path(data_dir)
  created = not data_dir.exists()
  data_dir.mkdir(parents=True, exist_ok=True)
  _remove_abandoned_builds(data_dir)
  building = Path(tempfile.mkdtemp(prefix=_BUILDING_PREFIX, dir=data_dir))
  try:
    with dirlock.DirLock(building, "dataset build"):
      builder = _build(
        building, data_dir, train_files, validation_files, validation_fraction, strict
      )
      _move_into_place(building, data_dir, overwrite)
  finally:
    shutil.rmtree(building, ignore_errors=True)
    if created and not any(data_dir.iterdir()):
      data_dir.rmdir()
  documents = {split: builder.info.splits[split].num_examples for split in SPLITS}
  return PrepareSummary(data_dir, documents, builder.file_stats)


_BUILDING_PREFIX = ".c4-building-"  # a dataset being written (locked by its writer)


def _build(
  building: Path, data_dir: Path, train_files, validation_files, validation_fraction, strict
):
  """Writes the dataset into `building` with tfds (errors name `data_dir`); returns the builder."""
  builder = C4(
    data_dir=os.fspath(building),
    config=CONFIG,
    file_format="array_record",
    train_files=train_files,
    validation_files=validation_files,
    validation_fraction=validation_fraction,
    strict=strict,
  )
  tfds.disable_progress_bar()  # Ours shows bytes read, with an ETA.
  with tempfile.TemporaryDirectory() as download_dir:  # Nothing is downloaded; keep it out.
    try:
      builder.download_and_prepare(download_dir=download_dir)
    except AssertionError as e:  # tfds: 'Failed to finalize writing of split ...: No examples'
      empty = [split for split, n in builder.split_documents.items() if n == 0]
      if not empty:
        raise
      raise builder.empty_split_error(empty[0], data_dir) from e
  return builder


def _move_into_place(building: Path, data_dir: Path, overwrite: bool) -> None:
  """Moves the dataset built under `building` to `data_dir` (replacing a prepared one only
  with `overwrite`: without it, one there now was finished by a concurrent `prepare`, maybe
  already read by a trainer, and ours is dropped)."""
  target = dataset_dir(data_dir)
  target.parent.mkdir(parents=True, exist_ok=True)
  for extra in (building / NAME / ".config",):  # tfds' builder metadata, beside the configs
    if extra.is_dir() and not (data_dir / NAME / extra.name).exists():
      extra.rename(data_dir / NAME / extra.name)
  if target.exists():
    if is_prepared(data_dir) and not overwrite:
      return
    target.rename(building / "replaced")  # the old one goes only now, with the build folder
  dataset_dir(building).rename(target)


def _remove_abandoned_builds(data_dir: Path) -> None:
  """Removes builds left by a killed `prepare` (their lock died with it); live ones stay."""
  for path in sorted(data_dir.glob(_BUILDING_PREFIX + "*")):
    # One without a lock file yet may have been created this instant: spare it for a minute.
    unlocked = (path / dirlock.LOCK_FILE).is_file() or time.time() - path.stat().st_mtime > 60
    if path.is_dir() and unlocked and not dirlock.is_locked(path):
      print(f"Removing {path}, an unfinished dataset of an interrupted prepare_data.")
      shutil.rmtree(path, ignore_errors=True)
