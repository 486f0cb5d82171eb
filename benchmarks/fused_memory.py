"""Compiled memory of the fused layer-wise step (`train.fused`) vs the standard step, 1B and 7B.

Both steps are jitted with params and optimizer state donated, lowered on abstract inputs
(`jax.ShapeDtypeStruct`: nothing is allocated) and compiled; the numbers are XLA's
`memory_analysis()` on the default backend: argument (params + optimizer state + tokens, exact),
output and alias (exact), temp (XLA's scratch), peak = argument + output - alias + temp.
Standard: `benchmarks.compiled_memory.make_train_step` (`value_and_grad` -> `tx.update` ->
`apply_updates`), with and without per-block remat. Fused: `train.fused.make_fused_update`,
one pass; with `--clip` also the two-pass global-norm clipping; with `--accum` also 2 micro-batches
(GaLore gradients accumulated in the subspace).

Default setting: the paper's Fig. 1 / Sec. 5.4 (BF16 weights, 8-bit GaLore at rank 1024 for 7B,
512 for 1B, 256 tokens per step). Then the step time of both at a small size (`--time-size`,
float32, measured, median of `--steps`).

Usage:
  python benchmarks/fused_memory.py [--sizes 1b,7b] [--dtype bfloat16] [--clip] [--accum]
      [--optimizer galore_adamw_8bit] [--time-size 60m] [--steps 10]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from galore_jax.memory import tree_bytes
from train import fused
from train.model import Llama, llama_config

try:  # `python benchmarks/fused_memory.py` (script directory on sys.path) or `-m benchmarks...`
  from compiled_memory import PAPER_RANK, make_optimizer, make_train_step
except ImportError:
  from benchmarks.compiled_memory import PAPER_RANK, make_optimizer, make_train_step

GB = 1e9
PAPER_7B_GB = 22.0  # 8-bit GaLore + layer-wise updates, 7B, token batch 256 (paper Sec. 5.4)


def setup(size: str, optimizer: str, dtype: str, remat: str = "none"):
  """(config, graphdef, tx, abstract params, abstract state)."""
  config = llama_config(size, dtype=dtype, param_dtype=dtype, scan_layers=True, remat_policy=remat)
  graphdef, params = nnx.split(nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0))), nnx.Param)
  params = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), params)
  tx = make_optimizer(optimizer, PAPER_RANK[size])
  return config, graphdef, tx, params, jax.eval_shape(tx.init, params)


def memory(step, params, state, tokens) -> dict:
  t0 = time.perf_counter()
  mem = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, tokens).compile()
  mem = mem.memory_analysis()
  out = {
    "argument": mem.argument_size_in_bytes,
    "output": mem.output_size_in_bytes,
    "alias": mem.alias_size_in_bytes,
    "temp": mem.temp_size_in_bytes,
  }
  out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
  out["compile_s"] = time.perf_counter() - t0
  return out


def variants(size: str, optimizer: str, dtype: str, args):
  """(name, step, params, state, tokens) for each row of one size."""
  tokens = jax.ShapeDtypeStruct((1, 256), jnp.int32)
  for remat in ("none", "full"):
    _, graphdef, tx, params, state = setup(size, optimizer, dtype, remat)
    yield f"standard, remat {remat}", make_train_step(graphdef, tx), params, state, tokens
  config, _, tx, params, state = setup(size, optimizer, dtype)
  options = dict(check_optimizer=False)
  yield "fused", fused.make_fused_update(config, tx, **options), params, state, tokens
  if args.clip:
    step = fused.make_fused_update(config, tx, grad_clip_norm=1.0, **options)
    yield "fused, clip (2 passes)", step, params, state, tokens
  if args.accum:
    step = fused.make_fused_update(config, tx, 2, proj_type="std", **options)
    yield (
      "fused, 2 x 256 accumulated",
      step,
      params,
      state,
      jax.ShapeDtypeStruct((2, 256), jnp.int32),
    )


def memory_table(args) -> None:
  print(
    f"jax {jax.__version__}, backend {jax.default_backend()}; {args.dtype} weights, "
    f"{args.optimizer} (rank {', '.join(f'{s} {PAPER_RANK[s]}' for s in args.sizes)}), "
    "256 tokens per step unless stated; GB = 1e9 bytes\n"
  )
  print("| size | step | params GB | opt state GB | argument GB | temp GB | peak GB | compile s |")
  print("|---|---|---|---|---|---|---|---|")
  for size in args.sizes:
    for name, step, params, state, tokens in variants(size, args.optimizer, args.dtype, args):
      m = memory(step, params, state, tokens)
      row = [size, name, tree_bytes(params) / GB, tree_bytes(state) / GB]
      row += [m["argument"] / GB, m["temp"] / GB, m["peak"] / GB, m["compile_s"]]
      print("| {} | {} | {:.2f} | {:.2f} | {:.2f} | {:.2f} | {:.2f} | {:.0f} |".format(*row))
  if "7b" in args.sizes:
    print(f"\nPaper (7B, 8-bit GaLore, layer-wise updates, 256 tokens): {PAPER_7B_GB} GB.")


def time_steps(args) -> None:
  """Measured step time of the standard and the fused step at a small size (float32)."""
  config, graphdef, tx, abstract, _ = setup(args.time_size, args.optimizer, "float32")
  params = nnx.split(Llama(config, rngs=nnx.Rngs(0)), nnx.Param)[1]
  tokens = jnp.asarray(np.random.default_rng(0).integers(1, 32000, (1, 256)), jnp.int32)
  steps = {
    "standard": make_train_step(graphdef, tx),
    "standard, remat full": make_train_step(
      setup(args.time_size, args.optimizer, "float32", "full")[1], tx
    ),
    "fused": fused.make_fused_update(config, tx, check_optimizer=False),
  }
  print(
    f"\nStep time, {args.time_size}, float32, 1 x 256 tokens, {args.optimizer}, median of "
    f"{args.steps} steps after 3 warm-up steps (wall and process CPU seconds):\n"
  )
  print("| step | wall s | CPU s |")
  print("|---|---|---|")
  for name, step in steps.items():
    step = jax.jit(step, donate_argnums=(0, 1))
    p, s = jax.tree.map(jnp.copy, params), tx.init(params)
    for _ in range(3):
      p, s, _ = step(p, s, tokens)
    jax.block_until_ready(p)
    wall, cpu = [], []
    for _ in range(args.steps):
      t0, c0 = time.perf_counter(), time.process_time()
      p, s, _ = jax.block_until_ready(step(p, s, tokens))
      wall.append(time.perf_counter() - t0)
      cpu.append(time.process_time() - c0)
    print(f"| {name} | {statistics.median(wall):.3f} | {statistics.median(cpu):.3f} |")


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", default="1b,7b", type=lambda s: s.split(","))
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--optimizer", default="galore_adamw_8bit")
  parser.add_argument("--clip", action="store_true", help="also the two-pass clipping step")
  parser.add_argument("--accum", action="store_true", help="also 2 accumulated micro-batches")
  parser.add_argument("--time-size", default="60m", help="'' skips the step-time table")
  parser.add_argument("--steps", type=int, default=10)
  args = parser.parse_args(argv)
  memory_table(args)
  if args.time_size:
    time_steps(args)


if __name__ == "__main__":
  main()
