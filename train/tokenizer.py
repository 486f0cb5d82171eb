"""A checkpoint's own tokenizer: Hugging Face `tokenizer.json` (no torch, no transformers).

LLaMA-3.x, Qwen2.x and Mistral v0.3+ ship a byte-level BPE `tokenizer.json` (LLaMA-2 and
Mistral v0.1 ship one beside their SentencePiece `tokenizer.model`). `HFTokenizer` reads it with
the Hugging Face `tokenizers` library (Rust) and its special tokens and chat template from the
files transformers reads beside it, with transformers' precedence:

* `tokenizer_config.json`: `bos_token`, `eos_token`, `pad_token`, ... (a string, or an
  `AddedToken` dict with `content`), and `chat_template` (a string, or a list of
  `{"name", "template"}` of which "default" is used);
* `special_tokens_map.json`: read only when `tokenizer_config.json` has no
  `added_tokens_decoder` (older checkpoints), and then it wins;
* `chat_template.jinja` (transformers >= 4.43 writes the template there): wins over the config.

`encode(text)` gives the ids of `transformers.AutoTokenizer.from_pretrained(dir)(text)` (the
post-processor in `tokenizer.json`, e.g. LLaMA-3's `<|begin_of_text|>`, adds the BOS; with
transformers >= 5 a `tokenizer.json` overrides `add_bos_token` in the config, as here).

`find_tokenizer_file` says which file of a checkpoint directory to use, or what is missing.

Example::

  tok = load_tokenizer("Meta-Llama-3-8B-Instruct")     # a local directory
  tok.encode("Hello")                                    # [128000, 9906]
  tok.chat_template is not None                          # True: Jinja, see train/instruct.py
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import tokenizers

TOKENIZER_JSON = "tokenizer.json"
SENTENCEPIECE_MODEL = "tokenizer.model"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
GENERATION_CONFIG = "generation_config.json"
# The named special tokens transformers passes to chat templates (`special_tokens_map`).
SPECIAL_TOKEN_NAMES = (
  "bos_token",
  "eos_token",
  "unk_token",
  "sep_token",
  "pad_token",
  "cls_token",
  "mask_token",
)
# What an exported checkpoint gets besides its weights.
_FILES = (
  TOKENIZER_JSON,
  TOKENIZER_CONFIG,
  SPECIAL_TOKENS_MAP,
  CHAT_TEMPLATE_FILE,
  GENERATION_CONFIG,
)


def _read_json(file: Path) -> dict[str, Any]:
  """A JSON object from `file`, with an error that names the file."""
  try:
    value = json.loads(file.read_text(encoding="utf-8"))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{file} is not valid JSON: {e}") from e
  if not isinstance(value, dict):
    raise ValueError(f"{file} holds a JSON {type(value).__name__}, not an object")
  return value


def _token_text(value: Any, field: str, file: Path) -> str | None:
  """A special token's text from a string or an `AddedToken` dict (`{"content": ...}`)."""
  if value is None or isinstance(value, str):
    return value
  if isinstance(value, dict) and isinstance(value.get("content"), str):
    return value["content"]
  raise ValueError(f"{file}: {field}={value!r} is neither a string nor an AddedToken dict")


def _chat_template(value: Any, file: Path) -> str | None:
  """The default template of `chat_template` (a string, or a list of named templates)."""
  if value is None or isinstance(value, str):
    return value
  if isinstance(value, list):
    named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
    if isinstance(named.get("default"), str):
      return named["default"]
    raise ValueError(f"{file}: chat_template is a list without a 'default' template: {list(named)}")
  raise ValueError(f"{file}: chat_template must be a string or a list, got {type(value).__name__}")


