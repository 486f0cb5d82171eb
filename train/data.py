"""C4 input pipeline: the T5 SentencePiece vocabulary, tfds array_record sources and grain.

Batches are `{"tokens": int32[B, L]}` with pad id 0 on the right. The model reads
`tokens[:, :-1]` and predicts `tokens[:, 1:]`; the loss ignores targets equal to 0.

Two ways to turn documents into rows of L tokens (`mode`):

* "pad", the GaLore paper's: each document is encoded, EOS (id 1) appended, then truncated or
  padded to L. A truncated document keeps EOS as its last token, as Hugging Face's T5 tokenizer
  does with `truncation=True, max_length=L, padding="max_length"` (it truncates to L - 1 tokens
  and then appends `</s>`): `Tokenizer.encode(text, max_length=L)`.
* "pack": documents, each followed by EOS, are concatenated and cut into rows of exactly L
  tokens (grain's concat-then-split), so there is no padding; a row may hold the end of one
  document and the start of the next. For training the final partial row is dropped.

Data comes from `tfds.data_source("c4/en", split=..., data_dir=...)`, which reads the
array_record files written by `python -m train.prepare_data` (see train/c4_builder.py).

Example::

  train_it = make_train_iterator(ensure_bundled_prepared(), seq_len=256, batch_size=32)
  batch = next(train_it)                   # {"tokens": int32[32, 256]}
  state = train_it.get_state()             # store with the checkpoint ...
  train_it.set_state(state)                # ... and resume on exactly the next batch.
  for batch in make_eval_batches(BUNDLED_DATA_DIR, seq_len=256, batch_size=32): ...
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import grain
import jax
import numpy as np
import sentencepiece as spm
import tensorflow_datasets as tfds
from sentencepiece import sentencepiece_model_pb2

from train import c4_builder
from train.c4_builder import BUNDLED_DATA_DIR

BUNDLED_VOCAB = c4_builder.BUNDLED_RAW_DIR / "t5_spiece.model"
Mode = Literal["pad", "pack"]
MODES = ("pad", "pack")
# Documents tokenised together before packing: concatenating them first leaves the packed
# stream unchanged and saves per-document overhead (and IPC with worker processes).
_PACK_RUN = 64

__all__ = [
  "BUNDLED_DATA_DIR",
  "BUNDLED_VOCAB",
  "Tokenizer",
  "ensure_bundled_prepared",
  "make_eval_batches",
  "make_train_iterator",
  "num_documents",
  "unigram_perplexity",
]


class Tokenizer:
  """A SentencePiece vocabulary used directly: BOS (if it has one) prepended, EOS appended.

  With the bundled T5 vocabulary (pad 0, EOS 1, no BOS), `encode` gives the ids Hugging Face's
  `T5Tokenizer` gives for the same text with its default settings (`add_special_tokens=True`),
  without the 100 `<extra_id_*>` sentinels, which C4 text never produces.

  A LLaMA-style vocabulary (`<unk>` 0, BOS 1, EOS 2, no pad piece) is accepted too: id 0 then
  pads, so `<unk>` targets are masked like pads. LLaMA's vocabularies fall back to bytes and
  never produce `<unk>`, so nothing real is masked.

  Example::

    tok = Tokenizer()
    tok.encode("Hello world")  # [8774, 296, 1]
    tok.encode("Hello world", max_length=2)  # [8774, 1]
  """

  def __init__(self, vocab_path: str | os.PathLike = BUNDLED_VOCAB):
    self.vocab_path = os.fspath(vocab_path)
    self._sp = spm.SentencePieceProcessor(model_file=self.vocab_path)
    proto = sentencepiece_model_pb2.ModelProto.FromString(self._sp.serialized_model_proto())
    # Then no piece spans a space: text up to a space encodes to a prefix of the text's ids.
    self._pieces_stop_at_spaces = proto.trainer_spec.split_by_whitespace
    unk_pads = self._sp.pad_id() < 0 and self._sp.unk_id() == 0  # LLaMA's layout
    if not (self._sp.pad_id() == 0 or unk_pads) or self._sp.eos_id() < 0:
      raise ValueError(
        f"{self.vocab_path}: the pipeline needs pad id 0, or no pad piece and <unk> at 0 (the "
        f"loss ignores targets equal to 0), and an EOS piece; this vocabulary has pad id "
        f"{self._sp.pad_id()}, <unk> id {self._sp.unk_id()}, EOS id {self._sp.eos_id()}"
      )
    self._bos = [self._sp.bos_id()] if self._sp.bos_id() >= 0 else []

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  @property
  def pad_id(self) -> int:
    return 0

  @property
  def eos_id(self) -> int:
    return self._sp.eos_id()

  def encode(self, text: str, max_length: int | None = None) -> list[int]:
    """Token ids of `text` followed by EOS, at most `max_length` of them.

    A longer result keeps its first `max_length - 1` ids and EOS, as Hugging Face's T5
    tokenizer does with `truncation=True, max_length=max_length`. Long texts are then
    tokenised only as far as needed (up to a space past ~8 characters per kept token).
    """
    if max_length is not None and self._pieces_stop_at_spaces:
      cut = text.find(" ", 8 * max_length)
      if cut > 0 and len(ids := self._bos + self._sp.encode(text[:cut])) >= max_length:
        return ids[: max_length - 1] + [self.eos_id]
    ids = self._bos + self._sp.encode(text) + [self.eos_id]
    if max_length is not None and len(ids) > max_length:
      return ids[: max_length - 1] + [self.eos_id]
    return ids

  def decode(self, ids: Iterable[int]) -> str:
    """Text of `ids`; pad and EOS decode to nothing."""
    return self._sp.decode([int(i) for i in ids])

  def __getstate__(self) -> dict[str, str]:  # Pickled by path, for grain worker processes.
    return {"vocab_path": self.vocab_path}

  def __setstate__(self, state: dict[str, str]) -> None:
    self.__init__(state["vocab_path"])


def ensure_bundled_prepared(data_dir: str | os.PathLike = BUNDLED_DATA_DIR) -> Path:
  """Prepares the bundled C4 sample into `data_dir` unless a C4 dataset is already there.

  Returns:
    `data_dir`, ready for `make_train_iterator` / `make_eval_batches`.
  """
  if not c4_builder.is_prepared(data_dir):
    summary = c4_builder.prepare(
      data_dir,
      train_patterns=[os.fspath(p) for p in c4_builder.BUNDLED_TRAIN_FILES],
      validation_patterns=[os.fspath(p) for p in c4_builder.BUNDLED_VALIDATION_FILES],
    )
    print(summary)
  return Path(data_dir)


def make_train_iterator(
  data_dir: str | os.PathLike = BUNDLED_DATA_DIR,
  *,
  split: str = "train",
  seq_len: int = 256,
  batch_size: int,
  mode: Mode = "pad",
  seed: int = 0,
  num_epochs: int | None = None,
  vocab_path: str | os.PathLike = BUNDLED_VOCAB,
  process_index: int | None = None,
  process_count: int | None = None,
  num_threads: int = 0,
  worker_count: int = 0,
) -> grain.DatasetIterator:
  """Shuffled, repeated, per-process batches for training.

  Documents are shuffled globally with `seed` and reshuffled each epoch (grain's index
  shuffle: no buffer, random access). Process `p` of `P` takes the documents `p, p + P, ...`
  of that order and batches `batch_size // P` rows, so the rows of the k-th global batch are
  the same whatever `P` is (exactly so in "pad" mode; "pack" packs each process's share).

  Args:
    data_dir: tfds data dir holding `c4/en/3.1.0` (see `python -m train.prepare_data`).
    split: tfds split name or slice, e.g. "train" or "train[:90%]".
    seq_len: tokens per row, L.
    batch_size: global rows per batch, divisible by the process count.
    mode: "pad" (one document per row, the paper's) or "pack" (see the module docstring).
    seed: shuffle seed, in [0, 2**32).
    num_epochs: passes over the documents, or None to repeat forever. A last incomplete
      batch is dropped.
    vocab_path: SentencePiece model.
    process_index: this process; defaults to `jax.process_index()`.
    process_count: number of processes; defaults to `jax.process_count()`.
    num_threads: grain prefetch threads in this process (0: none). Tokenisation holds the GIL,
      so threads rarely help; `worker_count` does.
    worker_count: grain worker processes (`mp_prefetch`) that read and tokenise; 0 for none.
      Batches do not depend on it, but a saved state restores only with the same value. Needs
      the `if __name__ == "__main__":` guard and parsed absl flags in the main program.

  Returns:
    An iterator of `{"tokens": int32[batch_size // P, seq_len]}` with `get_state()` (a small
    dict that survives a JSON round trip) and `set_state()`: restoring a state continues
    with exactly the batch that followed it. `close()` stops worker processes.
  """
  index, count = _process(process_index, process_count)
  per_process = _per_process_batch(batch_size, count)
  _check(seq_len, mode)
  tokenizer = Tokenizer(vocab_path)
  docs = grain.MapDataset.source(_data_source(data_dir, split)).shuffle(seed=seed)
  docs = docs.repeat(num_epochs)[index::count]
  read = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=max(num_threads, 1))
  workers = grain.MultiprocessingOptions(num_workers=worker_count, per_worker_buffer_size=2)
  if mode == "pad":  # Whole batches come from a worker (grain keeps their order).
    batches = docs.map(functools.partial(_pad_row, tokenizer, seq_len))
    batches = batches.batch(per_process, drop_remainder=True).to_iter_dataset(read)
    batches = batches.mp_prefetch(workers)
  else:  # Workers tokenise runs of documents; packing, which is sequential, runs here.
    docs = docs.map(functools.partial(_document, tokenizer))
    docs = docs.batch(_PACK_RUN, batch_fn=_concatenate).to_iter_dataset(read)
    rows = _pack(docs.mp_prefetch(workers), seq_len).filter(_is_full).map(_tokens_only)
    batches = rows.batch(per_process, drop_remainder=True)
  return _JsonStateIterator(iter(batches))


def make_eval_batches(
  data_dir: str | os.PathLike = BUNDLED_DATA_DIR,
  *,
  split: str = "validation",
  seq_len: int = 256,
  batch_size: int,
  mode: Mode = "pad",
  vocab_path: str | os.PathLike = BUNDLED_VOCAB,
  max_documents: int | None = None,
  process_index: int | None = None,
  process_count: int | None = None,
) -> grain.MapDataset | grain.IterDataset:
  """Every token of a split once, in stored order: not shuffled, not repeated.

  The last global batch is filled up with all-pad rows, which the loss ignores, so every
  process yields the same number of batches. In "pack" mode the last row keeps the final
  partial sequence, padded.

  Args:
    data_dir: tfds data dir holding `c4/en/3.1.0`.
    split: tfds split name or slice.
    seq_len: tokens per row, L.
    batch_size: global rows per batch, divisible by the process count.
    mode: "pad" or "pack", as in `make_train_iterator`.
    vocab_path: SentencePiece model.
    max_documents: use only the first this many documents of the split.
    process_index: this process; defaults to `jax.process_index()`.
    process_count: number of processes; defaults to `jax.process_count()`.

  Returns:
    An iterable of `{"tokens": int32[batch_size // P, seq_len]}`; in "pad" mode a
    `grain.MapDataset` whose `len()` is the number of batches. (In "pack" mode every process
    tokenises the whole split and keeps its rows of each global batch.)
  """
  index, count = _process(process_index, process_count)
  per_process = _per_process_batch(batch_size, count)
  _check(seq_len, mode)
  tokenizer = Tokenizer(vocab_path)
  docs = grain.MapDataset.source(_data_source(data_dir, split))
  if max_documents is not None:
    docs = docs[:max_documents]
  if mode == "pad":
    num_rows = math.ceil(len(docs) / batch_size) * batch_size
    rows = grain.MapDataset.range(num_rows)[index::count]
    rows = rows.map(functools.partial(_pad_row_or_blank, docs, tokenizer, seq_len))
    return rows.batch(per_process)
  docs = docs.map(functools.partial(_document, tokenizer))
  docs = docs.batch(_PACK_RUN, batch_fn=_concatenate).to_iter_dataset()
  rows = _pack(docs, seq_len).map(_tokens_only)
  take_rows = functools.partial(_rows_of_process, batch_size, seq_len, index, count)
  return rows.batch(batch_size, batch_fn=take_rows)


def unigram_perplexity(
  data_dir: str | os.PathLike = BUNDLED_DATA_DIR,
  *,
  seq_len: int = 256,
  mode: Mode = "pad",
  vocab_path: str | os.PathLike = BUNDLED_VOCAB,
  train_split: str = "train",
  eval_split: str = "validation",
  max_train_documents: int | None = 100_000,
  max_eval_documents: int | None = None,
) -> float:
  """Perplexity of the eval targets under train-split unigram frequencies: a floor to beat.

  Targets are what the loss scores: `tokens[:, 1:]` of each row, without pad (0), with the
  rows built as `make_eval_batches` builds them. With `c[v]` the count of token v among the
  train targets, `C` their total and `V` the vocabulary size, add-one smoothing gives

    p(v) = (c[v] + 1) / (C + V),   perplexity = exp(-mean over eval targets t of log p(t)).

  A model that ignores context cannot do better than about this on the eval split.

  Args:
    data_dir: tfds data dir holding `c4/en/3.1.0`.
    seq_len: tokens per row, L.
    mode: "pad" or "pack".
    vocab_path: SentencePiece model; V is its size.
    train_split: split whose targets give the frequencies.
    eval_split: split whose targets are scored.
    max_train_documents: count only the first this many train documents, in stored order
      (None: all). The default bounds the cost on full C4 (~50M tokens, about a minute) and
      covers the whole bundled sample.
    max_eval_documents: score only the first this many eval documents, as
      `make_eval_batches(max_documents=...)` (all: None).

  Returns:
    The unigram perplexity (a float > 1).
  """
  vocab_size = Tokenizer(vocab_path).vocab_size
  kwargs = dict(seq_len=seq_len, mode=mode, vocab_path=vocab_path, batch_size=64)
  kwargs.update(process_index=0, process_count=1)  # The same number on every process.
  train = _target_counts(
    make_eval_batches(data_dir, split=train_split, max_documents=max_train_documents, **kwargs),
    vocab_size,
  )
  evaluated = _target_counts(
    make_eval_batches(data_dir, split=eval_split, max_documents=max_eval_documents, **kwargs),
    vocab_size,
  )
  log_p = np.log(train + 1.0) - np.log(train.sum() + vocab_size)
  return float(np.exp(-(evaluated @ log_p) / evaluated.sum()))


def num_documents(data_dir: str | os.PathLike, split: str) -> int:
  """How many documents split `split` (a name or slice) of the C4 in `data_dir` holds."""
  try:
    return len(_data_source(data_dir, split))
  except ValueError as e:
    # tfds' array_record reader refuses a slice that selects no file ("Paths sequence can not
    # be of 0 length"); that is an empty split, not a broken one.
    if "0 length" in str(e):
      return 0
    raise


def _target_counts(batches: Iterable[Mapping[str, np.ndarray]], vocab_size: int) -> np.ndarray:
  """Counts of each token id among the non-pad targets `tokens[:, 1:]`."""
  counts = np.zeros(vocab_size, np.int64)
  for batch in batches:
    targets = batch["tokens"][:, 1:]
    counts += np.bincount(targets[targets != 0], minlength=vocab_size)
  return counts


def _process(index: int | None, count: int | None) -> tuple[int, int]:
  """This process and the process count, from jax unless given."""
  index = jax.process_index() if index is None else index
  count = jax.process_count() if count is None else count
  if not 0 <= index < count:
    raise ValueError(f"process_index {index} is not in [0, process_count={count})")
  return index, count


def _per_process_batch(batch_size: int, process_count: int) -> int:
  """The rows each process batches."""
  if batch_size <= 0 or batch_size % process_count:
    raise ValueError(
      f"batch_size {batch_size} must be a positive multiple of the process count {process_count}"
    )
  return batch_size // process_count


def _check(seq_len: int, mode: str) -> None:
  """Validates the arguments that shape rows."""
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
  if seq_len < 2:
    raise ValueError(f"seq_len must be at least 2 (one input, one target), got {seq_len}")


def _data_source(data_dir: str | os.PathLike, split: str):
  """`tfds.data_source("c4/en")`, with errors that say how to prepare the data."""
  try:
    return tfds.data_source("c4/en", split=split, data_dir=os.fspath(data_dir), download=False)
  except Exception as e:
    version_dir = c4_builder.dataset_dir(data_dir)
    if any(version_dir.glob("*.tfrecord*")):
      raise FileNotFoundError(
        f"{version_dir} holds C4 as TFRecord, which needs TensorFlow to read. Add array_record "
        "shards beside them once, in an environment with `pip install tensorflow-cpu "
        "tensorflow-datasets apache-beam mlcroissant`: tfds convert_format "
        f"--dataset_version_dir={version_dir} --out_file_format=array_record"
      ) from e
    if not c4_builder.is_prepared(data_dir):
      raise FileNotFoundError(
        f"No prepared C4 dataset in {os.fspath(data_dir)!r} (looked for {version_dir}). "
        "Prepare it with `python -m train.prepare_data "
        f"--output_dir={os.fspath(data_dir)} --train=GLOB --validation=GLOB`, or "
        f"`python -m train.prepare_data --bundled --output_dir={os.fspath(data_dir)}` for the "
        "sample bundled in data/."
      ) from e
    raise


def _text(example: Mapping[str, Any]) -> str:
  """A record's text: bytes from array_record files, str from `tfds.testing.mock_data`."""
  text = example["text"]
  return text.decode("utf-8") if isinstance(text, bytes) else text


def _pad_row(tokenizer: Tokenizer, seq_len: int, example: Mapping[str, Any]) -> dict:
  """One document as `{"tokens": int32[L]}`: ids + EOS, truncated keeping EOS last, or padded."""
  ids = tokenizer.encode(_text(example), max_length=seq_len)
  row = np.full((seq_len,), tokenizer.pad_id, np.int32)
  row[: len(ids)] = ids
  return {"tokens": row}


def _pad_row_or_blank(docs: grain.MapDataset, tokenizer: Tokenizer, seq_len: int, i: int) -> dict:
  """Row `i` of the eval rows: document `i` as in `_pad_row`, all pad past the last one."""
  if i < len(docs):
    return _pad_row(tokenizer, seq_len, docs[i])
  return {"tokens": np.full((seq_len,), tokenizer.pad_id, np.int32)}


def _document(tokenizer: Tokenizer, example: Mapping[str, Any]) -> dict:
  """One document as `{"tokens": int32[n]}`, ids + EOS, for packing."""
  return {"tokens": np.asarray(tokenizer.encode(_text(example)), np.int32)}


def _concatenate(docs: list[Mapping[str, np.ndarray]]) -> dict:
  """Several tokenised documents as one run, `{"tokens": int32[n]}`."""
  return {"tokens": np.concatenate([d["tokens"] for d in docs])}


def _pack(docs: grain.IterDataset, seq_len: int) -> grain.IterDataset:
  """Concatenates documents and cuts rows of `seq_len`; a final partial row is zero-padded."""
  return grain.experimental.ConcatThenSplitIterDataset(docs, length_struct={"tokens": seq_len})


def _is_full(row: Mapping[str, np.ndarray]) -> bool:
  """Whether a packed row has no padding (segment id 0 marks padding)."""
  return bool(row["tokens_segment_ids"][-1])


def _tokens_only(row: Mapping[str, np.ndarray]) -> dict:
  """Drops the packer's segment ids and positions."""
  return {"tokens": row["tokens"]}


def _rows_of_process(
  batch_size: int, seq_len: int, index: int, count: int, rows: list[Mapping[str, np.ndarray]]
) -> dict:
  """A global eval batch, filled up with pad rows, reduced to the rows of process `index`."""
  tokens = np.zeros((batch_size, seq_len), np.int32)
  tokens[: len(rows)] = np.stack([r["tokens"] for r in rows])
  return {"tokens": tokens[index::count]}


class _JsonStateIterator(grain.DatasetIterator):
  """Passes batches through; makes states survive the JSON round trip of checkpoints.

  grain's concat-then-split packer marks empty slices with the tuple (-1, -1) and compares
  restored states against that tuple, but JSON (grain's own orbax handler, or ours) turns it
  into the list [-1, -1], which then restores the wrong position. Lists become tuples here.
  """

  def __init__(self, parent: grain.DatasetIterator):
    super().__init__(parent)

  def __next__(self) -> dict:
    return next(self._parent)

  def get_state(self) -> dict[str, Any]:
    return self._parent.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(_slices_as_tuples(state))


def _slices_as_tuples(state: Any) -> Any:
  """`state` with the packer's `remainder_slices` values as tuples, at any depth."""
  if not isinstance(state, Mapping):
    return state
  return {
    k: ({f: tuple(s) for f, s in v.items()} if k == "remainder_slices" else _slices_as_tuples(v))
    for k, v in state.items()
  }
