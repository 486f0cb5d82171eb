"""What does my model say now? Greedy decoding from a Hugging Face checkpoint directory.

  python -m train.generate --checkpoint=runs/ft/hf --prompt="What is 2 plus 3?"

The prompt is a user message rendered with the checkpoint's chat template and its generation
prompt (the plain template of `train/instruct.py` if it has none), tokenised as
`apply_chat_template(..., add_generation_prompt=True)` does; `--raw` encodes the text as is
(BOS from the tokenizer's post-processor). Decoding is greedy (argmax) with our model in float32
and no KV cache: every new token runs the whole fixed-length sequence again (one compilation;
fine for checking a fine-tune, not for serving). It stops at the tokenizer's EOS or an
`eos_token_id` of `generation_config.json`, as `transformers`' `generate` does.

Needs the checkpoint's `tokenizer.json` (see train/tokenizer.py).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from absl import app, flags
from flax import nnx

from train import instruct
from train.checkpoint_io import load_hf_pretrained
from train.model import Llama
from train.tokenizer import HFTokenizer, generation_eos_ids, load_tokenizer

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Hugging Face checkpoint directory.")
_PROMPT = flags.DEFINE_string("prompt", None, "The user's message (or raw text with --raw).")
_SYSTEM = flags.DEFINE_string("system", "", "An optional system message.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 32, "Most tokens to generate.")
_RAW = flags.DEFINE_bool("raw", False, "Encode --prompt as plain text, without a chat template.")


def prompt_ids(tokenizer: HFTokenizer, prompt: str, system: str = "", raw: bool = False) -> list:
  """Token ids of the prompt: a rendered chat turn with the generation prompt, or raw text."""
  if raw:
    return tokenizer.encode(prompt)
  messages = ([{"role": "system", "content": system}] if system else []) + [
    {"role": "user", "content": prompt}
  ]
  template = instruct.chat_template_of(tokenizer)
  text = instruct.render_chat(
    template, messages, tokenizer.special_tokens, add_generation_prompt=True
  )
  return tokenizer.encode(text, add_special_tokens=False)


def greedy_decode(
  model: Llama, prompt: Sequence[int], max_new_tokens: int, stop_ids: Sequence[int] = ()
) -> list[int]:
  """The ids greedy decoding appends to `prompt` (at most `max_new_tokens`; a stop id ends it
  and is included)."""
  if not prompt:
    raise ValueError("greedy_decode needs a non-empty prompt")
  length = len(prompt) + max_new_tokens
  graphdef, state = nnx.split(model)

  @jax.jit
  def next_id(state, tokens_1xL, position):
    logits_1xLxV = nnx.merge(graphdef, state)(tokens_1xL)
    return jnp.argmax(logits_1xLxV[0, position - 1])  # causal: later slots do not matter

  tokens = jnp.zeros((1, length), jnp.int32).at[0, : len(prompt)].set(jnp.asarray(prompt))
  out = []
  for position in range(len(prompt), length):
    token = int(next_id(state, tokens, position))
    out.append(token)
    if token in stop_ids:
      break
    tokens = tokens.at[0, position].set(token)
  return out


def generate(checkpoint, prompt: str, *, max_new_tokens=32, system="", raw=False) -> dict:
  """`{"prompt_ids", "ids", "text"}` of a greedy reply of `checkpoint` to `prompt`."""
  tokenizer = load_tokenizer(checkpoint)
  _, model = load_hf_pretrained(checkpoint)
  ids = prompt_ids(tokenizer, prompt, system, raw)
  new = greedy_decode(model, ids, max_new_tokens, generation_eos_ids(checkpoint, tokenizer))
  return {"prompt_ids": ids, "ids": new, "text": tokenizer.decode(new)}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  out = generate(
    os.path.expanduser(_CHECKPOINT.value),
    _PROMPT.value,
    max_new_tokens=_MAX_NEW.value,
    system=_SYSTEM.value,
    raw=_RAW.value,
  )
  print(f"prompt ids: {out['prompt_ids']}\nreply ids:  {out['ids']}\nreply: {out['text']}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["checkpoint", "prompt"])
  app.run(main)
