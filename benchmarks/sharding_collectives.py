"""Per-device optimizer state and collective traffic of FSDP training steps, 1B and 7B recipes.

Everything is abstract: the paper's recipes (`configs/c4_llama_{1b,7b}.py`, BF16) are built
with `trainer.build`, laid out on a 1x8 mesh (pure FSDP over 8 virtual CPU devices) by
`train.sharding`, and the real jitted train step (`trainer.make_train_step` with the layout) is
lowered from `jax.ShapeDtypeStruct`s and compiled. Nothing is allocated, so 7B compiles here.

* State bytes per device: exact, from each leaf's shard shape (`sharding.shard_bytes`).
* Temp per device: XLA's scratch for the whole step (`memory_analysis().temp_size_in_bytes`),
  which holds the refresh's workspace (for the exact SVD: the gathered float32 gradients).
* Collectives: parsed from the optimized HLO (`hlo.hlo_collectives`). "Bytes" of one
  collective is the size of the whole array it works on (an all-gather's result, the others'
  operand); each device sends about 7/8 of that (twice for a ring all-reduce). Loops with a known
  trip count (the scan over layers) multiply; GaLore's refresh is the true branch of one
  `conditional`, so a step moves "step" bytes and a refresh step "step + refresh" bytes. The
  randomized method's power-iteration loop has no static trip count and is counted once, which
  is exact for the default `power_iters=1`.

One sequence of 256 tokens per device per step (batch 8, no accumulation): the parameter
all-gathers and gradient reductions of FSDP do not depend on the batch; activation collectives
(whatever XLA's partitioner picks for the forward/backward) grow with it.

Usage:
  python benchmarks/sharding_collectives.py [--sizes 1b,7b] [--out benchmarks/results/sharding.md]
"""

from __future__ import annotations

import os
import sys

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  # Host code generation only: the HLO (and its collectives) is the same, compiles are faster.
  " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402
import collections  # noqa: E402
import importlib  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks import hlo  # noqa: E402
from train import sharding, trainer  # noqa: E402

GB = 1e9
MARKER = "<!-- Tables below: written by benchmarks/sharding_collectives.py -->"
STATE_ROWS = (  # (optimizer, projectors split over fsdp)
  ("adamw", True),
  ("galore_adamw", True),
  ("galore_adamw", False),
  ("galore_adamw_8bit", True),
  ("galore_adamw_8bit", False),
)
COLLECTIVE_ROWS = (  # (optimizer, subspace method, projectors split)
  ("adamw", "svd", True),
  ("galore_adamw", "svd", True),
  ("galore_adamw", "randomized", True),
  ("galore_adamw", "randomized", False),
)


def recipe(size: str, optimizer: str, method: str, shard_projectors: bool, batch: int):
  """The paper's recipe for `size` on a 1x8 FSDP mesh, one micro-batch of `batch` rows."""
  config = importlib.import_module(f"configs.c4_llama_{size}").get_config()
  config.optimizer.name = optimizer
  config.optimizer.subspace_method = method
  config.mesh.update(data=1, fsdp=8)
  config.mesh.shard_projectors = shard_projectors
  config.train.update(batch_size=batch, grad_accum_steps=1, eval_batch_size=batch)
  return config


def layout_of(config):
  setup = trainer.build(config)
  layout = trainer.make_layout(config, setup, sharding.make_mesh(1, 8))
  abstract = jax.eval_shape(lambda: trainer.init_state(setup, 0))
  return setup, layout, abstract


def state_row(size: str, optimizer: str, shard_projectors: bool) -> dict:
  config = recipe(size, optimizer, "randomized", shard_projectors, batch=8)
  _, layout, abstract = layout_of(config)
  unsplit = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract.opt_state))
  return {
    "state": unsplit,
    "state_per_device": sharding.shard_bytes(abstract.opt_state, layout.state.opt_state),
    "params_per_device": sharding.shard_bytes(abstract.params, layout.state.params),
    "rank": config.optimizer.rank,
  }