class HFTokenizer:
  """A `tokenizer.json` with its special tokens and chat template (see the module docstring).

  Attributes:
    path: the `tokenizer.json`.
    special_tokens: `{"bos_token": "<|begin_of_text|>", ...}`: the named special tokens that are
      set (as transformers' `special_tokens_map`, what chat templates see).
    chat_template: the Jinja chat template, or None.
    bos_id, eos_id, pad_id: ids of those tokens, or None where unset.
  """

  def __init__(self, path: str | os.PathLike):
    path = Path(path)
    if path.is_dir():
      path = path / TOKENIZER_JSON
    self.path = path
    try:
      self._tok = tokenizers.Tokenizer.from_file(os.fspath(path))
    except Exception as e:  # noqa: BLE001 (tokenizers raises its own Exception type)
      raise ValueError(f"{path} is not a usable Hugging Face tokenizer.json: {e}") from e
    folder = path.parent
    config = _read_json(folder / TOKENIZER_CONFIG) if (folder / TOKENIZER_CONFIG).is_file() else {}
    named = lambda d, file: {
      k: _token_text(d[k], k, file) for k in SPECIAL_TOKEN_NAMES if d.get(k) is not None
    }
    specials = named(config, folder / TOKENIZER_CONFIG)
    if "added_tokens_decoder" not in config and (folder / SPECIAL_TOKENS_MAP).is_file():
      specials.update(named(_read_json(folder / SPECIAL_TOKENS_MAP), folder / SPECIAL_TOKENS_MAP))
    self.special_tokens = {k: specials[k] for k in SPECIAL_TOKEN_NAMES if k in specials}
    template = _chat_template(config.get("chat_template"), folder / TOKENIZER_CONFIG)
    if (folder / CHAT_TEMPLATE_FILE).is_file():
      template = (folder / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    self.chat_template = template
    for name, text in self.special_tokens.items():
      if self._tok.token_to_id(text) is None:
        raise ValueError(
          f"{folder}: {name}={text!r} (from {TOKENIZER_CONFIG} / {SPECIAL_TOKENS_MAP}) is not a "
          f"token of {path.name}"
        )
    ids = {k: self._tok.token_to_id(v) for k, v in self.special_tokens.items()}
    self.bos_id, self.eos_id, self.pad_id = (ids.get(f"{k}_token") for k in ("bos", "eos", "pad"))

  @property
  def vocab_size(self) -> int:
    """Ids in use, added tokens included (at most the model's embedding rows)."""
    return self._tok.get_vocab_size(with_added_tokens=True)

  @property
  def files(self) -> list[Path]:
    """The files this tokenizer was read from (copied along with an exported model)."""
    return [self.path.parent / f for f in _FILES if (self.path.parent / f).is_file()]

  def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
    """Ids of `text`, with the post-processor's BOS/EOS when `add_special_tokens`."""
    return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

  def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Ids of `text` (no special tokens added) and each token's `(start, end)` characters."""
    enc = self._tok.encode(text, add_special_tokens=False)
    return enc.ids, enc.offsets

  def decode(self, ids, skip_special_tokens: bool = True) -> str:
    """Text of `ids`."""
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def token_to_id(self, token: str) -> int | None:
    return self._tok.token_to_id(token)

  def __getstate__(self) -> dict[str, str]:  # Pickled by path, for grain worker processes.
    return {"path": os.fspath(self.path)}

  def __setstate__(self, state: dict[str, str]) -> None:
    self.__init__(state["path"])


def find_tokenizer_file(path: str | os.PathLike, *, prefer: str = TOKENIZER_JSON) -> Path:
  """The tokenizer file of checkpoint directory `path`: `prefer` if present, else the other.

  Args:
    path: a checkpoint directory, or a tokenizer file itself (returned as is).
    prefer: `TOKENIZER_JSON` (instruction data, parity with transformers) or
      `SENTENCEPIECE_MODEL` (the C4 pipeline, `train.data.Tokenizer`).

  Raises:
    FileNotFoundError: neither file exists; the message names both and lists what the
      directory has that looks like a tokenizer.
  """
  path = Path(path)
  if path.is_file():
    return path
  order = (prefer, *(f for f in (TOKENIZER_JSON, SENTENCEPIECE_MODEL) if f != prefer))
  for name in order:
    if (path / name).is_file():
      return path / name
  others = sorted({p.name for pattern in ("*token*", "*.tiktoken") for p in path.glob(pattern)})
  raise FileNotFoundError(
    f"{path} has no tokenizer: neither {TOKENIZER_JSON} (Hugging Face tokenizers) nor "
    f"{SENTENCEPIECE_MODEL} (SentencePiece)"
    + (f"; it has {others}" if others else "")
    + ". Save one there with transformers: AutoTokenizer.from_pretrained(SOURCE)"
    ".save_pretrained(DIR)."
  )


def generation_eos_ids(path: str | os.PathLike, tokenizer: HFTokenizer) -> list[int]:
  """Ids that end a generated reply: the tokenizer's EOS and `generation_config.json`'s
  `eos_token_id` (an int or a list; LLaMA-3-Instruct lists `<|end_of_text|>` and `<|eot_id|>`)."""
  ids = [] if tokenizer.eos_id is None else [tokenizer.eos_id]
  file = Path(path) / GENERATION_CONFIG
  if file.is_file():
    extra = _read_json(file).get("eos_token_id")
    for i in extra if isinstance(extra, list) else [extra]:
      if isinstance(i, int) and i not in ids:
        ids.append(i)
  return ids


def copy_tokenizer_files(source: HFTokenizer, path: str | os.PathLike) -> None:
  """Copies `source`'s files into directory `path` (an exported checkpoint)."""
  for file in source.files:
    target = Path(path) / file.name
    if file.resolve() != target.resolve():
      shutil.copyfile(file, target)


def load_tokenizer(path: str | os.PathLike) -> HFTokenizer:
  """`HFTokenizer` of a checkpoint directory or a `tokenizer.json` (errors name what is missing).

  SentencePiece-only directories are read by `train.data.Tokenizer` (the C4 pipeline).
  """
  file = find_tokenizer_file(path)
  if file.name != TOKENIZER_JSON and file.suffix != ".json":
    raise ValueError(
      f"{file} is a SentencePiece model; chat/instruction data needs the checkpoint's "
      f"{TOKENIZER_JSON}. Write one next to it with transformers: "
      f"AutoTokenizer.from_pretrained({str(file.parent)!r}).save_pretrained({str(file.parent)!r})."
    )
  return HFTokenizer(file)


__all__ = [
  "HFTokenizer",
  "copy_tokenizer_files",
  "find_tokenizer_file",
  "generation_eos_ids",
  "load_tokenizer",
]
