"""Tests for the C4 pipeline: prepare (train/c4_builder.py, train/prepare_data.py) and read
(train/data.py): bad data, exact token rows in both modes, shuffling, sharding, resume, eval
coverage, the unigram floor, the bundled sample and tfds.testing.mock_data. No network."""

import gzip
import hashlib
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import tensorflow_datasets as tfds
from absl import flags

from train import c4_builder, data

SP = spm.SentencePieceProcessor(model_file=os.fspath(data.BUNDLED_VOCAB))
REPO = Path(__file__).resolve().parent.parent

# Hand-written documents: short, long (truncated at small L), special-token lookalikes, URL and
# non-ASCII text.
DOCS = [
  "Hello world",
  "The quick brown fox jumps over the lazy dog. " * 3,
  "A cat.",
  "Tokens like </s> and <pad> in text are plain text, not special ids.",
  "https://example.com/a/b and café ½ “quotes”",
  "Short.",
  "One more document to make the packed stream longer than a few rows.",
]


def _ids(text):
  """What the pipeline must produce for one document: sentencepiece ids + EOS."""
  return SP.encode(text) + [1]


def _write_jsonl(path, records, *, gz=False):
  """Writes JSON lines (records that are `bytes` are written as they are)."""
  lines = [r if isinstance(r, bytes) else json.dumps(r).encode() for r in records]
  payload = b"\n".join(lines) + b"\n"
  path.write_bytes(gzip.compress(payload) if gz else payload)
  return path


def _prepare(tmp_path, train_docs, validation_docs):
  """Prepares text-only documents as c4/en under tmp_path/tfds; returns the data dir."""
  train = _write_jsonl(tmp_path / "train.jsonl", [{"text": t} for t in train_docs])
  valid = _write_jsonl(tmp_path / "valid.jsonl", [{"text": t} for t in validation_docs])
  c4_builder.prepare(
    tmp_path / "tfds", train_patterns=[str(train)], validation_patterns=[str(valid)]
  )
  return tmp_path / "tfds"


@pytest.fixture(scope="module")
def hand_dir(tmp_path_factory):
  """The hand-written documents as both splits (validation in reverse order)."""
  return _prepare(tmp_path_factory.mktemp("hand"), DOCS, DOCS[::-1])


def _all_batches(batches):
  return [np.asarray(b["tokens"]) for b in batches]


# --- Tokenizer ---------------------------------------------------------------------------------


def test_tokenizer_is_sentencepiece_plus_eos():
  tok = data.Tokenizer()
  assert (tok.vocab_size, tok.pad_id, tok.eos_id) == (32000, 0, 1)
  assert tok.encode("Hello world") == [8774, 296, 1]  # T5's ids for this text.
  for text in DOCS:
    assert tok.encode(text) == SP.encode(text) + [1]
  assert tok.decode(tok.encode("Hello world") + [0, 0]) == "Hello world"


def test_truncated_encode_is_exact_on_the_bundled_documents():
  # `encode(text, max_length=L)` tokenises only a prefix of long texts; it must give what
  # truncating the full encoding gives (HF T5: first L - 1 ids, then EOS).
  files = (*c4_builder.BUNDLED_TRAIN_FILES, *c4_builder.BUNDLED_VALIDATION_FILES)
  texts = [record["text"] for f in files for _, record in c4_builder.read_c4_json(f)]
  tok = data.Tokenizer()
  for text in texts:
    ids = _ids(text)
    for max_length in (16, 256):
      expected = ids if len(ids) <= max_length else ids[: max_length - 1] + [1]
      assert tok.encode(text, max_length=max_length) == expected


# --- Prepare: the three input shapes and bad data ----------------------------------------------


