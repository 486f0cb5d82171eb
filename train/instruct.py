r"""Instruction and chat data: JSON-lines records -> padded token rows with a response-only loss.

Each line of a `.jsonl` file (gzipped if it ends in `.gz`) is one of

  {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}
  {"prompt": "...", "response": "...", "system": "..."}      (system optional)
  {"text": "..."}                                            (a document: every token counts)

A conversation is rendered with the checkpoint's chat template (`tokenizer_config.json` or
`chat_template.jinja`) exactly as `transformers`' `apply_chat_template` renders it (a sandboxed
Jinja environment with `trim_blocks`, `lstrip_blocks`, `raise_exception`, `tojson`, the special
tokens as `bos_token`, `eos_token`, ...), then tokenised in one piece without added special
tokens, as `apply_chat_template(messages)` does: the ids are transformers' ids. A checkpoint
without a template (a base model) gets `PLAIN_CHAT_TEMPLATE`:

  {bos}{system}\n\n### User:\n{user}\n\n### Assistant:\n{assistant}{eos}\n\n### User:\n...

**Loss mask.** Only the assistant's tokens are targets. Assistant turn i covers the characters
between the rendering of messages[:i] with the generation prompt and that of messages[:i+1]:
its content and whatever the template closes it with (LLaMA-3's `<|eot_id|>`, ChatML's
`<|im_end|>`, the plain template's EOS), so the model learns to stop; whitespace after that is
left to the next prompt. A token is the assistant's when its first
character is (token offsets of the `tokenizers` encoding). A template whose renderings are not
prefixes of one another (e.g. one that drops earlier turns' reasoning) cannot be split so; such
a record is skipped and counted.

**Rows.** One example per row of L tokens, right-padded (pad id, or EOS if the tokenizer has
no pad; pads are never targets). The model's causal attention then never lets a real token see
another example: there is no packing. A longer example is cut to its first L tokens and kept if
a response token is left. `loss_mask[b, t]` says whether `tokens[b, t]` is a target (position 0
never is: nothing predicts it).

**Bad records** are skipped and counted by reason (`InstructStats`), as `python -m
train.prepare_data` counts C4's; `strict=True` raises `BadRecordError` naming `file:line`.

Example::

  tok = train.tokenizer.load_tokenizer("llama-3-dir")
  data = load_instruct_file("chat.jsonl", tok, seq_len=1024)
  print(data.stats)     # "chat.jsonl: 9,998 examples (12 truncated); skipped 2 ..."
  it = make_train_iterator(data, batch_size=8, seed=0)
  next(it)              # {"tokens": int32[8, 1024], "loss_mask": bool[8, 1024]}
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import json
import os
from collections.abc import Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import grain
import jax
import jinja2
import jinja2.ext
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment

from train.c4_builder import BadRecordError
from train.tokenizer import HFTokenizer

ROLES = ("system", "user", "assistant")
# The template used when the checkpoint has none (see the module docstring).
PLAIN_CHAT_TEMPLATE = (
  "{{ bos_token }}{% for message in messages %}{% if not loop.first %}{{ '\\n\\n' }}{% endif %}"
  "{% if message['role'] == 'system' %}{{ message['content'] }}"
  "{% elif message['role'] == 'user' %}{{ '### User:\\n' + message['content'] }}"
  "{% else %}{{ '### Assistant:\\n' + message['content'] + eos_token }}{% endif %}{% endfor %}"
  "{% if add_generation_prompt %}{{ ('\\n\\n' if messages else '') + '### Assistant:\\n' }}"
  "{% endif %}"
)


class _GenerationTag(jinja2.ext.Extension):
  """Accepts transformers' `{% generation %}...{% endgeneration %}` (renders its body)."""

  tags = {"generation"}

  def parse(self, parser):
    lineno = next(parser.stream).lineno
    body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
    return jinja2.nodes.Scope(body).set_lineno(lineno)


def _raise_exception(message):
  raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
  # transformers' override: no HTML escaping, json.dumps' options.
  return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                    sort_keys=sort_keys)  # fmt: skip


@functools.lru_cache(maxsize=8)
def compile_chat_template(template: str) -> jinja2.Template:
  """`template` compiled as transformers compiles chat templates (sandboxed, immutable)."""
  env = ImmutableSandboxedEnvironment(
    trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
  )
  env.filters["tojson"] = _tojson
  env.globals["raise_exception"] = _raise_exception
  env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
  return env.from_string(template)


