"""The end-to-end fine-tuning example (train/finetune_example.py), shortened: a tiny LLaMA-3-
style checkpoint, GaLore on the bundled chat sample with the response-only loss, export, and
greedy decoding with ours and with transformers."""

import json
import os

import numpy as np
import pytest
import torch
import transformers

from train import finetune_example, generate, instruct, trainer
from train.tokenizer import load_tokenizer

os.environ["HF_HUB_OFFLINE"] = "1"
# Our float32 logits and transformers' differ by summation order only: <= 2e-5 on this model
# (tests/test_checkpoint_io.py derives the bound; 1e-4 is its test bound). A greedy step whose
# top-2 margin is above 1e-3 cannot flip between the two implementations.
MARGIN = 1e-3


@pytest.mark.slow
def test_example_decodes_the_same_ids_as_transformers(tmp_path):
  prompt = "What is 7 plus 5?"
  out = finetune_example.run_example(tmp_path, steps=30, prompt=prompt, max_new_tokens=10)
  tuned = tmp_path / "tuned"
  assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= {
    p.name for p in tuned.iterdir()
  }
  losses = [r["loss"] for r in trainer.load_metrics(tmp_path / "run") if "loss" in r]
  assert losses[-1] < losses[0] - 0.5, losses  # the response loss falls from ~ln(517)
  # Eval is over the eval file's response tokens exactly.
  eval_data = instruct.load_instruct_files(
    finetune_example.EVAL_FILE, load_tokenizer(tuned), seq_len=96
  )
  assert out["eval_tokens"] == eval_data.stats.response_tokens > 0
  assert np.isfinite(out["eval_loss"])
  ours, theirs = out["ours"], out["transformers_ids"]
  print(f"\nours {ours['ids']} {ours['text']!r}\ntransformers {theirs}")
  assert len(ours["ids"]) > 0 and ours["ids"] == theirs
  # The prompt ids are apply_chat_template's, and no greedy step was a near tie.
  tok = transformers.AutoTokenizer.from_pretrained(tuned)
  chat = [{"role": "user", "content": prompt}]
  assert (
    ours["prompt_ids"] == tok.apply_chat_template(chat, add_generation_prompt=True)["input_ids"]
  )
  model = transformers.AutoModelForCausalLM.from_pretrained(tuned, dtype=torch.float32).eval()
  ids = torch.tensor([ours["prompt_ids"] + ours["ids"]])
  with torch.no_grad():
    logits = model(ids).logits[0, len(ours["prompt_ids"]) - 1 : -1]
  top2 = torch.topk(logits, 2).values
  assert float((top2[:, 0] - top2[:, 1]).min()) > MARGIN
  # And the decode CLI's function is what the example used.
  again = generate.generate(tuned, prompt, max_new_tokens=10)
  assert again["ids"] == ours["ids"]


def test_standard_step_on_chat_data_and_config_errors(tmp_path):
  base = tmp_path / "base"
  finetune_example.write_tiny_checkpoint(base, vocab_size=512, tokenizer="bpe")
  config = finetune_example.example_config(base, tmp_path / "tuned", steps=4)
  config.export_to = ""
  config.train.fused_update = False
  final = trainer.train_and_evaluate(config, tmp_path / "run")
  records = trainer.load_metrics(tmp_path / "run")
  assert all(np.isfinite(r["loss"]) for r in records if "loss" in r)
  assert final["steps"] == 4 and np.isfinite(final["eval_loss"])
  # Errors name the field.
  bad = finetune_example.example_config(base, tmp_path / "x", steps=4)
  bad.data.train_files = ""
  with pytest.raises(ValueError, match=r"config\.data\.train_files='' must name JSON-lines"):
    trainer.build(bad)
  bad = finetune_example.example_config(base, tmp_path / "x", steps=4)
  bad.data.eval_files = str(tmp_path / "missing.jsonl")
  with pytest.raises(ValueError, match=r"config\.data\.eval_files=.* names .*missing\.jsonl"):
    trainer.validate_data_config(bad, trainer.build(bad))
  (tmp_path / "notok").mkdir()
  (tmp_path / "notok" / "config.json").write_text((base / "config.json").read_text())
  bad = finetune_example.example_config(tmp_path / "notok", tmp_path / "x", steps=4)
  with pytest.raises(ValueError, match=r"config\.init_from=.*neither tokenizer\.json"):
    trainer.build(bad)
  # A SentencePiece-only tokenizer is named as the problem for chat data.
  (tmp_path / "notok" / "tokenizer.model").write_bytes(b"")
  with pytest.raises(ValueError, match=r"config\.init_from=.* SentencePiece model; chat"):
    trainer.validate_data_config(bad, trainer.build(bad))
  json.loads((base / "tokenizer_config.json").read_text())  # the example wrote real JSON