def collective_row(size: str, optimizer: str, method: str, shard_projectors: bool, seq: int):
  config = recipe(size, optimizer, method, shard_projectors, batch=8)
  setup, layout, abstract = layout_of(config)
  step = jax.jit(
    trainer.make_train_step(setup, 1, layout),
    in_shardings=(layout.state, layout.batch),
    out_shardings=(layout.state, layout.replicated),
    donate_argnums=(0,),
  )
  tokens = jax.ShapeDtypeStruct((8, seq), jnp.int32)
  t0 = time.perf_counter()
  compiled = step.lower(abstract, {"tokens": tokens}).compile()
  seconds = time.perf_counter() - t0
  colls = hlo.hlo_collectives(compiled.as_text())
  refresh = [c for c in colls if c.branch == 1]
  by_op = collections.Counter()
  for c in colls:
    if c.branch != 1:
      by_op[c.op] += c.bytes * c.count
  return {
    "step": hlo.collective_bytes(colls) + hlo.collective_bytes(colls, 0),
    "refresh": hlo.collective_bytes(colls, 1),
    "largest_refresh": max(refresh, key=lambda c: c.bytes, default=None),
    "largest_step": max((c for c in colls if c.branch != 1), key=lambda c: c.bytes, default=None),
    "by_op": dict(by_op),
    "temp_per_device": compiled.memory_analysis().temp_size_in_bytes,
    "compile_s": seconds,
  }


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", default="1b,7b")
  parser.add_argument("--seq", type=int, default=256)
  parser.add_argument("--out", default="")
  args = parser.parse_args(argv)
  sizes = args.sizes.split(",")
  lines = [
    f"jax {jax.__version__}, {jax.device_count()} virtual CPU devices, mesh data=1 x fsdp=8, "
    f"BF16 recipes, 8x{args.seq} tokens per step; GB = 1e9 bytes.",
    "",
    "### Optimizer state per device (FSDP over 8)",
    "",
    "| size | optimizer | rank | projectors | state, unsplit GB | state per device GB | "
    "params per device GB |",
    "|---|---|---|---|---|---|---|",
  ]
  print("\n".join(lines), flush=True)

  def emit(line: str) -> None:
    lines.append(line)
    print(line, flush=True)

  for size in sizes:
    for optimizer, split in STATE_ROWS:
      r = state_row(size, optimizer, split)
      proj = "-" if "galore" not in optimizer else ("split" if split else "replicated")
      emit(
        f"| {size} | {optimizer} | {r['rank'] if proj != '-' else '-'} | {proj} | "
        f"{r['state'] / GB:.3f} | {r['state_per_device'] / GB:.3f} | "
        f"{r['params_per_device'] / GB:.3f} |"
      )
  emit("")
  emit("### Collectives per step and per refresh step (compiled HLO)")
  emit("")
  emit(
    "| size | optimizer | subspace | projectors | per step GB | refresh branch GB | "
    "per refresh step GB | largest refresh collective | largest step collective | "
    "step by op (GB) | temp per device GB | compile s |"
  )
  emit("|---|---|---|---|---|---|---|---|---|---|---|---|")
  for size in sizes:
    for optimizer, method, split in COLLECTIVE_ROWS:
      r = collective_row(size, optimizer, method, split, args.seq)
      galore = "galore" in optimizer
      name = lambda c: (
        "-"
        if c is None
        else (
          f"{c.op} {c.shape}{f' +{c.arrays - 1} more' if c.arrays > 1 else ''} "
          f"({c.bytes / 1e6:.1f} MB)"
        )
      )
      ops = ", ".join(f"{k} {v / GB:.2f}" for k, v in sorted(r["by_op"].items()))
      emit(
        f"| {size} | {optimizer} | {method if galore else '-'} | "
        f"{('split' if split else 'replicated') if galore else '-'} | {r['step'] / GB:.2f} | "
        f"{r['refresh'] / GB:.3f} | {(r['step'] + r['refresh']) / GB:.2f} | "
        f"{name(r['largest_refresh'])} | {name(r['largest_step'])} | "
        f"{ops} | {r['temp_per_device'] / GB:.2f} | {r['compile_s']:.0f} |"
      )
  if args.out:  # replace what follows the marker, keep the text written above it
    out = Path(args.out)
    head = out.read_text().split(MARKER)[0] if out.exists() else ""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(head + MARKER + "\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
  main()