def _three_shapes(tmp_path):
  """Small files shaped like the three bundled ones, with bad records in known places."""
  gz = _write_jsonl(
    tmp_path / "c4-train.00000-of-01024.json.gz",
    [
      {"text": "First allenai doc.", "timestamp": "2019-04-25T12:57:54Z", "url": "https://a.b/1"},
      b'{"text": "broken json',  # line 2: malformed
      {"text": "   \n "},  # line 3: whitespace only
      b'{"text": "caf\xe9 latin-1", "url": "https://a.b/2"}',  # line 4: not UTF-8
      {"text": "Last allenai doc.", "timestamp": "2019-04-26T01:02:03Z", "url": "https://a.b/3"},
    ],
    gz=True,
  )
  jsonl = _write_jsonl(
    tmp_path / "olmo_style.jsonl",
    [
      {"text": "Doc with date.", "date": "2019-04-21T18:54:04Z", "url": "https://c.d/x"},
      b'{"text":"Escaped \\/ slash","timestamp":"2019-04-25 12:57:54","url":"https:\\/\\/e.f\\/"}',
      b"[1, 2, 3]",  # line 3: JSON but not an object with text
      {"text": "Surrogate \ud800 escape"},  # line 4: lone surrogate, json writes \ud800
    ],
  )
  text_only = _write_jsonl(tmp_path / "demo.json", [{"text": "Only text here."}])
  return gz, jsonl, text_only


def test_prepare_reads_all_shapes_and_counts_bad_records(tmp_path):
  gz, jsonl, text_only = _three_shapes(tmp_path)
  summary = c4_builder.prepare(
    tmp_path / "tfds", train_patterns=[str(gz), str(jsonl)], validation_patterns=[str(text_only)]
  )
  assert summary.documents == {"train": 6, "validation": 1}
  t = summary.totals()
  assert (t.documents, t.malformed, t.empty, t.non_utf8) == (7, 2, 1, 2)
  assert "2 malformed" in str(summary) and "1 empty" in str(summary)

  train = tfds.data_source("c4/en", split="train", data_dir=str(tmp_path / "tfds"), download=False)
  keys = ("text", "url", "timestamp")
  got = [{k: train[i][k].decode() for k in keys} for i in range(len(train))]
  assert got == [  # In input order; `date` read as timestamp, C4's timestamp format restored.
    {"text": "First allenai doc.", "url": "https://a.b/1", "timestamp": "2019-04-25T12:57:54Z"},
    {"text": "caf\ufffd latin-1", "url": "https://a.b/2", "timestamp": ""},
    {"text": "Last allenai doc.", "url": "https://a.b/3", "timestamp": "2019-04-26T01:02:03Z"},
    {"text": "Doc with date.", "url": "https://c.d/x", "timestamp": "2019-04-21T18:54:04Z"},
    {"text": "Escaped / slash", "url": "https://e.f/", "timestamp": "2019-04-25T12:57:54Z"},
    {"text": "Surrogate \ufffd escape", "url": "", "timestamp": ""},
  ]
  valid = tfds.data_source("c4/en", split="validation", data_dir=str(tmp_path / "tfds"))
  assert [v["text"] for v in valid] == [b"Only text here."]
  assert valid[0]["url"] == b"" and valid[0]["timestamp"] == b""


@pytest.mark.parametrize(
  ("file_index", "line", "what"),
  [
    (0, 2, "malformed record"),
    (0, 3, "empty document"),
    (0, 4, "invalid UTF-8"),
    (1, 3, "malformed record"),
    (1, 4, "invalid Unicode"),
  ],
)
def test_strict_mode_names_file_and_line(tmp_path, file_index, line, what):
  bad = _three_shapes(tmp_path)[file_index]
  # The bad line at the same line number, after good ones only: it is the first error.
  raw = bad.read_bytes()
  bad_line = (gzip.decompress(raw) if bad.suffix == ".gz" else raw).split(b"\n")[line - 1]
  lines = [{"text": "fine"}] * (line - 1) + [bad_line]
  cut = _write_jsonl(tmp_path / f"cut{bad.suffix}", lines, gz=bad.suffix == ".gz")
  valid = _write_jsonl(tmp_path / "valid.jsonl", [{"text": "fine"}])
  with pytest.raises(c4_builder.BadRecordError, match=re.escape(f"{cut}:{line}: {what}")):
    c4_builder.prepare(
      tmp_path / "tfds", train_patterns=[str(cut)], validation_patterns=[str(valid)], strict=True
    )