def render_chat(
  template: str,
  messages: Sequence[dict[str, str]],
  special_tokens: dict[str, str],
  *,
  add_generation_prompt: bool = False,
) -> str:
  """`apply_chat_template(messages, tokenize=False, add_generation_prompt=...)`'s text.

  Args:
    template: the Jinja chat template.
    messages: `[{"role", "content"}, ...]`.
    special_tokens: `{"bos_token": ..., "eos_token": ...}` (`HFTokenizer.special_tokens`).
    add_generation_prompt: end with the header of an assistant turn.

  Raises:
    jinja2.TemplateError: the template rejects the conversation (`raise_exception`).
  """
  return compile_chat_template(template).render(
    messages=[dict(m) for m in messages],
    add_generation_prompt=add_generation_prompt,
    **special_tokens,
  )


def chat_template_of(tokenizer: HFTokenizer) -> str:
  """The checkpoint's template, or `PLAIN_CHAT_TEMPLATE` (which needs an EOS token)."""
  if tokenizer.chat_template is not None:
    return tokenizer.chat_template
  if "eos_token" not in tokenizer.special_tokens:
    raise ValueError(
      f"{tokenizer.path.parent} has no chat template and no eos_token (tokenizer_config.json / "
      "special_tokens_map.json): the plain template ends each response with EOS, and a model "
      "that is never shown one cannot learn to stop."
    )
  return PLAIN_CHAT_TEMPLATE


def tokenize_chat(
  tokenizer: HFTokenizer, messages: Sequence[dict[str, str]], template: str
) -> tuple[list[int], list[bool]]:
  """Ids of the rendered conversation (as `apply_chat_template`) and which are the assistant's.

  Raises:
    jinja2.TemplateError: the template rejects the conversation.
    ValueError: the template's renderings of growing prefixes are not prefixes of each other.
  """
  specials = tokenizer.special_tokens
  text = render_chat(template, messages, specials)
  spans = []
  for i, message in enumerate(messages):
    if message["role"] != "assistant":
      continue
    head = render_chat(template, messages[:i], specials, add_generation_prompt=True)
    turn = render_chat(template, messages[: i + 1], specials)
    if not (turn.startswith(head) and text.startswith(turn)):
      raise ValueError(f"the chat template renders turn {i} differently as the conversation grows")
    # Whitespace after the turn's end marker (ChatML's "\n" after <|im_end|>) is never
    # generated: the next prompt owns it.
    spans.append((len(head), len(turn.rstrip())))
  ids, offsets = tokenizer.encode_with_offsets(text)
  mask = [any(a <= start < b for a, b in spans) for start, _ in offsets]
  return ids, mask


@dataclasses.dataclass
class InstructStats:
  """What reading instruction files found (each bad record is counted under one reason)."""

  examples: int = 0  # records kept
  truncated: int = 0  # kept records cut to seq_len
  tokens: int = 0  # non-pad tokens of the kept rows
  response_tokens: int = 0  # targets (assistant tokens) of the kept rows
  malformed: int = 0  # not a JSON object with `messages`, `prompt`+`response` or `text`
  bad_messages: int = 0  # `messages` not a list of {role in ROLES, content: str}
  no_response: int = 0  # no assistant turn with text (or empty text)
  template_error: int = 0  # the chat template rejected the conversation, or cannot be split
  too_long: int = 0  # no response token within seq_len
  files: list[str] = dataclasses.field(default_factory=list)

  @property
  def skipped(self) -> int:
    return (
      self.malformed + self.bad_messages + self.no_response + self.template_error + self.too_long
    )

  def __str__(self) -> str:
    return (
      f"{', '.join(self.files)}: {self.examples:,} examples ({self.truncated:,} truncated), "
      f"{self.tokens:,} tokens of which {self.response_tokens:,} are response targets. Skipped "
      f"{self.skipped:,} records: {self.malformed:,} malformed, {self.bad_messages:,} with bad "
      f"messages, {self.no_response:,} without a response, {self.template_error:,} rejected by "
      f"the chat template, {self.too_long:,} with no response token within seq_len."
    )


