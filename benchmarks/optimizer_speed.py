"""Optimizer step time, side by side: galore_adamw vs optax.adamw vs optax.contrib.galore vs torch.

Four parts, all in one process so that the ratios share the machine's state:

1. Machine rates: float32 matmul GFLOP/s and memory copy GB/s, measured here (JAX, jitted).
2. Optimizer-only step (jitted update + apply, params and state donated) on LLaMA-60M-shaped
   weights: the 8 layers' attention (4 x 512x512) and MLP (512x1376, 512x1376, 1376x512)
   kernels, float32, 25.3M entries; the embedding and LM head are left out (they would be plain
   Adam in every GaLore variant and only dilute the ratios). GaLore at rank 128, scale 0.25, std.
   Non-refresh steps use update_proj_gap=200; refresh steps use update_proj_gap=1 (every step
   recomputes every subspace: the same branch). Amortised = (199 non-refresh + 1 refresh) / 200.
   The PyTorch reference (galore_torch 1.0 `GaLoreAdamW` and `torch.optim.AdamW`) runs on the
   same weights in torch's (out, in) layout with the same thread count.
   Floors: GaLore's projection + back-projection GEMMs, 4 r I O FLOPs per I x O matrix, over the
   matmul rate of a 2048^3 probe (refresh steps: plus the bare jitted SVDs of the same
   matrices); AdamW's floor is its memory traffic (read p, g, m, v; write p, m, v) over the rate
   of a donated elementwise probe. The probes run in the same round-robin as the optimizers.
3. Full jitted train step of LLaMA 60M (float32, batch x 256 tokens; fwd + bwd + update):
   galore_adamw (non-refresh steps) vs optax.adamw; amortised adds the optimizer-only refresh
   surcharge / 200.
4. One exact subspace refresh: float32 thin SVD (`jnp.linalg.svd(full_matrices=False)`, what
   `subspace_method="svd"` runs) per matrix shape of LLaMA 60M ... 1B, and the whole model's
   refresh (every targeted matrix) with its amortised cost per step at update_proj_gap=200.
   7B shapes are skipped (a 4096 x 11008 SVD takes minutes here).

The contenders of each table run round-robin (interleaved), so they share the same neighbours;
each cell is the best wall time (median in brackets) and the median process CPU time (all
threads). Ratios use the best times: on a shared machine the best is the closest to the
uncontended cost, while medians partly measure the neighbours.

Usage: python benchmarks/optimizer_speed.py [--quick] [--no-torch]
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
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import galore_jax as gj
from train.model import Llama, llama_config, next_token_loss

RANK, GAP, SCALE, LR = 128, 200, 0.25, 1e-3
SHAPES_60M = {
  "attn/q_proj": (512, 512),
  "attn/k_proj": (512, 512),
  "attn/v_proj": (512, 512),
  "attn/o_proj": (512, 512),
  "mlp/gate_proj": (512, 1376),
  "mlp/up_proj": (512, 1376),
  "mlp/down_proj": (1376, 512),
}
REFRESH_SIZES = {"60m": 128, "130m": 256, "350m": 256, "1b": 512}  # size -> paper rank


class Timing(NamedTuple):
  """Seconds per call: best and median wall clock, median process CPU (all threads)."""

  best: float
  median: float
  cpu: float


def interleaved(runners: dict[str, Callable[[], object]], repeats: int) -> dict[str, Timing]:
  """Times each runner `repeats` times, round-robin, so that all share the same neighbours.

  Runners must block until their work is done and must already be warm (compiled).
  """
  wall: dict[str, list[float]] = {k: [] for k in runners}
  cpu: dict[str, list[float]] = {k: [] for k in runners}
  for _ in range(repeats):
    for name, run in runners.items():
      t0, c0 = time.perf_counter(), time.process_time()
      run()
      wall[name].append(time.perf_counter() - t0)
      cpu[name].append(time.process_time() - c0)
  return {
    k: Timing(min(wall[k]), statistics.median(wall[k]), statistics.median(cpu[k])) for k in runners
  }


# ---------------------------------------------------------------------------------------------
# 1. Machine rates.


def _best_of(fn: Callable[[], object], repeats: int) -> float:
  fn()
  return interleaved({"f": fn}, repeats)["f"].best


def matmul_probe(n: int = 2048) -> tuple[Callable[[], object], int]:
  """A warm runner of a float32 `n^3` GEMM, and its FLOPs."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  f = jax.jit(lambda a: a @ a).lower(a).compile()
  return (lambda: f(a).block_until_ready()), 2 * n**3


