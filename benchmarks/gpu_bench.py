"""Train-step speed and memory on an accelerator: AdamW vs GaLore vs 8-bit, LLaMA 60M ... 1B.

For each (size, optimizer) the plain functional train step of `compiled_memory.py` (BF16 params
and activations, scan over layers, params and state donated) is compiled ahead of time; then:

* compiled memory: XLA's `memory_analysis()` (argument, temp, peak = argument + output - alias
  + temp);
* device memory: `peak_bytes_in_use` of the device allocator after the run (GPU/TPU; the CPU
  backend has no allocator stats). The process-wide peak cannot be reset, so runs go in order of
  increasing compiled peak and a row whose peak did not rise is marked "<=";
* step time: step 0 (a GaLore refresh, right after compile, untimed), `--warmup` steps, then the
  median of `--steps` non-refresh steps; then one more refresh step, timed (the GaLore transforms
  are built with `update_proj_gap = warmup + steps + 1` so that it lands there; the gap does not
  change the per-step cost or the state). Amortised = (199 non-refresh + 1 refresh) / 200,
  the paper's update_proj_gap. Tokens/s = batch x seq / amortised step time.

Paper reference (Table 11, LLaMA 1B, token batch 256, one A100; not layer-wise): AdamW 13.60 G,
1256.98 tok/s; Adam8bit 9.54 G, 1569.89 tok/s; 8-bit GaLore 7.95 G, 1109.38 tok/s.

On a CPU backend (or with `--quick`) it runs a tiny LLaMA (2 layers, vocab 1000) so the script
stays tested without an accelerator. Imports: jax, optax, numpy, flax, galore_jax, train.model
(and the sibling `compiled_memory.py`), which is what the lent GPU machine has.

Usage: python benchmarks/gpu_bench.py [--quick] [--sizes 60m,130m,350m,1b] [--batch 1]
  [--steps 10] [--subspace-method svd|randomized] [--remat full]
On a lent GPU with little device time, start small: `--sizes 60m,350m --steps 5` (each row
compiles a train step, and every GaLore row runs two exact-SVD refreshes).
"""

from __future__ import annotations

import os

# Before numpy/jax load OpenBLAS (jax's CPU LAPACK, hence its SVD, comes from it): on a shared,
# oversubscribed CPU its spinning worker threads make a 512x1376 SVD 10-30x slower (measured
# 0.3 s with one thread vs 3-20 s with two at load ~10 on 2 cores). Override by setting it.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import galore_jax as gj
from galore_jax.memory import state_bytes
from train.model import Llama, llama_config

try:  # `python benchmarks/gpu_bench.py` (script directory on sys.path) or `-m benchmarks.gpu_bench`
  from compiled_memory import OPTIMIZERS, PAPER_RANK, make_train_step
except ImportError:
  from benchmarks.compiled_memory import OPTIMIZERS, PAPER_RANK, make_train_step

try:
  from galore_jax import adam8bit
except ImportError:  # pragma: no cover
  adam8bit = None

GB = 1e9
PAPER_TABLE11 = {
  "adamw": (13.60, 1256.98),
  "adamw_8bit": (9.54, 1569.89),
  "galore_adamw_8bit": (7.95, 1109.38),
}  # 1B: memory G, tokens/s
TINY = dict(num_layers=2, vocab_size=1000)  # on "tiny": llama_config("9m", **TINY)


def model_config(size: str, remat: str):
  base, overrides = ("9m", TINY) if size == "tiny" else (size, {})
  return llama_config(
    base,
    dtype=jnp.bfloat16,
    param_dtype=jnp.bfloat16,
    scan_layers=True,
    remat_policy=remat,
    **overrides,
  )


def make_tx(name: str, rank: int, gap: int, method: str) -> optax.GradientTransformation:
  galore = dict(rank=rank, update_proj_gap=gap, mask=gj.llama_galore_mask, subspace_method=method)
  if name == "adamw":
    return optax.adamw(1e-3)
  if name == "galore_adamw":
    return gj.galore_adamw(1e-3, **galore)
  if name == "adamw_8bit":
    return gj.adamw_8bit(1e-3)
  return gj.galore_adamw_8bit(1e-3, **galore)


def prepare(size: str, opt: str, args):
  """Model config, graphdef, tx and the AOT-compiled step with its memory analysis."""
  config = model_config(size, args.remat)
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0))))
  rank = 32 if size == "tiny" else PAPER_RANK[size]
  tx = make_tx(opt, rank, args.warmup + args.steps + 1, args.subspace_method)
  state_abs = jax.eval_shape(tx.init, abstract)
  tokens = jax.ShapeDtypeStruct((args.batch, args.seq), jnp.int32)
  t0 = time.perf_counter()
  step = make_train_step(graphdef, tx)
  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(abstract, state_abs, tokens).compile()
  m = compiled.memory_analysis()
  peak = (
    m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
  )
  return dict(
    size=size,
    opt=opt,
    config=config,
    tx=tx,
    compiled=compiled,
    rank=rank,
    argument=m.argument_size_in_bytes,
    temp=m.temp_size_in_bytes,
    peak=peak,
    state=state_bytes(tx, abstract).total,
    compile_s=time.perf_counter() - t0,
  )