def test_missing_inputs_are_clear_errors(tmp_path):
  valid = _write_jsonl(tmp_path / "v.jsonl", [{"text": "v"}])
  with pytest.raises(FileNotFoundError, match=re.escape("'/nowhere/*.json.gz' matched no files")):
    c4_builder.prepare(tmp_path, train_patterns=["/nowhere/*.json.gz"], validation_patterns=[])
  with pytest.raises(FileNotFoundError, match="not found: '/nowhere/c4.jsonl'"):
    c4_builder.prepare(
      tmp_path, train_patterns=["/nowhere/c4.jsonl"], validation_patterns=[str(valid)]
    )
  with pytest.raises(ValueError, match="No validation inputs"):
    c4_builder.prepare(tmp_path, train_patterns=[str(valid)])


def test_reading_unprepared_dir_says_how_to_prepare(tmp_path):
  with pytest.raises(FileNotFoundError, match="python -m train.prepare_data"):
    data.make_train_iterator(tmp_path / "empty", batch_size=2)
  # C4 prepared by TensorFlow's tfds as TFRecord: say how to add array_record shards.
  version_dir = c4_builder.dataset_dir(tmp_path)
  version_dir.mkdir(parents=True)
  (version_dir / "c4-train.tfrecord-00000-of-00001").touch()
  with pytest.raises(FileNotFoundError, match="tfds convert_format --dataset_version_dir="):
    data.make_eval_batches(tmp_path, batch_size=2)


def test_validation_fraction_is_a_deterministic_partition(tmp_path):
  docs = [f"document number {i}" for i in range(200)]
  train = _write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in docs])
  summary = c4_builder.prepare(
    tmp_path / "tfds", train_patterns=[str(train)], validation_fraction=0.25
  )
  read = lambda split: tfds.data_source("c4/en", split=split, data_dir=str(summary.data_dir))
  split = {s: [x["text"].decode() for x in read(s)] for s in c4_builder.SPLITS}
  assert sorted(split["train"] + split["validation"]) == sorted(docs)
  assert split["validation"] == [t for t in docs if c4_builder.in_validation_fraction(t, 0.25)]
  assert 30 <= len(split["validation"]) <= 70  # 50 expected; binomial sd ~6.


def test_cli_help_and_strict_failure(tmp_path):
  run = lambda *a: subprocess.run(
    [sys.executable, "-m", "train.prepare_data", *a], capture_output=True, text=True, cwd=REPO
  )
  usage = run("--help")  # absl exits with status 1 after printing help.
  assert "--validation_fraction" in usage.stdout and "python -m train.prepare_data" in usage.stdout
  bad = _write_jsonl(tmp_path / "bad.jsonl", [{"text": "ok"}, b"{nope"])
  result = run(f"--output_dir={tmp_path}", f"--train={bad}", f"--validation={bad}", "--strict")
  assert result.returncode == 1
  assert "Files given as both train and validation" in result.stderr
  good = _write_jsonl(tmp_path / "good.jsonl", [{"text": "ok"}])
  result = run(f"--output_dir={tmp_path}", f"--train={bad}", f"--validation={good}", "--strict")
  assert result.returncode == 1 and f"{bad}:2: malformed record" in result.stderr


# --- Tokenisation modes: exact rows ------------------------------------------------------------