def copy_probe(n: int = 2**25) -> tuple[Callable[[], object], int]:
  """A warm runner of an in-place (donated) elementwise op on 128 MiB of float32, and its bytes.

  Donated like the optimizer's state: a fresh 128 MiB output per call would add the page faults
  of new memory (expensive on this VM) and halve the measured rate.
  """
  x = [jnp.ones((n,), jnp.float32)]
  f = jax.jit(lambda x: x * 1.0001, donate_argnums=0)

  def run():
    x[0] = f(x[0])
    x[0].block_until_ready()

  run()
  return run, 2 * 4 * n


def matmul_rate(repeats: int = 7) -> float:
  """float32 GEMM FLOP/s (best of `repeats`, so it is the machine's rate, not the neighbours')."""
  run, flops = matmul_probe()
  return flops / _best_of(run, repeats)


def copy_rate(repeats: int = 7) -> float:
  """Bytes/s (read + write) of the donated elementwise probe, best of `repeats`."""
  run, nbytes = copy_probe()
  return nbytes / _best_of(run, repeats)


# ---------------------------------------------------------------------------------------------
# 2. Optimizer-only step.


def stack_60m(layers: int, seed: int = 0) -> dict[str, np.ndarray]:
  """LLaMA-60M attention + MLP kernels, Flax (in, out) layout, float32."""
  rng = np.random.default_rng(seed)
  return {
    f"layers/{i}/{name}/kernel": (0.02 * rng.standard_normal(shape)).astype(np.float32)
    for i in range(layers)
    for name, shape in SHAPES_60M.items()
  }


def jax_runner(tx: optax.GradientTransformation, params, grads, skip: int):
  """A warm runner of one jitted, donated update + apply, after `skip` untimed steps."""

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  step = jax.jit(step, donate_argnums=(0, 1))
  carry = [jax.tree.map(jnp.array, params), None]
  carry[1] = tx.init(carry[0])

  def run():
    carry[0], carry[1] = step(carry[0], carry[1], grads)
    jax.block_until_ready(carry)

  for _ in range(skip):
    run()
  return run


def torch_runner(params_np, grads_np, kind: str, gap: int, skip: int):
  """A warm runner of `optimizer.step()` of the PyTorch reference on the same weights."""
  import torch
  from galore_torch import GaLoreAdamW

  torch.set_num_threads(os.cpu_count() or 1)
  # torch Linear weights are (out, in): the transpose of the Flax kernel.
  ps = [torch.nn.Parameter(torch.from_numpy(p.T.copy())) for p in params_np.values()]
  for p, g in zip(ps, grads_np.values()):
    p.grad = torch.from_numpy(g.T.copy())
  if kind == "galore":
    group = dict(params=ps, rank=RANK, update_proj_gap=gap, scale=SCALE, proj_type="std")
    opt = GaLoreAdamW([group], lr=LR, weight_decay=0.0, no_deprecation_warning=True)
  else:
    opt = torch.optim.AdamW(ps, lr=LR, weight_decay=0.0, fused=kind == "fused" or None)

  def run():
    with torch.no_grad():
      opt.step()

  for _ in range(skip):
    run()
  return run


