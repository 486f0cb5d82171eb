"""Writes a tiny random LLaMA checkpoint directory, as Hugging Face lays one out, for trying
`--config.init_from` without downloading anything.

  python -m train.tiny_checkpoint --output_dir=/tmp/tiny-llama

The directory gets `config.json`, `model.safetensors` (written by
`train.checkpoint_io.save_hf_pretrained`, no torch needed) and a `tokenizer.model`: a
SentencePiece vocabulary with LLaMA's special ids (`<unk>` 0, `<s>` 1, `</s>` 2, no pad, byte
fallback), trained here on the bundled C4 training text. The model has grouped-query attention
(4 query heads, 2 key/value heads), so fine-tuning it exercises the same code as LLaMA-3 or
Mistral checkpoints do.
"""

from __future__ import annotations

import gzip
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path

import sentencepiece as spm
from absl import app, flags
from flax import nnx

from train import c4_builder
from train.checkpoint_io import TOKENIZER_FILE, save_hf_pretrained
from train.model import Llama, LlamaConfig

_OUT = flags.DEFINE_string("output_dir", None, "Directory to write the checkpoint to.")
_VOCAB = flags.DEFINE_integer("vocab_size", 1024, "SentencePiece vocabulary size.")
_SEED = flags.DEFINE_integer("seed", 0, "Model init seed.")


def _texts(max_docs: int = 2000) -> Iterator[str]:
  """Documents of the bundled C4 training files."""
  n = 0
  for file in c4_builder.BUNDLED_TRAIN_FILES:
    opener = gzip.open if file.suffix == ".gz" else open
    with opener(file, "rt", encoding="utf-8") as f:
      for line in f:
        yield json.loads(line)["text"]
        n += 1
        if n >= max_docs:
          return


def train_llama_style_tokenizer(path: str | os.PathLike, vocab_size: int) -> Path:
  """A SentencePiece BPE model with LLaMA's special ids, trained on the bundled C4 text."""
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
    sentence_iterator=_texts(),
    model_writer=model,
    vocab_size=vocab_size,
    model_type="bpe",
    unk_id=0,
    bos_id=1,
    eos_id=2,
    pad_id=-1,
    byte_fallback=True,  # as LLaMA's: nothing encodes to <unk>
    character_coverage=0.9995,
    num_threads=1,  # deterministic
    minloglevel=2,
  )
  Path(path).write_bytes(model.getvalue())
  return Path(path)


def tiny_config(vocab_size: int) -> LlamaConfig:
  """D 64, F 176, 4 query / 2 key-value heads (K 16), 2 layers."""
  return LlamaConfig(
    vocab_size=vocab_size,
    hidden_dim=64,
    mlp_dim=176,
    num_heads=4,
    num_kv_heads=2,
    num_layers=2,
    rms_norm_eps=1e-5,  # LLaMA-2/3's value
    rope_base=10000.0,
  )


def write_tiny_checkpoint(path: str | os.PathLike, vocab_size: int = 1024, seed: int = 0) -> Path:
  """Writes the checkpoint directory (see the module docstring); returns it."""
  path = Path(path)
  path.mkdir(parents=True, exist_ok=True)
  tokenizer = train_llama_style_tokenizer(path / TOKENIZER_FILE, vocab_size)
  size = spm.SentencePieceProcessor(model_file=os.fspath(tokenizer)).get_piece_size()
  config = tiny_config(size)
  return save_hf_pretrained(config, Llama(config, rngs=nnx.Rngs(seed)), path)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  path = write_tiny_checkpoint(_OUT.value, _VOCAB.value, _SEED.value)
  print(f"Wrote a tiny LLaMA checkpoint to {path}: {sorted(p.name for p in path.iterdir())}")


if __name__ == "__main__":
  flags.mark_flag_as_required("output_dir")
  app.run(main)