def device_peak() -> int | None:
  stats = jax.local_devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def run(row: dict, args) -> dict:
  """Allocates params/state on the device, runs the compiled step, times it."""
  config, tx, compiled = row["config"], row["tx"], row["compiled"]
  params = jax.jit(lambda: nnx.split(Llama(config, rngs=nnx.Rngs(0)))[1])()
  state = jax.jit(tx.init)(params)
  tokens = jax.random.randint(jax.random.key(1), (args.batch, args.seq), 1, config.vocab_size)

  def step():
    nonlocal params, state
    params, state, loss = compiled(params, state, tokens)
    jax.block_until_ready(loss)
    return loss

  def timed():
    t0 = time.perf_counter()
    loss = step()
    return time.perf_counter() - t0, loss

  for _ in range(1 + args.warmup):  # step 0 refreshes; then warm-up
    step()
  times = [timed()[0] for _ in range(args.steps)]
  refresh, loss = timed()  # count = warmup + steps + 1 = update_proj_gap: a refresh for GaLore
  if not np.isfinite(float(loss)):
    raise FloatingPointError(f"{row['size']} {row['opt']}: loss {float(loss)}")
  del params, state
  return dict(step_s=statistics.median(times), refresh_s=refresh, device_peak=device_peak())


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", default="60m,130m,350m,1b")
  parser.add_argument("--optimizers", default=",".join(OPTIMIZERS))
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--seq", type=int, default=256)
  parser.add_argument("--steps", type=int, default=10, help="timed non-refresh steps")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--remat", default="none", help="train.model remat_policy, e.g. full")
  parser.add_argument("--subspace-method", default="svd", help="GaLore refresh: svd|randomized")
  parser.add_argument("--quick", action="store_true", help="tiny model, 2 timed steps")
  args = parser.parse_args(argv)
  backend = jax.default_backend()
  if args.quick or backend == "cpu":
    args.sizes, args.steps, args.warmup = "tiny", min(args.steps, 2), min(args.warmup, 1)
  optimizers = [o for o in args.optimizers.split(",") if adam8bit or "8bit" not in o]
  print(
    f"jax {jax.__version__}, backend {backend}, device {jax.local_devices()[0].device_kind}; "
    f"BF16, {args.batch}x{args.seq} tokens/step, scan_layers, remat={args.remat}, "
    f"GaLore refresh {args.subspace_method}; GB = 1e9\n"
  )
  t0 = time.perf_counter()
  rows = [prepare(s, o, args) for s in args.sizes.split(",") for o in optimizers]
  rows.sort(key=lambda r: r["peak"])  # so the allocator's running peak is each run's own
  prev_peak = 0
  for row in rows:
    row |= run(row, args)
    row["peak_masked"] = row["device_peak"] is not None and row["device_peak"] <= prev_peak
    prev_peak = max(prev_peak, row["device_peak"] or 0)
  print(
    "| size | optimizer | rank | state GB | compiled peak GB | device peak GB | step ms | "
    "refresh ms | amortised T=200 ms | tokens/s | time vs AdamW | paper (1B, Table 11) |"
  )
  print("|---|---|---|---|---|---|---|---|---|---|---|---|")
  order = {
    (s, o): i for i, (s, o) in enumerate((s, o) for s in args.sizes.split(",") for o in optimizers)
  }
  rows.sort(key=lambda r: order[(r["size"], r["opt"])])
  base = {r["size"]: r for r in rows if r["opt"] == "adamw"}
  for r in rows:
    amort = (199 * r["step_s"] + r["refresh_s"]) / 200 if "galore" in r["opt"] else r["step_s"]
    r["amort_s"] = amort
    b = base.get(r["size"])
    ratio = f"{amort / b['amort_s']:.2f}x" if b and "amort_s" in b else "-"
    dev = (
      "n/a"
      if r["device_peak"] is None
      else (("<=" if r["peak_masked"] else "") + f"{r['device_peak'] / GB:.2f}")
    )
    paper = PAPER_TABLE11.get(r["opt"]) if r["size"] == "1b" else None
    paper_s = f"{paper[0]:.2f} G, {paper[1]:.0f} tok/s" if paper else "-"
    rank = r["rank"] if "galore" in r["opt"] else "-"
    refresh = f"{r['refresh_s'] * 1e3:.1f}" if "galore" in r["opt"] else "-"
    print(
      f"| {r['size']} | {r['opt']} | {rank} | {r['state'] / GB:.3f} | {r['peak'] / GB:.3f} | "
      f"{dev} | {r['step_s'] * 1e3:.1f} | {refresh} | {amort * 1e3:.1f} | "
      f"{args.batch * args.seq / amort:.0f} | {ratio} | {paper_s} |"
    )
  print(f"\nTotal {time.perf_counter() - t0:.0f} s (compile included).")


if __name__ == "__main__":
  main()
