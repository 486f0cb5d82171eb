"""Compiled memory of a fine-tune step: LLaMA-3-8B and LLaMA-2-7B shapes, 8-bit GaLore r=128.

The fine-tune setting (LLaMA-Factory's GaLore recipe, `configs/finetune.py`'s rank): BF16
weights and activations, `galore_jax.galore_adamw_8bit` at rank 128 (scale 2, update_proj_gap
500) on the attention and MLP kernels, 8-bit AdamW moments for the embedding, LM head and norms,
the fused layer-wise step (`train.fused.make_fused_update`), the chunked loss
(`loss_chunk_size`), one sequence of 2048 tokens. Each row is one step lowered on
`jax.ShapeDtypeStruct`s (nothing is allocated), params and optimizer state donated, compiled;
the numbers are XLA's `memory_analysis()` on the default backend, split as

* weights: the parameters (exact), optimizer state: its moments and GaLore projectors (exact,
  `galore_jax.memory.state_bytes`), tokens: the batch (exact); their sum is XLA's argument;
* gradient + scratch: XLA's temp (the block inputs saved for the backward pass, one block's or
  one vocabulary chunk's gradient, the activations of the block being recomputed, the
  optimizer's temporaries for one leaf, and on XLA:CPU its float32 copies of BF16 operands);
* peak = argument + output - alias + temp (output - alias: the metrics and scalar counters;
  params and state are updated in place).

Rows: `vocab chunks 0` is the fused step with whole-leaf gradients of the embedding and LM head;
`vocab chunks N` computes and applies those gradients N vocabulary entries at a time
(`make_fused_update(vocab_chunk_size=N)`), the head's loss by
the same column chunks (an online softmax). The pre-training row (the paper's 7B rank 1024, 256
tokens, full logits) is printed apart with `--pretrain`.

Usage:
  python benchmarks/finetune_memory.py [--sizes llama3-8b,7b] [--seq 2048] [--rank 128]
      [--vocab-chunks 0,16384] [--loss-chunk 16] [--pretrain] [--vocab-size 256]
      [--galore-vocab] [--attention-chunk 512] [--grad-clip 1.0]

`--attention-chunk C` runs attention C queries at a time, each chunk recomputed in the backward
(`LlamaConfig.attention_chunk_size`), so the `[B, H, L, L]` float32 scores exist one chunk at a
time.
`--galore-vocab` puts GaLore (same rank) on the embedding and LM head too (their projector on
the D side, low-rank moments `[r, V]` / `[V, r]` split by vocabulary chunks like the weight).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import galore_jax as gj
from galore_jax.memory import state_bytes, tree_bytes
from train import fused, optim
from train.model import Llama, llama_config

try:  # `python benchmarks/finetune_memory.py` (script directory on sys.path) or `-m benchmarks...`
  from fused_memory import memory as compiled_memory
except ImportError:
  from benchmarks.fused_memory import memory as compiled_memory

GB = 1e9
FINETUNE_RANK = 128  # configs/finetune.py; LLaMA-Factory's GaLore recipe for Llama-3-8B
PRETRAIN_RANK = 1024  # the paper's 7B pre-training rank (Sec. 5.4, Fig. 1)


def finetune_optimizer(rank: int, galore_vocab: bool = False) -> optax.GradientTransformation:
  """8-bit GaLore as the fine-tune config builds it (scale 2, gap 500, the model's targets;
  with `galore_vocab`, the embedding and LM head too)."""
  mask = optim.galore_vocab_mask if galore_vocab else gj.llama_galore_mask
  return gj.galore_adamw_8bit(2e-5, rank=rank, update_proj_gap=500, scale=2.0, mask=mask)


def finetune_memory(
  size: str,
  *,
  rank: int = FINETUNE_RANK,
  batch: int = 1,
  seq: int = 2048,
  loss_chunk_size: int = 16,
  vocab_chunk_size: int = 0,
  tx: optax.GradientTransformation | None = None,
  galore_vocab: bool = False,
  grad_clip_norm: float = 0.0,
  **model_overrides,
) -> dict:
  """Compiled memory of one fused fine-tune step, in bytes, with the breakdown.

  Args:
    size: a `train.model.llama_config` size ("llama3-8b", "7b", ... "9m").
    rank: GaLore rank of `finetune_optimizer` (ignored with `tx`).
    batch, seq: the token batch's shape.
    loss_chunk_size, vocab_chunk_size: `train.fused.make_fused_update`'s options.
    tx: the optimizer; default `finetune_optimizer(rank, galore_vocab)`.
    galore_vocab: GaLore on the embedding and LM head too (ignored with `tx`).
    grad_clip_norm: `make_fused_update`'s global-norm clipping (0: off, as `configs/finetune.py`).
    **model_overrides: `LlamaConfig` fields (default BF16 weights and activations, scanned).

  Returns:
    `weights`, `moments`, `projectors`, `state` (moments + projectors + counters), `tokens`,
    `argument` (= weights + state + tokens), `output`, `alias`, `temp`, `peak`, `compile_s`.
  """
  overrides = dict(dtype="bfloat16", param_dtype="bfloat16", scan_layers=True) | model_overrides
  config = llama_config(size, **overrides)
  params = nnx.split(nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0))), nnx.Param)[1]
  params = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), params)
  tx = tx or finetune_optimizer(rank, galore_vocab)
  state = jax.eval_shape(tx.init, params)
  tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
  step = fused.make_fused_update(
    config,
    tx,
    check_optimizer=False,
    loss_chunk_size=loss_chunk_size,
    vocab_chunk_size=vocab_chunk_size,
    grad_clip_norm=grad_clip_norm,
  )
  split = state_bytes(tx, params)
  out = {
    "weights": tree_bytes(params),
    "moments": split.moments,
    "projectors": split.projectors,
    "state": split.total,
    "tokens": tree_bytes(tokens),
  }
  return out | compiled_memory(step, params, state, tokens)


ROW = "| {} | {} | {} | {} |" + " {:.2f} |" * 6 + " **{:.2f}** | {:.0f} |"


def print_table(rows) -> None:
  print(
    "| shapes | rank | tokens | loss / vocab chunks | weights GB | moments GB | projectors GB | "
    "argument GB | temp (grad + scratch) GB | output - alias GB | peak GB | compile s |"
  )
  print("|---|---|---|---|---|---|---|---|---|---|---|---|")
  for (size, rank, batch, seq, loss_chunk, vocab_chunk), r in rows:
    cells = [size, rank, f"{batch} x {seq}", f"{loss_chunk or 'full logits'} / {vocab_chunk}"]
    cells += [r[k] / GB for k in ("weights", "moments", "projectors", "argument", "temp")]
    cells += [(r["output"] - r["alias"]) / GB, r["peak"] / GB, r["compile_s"]]
    print(ROW.format(*cells), flush=True)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", default="llama3-8b,7b", type=lambda s: s.split(","))
  parser.add_argument("--rank", type=int, default=FINETUNE_RANK)
  parser.add_argument("--seq", type=int, default=2048)
  parser.add_argument("--loss-chunk", type=int, default=16)
  parser.add_argument("--vocab-chunks", default="0,16384", type=lambda s: s.split(","))
  parser.add_argument("--pretrain", action="store_true", help="also the rank-1024 pre-train row")
  parser.add_argument("--vocab-size", type=int, default=0, help="override (e.g. 256: blocks only)")
  parser.add_argument(
    "--galore-vocab", action="store_true", help="GaLore on the embedding and LM head too"
  )
  parser.add_argument(
    "--attention-chunk", type=int, default=0, help="queries per attention chunk (0: all)"
  )
  parser.add_argument(
    "--grad-clip", type=float, default=0.0, help="global-norm clipping threshold (0: off)"
  )
  args = parser.parse_args(argv)
  print(
    f"jax {jax.__version__}, backend {jax.default_backend()}; BF16 weights, galore_adamw_8bit, "
    "fused layer-wise step; GB = 1e9 bytes\n"
  )
  rows = []
  for size in args.sizes:
    for vocab_chunk in map(int, args.vocab_chunks):
      name = f"{size}, GaLore on embed + head" if args.galore_vocab else size
      if args.attention_chunk:
        name += f", attention chunks {args.attention_chunk}"
      if args.grad_clip:
        name += f", clip {args.grad_clip:g}"
      key = (name, args.rank, 1, args.seq, args.loss_chunk, vocab_chunk)
      r = finetune_memory(
        size,
        rank=args.rank,
        seq=args.seq,
        loss_chunk_size=args.loss_chunk,
        vocab_chunk_size=vocab_chunk,
        galore_vocab=args.galore_vocab,
        grad_clip_norm=args.grad_clip,
        attention_chunk_size=args.attention_chunk,
        **({"vocab_size": args.vocab_size} if args.vocab_size else {}),
      )
      rows.append((key, r))
  print_table(rows)
  if args.pretrain:
    print("\nPre-training setting (the paper's 7B rank, 256 tokens, full logits), apart:\n")
    rows = []
    for size in args.sizes:
      r = finetune_memory(size, rank=PRETRAIN_RANK, seq=256, loss_chunk_size=0)
      rows.append(((size, PRETRAIN_RANK, 1, 256, 0, 0), r))
    print_table(rows)


if __name__ == "__main__":
  main()
