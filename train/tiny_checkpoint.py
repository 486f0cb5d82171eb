"""Writes a tiny random LLaMA checkpoint directory, as Hugging Face lays one out, for trying
`--config.init_from` without downloading anything.

  python -m train.tiny_checkpoint --output_dir=/tmp/tiny-llama

The directory gets `config.json`, `model.safetensors` (written by
`train.checkpoint_io.save_hf_pretrained`, no torch needed) and a tokenizer trained here on the
bundled C4 training text:

* `--tokenizer=sentencepiece` (default): a `tokenizer.model` with LLaMA-2's special ids
  (`<unk>` 0, `<s>` 1, `</s>` 2, no pad, byte fallback);
* `--tokenizer=bpe`: LLaMA-3's layout: a byte-level BPE `tokenizer.json` (LLaMA-3's
  pre-tokenizer regex; id 0 is an ordinary token; the special tokens `<|begin_of_text|>`,
  `<|eot_id|>`, ... after the merges; BOS added by the post-processor), a
  `tokenizer_config.json` with BOS/EOS and LLaMA-3-Instruct's chat template, and a
  `generation_config.json` whose EOS ids end a reply; rope base 500,000 as LLaMA-3's.

The model has grouped-query attention (4 query heads, 2 key/value heads), so fine-tuning it
exercises the same code as LLaMA-3 or Mistral checkpoints do.

It lives in the trainer (not in `tests/`) because users run it: `train/finetune_example.py`
builds its base checkpoint with `write_tiny_checkpoint`, and the fine-tuning guide
(`docs/trainer.md`, `configs/finetune.py`) starts from `python -m train.tiny_checkpoint`. The
tests reuse its tokenizer builders.
"""

from __future__ import annotations

import gzip
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path

import sentencepiece as spm
import tokenizers
from absl import app, flags
from flax import nnx

from train import c4_builder
from train.checkpoint_io import TOKENIZER_FILE, save_hf_pretrained
from train.model import Llama, LlamaConfig

_OUT = flags.DEFINE_string("output_dir", None, "Directory to write the checkpoint to.")
_VOCAB = flags.DEFINE_integer("vocab_size", 1024, "SentencePiece vocabulary size.")
_SEED = flags.DEFINE_integer("seed", 0, "Model init seed.")
_TOKENIZER = flags.DEFINE_enum(
  "tokenizer", "sentencepiece", ["sentencepiece", "bpe"], "tokenizer.model or tokenizer.json."
)

# LLaMA-3's pre-tokenizer split (tokenizer.json of Meta-Llama-3): contractions, letter runs,
# numbers of up to 3 digits, punctuation runs, newlines, spaces.
LLAMA3_SPLIT = (
  r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
  r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
BOS, END_OF_TEXT, EOT = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"
HEADER_START, HEADER_END = "<|start_header_id|>", "<|end_header_id|>"
LLAMA3_SPECIALS = (BOS, END_OF_TEXT, HEADER_START, HEADER_END, EOT)
# The chat template of Meta-Llama-3-8B-Instruct's tokenizer_config.json.
LLAMA3_CHAT_TEMPLATE = (
  "{% set loop_messages = messages %}{% for message in loop_messages %}"
  "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
  "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
  "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
  "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
  "{% endif %}"
)


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


def train_llama3_style_tokenizer(path: str | os.PathLike, vocab_size: int) -> Path:
  """Writes LLaMA-3's tokenizer files into directory `path` (see the module docstring), with
  a byte-level BPE of `vocab_size` ids before the special tokens, trained on the bundled C4."""
  path = Path(path)
  path.mkdir(parents=True, exist_ok=True)
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Sequence(
    [
      tokenizers.pre_tokenizers.Split(tokenizers.Regex(LLAMA3_SPLIT), behavior="isolated"),
      tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ]
  )
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
    vocab_size=vocab_size,
    initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
  )
  tok.train_from_iterator(_texts(), trainer)
  tok.add_special_tokens(list(LLAMA3_SPECIALS))  # ids after the merges, as LLaMA-3's 128000+
  bos = tok.token_to_id(BOS)
  tok.post_processor = tokenizers.processors.Sequence(
    [
      tokenizers.processors.ByteLevel(trim_offsets=False),
      tokenizers.processors.TemplateProcessing(
        single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1", special_tokens=[(BOS, bos)]
      ),
    ]
  )
  tok.save(os.fspath(path / "tokenizer.json"))
  config = {
    "bos_token": BOS,
    "eos_token": EOT,
    "chat_template": LLAMA3_CHAT_TEMPLATE,
    "clean_up_tokenization_spaces": False,
    "model_max_length": 8192,
    "tokenizer_class": "PreTrainedTokenizerFast",
  }
  (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
  eos_ids = [tok.token_to_id(t) for t in (END_OF_TEXT, EOT)]
  generation = {"bos_token_id": bos, "eos_token_id": eos_ids}
  (path / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
  return path / "tokenizer.json"


def tiny_config(vocab_size: int, **overrides) -> LlamaConfig:
  """D 64, F 176, 4 query / 2 key-value heads (K 16), 2 layers."""
  return LlamaConfig(
    vocab_size=vocab_size,
    hidden_dim=64,
    mlp_dim=176,
    num_heads=4,
    num_kv_heads=2,
    num_layers=2,
    rms_norm_eps=1e-5,  # LLaMA-2/3's value
    **{"rope_base": 10000.0, **overrides},
  )


def write_tiny_checkpoint(
  path: str | os.PathLike, vocab_size: int = 1024, seed: int = 0, tokenizer: str = "sentencepiece"
) -> Path:
  """Writes the checkpoint directory (see the module docstring); returns it.

  `tokenizer`: "sentencepiece" (`tokenizer.model`, LLaMA-2's layout) or "bpe" (LLaMA-3's).
  """
  path = Path(path)
  path.mkdir(parents=True, exist_ok=True)
  if tokenizer == "bpe":
    file = train_llama3_style_tokenizer(path, vocab_size)
    size = tokenizers.Tokenizer.from_file(os.fspath(file)).get_vocab_size(with_added_tokens=True)
    config = tiny_config(size, rope_base=500000.0)
  elif tokenizer == "sentencepiece":
    file = train_llama_style_tokenizer(path / TOKENIZER_FILE, vocab_size)
    config = tiny_config(spm.SentencePieceProcessor(model_file=os.fspath(file)).get_piece_size())
  else:
    raise ValueError(f"tokenizer={tokenizer!r} is not 'sentencepiece' or 'bpe'")
  return save_hf_pretrained(config, Llama(config, rngs=nnx.Rngs(seed)), path)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  path = write_tiny_checkpoint(_OUT.value, _VOCAB.value, _SEED.value, _TOKENIZER.value)
  print(f"Wrote a tiny LLaMA checkpoint to {path}: {sorted(p.name for p in path.iterdir())}")


if __name__ == "__main__":
  flags.mark_flag_as_required("output_dir")
  app.run(main)