@pytest.mark.parametrize("seq_len", [6, 12, 64])
def test_pad_mode_rows_are_exact(hand_dir, seq_len):
  (tokens,) = _all_batches(
    data.make_eval_batches(hand_dir, split="train", seq_len=seq_len, batch_size=8, mode="pad")
  )
  assert tokens.dtype == np.int32 and tokens.shape == (8, seq_len)
  for row, text in zip(tokens, DOCS):
    ids = _ids(text)
    if len(ids) > seq_len:  # Truncated like HF T5 (truncation=True): EOS kept as last token.
      ids = ids[: seq_len - 1] + [1]
    np.testing.assert_array_equal(row, ids + [0] * (seq_len - len(ids)))
  np.testing.assert_array_equal(tokens[len(DOCS) :], 0)  # The batch is filled with pad rows.


@pytest.mark.parametrize("seq_len", [5, 16])
def test_pack_mode_rows_are_exact(hand_dir, seq_len):
  stream = [i for text in DOCS for i in _ids(text)]
  rows = np.concatenate(
    _all_batches(
      data.make_eval_batches(hand_dir, split="train", seq_len=seq_len, batch_size=4, mode="pack")
    )
  )
  num_rows = math.ceil(len(stream) / seq_len)
  expected = np.zeros((math.ceil(num_rows / 4) * 4, seq_len), np.int32)
  expected.reshape(-1)[: len(stream)] = stream  # Eval keeps the final partial row, padded.
  np.testing.assert_array_equal(rows, expected)

  # Training packs the shuffled documents; pad mode with the same seed shows their order
  # (no document of DOCS is truncated at 64). The final partial row is dropped.
  epoch = dict(split="train", batch_size=1, seed=3, num_epochs=1)
  shuffled = np.concatenate(
    _all_batches(data.make_train_iterator(hand_dir, seq_len=64, mode="pad", **epoch))
  )
  shuffled = shuffled[shuffled != 0]
  assert sorted(shuffled.tolist()) == sorted(stream) and shuffled.tolist() != stream
  packed = _all_batches(data.make_train_iterator(hand_dir, seq_len=seq_len, mode="pack", **epoch))
  full = len(stream) // seq_len * seq_len
  np.testing.assert_array_equal(np.concatenate(packed).reshape(-1), shuffled[:full])


def test_pad_mode_matches_hugging_face_t5_tokenizer(tmp_path):
  transformers = pytest.importorskip("transformers")
  (tmp_path / "t5").mkdir()
  (tmp_path / "t5" / "spiece.model").write_bytes(data.BUNDLED_VOCAB.read_bytes())
  hf = transformers.T5Tokenizer.from_pretrained(str(tmp_path / "t5"))
  texts = [json.loads(line)["text"] for line in (REPO / "data/c4_demo.jsonl").open()][:100]
  prepared = _prepare(tmp_path, texts[:4], texts)
  ours = np.concatenate(
    _all_batches(data.make_eval_batches(prepared, seq_len=256, batch_size=100, mode="pad"))
  )
  theirs = hf(texts, truncation=True, max_length=256, padding="max_length")["input_ids"]
  np.testing.assert_array_equal(ours, theirs)


# --- Training iterator: shuffling, epochs, sharding, resume ------------------------------------


def _take(iterator, n):
  return [next(iterator)["tokens"] for _ in range(n)]


@pytest.mark.parametrize("mode", data.MODES)
def test_seeded_shuffle_is_deterministic(hand_dir, mode):
  make = lambda seed: data.make_train_iterator(
    hand_dir, seq_len=8, batch_size=2, mode=mode, seed=seed
  )
  first = _take(make(0), 12)
  for a, b in zip(first, _take(make(0), 12)):
    np.testing.assert_array_equal(a, b)
  assert any((a != b).any() for a, b in zip(first, _take(make(1), 12)))


def test_pad_mode_epochs_cover_each_document_once_and_reshuffle(hand_dir):
  it = data.make_train_iterator(hand_dir, seq_len=64, batch_size=1, seed=0, num_epochs=2)
  rows = [tuple(b["tokens"][0]) for b in it]
  assert len(rows) == 2 * len(DOCS)
  first, second = rows[: len(DOCS)], rows[len(DOCS) :]
  assert sorted(first) == sorted(second) and len(set(first)) == len(DOCS)
  assert first != second  # Each epoch has its own order.


