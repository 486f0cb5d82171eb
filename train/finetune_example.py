"""Fine-tune a released-style model on your own chat data, end to end, on CPU in a few minutes.

  python -m train.finetune_example --workdir=/tmp/ft-example

1. writes a tiny LLaMA-3-style checkpoint (`train/tiny_checkpoint.py --tokenizer=bpe`: a
   byte-level BPE `tokenizer.json`, LLaMA-3-Instruct's chat template, GQA) to `WORKDIR/base`;
2. fine-tunes it with GaLore (`configs/finetune.py`, fused layer-wise step) on the bundled
   instruction sample (`data/instruct_sample_{train,eval}.jsonl`), the loss on the assistant's
   tokens only, and exports it to `WORKDIR/tuned` as a Hugging Face directory;
3. greedy-decodes a reply to a chat prompt with our model (`train/generate.py`) and, when
   `transformers` is installed, with `transformers` from the exported directory
   (`apply_chat_template` + `generate`), and checks that the ids are identical.

The same three steps for a real checkpoint are in docs/guides/finetuning.md.
"""

from __future__ import annotations

import os
from pathlib import Path

from absl import app, flags

from configs import finetune
from train import generate, trainer
from train.c4_builder import BUNDLED_RAW_DIR
from train.tiny_checkpoint import write_tiny_checkpoint

_WORKDIR = flags.DEFINE_string("workdir", "/tmp/ft-example", "Where everything is written.")
_STEPS = flags.DEFINE_integer("steps", 60, "Fine-tuning steps.")
_PROMPT = flags.DEFINE_string("chat_prompt", "What is 7 plus 5?", "The prompt decoded at the end.")
_MAX_NEW = flags.DEFINE_integer("decode_tokens", 12, "Most tokens to decode.")

TRAIN_FILE = BUNDLED_RAW_DIR / "instruct_sample_train.jsonl"
EVAL_FILE = BUNDLED_RAW_DIR / "instruct_sample_eval.jsonl"


def example_config(base: Path, tuned: Path, steps: int):
  """`configs/finetune.py` on the tiny checkpoint and the bundled instruction sample."""
  c = finetune.get_config()
  c.init_from, c.export_to = os.fspath(base), os.fspath(tuned)
  c.data.update(format="instruct", train_files=os.fspath(TRAIN_FILE), seq_len=96)
  c.data.eval_files = os.fspath(EVAL_FILE)
  # float32: the decode comparison with transformers is then exact up to float32 rounding.
  c.model.update(dtype="float32", param_dtype="float32")
  # Tiny random model: rank 16 of its 64-wide matrices, and a learning rate that moves it in
  # a minute (a released 8B model keeps configs/finetune.py's 128 and 2e-5).
  c.optimizer.update(rank=16, learning_rate=1e-2, update_proj_gap=max(steps // 3, 1), scale=1.0)
  c.optimizer.warmup_fraction = 0.1
  c.train.update(num_steps=steps, batch_size=8, fused_update=True, progress_bar=False)
  c.train.update(eval_every=steps, checkpoint_every=steps, log_every=10)
  return c


def transformers_greedy(path: Path, prompt: str, max_new_tokens: int) -> list[int] | None:
  """transformers' greedy reply ids to a chat prompt (None if transformers is not installed)."""
  try:
    import torch  # noqa: PLC0415 (optional: only to cross-check)
    import transformers  # noqa: PLC0415
  except ImportError:
    return None
  tok = transformers.AutoTokenizer.from_pretrained(path)
  model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
  messages = [{"role": "user", "content": prompt}]
  ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
  ids = ids["input_ids"] if hasattr(ids, "keys") else ids
  with torch.no_grad():
    out = model.generate(ids, do_sample=False, max_new_tokens=max_new_tokens)
  return out[0, ids.shape[1] :].tolist()


def run_example(workdir: str | os.PathLike, steps: int, prompt: str, max_new_tokens: int) -> dict:
  """Steps 1-3 of the module docstring; returns the final metrics and both replies."""
  workdir = Path(workdir)
  base, tuned = workdir / "base", workdir / "tuned"
  write_tiny_checkpoint(base, vocab_size=512, tokenizer="bpe")
  final = trainer.train_and_evaluate(example_config(base, tuned, steps), workdir / "run")
  ours = generate.generate(tuned, prompt, max_new_tokens=max_new_tokens)
  theirs = transformers_greedy(tuned, prompt, max_new_tokens)
  return {**final, "ours": ours, "transformers_ids": theirs}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  out = run_example(_WORKDIR.value, _STEPS.value, _PROMPT.value, _MAX_NEW.value)
  ours = out["ours"]
  print(f"\nPrompt: {_PROMPT.value!r}\nours:         {ours['ids']} {ours['text']!r}")
  if out["transformers_ids"] is None:
    print("transformers: not installed; skipped the comparison")
  else:
    print(f"transformers: {out['transformers_ids']}")
    if out["transformers_ids"] != ours["ids"]:
      raise SystemExit("The two decodes differ.")
    print("Identical ids.")


if __name__ == "__main__":
  app.run(main)