def projection_flops(shapes) -> int:
  """Projection + back-projection FLOPs of one GaLore step: 4 r I O per I x O matrix."""
  return sum(4 * min(RANK, *s) * s[0] * s[1] for s in shapes)


def optimizer_table(layers: int, repeats: int, refresh_repeats: int, torch_ok: bool):
  """Prints the optimizer-only table; returns galore_adamw's refresh surcharge per layer (s).

  The matmul and elementwise probes that set the floors run in the same round-robin as the
  optimizers, so floors and times see the same neighbours.
  """
  params = stack_60m(layers)
  grads = stack_60m(layers, seed=1)  # any full-rank matrix: step times do not depend on values
  n = sum(p.size for p in params.values())
  gflop = projection_flops([p.shape for p in params.values()]) / 1e9
  jp, jg = jax.tree.map(jnp.asarray, params), jax.tree.map(jnp.asarray, grads)
  svds = jax.jit(lambda g: jax.tree.map(lambda x: jnp.linalg.svd(x, full_matrices=False), g))
  svds = svds.lower(jg).compile()
  makers = {
    "galore_jax.galore_adamw": lambda gap: gj.galore_adamw(
      LR, rank=RANK, update_proj_gap=gap, scale=SCALE
    ),
    "optax.contrib.galore": lambda gap: optax.contrib.galore(
      LR, rank=RANK, update_proj_gap=gap, scale=SCALE, base_optimizer=optax.scale_by_adam()
    ),
  }
  # Non-refresh: update_proj_gap=200 after 3 steps (step 0 refreshes). Refresh: gap 1.
  (gemm_probe, probe_flops), (mem_probe, probe_bytes) = matmul_probe(), copy_probe()
  non = {"gemm probe": gemm_probe, "memory probe": mem_probe}
  non["optax.adamw"] = jax_runner(optax.adamw(LR), jp, jg, 3)
  # The refresh floor's SVD part is timed in the same round-robin as the refresh steps.
  ref = {"svd": lambda: jax.block_until_ready(svds(jg))}
  for name, make in makers.items():
    non[name] = jax_runner(make(GAP), jp, jg, 3)
    ref[name] = jax_runner(make(1), jp, jg, 1)
  if torch_ok:
    non["torch.optim.AdamW"] = torch_runner(params, grads, "adamw", GAP, 3)
    non["torch.optim.AdamW(fused=True)"] = torch_runner(params, grads, "fused", GAP, 3)
    non["galore_torch.GaLoreAdamW"] = torch_runner(params, grads, "galore", GAP, 3)
    ref["galore_torch.GaLoreAdamW"] = torch_runner(params, grads, "galore", 1, 1)
  t_non, t_ref = interleaved(non, repeats), interleaved(ref, refresh_repeats)
  flops_s = probe_flops / t_non.pop("gemm probe").best
  bytes_s = probe_bytes / t_non.pop("memory probe").best
  gemm_floor = gflop * 1e9 / flops_s
  floors = {
    "adamw": (7 * 4 * n / bytes_s, None),  # read p, g, m, v; write p, m, v (float32)
    "galore": (gemm_floor, gemm_floor + t_ref.pop("svd").best),
  }

  base = t_non["optax.adamw"].best
  print(
    f"## Optimizer-only step, LLaMA-60M-shaped kernels ({layers} layers x 7 matrices, "
    f"{n / 1e6:.1f}M float32 entries), rank {RANK}\n"
  )
  print(
    f"Projection + back-projection GEMMs per GaLore step: {gflop:.2f} GFLOP; probes in the same "
    f"round: {flops_s / 1e9:.0f} GFLOP/s float32 matmul, {bytes_s / 1e9:.1f} GB/s elementwise. "
    "Refresh floor = GEMM floor + the bare jitted SVDs of the same matrices, timed in the same "
    "round as the refresh steps. Times: best "
    f"(median) wall ms over {repeats} interleaved calls ({refresh_repeats} for refresh steps); "
    "CPU = median process CPU ms.\n"
  )
  print(
    "| optimizer | non-refresh ms | CPU ms | vs optax.adamw | floor ms | refresh ms | CPU ms "
    "| refresh floor ms | amortised T=200 ms | vs optax.adamw |"
  )
  print("|---|---|---|---|---|---|---|---|---|---|")
  for name, t in t_non.items():
    r = t_ref.get(name)
    floor, rfloor = floors["galore" if "alore" in name else "adamw"]
    amort = t.best if r is None else (199 * t.best + r.best) / 200
    kind = "GEMM" if r else "memory"
    ref_cols = (
      "- | - | -"
      if r is None
      else (f"{r.best * 1e3:.0f} ({r.median * 1e3:.0f}) | {r.cpu * 1e3:.0f} | {rfloor * 1e3:.0f}")
    )
    print(
      f"| {name} | {t.best * 1e3:.1f} ({t.median * 1e3:.1f}) | {t.cpu * 1e3:.0f} | "
      f"{t.best / base:.2f}x | {floor * 1e3:.1f} ({kind}) | {ref_cols} | {amort * 1e3:.1f} | "
      f"{amort / base:.2f}x |",
      flush=True,
    )
  print()
  g = "galore_jax.galore_adamw"
  return (t_ref[g].best - t_non[g].best) / layers