def test_processes_split_each_global_batch(hand_dir):
  kwargs = dict(seq_len=16, batch_size=4, mode="pad", seed=5)
  single = _take(data.make_train_iterator(hand_dir, **kwargs), 6)
  shards = [
    _take(data.make_train_iterator(hand_dir, process_index=p, process_count=2, **kwargs), 6)
    for p in range(2)
  ]
  for k, batch in enumerate(single):
    assert shards[0][k].shape == (2, 16)
    # Row j of the global batch is row j // 2 of process j % 2.
    np.testing.assert_array_equal(batch, np.stack([shards[j % 2][k][j // 2] for j in range(4)]))
  with pytest.raises(ValueError, match="multiple of the process count"):
    data.make_train_iterator(hand_dir, batch_size=3, process_index=0, process_count=2)


@pytest.mark.parametrize("mode", data.MODES)
@pytest.mark.parametrize("after", [0, 1, 3])
def test_resume_continues_with_the_next_batch(hand_dir, mode, after):
  make = lambda: data.make_train_iterator(hand_dir, seq_len=8, batch_size=2, mode=mode, seed=7)
  uninterrupted = _take(make(), after + 5)
  it = make()
  _take(it, after)
  state = json.loads(json.dumps(it.get_state()))  # As a checkpoint stores it.
  restored = make()
  restored.set_state(state)
  for a, b in zip(uninterrupted[after:], _take(restored, 5)):
    np.testing.assert_array_equal(a, b)


# --- Eval batches and the unigram floor --------------------------------------------------------


@pytest.mark.parametrize(("mode", "seq_len"), [("pad", 64), ("pack", 16)])
def test_eval_batches_cover_every_token_once_on_every_process(hand_dir, mode, seq_len):
  stream = [i for text in DOCS[::-1] for i in _ids(text)]  # Validation is DOCS reversed.
  shards = [
    _all_batches(
      data.make_eval_batches(
        hand_dir, seq_len=seq_len, batch_size=2, mode=mode, process_index=p, process_count=2
      )
    )
    for p in range(2)
  ]
  assert len(shards[0]) == len(shards[1]) > 1  # Processes step together.
  # Row j of the global batch is row j // 2 of process j % 2 (here: row 0 of process j).
  rows = np.concatenate([np.concatenate([a, b]) for a, b in zip(*shards)])
  assert rows[rows != 0].tolist() == stream  # seq_len 64 truncates none of DOCS in pad mode.
  if mode == "pad":
    assert (rows[:, 0] != 0).sum() == len(DOCS)


def test_unigram_perplexity_matches_hand_count(hand_dir):
  seq_len = 12
  train = [
    (_ids(t)[: seq_len - 1] + [1])[1:] if len(_ids(t)) > seq_len else _ids(t)[1:] for t in DOCS
  ]
  counts = np.bincount(np.concatenate(train), minlength=32000)
  p = (counts + 1) / (counts.sum() + 32000)  # Add-one smoothing over the 32,000 ids.
  targets = np.concatenate(train[::-1])  # Validation: the same rows, reversed.
  expected = np.exp(-np.mean(np.log(p[targets])))
  got = data.unigram_perplexity(hand_dir, seq_len=seq_len, mode="pad")
  np.testing.assert_allclose(got, expected, rtol=1e-12)  # Same float64 sums, reordered.


# --- The bundled sample ------------------------------------------------------------------------

# From data/README.md; the files must stay byte-for-byte copies of their sources.
BUNDLED_SHA256 = {
  "c4-sample.00000-of-00001.json.gz": "75cdeb8bacc1fd115eaf338290fc7c6ac60e48c9f88d12250511666a201eee1c",  # noqa: E501
  "c4_en_train00000_first1000.jsonl": "cdd5b754119131d2934e3e799a059a9d64f53a6aac9e7e2ef79b43120bb01a32",  # noqa: E501
  "c4_demo.jsonl": "f51528081ef22279f2840c02c4cd7cdfc372138be0817c5b8714d200af692b78",
  "t5_spiece.model": "d60acb128cf7b7f2536e8f38a5b18a05535c9e14c7a355904270e15b0945ea86",
}


def test_bundled_files_are_unchanged():
  for name, digest in BUNDLED_SHA256.items():
    assert hashlib.sha256((REPO / "data" / name).read_bytes()).hexdigest() == digest, name


def test_bundled_sample_prepares_and_reads(tmp_path):
  data_dir = data.ensure_bundled_prepared(tmp_path / "tfds")
  assert c4_builder.is_prepared(data_dir)
  # Golden counts of the bundled sample (T5 vocabulary, EOS per document). If the sample or
  # the tokenisation changes on purpose, re-count and update them here and in data/README.md.
  expected = {  # split: (documents, tokens with EOS, non-pad tokens in pad mode at L=256)
    "train": (2000, 1_020_747, 392_668),
    "validation": (300, 171_730, 59_845),
  }
  for split, (docs, total, non_pad) in expected.items():
    batches = _all_batches(
      data.make_eval_batches(data_dir, split=split, seq_len=256, batch_size=500, mode="pad")
    )
    rows = np.concatenate(batches)
    assert (rows[:, 0] != 0).sum() == docs
    assert (rows != 0).sum() == non_pad, split
    src = tfds.data_source("c4/en", split=split, data_dir=str(data_dir))
    assert sum(len(_ids(x["text"].decode())) for x in src) == total, split
  it = data.make_train_iterator(data_dir, seq_len=256, batch_size=4, mode="pack")
  assert next(it)["tokens"].shape == (4, 256)
  assert data.ensure_bundled_prepared(data_dir) == data_dir  # Already there: no-op.


# --- tfds.testing.mock_data --------------------------------------------------------------------


@pytest.mark.parametrize("mode", data.MODES)
def test_pipeline_on_tfds_mock_data(tmp_path, mode):
  # Registers tfds's canonical `c4` builder (no TensorFlow needed), which mock_data fakes from
  # its features; without it tfds does not know "c4" unless a prepared dir is found. Tests above
  # read prepared dirs without the registration, as a user without it does.
  import tensorflow_datasets.text.c4  # noqa: F401

  with tfds.testing.mock_data(num_examples=20, policy=tfds.testing.MockPolicy.USE_CODE):
    batch = next(data.make_train_iterator(tmp_path, seq_len=32, batch_size=4, mode=mode))
    evaluated = _all_batches(data.make_eval_batches(tmp_path, seq_len=32, batch_size=8))
  assert set(batch) == {"tokens"}
  assert batch["tokens"].shape == (4, 32) and batch["tokens"].dtype == np.int32
  assert [b.shape for b in evaluated] == [(8, 32)] * 3  # 20 documents, padded to 24 rows.
  assert (batch["tokens"][:, 0] != 0).all()


@pytest.mark.slow
def test_worker_processes_change_nothing_but_speed(hand_dir):
  flags.FLAGS.mark_as_parsed()  # grain's workers read absl flags; pytest parses none.
  for mode in data.MODES:
    make = lambda workers, mode=mode: data.make_train_iterator(
      hand_dir, seq_len=8, batch_size=2, mode=mode, seed=1, worker_count=workers
    )
    expected = _take(make(0), 8)
    it = make(2)
    got = _take(it, 4)
    state = json.loads(json.dumps(it.get_state()))
    it.close()
    restored = make(2)
    restored.set_state(state)
    got += _take(restored, 4)
    restored.close()
    for a, b in zip(expected, got):
      np.testing.assert_array_equal(a, b)