class _Bad(Exception):
  """A record to skip: `reason` is an `InstructStats` field."""

  def __init__(self, reason: str, why: str):
    super().__init__(why)
    self.reason = reason


def record_messages(record: Any) -> list[dict[str, str]] | None:
  """The conversation of a parsed record (None for a `text` record); `_Bad` if unusable."""
  if not isinstance(record, dict):
    raise _Bad("malformed", f"a JSON {type(record).__name__}, not an object")
  if "messages" in record:
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
      raise _Bad("bad_messages", "'messages' is not a non-empty list")
    for j, m in enumerate(messages):
      if not isinstance(m, dict) or m.get("role") not in ROLES:
        raise _Bad("bad_messages", f"message {j} has no role in {ROLES}")
      if not isinstance(m.get("content"), str):
        raise _Bad("bad_messages", f"message {j} has no string 'content'")
    out = [{"role": m["role"], "content": m["content"]} for m in messages]
  elif "prompt" in record or "response" in record:
    fields = ("prompt", "response") + (("system",) if "system" in record else ())
    if not all(isinstance(record.get(f), str) for f in fields):
      raise _Bad("malformed", f"{'/'.join(fields)} must all be strings")
    out = [{"role": "system", "content": record["system"]}] if "system" in record else []
    out += [
      {"role": "user", "content": record["prompt"]},
      {"role": "assistant", "content": record["response"]},
    ]
  elif isinstance(record.get("text"), str):
    if not record["text"].strip():
      raise _Bad("no_response", "empty 'text'")
    return None
  else:
    raise _Bad("malformed", "no 'messages', 'prompt'/'response' or string 'text' field")
  if not any(m["role"] == "assistant" and m["content"].strip() for m in out):
    raise _Bad("no_response", "no assistant message with text")
  return out