# ---------------------------------------------------------------------------------------------
# 3. Full train step.


def train_step_table(size: str, batch: int, seq: int, repeats: int, refresh_surcharge: float):
  """Full train step, galore_adamw vs optax.adamw; `refresh_surcharge` (s) is amortised / 200."""
  config = llama_config(size)  # float32
  graphdef, params = nnx.split(Llama(config, rngs=nnx.Rngs(0)))
  tokens = jax.random.randint(jax.random.key(1), (batch, seq), 1, config.vocab_size, jnp.int32)

  def loss_fn(params, tokens_BxL):
    loss_sum, count = next_token_loss(nnx.merge(graphdef, params)(tokens_BxL), tokens_BxL)
    return loss_sum / jnp.maximum(count, 1)

  txs = {
    "optax.adamw": optax.adamw(LR),
    "galore_jax.galore_adamw": gj.galore_adamw(
      LR, rank=RANK, update_proj_gap=GAP, scale=SCALE, mask=gj.llama_galore_mask
    ),
  }
  runners = {}
  for name, tx in txs.items():

    def step(params, state, tokens, tx=tx):
      loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state, loss

    step = jax.jit(step, donate_argnums=(0, 1))
    carry = [jax.tree.map(jnp.copy, params), None]
    carry[1] = tx.init(carry[0])

    def run(step=step, carry=carry):
      carry[0], carry[1], loss = step(carry[0], carry[1], tokens)
      jax.block_until_ready(loss)

    run()  # compile + GaLore's refresh at step 0
    runners[name] = run
  times = interleaved(runners, repeats)

  base = times["optax.adamw"].best
  print(f"## Full jitted train step, LLaMA {size} float32, {batch}x{seq} tokens (fwd+bwd+update)\n")
  print(f"Best (median) wall s over {repeats} interleaved steps; CPU = median process CPU s.\n")
  print(
    "| optimizer | non-refresh s | CPU s | vs optax.adamw | amortised T=200 s | vs optax.adamw |"
  )
  print("|---|---|---|---|---|---|")
  for name, t in times.items():
    amort = t.best + (refresh_surcharge / GAP if "galore" in name else 0.0)
    print(
      f"| {name} | {t.best:.2f} ({t.median:.2f}) | {t.cpu:.2f} | {t.best / base:.3f}x | "
      f"{amort:.2f} | {amort / base:.3f}x |"
    )
  print()


# ---------------------------------------------------------------------------------------------
# 4. Refresh (SVD) time per shape.


