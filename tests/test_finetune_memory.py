"""benchmarks/finetune_memory.py: the memory rows come from `finetune_memory`, whose breakdown
adds up to XLA's own totals (compiled on abstract shapes; nothing is timed or allocated)."""

import jax.numpy as jnp
import pytest

from benchmarks import finetune_memory as fm
from configs import default
from train import fused, trainer
from train.model import llama_config

# A tiny LLaMA with a vocabulary larger than its block matrices, as LLaMA-3's is.
TINY = dict(vocab_size=512, hidden_dim=32, mlp_dim=64, num_heads=4, num_layers=2)


def test_breakdown_sums_to_xla_totals(capsys):
  rows = []
  for vocab_chunk in (0, 128):
    r = fm.finetune_memory(
      "9m", rank=8, seq=32, loss_chunk_size=8, vocab_chunk_size=vocab_chunk, **TINY
    )
    # The argument is exactly the weights, the optimizer state and the tokens.
    assert r["argument"] == r["weights"] + r["state"] + r["tokens"]
    assert r["tokens"] == 32 * jnp.dtype(jnp.int32).itemsize
    assert 0 < r["moments"] + r["projectors"] <= r["state"]
    # Params and state are updated in place (donated); only the metrics and scalar counters are
    # new buffers (436 bytes here), shown as 0.00 GB in the table. Peak as documented.
    assert 0 <= r["output"] - r["alias"] < 1024
    assert r["peak"] == r["argument"] + r["output"] - r["alias"] + r["temp"]
    rows.append((("9m", 8, 1, 32, 8, vocab_chunk), r))
  fm.print_table(rows)
  lines = capsys.readouterr().out.splitlines()[2:]
  for line, (_, r) in zip(lines, rows):
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert float(cells[4]) == round(r["weights"] / fm.GB, 2)
    assert float(cells[10].strip("*")) == round(r["peak"] / fm.GB, 2)


def test_fused_vocab_chunk_size_is_validated():
  c = default.get_config()
  c.train.fused_vocab_chunk_size = 1024
  with pytest.raises(ValueError, match="fused_vocab_chunk_size"):
    trainer.validate_config(c)  # fused_update is off
  c.train.fused_update, c.model.scan_layers, c.model.loss_chunk_size = True, True, 16
  trainer.validate_config(c)
  c.train.fused_vocab_chunk_size = -1
  with pytest.raises(ValueError, match="fused_vocab_chunk_size"):
    trainer.validate_config(c)


def test_fused_fences_free_what_they_are_for(monkeypatch):
  """`train.fused._after` keeps XLA:CPU from holding the embedding's float32 scatter-add
  gradient through the backward scan and from converting every leaf of a half-block at once.
  Compiled at 1B shapes (256 tokens, rank 512, nothing allocated), the step without the fences
  needs at least those buffers more: the `[V, D]` float32 embedding gradient and one float32
  copy of an MLP kernel's gradient."""
  c = llama_config("1b")
  kw = dict(rank=512, seq=256, loss_chunk_size=0)
  fenced = fm.finetune_memory("1b", **kw)["temp"]
  monkeypatch.setattr(fused, "_after", lambda fn, x, dep: fn(x))
  unfenced = fm.finetune_memory("1b", **kw)["temp"]
  f32 = jnp.dtype(jnp.float32).itemsize
  assert unfenced - fenced >= (c.vocab_size * c.hidden_dim + c.hidden_dim * c.mlp_dim) * f32
