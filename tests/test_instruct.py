"""Checkpoint tokenizers (train/tokenizer.py) and instruction data (train/instruct.py), against
transformers (`AutoTokenizer`, `apply_chat_template`) on a locally built LLaMA-3-style tokenizer;
the response-only loss against a hand computation."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from train import instruct, losses
from train.c4_builder import BUNDLED_RAW_DIR, BadRecordError
from train.model import next_token_loss
from train.tiny_checkpoint import LLAMA3_CHAT_TEMPLATE, train_llama3_style_tokenizer
from train.tokenizer import find_tokenizer_file, generation_eos_ids, load_tokenizer

os.environ["HF_HUB_OFFLINE"] = "1"

# A ChatML (Qwen2-style) template: a default system turn, `raise_exception`, loop variables.
CHATML = (
  "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
  "{{ '<|im_start|>system\\nYou are helpful.<|im_end|>\\n' }}{% endif %}"
  "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
  "{{ raise_exception('unknown role ' + message['role']) }}{% endif %}"
  "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
  "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CONVERSATIONS = [
  [{"role": "user", "content": "Hi  there "}, {"role": "assistant", "content": "Hello!"}],
  [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": " 4, of course.\n"},
    {"role": "user", "content": "And 3 + 3? Ünïcode ✓ 日本"},
    {"role": "assistant", "content": "6."},
  ],
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("llama3_tok")
  train_llama3_style_tokenizer(path, 512)
  return path


@pytest.fixture(scope="module")
def hf_tok(tok_dir):
  return transformers.AutoTokenizer.from_pretrained(tok_dir)


def _c4_texts(n=300):
  with open(BUNDLED_RAW_DIR / "c4_demo.jsonl") as f:
    return [json.loads(line)["text"] for line in f][:n]


def test_token_ids_equal_transformers_on_c4_text(tok_dir, hf_tok):
  tok = load_tokenizer(tok_dir)
  texts = _c4_texts()
  ours = [tok.encode(t) for t in texts]
  theirs = hf_tok(texts)["input_ids"]
  n = sum(map(len, ours))
  same = sum(a == b for a, b in zip(ours, theirs))
  print(f"\ntoken parity: {same}/{len(texts)} C4 documents, {n:,} tokens")
  assert same == len(texts) and n > 50_000  # real text, many merges exercised
  assert all(ids[0] == tok.bos_id for ids in ours)  # the post-processor's BOS, as LLaMA-3
  assert tok.token_to_id("!") == 0  # id 0 is an ordinary token: no "pad 0" assumption
  assert [tok.encode(t, add_special_tokens=False) for t in texts[:20]] == [
    hf_tok(t, add_special_tokens=False)["input_ids"] for t in texts[:20]
  ]
  assert tok.decode(ours[0]) == hf_tok.decode(theirs[0], skip_special_tokens=True) == texts[0]
  assert tok.special_tokens == {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
  assert (tok.eos_id, tok.pad_id) == (hf_tok.eos_token_id, hf_tok.pad_token_id)
  assert tok.vocab_size == len(hf_tok)
  # generation_config.json lists <|end_of_text|> and <|eot_id|>, the tokenizer's EOS first.
  assert generation_eos_ids(tok_dir, tok) == [tok.eos_id, tok.token_to_id("<|end_of_text|>")]


def test_special_tokens_sources_and_errors(tok_dir, tmp_path):
  d = shutil.copytree(tok_dir, tmp_path / "t")
  config = json.loads((d / "tokenizer_config.json").read_text())
  # special_tokens_map.json is read when the config has no added_tokens_decoder, and wins.
  (d / "special_tokens_map.json").write_text(
    json.dumps({"pad_token": {"content": "<|end_of_text|>"}})
  )
  tok = load_tokenizer(d)
  assert tok.pad_id == tok.token_to_id("<|end_of_text|>")
  assert transformers.AutoTokenizer.from_pretrained(d).pad_token_id == tok.pad_id
  # chat_template.jinja wins over the config's template.
  (d / "chat_template.jinja").write_text(CHATML)
  assert load_tokenizer(d).chat_template == CHATML
  (d / "special_tokens_map.json").unlink()
  (d / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": "<|nope|>"}))
  with pytest.raises(ValueError, match=r"eos_token='<\|nope\|>' .* is not a token of tokenizer"):
    load_tokenizer(d)
  (d / "tokenizer_config.json").write_text("{oops")
  with pytest.raises(ValueError, match=r"tokenizer_config\.json is not valid JSON"):
    load_tokenizer(d)
  (d / "tokenizer.json").write_text("{}")
  with pytest.raises(ValueError, match=r"tokenizer\.json is not a usable Hugging Face"):
    load_tokenizer(d)
  with pytest.raises(FileNotFoundError, match=r"neither tokenizer\.json .* nor tokenizer\.model"):
    find_tokenizer_file(tmp_path)
  (tmp_path / "tokenizer.model").write_bytes(b"")
  with pytest.raises(ValueError, match=r"SentencePiece model; chat/instruction data needs"):
    load_tokenizer(tmp_path)


@pytest.mark.parametrize("template", ["llama3", "plain", "chatml"])
def test_chat_template_equals_apply_chat_template(tok_dir, hf_tok, template):
  tok = load_tokenizer(tok_dir)
  text = {"llama3": LLAMA3_CHAT_TEMPLATE, "plain": instruct.PLAIN_CHAT_TEMPLATE, "chatml": CHATML}
  t = text[template]
  for messages in CONVERSATIONS:
    for gen in (False, True):
      ours = instruct.render_chat(t, messages, tok.special_tokens, add_generation_prompt=gen)
      theirs = hf_tok.apply_chat_template(
        messages, chat_template=t, tokenize=False, add_generation_prompt=gen
      )
      assert ours == theirs
    ids, mask = instruct.tokenize_chat(tok, messages, t)
    assert ids == hf_tok.apply_chat_template(messages, chat_template=t)["input_ids"]
    # The masked tokens are exactly each assistant reply and the template's end of its turn.
    end = {"llama3": "<|eot_id|>", "plain": "<|eot_id|>", "chatml": "<|im_end|>"}[template]
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    if template == "llama3":  # LLaMA-3's template trims the content
      replies = [r.strip() for r in replies]
    expected = "".join(r + end for r in replies)
    assert tok.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False) == expected
  # raise_exception: the template's error, as transformers raises it.
  with pytest.raises(Exception, match="unknown role tool"):
    instruct.render_chat(CHATML, [{"role": "tool", "content": "x"}], tok.special_tokens)


def test_masked_loss_equals_hand_computation():
  """Only targets with mask True count: the sum of -log softmax(logits)[target] over them,
  computed here in float64 numpy, and their count."""
  rng = np.random.default_rng(0)
  b, seq, v, d = 4, 10, 11, 5
  h = rng.normal(size=(b, seq, d)).astype(np.float32)
  kernel = rng.normal(size=(d, v)).astype(np.float32)
  tokens = rng.integers(0, v, (b, seq)).astype(np.int32)  # id 0 occurs and is a real target
  mask = rng.random((b, seq)) < 0.6
  mask[1] = False  # a row with no target
  assert mask[:, 1:].sum() >= 12 and (tokens[:, 1:][mask[:, 1:]] == 0).any()
  logits = h.astype(np.float64) @ kernel.astype(np.float64)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  expected, count = 0.0, 0
  for i in range(b):
    for t in range(seq - 1):
      if mask[i, t + 1]:
        expected -= logp[i, t, tokens[i, t + 1]]
        count += 1
  # Float32 bound: each term's log-sum-exp over V values of size <= M rounds by ~(V + 3) eps M
  # (the logits' dot of D terms adds D eps M); summed over `count` terms.
  m = np.abs(logits).max()
  bound = count * (v + d + 3) * float(np.finfo(np.float32).eps) * m
  full = jax.jit(next_token_loss)(jnp.asarray(h @ kernel), tokens, 0, jnp.asarray(mask))
  for s in (1, 2, 4, 6):
    chunked = jax.jit(
      lambda h, k, t, m, s=s: losses.chunked_next_token_loss(h, k, t, chunk_size=s, loss_mask_BxL=m)
    )(h, kernel, tokens, mask)
    assert int(chunked[1]) == count and abs(float(chunked[0]) - expected) <= bound
  assert int(full[1]) == count and abs(float(full[0]) - expected) <= bound
  print(f"\nmasked loss: {float(full[0]):.6f} vs hand {expected:.6f} ({count} targets)")
  # The gradient of the chunked loss is that of the full one (fused backward).
  g_chunk = jax.grad(
    lambda h: losses.chunked_next_token_loss(h, kernel, tokens, chunk_size=4, loss_mask_BxL=mask)[0]
  )(jnp.asarray(h))
  g_full = jax.grad(lambda h: next_token_loss(h @ kernel, tokens, 0, mask)[0])(jnp.asarray(h))
  np.testing.assert_allclose(g_chunk, g_full, atol=(v + d) * 4 * float(np.finfo(np.float32).eps))
  assert not np.any(np.asarray(g_chunk)[1])  # the unscored row gets no gradient


def _write(path, lines):
  path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
  return path


def test_rows_masks_and_bad_records(tok_dir, tmp_path):
  tok = load_tokenizer(tok_dir)
  good = [
    json.dumps({"prompt": "Say hi.", "response": "Hi!"}),
    json.dumps({"messages": CONVERSATIONS[1]}),
    json.dumps({"prompt": "Q", "response": "A", "system": "S"}),
    json.dumps({"text": "A plain document."}),
  ]
  bad = {
    "{not json": "malformed",
    "[1, 2]": "malformed",
    json.dumps({"foo": 1}): "malformed",
    json.dumps({"prompt": "x", "response": 3}): "malformed",
    json.dumps({"messages": []}): "bad_messages",
    json.dumps({"messages": [{"role": "robot", "content": "x"}]}): "bad_messages",
    json.dumps({"messages": [{"role": "user", "content": None}]}): "bad_messages",
    json.dumps({"messages": [{"role": "user", "content": "x"}]}): "no_response",
    json.dumps({"prompt": "x", "response": "  "}): "no_response",
    json.dumps({"prompt": "long " * 200, "response": "late"}): "too_long",
  }
  file = _write(tmp_path / "mixed.jsonl", [*good[:2], *bad, *good[2:]])
  data = instruct.load_instruct_files(file, tok, seq_len=64)
  s = data.stats
  print(f"\n{s}")
  assert (s.examples, s.skipped) == (4, len(bad))
  for reason in ("malformed", "bad_messages", "no_response", "too_long"):
    assert getattr(s, reason) == list(bad.values()).count(reason), reason
  assert f"Skipped {len(bad)} records: 4 malformed" in str(s)
  assert data.tokens_NxL.shape == (4, 64) and data.tokens_NxL.dtype == np.int32
  # Row 0: the LLaMA-3 rendering, right-padded with EOS (no pad token); only "Hi!<|eot_id|>".
  ids, _ = instruct.tokenize_chat(
    tok, [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}],
    tok.chat_template,
  )  # fmt: skip
  row, mask = data.tokens_NxL[0], data.loss_mask_NxL[0]
  assert list(row[: len(ids)]) == ids and set(row[len(ids) :]) == {tok.eos_id}
  assert tok.decode(row[mask], skip_special_tokens=False) == "Hi!<|eot_id|>"
  assert not mask[0] and not mask[len(ids) :].any()
  assert s.response_tokens == int(data.loss_mask_NxL.sum())
  # A text record: every token after the first is a target, EOS included.
  text_row = data.tokens_NxL[3]
  assert data.loss_mask_NxL[3].sum() == len(tok.encode("A plain document.")) and text_row[0] == 512
  # Truncation keeps a record whose response starts within L.
  short = instruct.load_instruct_files(file, tok, seq_len=24)
  assert short.stats.truncated >= 1 and short.loss_mask_NxL.any(axis=1).all()
  with pytest.raises(BadRecordError, match=r"mixed\.jsonl:3: not JSON"):
    instruct.load_instruct_files(file, tok, seq_len=64, strict=True)
  # Batches: train batches are shuffled rows with their masks; eval pads with unscored rows.
  it = instruct.make_train_iterator(data, batch_size=3, seed=0)
  batch = next(it)
  assert batch["tokens"].shape == (3, 64) and batch["loss_mask"].dtype == bool
  state = it.get_state()
  nxt = next(it)
  it.set_state(state)
  np.testing.assert_array_equal(next(it)["tokens"], nxt["tokens"])
  evals = instruct.make_eval_batches(data, batch_size=3)
  assert len(evals) == 2 and not evals[1]["loss_mask"][1:].any()
  assert sum(int(e["loss_mask"].sum()) for e in evals) == s.response_tokens