def svd_time(shape: tuple[int, int], repeats: int) -> float:
  """Best wall s of a jitted float32 thin SVD (compiled ahead, so no call is wasted)."""
  g = jax.random.normal(jax.random.key(2), shape, jnp.float32)
  f = jax.jit(lambda g: jnp.linalg.svd(g, full_matrices=False)).lower(g).compile()
  return interleaved({"svd": lambda: jax.block_until_ready(f(g))}, repeats)["svd"].best


def refresh_table(sizes, repeats: int, budget_s: float) -> None:
  """Prints SVD time per shape and per whole-model refresh; stops starting sizes after budget."""
  times: dict[tuple[int, int], float] = {}
  t0 = time.perf_counter()
  print("## One exact subspace refresh (float32 thin SVD, jitted) per matrix shape\n")
  print(f"Best wall s of {repeats} calls per shape.\n")
  print(
    "| size | rank | matrix (I x O) | SVD s | whole-model refresh s (matrices) | "
    "amortised per step at T=200 ms |"
  )
  print("|---|---|---|---|---|---|")
  for size in sizes:
    if time.perf_counter() - t0 > budget_s:
      print(f"| {size} | | | skipped: the {budget_s:.0f} s budget of this table is spent | | |")
      continue
    c = llama_config(size)
    d, f = c.hidden_dim, c.mlp_dim
    shapes = [(d, d)] * 4 + [(d, f)] * 2 + [(f, d)]  # q, k, v, o, gate, up, down
    for s in dict.fromkeys(shapes):
      if s not in times:
        times[s] = svd_time(s, repeats)
    total = sum(times[s] for s in shapes) * c.num_layers
    for i, s in enumerate(dict.fromkeys(shapes)):
      whole = f"{total:.1f} ({7 * c.num_layers})" if i == 0 else ""
      amort = f"{total / GAP * 1e3:.0f}" if i == 0 else ""
      print(
        f"| {size} | {REFRESH_SIZES[size]} | {s[0]}x{s[1]} | {times[s]:.3f} | {whole} | {amort} |",
        flush=True,
      )
  print()


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    "--quick", action="store_true", help="2 layers, fewer calls, 60m SVDs, 1x256-token train step"
  )
  parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
  parser.add_argument("--svd-budget", type=float, default=240.0, help="seconds for the SVD table")
  args = parser.parse_args(argv)
  torch_ok = not args.no_torch
  if torch_ok:
    try:
      import galore_torch  # noqa: F401
    except ImportError:
      torch_ok = False
  q = args.quick
  t0 = time.perf_counter()
  note = "" if torch_ok else "; PyTorch reference skipped"
  print(
    f"jax {jax.__version__}, backend {jax.default_backend()}, {os.cpu_count()} CPU threads{note}"
  )
  print(f"load average at start: {os.getloadavg()[0]:.1f}\n")
  flops_s, bytes_s = matmul_rate(), copy_rate()
  print(
    f"Measured at start: float32 matmul {flops_s / 1e9:.0f} GFLOP/s (2048^3, best of 7); "
    f"elementwise read+write {bytes_s / 1e9:.1f} GB/s (128 MiB, best of 7).\n"
  )
  layers = 2 if q else 8
  per_layer = optimizer_table(layers, 5 if q else 10, 1 if q else 2, torch_ok)
  train_step_table("60m", 1 if q else 8, 256, 2 if q else 4, per_layer * 8)
  refresh_table(["60m"] if q else list(REFRESH_SIZES), 1 if q else 2, args.svd_budget)
  print(
    f"Measured at end: float32 matmul {matmul_rate() / 1e9:.0f} GFLOP/s; elementwise read+write "
    f"{copy_rate() / 1e9:.1f} GB/s."
  )
  print(
    f"load average at end: {os.getloadavg()[0]:.1f}; total runtime "
    f"{time.perf_counter() - t0:.0f} s."
  )


if __name__ == "__main__":
  main()
