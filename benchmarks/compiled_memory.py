"""XLA's memory report of full train steps, AdamW vs GaLore (and 8-bit), for LLaMA 60M ... 7B.

Each step is a plain functional train step (`nnx.merge` -> `jax.value_and_grad` of
`next_token_loss` -> `tx.update` -> `optax.apply_updates`), jitted with params and optimizer
state donated, lowered on abstract inputs (`jax.ShapeDtypeStruct`: nothing is allocated, so 7B
compiles on a small CPU machine) and compiled; the table is `compiled.memory_analysis()`:

* argument: params + optimizer state + tokens (exact),
* output: new params + new state + loss (exact); alias: the part of it written in place into
  the donated arguments,
* temp: XLA's scratch for the step: the full gradient, the activations saved for the backward
  pass, the optimizer's intermediates (and GaLore's refresh workspace: the float32 SVD input
  and factors of one matrix at a time, inside a conditional that runs every `update_proj_gap`
  steps).
* peak = argument + output - alias + temp: what the device must hold at once.
* update-only temp: the temp of `jax.jit(tx.update)` alone (gradients passed in), i.e. the
  optimizer's own scratch; compile s counts both compiles.

BF16 parameters and activations, one sequence of 256 tokens per step (the paper's Fig. 1 /
Sec. 5.5 setting), GaLore on attention + MLP kernels at the paper's ranks
(60M 128, 130M/350M 256, 1B 512, 7B 1024), `update_proj_gap` 200, scale 0.25.
The fused layer-wise step, which never holds the full gradient, is issue #10 (not here).

Usage:
  python benchmarks/compiled_memory.py [--quick] [--sizes 60m,1b] [--no-scan] [--remat full]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import galore_jax as gj
from galore_jax.memory import state_bytes, tree_bytes
from train.model import Llama, llama_config, next_token_loss

try:  # 8-bit rows once galore_jax.adam8bit exists
  from galore_jax import adam8bit
except ImportError:  # pragma: no cover
  adam8bit = None

GB = 1e9
# llama3-8b is not in the paper: the 7B rank, on LLaMA-3-8B shapes (train.model.RELEASED_SHAPES).
PAPER_RANK = {
  "9m": 64,
  "60m": 128,
  "130m": 256,
  "350m": 256,
  "1b": 512,
  "7b": 1024,
  "llama3-8b": 1024,
}
OPTIMIZERS = ("adamw", "galore_adamw", "adamw_8bit", "galore_adamw_8bit")


def make_optimizer(
  name: str, rank: int, lr: float = 1e-3, subspace_method: str = "svd"
) -> optax.GradientTransformation:
  """The four optimizers of the comparison (constant lr, as the state size does not care)."""
  galore = dict(
    rank=rank, update_proj_gap=200, mask=gj.llama_galore_mask, subspace_method=subspace_method
  )
  if name == "adamw":
    return optax.adamw(lr)
  if name == "galore_adamw":
    return gj.galore_adamw(lr, **galore)
  if adam8bit is None:
    raise ValueError(f"{name} needs galore_jax.adam8bit")
  if name == "adamw_8bit":
    return gj.adamw_8bit(lr)
  if name == "galore_adamw_8bit":
    return gj.galore_adamw_8bit(lr, **galore)
  raise ValueError(f"unknown optimizer {name!r}; known: {OPTIMIZERS}")


def make_train_step(graphdef, tx: optax.GradientTransformation):
  """`step(params, opt_state, tokens_BxL) -> (params, opt_state, loss)`, a pure function."""

  def loss_fn(params, tokens_BxL):
    loss_sum, num_tokens = next_token_loss(nnx.merge(graphdef, params)(tokens_BxL), tokens_BxL)
    return loss_sum / jnp.maximum(num_tokens, 1)

  def step(params, opt_state, tokens_BxL):
    loss, grads = jax.value_and_grad(loss_fn)(params, tokens_BxL)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return step


def abstract_setup(
  size: str,
  optimizer: str,
  *,
  batch: int,
  seq: int,
  subspace_method: str = "svd",
  **model_overrides,
):
  """(step, abstract params, abstract opt state, abstract tokens) for one table row."""
  overrides = dict(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16) | model_overrides
  config = llama_config(size, **overrides)
  graphdef, params = nnx.split(nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0))))
  tx = make_optimizer(optimizer, PAPER_RANK.get(size, 128), subspace_method=subspace_method)
  opt_state = jax.eval_shape(tx.init, params)
  tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
  return make_train_step(graphdef, tx), tx, params, opt_state, tokens


def compiled_memory(size: str, optimizer: str, *, batch: int, seq: int, **overrides):
  """Memory analysis of one compiled train step, plus the state split and compile time."""
  step, tx, params, opt_state, tokens = abstract_setup(
    size, optimizer, batch=batch, seq=seq, **overrides
  )
  t0 = time.perf_counter()
  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt_state, tokens).compile()
  mem = compiled.memory_analysis()
  # The optimizer update alone (gradients as an input): its temp is the optimizer's own scratch,
  # e.g. GaLore's refresh workspace, which the full step's temp contains too.
  update = jax.jit(tx.update, donate_argnums=(1,)).lower(params, opt_state, params).compile()
  return {
    "update_temp": update.memory_analysis().temp_size_in_bytes,
    "argument": mem.argument_size_in_bytes,
    "output": mem.output_size_in_bytes,
    "alias": mem.alias_size_in_bytes,
    "temp": mem.temp_size_in_bytes,
    "peak": mem.argument_size_in_bytes
    + mem.output_size_in_bytes
    - mem.alias_size_in_bytes
    + mem.temp_size_in_bytes,
    "params": tree_bytes(params),
    "state": state_bytes(tx, params),
    "compile_s": time.perf_counter() - t0,
  }


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", default="60m,130m,350m,1b,7b")
  parser.add_argument("--optimizers", default=",".join(OPTIMIZERS))
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--seq", type=int, default=256)
  parser.add_argument("--no-scan", action="store_true", help="unrolled layers (2-D kernels)")
  parser.add_argument("--remat", default="none", help="train.model remat_policy, e.g. full")
  parser.add_argument("--subspace-method", default="svd", help="GaLore refresh: svd|randomized")
  parser.add_argument("--quick", action="store_true", help="60m and 130m only")
  args = parser.parse_args(argv)
  sizes = ["60m", "130m"] if args.quick else args.sizes.split(",")
  optimizers = [o for o in args.optimizers.split(",") if adam8bit or "8bit" not in o]
  scan = not args.no_scan
  print(
    f"jax {jax.__version__}, backend {jax.default_backend()}; BF16, "
    f"{args.batch}x{args.seq} tokens, scan_layers={scan}, remat={args.remat}, "
    f"GaLore subspace_method={args.subspace_method}; GB = 1e9 bytes\n"
  )
  print(
    "| size | optimizer | params GB | opt state GB | argument GB | output GB | alias GB | "
    "temp GB | peak GB | peak vs AdamW | update-only temp GB | compile s |"
  )
  print("|---|---|---|---|---|---|---|---|---|---|---|---|")
  for size in sizes:
    base = None
    for opt in optimizers:
      r = compiled_memory(
        size,
        opt,
        batch=args.batch,
        seq=args.seq,
        subspace_method=args.subspace_method,
        scan_layers=scan,
        remat_policy=args.remat,
      )
      base = base or r["peak"]
      f = lambda key, r=r: f"{r[key] / GB:.3f}"
      print(
        f"| {size} | {opt} | {f('params')} | {r['state'].total / GB:.3f} | {f('argument')} | "
        f"{f('output')} | {f('alias')} | {f('temp')} | {f('peak')} | "
        f"{100 * (r['peak'] / base - 1):+.1f}% | {f('update_temp')} | {r['compile_s']:.1f} |",
        flush=True,
      )


if __name__ == "__main__":
  main()