def _example(tokenizer: HFTokenizer, template: str, line: str) -> tuple[list[int], list[bool]]:
  """One JSON line as (ids, assistant mask), or `_Bad`."""
  try:
    record = json.loads(line)
  except ValueError as e:
    raise _Bad("malformed", f"not JSON: {e}") from e
  messages = record_messages(record)
  if messages is None:  # a document: BOS (post-processor) + text + EOS, all targets
    ids = tokenizer.encode(record["text"])
    ids += [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    return ids, [True] * len(ids)
  try:
    return tokenize_chat(tokenizer, messages, template)
  except (jinja2.TemplateError, ValueError) as e:
    raise _Bad("template_error", f"chat template: {e}") from e


@dataclasses.dataclass
class InstructData:
  """Examples as rows: `tokens_NxL` int32, `loss_mask_NxL` bool, and what reading found."""

  tokens_NxL: np.ndarray
  loss_mask_NxL: np.ndarray
  stats: InstructStats

  def __len__(self) -> int:
    return len(self.tokens_NxL)


def load_instruct_files(
  files: str | os.PathLike | Sequence[str | os.PathLike],
  tokenizer: HFTokenizer,
  *,
  seq_len: int,
  template: str | None = None,
  strict: bool = False,
  max_records: int | None = None,
) -> InstructData:
  """Reads JSON-lines instruction files into padded rows (see the module docstring).

  Args:
    files: one file or several (`.jsonl`, `.json`, gzipped if `.gz`).
    tokenizer: the checkpoint's tokenizer.
    seq_len: tokens per row, L >= 2.
    template: chat template; None for the tokenizer's (or the plain one).
    strict: raise `BadRecordError` at the first bad record instead of skipping it.
    max_records: read at most this many lines in all (None: every line).

  Returns:
    The rows and their `InstructStats`.

  Raises:
    FileNotFoundError: a file is missing.
    BadRecordError: with `strict`, naming `file:line` and why.
  """
  if seq_len < 2:
    raise ValueError(f"seq_len must be at least 2 (one input, one target), got {seq_len}")
  files = [files] if isinstance(files, (str, os.PathLike)) else list(files)
  template = chat_template_of(tokenizer) if template is None else template
  pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
  stats, rows, masks, seen = InstructStats(files=[os.fspath(f) for f in files]), [], [], 0
  for file in map(Path, files):
    if not file.is_file():
      raise FileNotFoundError(f"instruction data file not found: {file}")
    for number, line in _lines(file):
      if max_records is not None and seen >= max_records:
        break
      seen += 1
      try:
        if not line.strip():
          raise _Bad("malformed", "empty line")
        ids, mask = _example(tokenizer, template, line)
        if not any(mask[1:seq_len]):
          raise _Bad("too_long", f"no response token within the first {seq_len} tokens")
      except _Bad as e:
        if strict:
          raise BadRecordError(f"{file}:{number}: {e}") from e
        setattr(stats, e.reason, getattr(stats, e.reason) + 1)
        continue
      stats.truncated += len(ids) > seq_len
      ids, mask = ids[:seq_len], mask[:seq_len]
      row = np.full(seq_len, 0 if pad is None else pad, np.int32)
      row[: len(ids)] = ids
      rows.append(row)
      masks.append(np.zeros(seq_len, bool))
      masks[-1][1 : len(ids)] = mask[1:]
      stats.examples += 1
      stats.tokens += len(ids)
      stats.response_tokens += int(masks[-1].sum())
  shape = (0, seq_len)
  tokens = np.stack(rows) if rows else np.zeros(shape, np.int32)
  return InstructData(tokens, np.stack(masks) if masks else np.zeros(shape, bool), stats)


def _lines(file: Path) -> Iterator[tuple[int, str]]:
  """(line number from 1, text) of a UTF-8 file (gzipped if `.gz`); bad UTF-8 is replaced."""
  opener = gzip.open if file.suffix == ".gz" else open
  with opener(file, "rt", encoding="utf-8", errors="replace") as f:
    yield from enumerate(f, start=1)


def _row(data: InstructData, i: int) -> dict[str, np.ndarray]:
  return {"tokens": data.tokens_NxL[i], "loss_mask": data.loss_mask_NxL[i]}


def _process(index: int | None, count: int | None, batch_size: int) -> tuple[int, int, int]:
  """(process index, process count, rows per process)."""
  index = jax.process_index() if index is None else index
  count = jax.process_count() if count is None else count
  if batch_size <= 0 or batch_size % count:
    raise ValueError(f"batch_size {batch_size} must be a positive multiple of {count} processes")
  return index, count, batch_size // count


def make_train_iterator(
  data: InstructData,
  *,
  batch_size: int,
  seed: int = 0,
  process_index: int | None = None,
  process_count: int | None = None,
) -> grain.DatasetIterator:
  """Shuffled (reshuffled every epoch), repeated batches `{"tokens", "loss_mask"}`.

  Process `p` of `P` takes rows `p, p + P, ...` of the global order, so a global batch does not
  depend on `P`. The iterator's `get_state()` / `set_state()` resume on exactly the next batch.
  """
  if len(data) == 0:
    raise ValueError(f"no usable instruction examples in {', '.join(data.stats.files)}")
  index, count, per_process = _process(process_index, process_count, batch_size)
  rows = grain.MapDataset.range(len(data)).shuffle(seed=seed).repeat(None)[index::count]
  rows = rows.map(functools.partial(_row, data))
  return iter(rows.batch(per_process, drop_remainder=True).to_iter_dataset())


def make_eval_batches(
  data: InstructData,
  *,
  batch_size: int,
  process_index: int | None = None,
  process_count: int | None = None,
) -> list[dict[str, np.ndarray]]:
  """Every row once, in order; the last global batch is filled with rows that have no targets."""
  index, count, _ = _process(process_index, process_count, batch_size)
  n, seq_len = data.tokens_NxL.shape
  total = -(-n // batch_size) * batch_size
  tokens = np.zeros((total, seq_len), np.int32)
  mask = np.zeros((total, seq_len), bool)
  tokens[:n], mask[:n] = data.tokens_NxL, data.loss_mask_NxL
  rows = lambda a, s: a[s : s + batch_size][index::count]
  return [
    {"tokens": rows(tokens, s), "loss_mask": rows(mask, s)} for s in range(0, total, batch_size)
  ]


__all__ = [
  "PLAIN_CHAT_TEMPLATE",
  "ROLES",
  "InstructData",
  "InstructStats",
  "chat_template_of",
  "compile_chat_template",
  "load_instruct_files",
  "make_eval_batches",
  "make_train_iterator",
  "record_messages",
  "render_chat",
  "tokenize_chat",
]
