"""Subspace refresh: exact SVD vs warm-started randomized subspace iteration (speed and quality).

Parts (run one, or `all`):
  speed      refresh time of each method at the LLaMA 60M...7B matrix shapes and paper ranks,
             jitted (compile excluded), as ratios to the full SVD; with each shape's captured
             energy on a synthetic matrix `U diag(s) Vᵀ` (known exact subspace) whose spectrum is
             a power law or a measured one (`--profile`, written by `real --save-profile`).
  synthetic  captured energy and principal angles against the exact subspace, synthetic spectra
             (flat, power law, exponential, step gaps), cold and warm, over oversample/power_iters.
  real       the same on real gradients of a LLaMA trained with AdamW on the bundled C4 sample
             (attention + MLP kernels), cold and warm from the exact basis of a step Δ earlier;
             plus the sign statistics of successive exact bases (canonical vs aligned signs).
  finish     alternative final (Rayleigh–Ritz) steps: energy and time.
  energy     time and captured energy of the exact SVD, the randomized refresh with fixed
             iterations and the adaptive one (`energy_tol`, certified), on spectra 1/k^a
             (a = 0.5, 1, 2), geometric and flat+noise at 2048x5504 r=256 and the 7B shapes
             r=1024 (`--energy-shapes`), plus a 1/k + noise matrix at 2048x5504.

Definitions (per matrix, projector P `D x r` on the reduced side of `std`, exact top-r `U_r`):
  energy = ‖Pᵀ G‖² / ‖U_rᵀ G‖²  (1 = as good as the exact SVD for this gradient);
  angles = arccos of the singular values of `U_rᵀ P` (principal angles), max and mean, degrees.

Usage (single-threaded, so that CPU seconds measure the work and not the neighbours):
  export XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
  export OPENBLAS_NUM_THREADS=1
  python benchmarks/subspace_refresh.py real --grads /tmp/galore_grads_20m.npz \
      --save-profile /tmp/galore_profile_20m.npy
  python benchmarks/subspace_refresh.py speed --profile /tmp/galore_profile_20m.npy
  python benchmarks/subspace_refresh.py synthetic
  python benchmarks/subspace_refresh.py finish

`real` first trains the model (LLaMA-20m, 300 AdamW steps at batch 16; 110 min on the shared
2-core machine of the recorded run) unless `--grads` exists. `speed` runs the full SVD of every
shape once per repeat, except the 7B shapes (`--svd-repeats-7b`, default 1): their float32 SVD
takes minutes. Wall and process CPU seconds are both reported: on a shared machine wall time
mostly measures the neighbours.
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from galore_jax import projection, subspace

# name: (in_dim, out_dim, paper rank); square attention kernels and the MLP up/gate kernel.
SHAPES = {
  "60m": ((512, 512), (512, 1376), 128),
  "130m": ((768, 768), (768, 2048), 256),
  "350m": ((1024, 1024), (1024, 2736), 256),
  "1b": ((2048, 2048), (2048, 5461), 512),
  "7b": ((4096, 4096), (4096, 11008), 1024),
}


def mm(a, b):
  """A float32 matmul at full precision (as the library's range finder computes)."""
  return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)


def tr(x):
  return jnp.swapaxes(x, -1, -2)


# The library's defaults (galore_jax.scale_by_galore and subspace.COLD_POWER_ITERS).
DEFAULT = dict(oversample=8, power_iters=1, cold_power_iters=subspace.COLD_POWER_ITERS)


# ---------------------------------------------------------------------------------------------
# Measures.


def energy_and_angles(g_DxE: np.ndarray, p_DxR: np.ndarray, u_DxR: np.ndarray, s_top: np.ndarray):
  """Per matrix: captured-energy ratio, largest and mean principal angle (degrees)."""
  pt = np.swapaxes(p_DxR, -1, -2).astype(np.float64)
  energy = np.sum((pt @ g_DxE) ** 2, axis=(-2, -1)) / np.sum(s_top**2, axis=-1)
  cos = np.linalg.svd(np.swapaxes(u_DxR, -1, -2) @ p_DxR.astype(np.float64), compute_uv=False)
  angles = np.degrees(np.arccos(np.clip(cos, 0.0, 1.0)))
  return energy, angles.max(axis=-1), angles.mean(axis=-1)


def _refresh_fn(method: str, rank: int, **kw):
  fn = subspace.make_refresh_fn(
    method,
    rank,
    kw.get("oversample", 0),
    kw.get("power_iters", 1),
    cold_power_iters=kw.get("cold_power_iters"),
  )
  return jax.jit(lambda g, prev, key: fn(g, (prev,), "in", key)[0])


def _timed(compiled, args, repeats: int) -> tuple[float, float]:
  """Best wall and process-CPU seconds of `repeats` calls of a compiled function."""
  wall, cpu = [], []
  for _ in range(repeats):
    w, c = time.perf_counter(), time.process_time()
    jax.block_until_ready(compiled(*args))
    wall.append(time.perf_counter() - w)
    cpu.append(time.process_time() - c)
  return min(wall), min(cpu)


# ---------------------------------------------------------------------------------------------
# Synthetic matrices.


def spectrum(kind: str, n: int, r: int) -> np.ndarray:
  """Singular values (descending, s_1 = 1) of a synthetic test spectrum of length n."""
  i = np.arange(n, dtype=np.float64)
  if kind == "flat":
    return np.ones(n)
  if kind == "power-law-0.5":
    return (1.0 + i) ** -0.5
  if kind == "power-law-1":
    return (1.0 + i) ** -1.0
  if kind == "exponential":  # s_r / s_1 = 1e-2
    return np.exp(-np.log(100.0) * i / r)
  if kind == "gap-10x":  # flat top r, then a 10x drop
    return np.where(i < r, 1.0, 0.1) * (1.0 - 0.5 * i / n)
  if kind == "gap-1.5x":  # a mild gap: power law with a 1.5x drop after r
    return (1.0 + i) ** -0.5 * np.where(i < r, 1.0, 1 / 1.5)
  raise ValueError(kind)


def real_like_spectrum(profile: np.ndarray, n: int) -> np.ndarray:
  """Resamples a measured spectrum (normalised, any length) to n values on the same relative
  index i / n, log-linearly: a gradient of a larger model with the same spectral shape."""
  src = (np.arange(len(profile)) + 0.5) / len(profile)
  dst = (np.arange(n) + 0.5) / n
  return np.exp(np.interp(dst, src, np.log(profile / profile[0])))


def with_spectrum(rng, d: int, e: int, s: np.ndarray):
  """`g = U diag(s) Vᵀ` (float32) with random orthonormal U (`d x n`, float64) and V."""
  n = len(s)
  u = np.linalg.qr(rng.standard_normal((d, n)))[0]
  v = np.linalg.qr(rng.standard_normal((e, n)).astype(np.float32))[0]
  g = ((u * s).astype(np.float32) @ v.T).astype(np.float32)
  return g, u


def energy_of(p_DxR: np.ndarray, u: np.ndarray, s: np.ndarray, r: int) -> float:
  """Captured-energy ratio of `p` for `g = U diag(s) Vᵀ`: `‖Pᵀ U S‖² / Σ_{i<r} s_i²`."""
  return float(np.sum((p_DxR.astype(np.float64).T @ u * s) ** 2) / np.sum(s[:r] ** 2))


def drifted(u: np.ndarray, s: np.ndarray, r: int, target_energy: float, rng) -> np.ndarray:
  """An orthonormal `D x r` basis near the exact one whose captured energy is `target_energy` of
  the exact one: the previous projector of a gradient whose subspace has since moved."""
  noise = rng.standard_normal((u.shape[0], r))
  lo, hi = 0.0, 10.0
  for _ in range(20):  # bisection on the noise level (energy falls as the noise grows)
    eps = 0.5 * (lo + hi)
    if energy_of(np.linalg.qr(u[:, :r] + eps * noise)[0], u, s, r) > target_energy:
      lo = eps
    else:
      hi = eps
  return np.linalg.qr(u[:, :r] + lo * noise)[0].astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Real gradients.


def collect_gradients(
  path: Path, size: str, steps: int, batch_size: int, lr: float, warmup: int, save_at
) -> None:
  """Trains LLaMA-`size` with AdamW on the bundled C4 sample; saves GaLore-target gradients."""
  import optax
  from flax import nnx

  from train import data
  from train import model as llama

  mdl = llama.Llama(llama.llama_config(size, scan_layers=True), rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(mdl, nnx.Param)
  params = jax.tree.map(jnp.asarray, params)
  tx = optax.adamw(optax.linear_schedule(0.0, lr, warmup), b1=0.9, b2=0.999, eps=1e-6)
  opt = tx.init(params)

  def loss_fn(p, tokens_BxL):
    total, n = llama.next_token_loss(nnx.merge(graphdef, p)(tokens_BxL), tokens_BxL)
    return total / jnp.maximum(n, 1)

  @jax.jit
  def step(p, o, tokens_BxL):
    loss, g = jax.value_and_grad(loss_fn)(p, tokens_BxL)
    u, o = tx.update(g, o, p)
    return optax.apply_updates(p, u), o, loss, g

  batches = data.make_train_iterator(batch_size=batch_size, seq_len=256, seed=0)
  saved = {}
  for t in range(max(save_at) + 1):
    params, opt, loss, g = step(params, opt, jnp.asarray(next(batches)["tokens"]))
    if t in save_at:
      for kp, leaf in jax.tree_util.tree_flatten_with_path(g)[0]:
        if llama.is_galore_target(kp):
          saved[f"{t}:{'/'.join(map(str, llama.param_names(kp)))}"] = np.asarray(leaf)
    if t % 10 == 0:
      print(f"  step {t} loss {float(loss):.3f}", flush=True)
  np.savez(path, **saved)


def load_gradients(path: Path):
  """{(step, name): [N, D, E] float64} with the `std` side as rows (D = the reduced axis)."""
  z = np.load(path)
  out = {}
  for key in z.files:
    step, name = key.split(":")
    g = z[key].astype(np.float64)
    side = projection.side_for("std", g.shape[-2], g.shape[-1])
    out[int(step), name] = g if side == "in" else np.swapaxes(g, -1, -2)
  return out


# ---------------------------------------------------------------------------------------------
# Parts.


def part_synthetic(args) -> None:
  d, e, r = 512, 1376, 128
  rng = np.random.default_rng(0)
  settings = [(0, 1), (8, 1), (8, 2), (8, 4), (32, 1), (32, 2), (128, 1)]
  print(f"\n### Synthetic spectra, {d}x{e}, r={r} (energy: fraction of the exact top-r energy)\n")
  print(
    "| spectrum | s_r/s_1 | start | oversample | power_iters | energy | max angle | mean angle |"
  )
  print("|---|---|---|---|---|---|---|---|")
  kinds = ["flat", "power-law-0.5", "power-law-1", "exponential", "gap-10x", "gap-1.5x"]
  for kind in kinds:
    s = spectrum(kind, d, r)
    g, u = with_spectrum(rng, d, e, s)
    prev = drifted(u, s, r, 0.95, rng)
    for (p, q), start in itertools.product(settings, ["cold", "warm"]):
      f = _refresh_fn("randomized", r, oversample=p, power_iters=q, cold_power_iters=q)
      init = np.zeros((d, r), np.float32) if start == "cold" else prev
      basis = np.asarray(f(jnp.asarray(g), jnp.asarray(init), jax.random.key(1)))
      en, amax, amean = energy_and_angles(g.astype(np.float64), basis, u[:, :r], s[:r])
      print(
        f"| {kind} | {s[r - 1]:.2g} | {start} | {p} | {q} | {en:.5f} | {amax:.1f} | {amean:.2f} |",
        flush=True,
      )
  print("\n(warm: started from a basis whose captured energy is 95% of the exact one)")


def part_real(args) -> None:
  path = Path(args.grads)
  if not path.exists():
    print(f"collecting gradients into {path} ...", flush=True)
    collect_gradients(
      path, args.size, args.steps, args.batch_size, args.lr, args.warmup, args.save_at
    )
  grads = load_gradients(path)
  steps = sorted({t for t, _ in grads})
  names = sorted({n for _, n in grads})
  last = steps[-1] if args.at is None else args.at
  steps = [t for t in steps if t <= last]
  r = args.rank
  exact = {}
  for key, g in grads.items():
    if key[0] not in steps:
      continue
    u, s, _ = np.linalg.svd(g, full_matrices=False)
    exact[key] = (u[..., :r], s)
  print(f"\n### Real gradients: LLaMA-{args.size}, AdamW, step {last} (start: exact basis of an")
  print(
    f"earlier step, or cold), rank {r}; {len(names)} kernels x {grads[last, names[0]].shape[0]}"
  )
  print("layers; energy min / mean over matrices, angles median / mean\n")
  _spectrum_summary(grads, exact, names, last, r)
  print(
    "| method | oversample | power_iters | start | energy min | energy mean |"
    " max angle (median) | mean angle (mean) |"
  )
  print("|---|---|---|---|---|---|---|---|")
  starts = ["cold"] + [t for t in steps[:-1]]
  for t in starts[1:]:
    row = _real_row(grads, exact, names, last, r, None, t)
    print(f"| stale (no refresh) | | | step {t} | {row} |")
  settings = [(0, 1), (8, 1), (8, 2), (8, 4), (32, 1)]
  for (p, q), start in itertools.product(settings, starts):
    f = _refresh_fn("randomized", r, oversample=p, power_iters=q, cold_power_iters=q)
    row = _real_row(grads, exact, names, last, r, f, start)
    label = "cold" if start == "cold" else f"step {start} (Δ={last - start})"
    print(f"| randomized | {p} | {q} | {label} | {row} |", flush=True)
  part_signs(grads, exact, names, steps, r)
  if args.save_profile:  # the median normalised spectrum of the widest kernel, for `speed`
    widest = max(names, key=lambda n: grads[last, n].shape[-1])
    s = exact[last, widest][1]
    np.save(args.save_profile, np.median(s / s[..., :1], axis=0))
    print(f"\nsaved the spectrum of {widest} (median over layers) to {args.save_profile}")


def _spectrum_summary(grads, exact, names, last, r):
  print("| kernel | shape | s_r/s_1 (median) | energy in top r (median) | in top r/8 |")
  print("|---|---|---|---|---|")
  for n in names:
    s = exact[last, n][1]
    e = np.cumsum(s**2, -1) / np.sum(s**2, -1, keepdims=True)
    print(
      f"| {n} | {grads[last, n].shape[1:]} | {np.median(s[:, r - 1] / s[:, 0]):.2g} | "
      f"{np.median(e[:, r - 1]):.4f} | {np.median(e[:, r // 8 - 1]):.4f} |"
    )
  print()


def _real_row(grads, exact, names, last, r, f, start):
  en, amax, amean = [], [], []
  for n in names:
    g = grads[last, n]
    if f is None:
      basis = exact[start, n][0]
    else:
      init = np.zeros((*g.shape[:-1], r)) if start == "cold" else exact[start, n][0]
      basis = np.asarray(
        f(jnp.asarray(g, jnp.float32), jnp.asarray(init, jnp.float32), jax.random.key(0))
      )
    u, s = exact[last, n]
    a, b, c = energy_and_angles(g, basis, u, s[..., :r])
    en.append(a), amax.append(b), amean.append(c)
  en, amax, amean = map(np.concatenate, (en, amax, amean))
  return f"{en.min():.4f} | {en.mean():.4f} | {np.median(amax):.1f} | {amean.mean():.2f}"


def part_signs(grads, exact, names, steps, r) -> None:
  """How often the canonical sign disagrees with the previous basis (exact SVD bases).

  With `on_refresh="keep"` the moment coordinate j, built on old vector j, is reused for new
  vector j: it helps in proportion to their signed cosine, and hurts when the sign flipped.
  """
  print("\n### Signs of successive exact bases (vector j of a step Δ earlier vs vector j now)\n")
  print(
    "| from step | Δ | persistent (|cos| > 0.5) | canonical sign flips: all | persistent |"
    " mean signed cos: canonical | aligned |"
  )
  print("|---|---|---|---|---|---|---|")
  last = steps[-1]
  for t in steps[:-1]:
    # numpy's SVD picks its own signs: put both bases in the canonical sign first.
    cos = np.concatenate(
      [
        np.sum(_canonical(exact[last, n][0]) * _canonical(exact[t, n][0]), axis=-2).ravel()
        for n in names
      ]
    )
    big = np.abs(cos) > 0.5
    flips_big = np.mean(cos[big] < 0) if big.any() else float("nan")
    print(
      f"| {t} | {last - t} | {np.mean(big):.3f} | {np.mean(cos < 0):.3f} | {flips_big:.3f} | "
      f"{cos.mean():.3f} | {np.abs(cos).mean():.3f} |"
    )


def _canonical(b):
  idx = np.argmax(np.abs(b), axis=-2)[..., None, :]
  return b * np.where(np.take_along_axis(b, idx, axis=-2) < 0, -1.0, 1.0)


def _finish_variants():
  """Alternative final steps after `q - 1` iterations from the same start `x` (same sketch)."""
  orth = subspace.orthonormalize

  def iterate(a, x, q):
    for _ in range(q - 1):
      x = orth(mm(a, mm(tr(a), x)))
    return x

  def classical_ritz(a, x, r, q):  # Q = orth(a aᵀ x); top-r of svd(Qᵀ a) via QR of (Qᵀ a)ᵀ
    qq = orth(mm(a, mm(tr(a), iterate(a, x, q))))
    vh = jnp.linalg.svd(jnp.linalg.qr(mm(tr(a), qq), mode="r"))[2]
    return mm(qq, tr(vh[:r]))

  def classical_eigh(a, x, r, q):  # the same Ritz step through eigh of the k x k Gram B Bᵀ
    qq = orth(mm(a, mm(tr(a), iterate(a, x, q))))
    b = mm(tr(qq), a)
    w = jnp.linalg.eigh(mm(b, tr(b)))[1]
    return mm(qq, w[:, ::-1][:, :r])

  def row_ritz(a, x, r, q):  # the library's finish
    return subspace.row_ritz_left(a, iterate(a, x, q), r)

  def sketch_svd(a, x, r, q):  # no Ritz selection: top-r left singular vectors of a aᵀ x
    y = mm(a, mm(tr(a), iterate(a, x, q)))
    qy, ry = jnp.linalg.qr(y)
    return mm(qy, jnp.linalg.svd(ry)[0][:, :r])

  return {
    "classical Ritz, svd(Qᵀ a) (3 products)": classical_ritz,
    "classical Ritz, eigh(B Bᵀ) (3 products)": classical_eigh,
    "row-space Ritz / Nyström (2 products, used)": row_ritz,
    "svd of the sketch a aᵀ x (2 products)": sketch_svd,
  }


def part_finish(args) -> None:
  """Final-step variants: captured energy (synthetic, 512x1376) and time (4096x11008)."""
  rng = np.random.default_rng(0)
  variants = _finish_variants()
  d, e, r, p = 512, 1376, 128, 8
  print(f"\n### Final step after q - 1 iterations: energy at {d}x{e} r={r} p={p}, q=1 warm")
  print("(start capturing 95% / 50% of the exact energy) and q=4 cold\n")
  print("| variant | spectrum | warm 95% | warm 50% | cold q=4 | orthonormality error |")
  print("|---|---|---|---|---|---|")
  for kind in ("power-law-0.5", "gap-1.5x"):
    s = spectrum(kind, d, r)
    g, u = with_spectrum(rng, d, e, s)
    starts = [drifted(u, s, r, t, rng) for t in (0.95, 0.5)]
    omega = rng.standard_normal((d, r + p)).astype(np.float32) / np.sqrt(d)
    for name, fn in variants.items():
      f = jax.jit(fn, static_argnums=(2, 3))
      cells, err = [], 0.0
      for x, q in ((starts[0], 1), (starts[1], 1), (None, 4)):
        x = omega if x is None else np.concatenate([x, omega[:, :p]], axis=1)
        b = np.asarray(f(jnp.asarray(g), jnp.asarray(x), r, q))
        cells.append(f"{energy_of(b, u, s, r):.5f}")
        err = max(err, float(np.abs(b.T @ b - np.eye(r)).max()))
      print(f"| {name} | {kind} | {' | '.join(cells)} | {err:.1e} |", flush=True)
  d, e, r = 4096, 11008, 1024
  a = jax.random.normal(jax.random.key(0), (d, e))
  x = jnp.linalg.qr(jax.random.normal(jax.random.key(1), (d, r + p)))[0]
  print(f"\n| variant | {d}x{e} r={r} q=1: wall s | CPU s |\n|---|---|---|")
  for name, fn in variants.items():
    compiled = jax.jit(fn, static_argnums=(2, 3)).lower(a, x, r, 1).compile()
    wall, cpu = _timed(compiled, (a, x), args.repeats)
    print(f"| {name} | {wall:.2f} | {cpu:.2f} |", flush=True)


def part_speed(args) -> None:
  profile = np.load(args.profile) if args.profile else None
  rng = np.random.default_rng(0)
  kind = f"real-like ({args.profile})" if args.profile else "power-law-0.5"
  print("\n### Refresh time, jitted, compile excluded (best of repeats; wall / process CPU s)")
  print(f"\nMatrices: U diag(s) Vᵀ with spectrum {kind}; warm start from a basis that captures")
  print(f"{args.warm_energy:.0%} of the exact top-r energy. energy: of the result, vs exact.\n")
  print(
    "| model | D x E | rank | method | settings | wall s | CPU s | wall vs SVD |"
    " CPU vs SVD | energy |"
  )
  print("|---|---|---|---|---|---|---|---|---|---|")
  cfg = DEFAULT
  variants = (
    ("randomized warm", cfg, "warm"),
    ("randomized cold", cfg, "cold"),
    ("randomized warm", dict(cfg, power_iters=2), "warm"),
  )
  for name in args.shapes.split(","):
    *dims, r = SHAPES[name]
    for d, e in dims:
      s = real_like_spectrum(profile, d) if profile is not None else spectrum("power-law-0.5", d, r)
      g, u = with_spectrum(rng, d, e, s)
      prev = drifted(u, s, r, args.warm_energy, rng)
      g = jnp.asarray(g)
      rows = []
      t_svd = (float("nan"), float("nan"))
      if not args.skip_svd:
        svd = jax.jit(lambda g, r=r: projection.svd_projectors(g, "in", r)[0])
        compiled = svd.lower(g).compile()
        reps = args.svd_repeats_7b if name == "7b" else args.repeats
        t_svd = _timed(compiled, (g,), reps)
        rows.append(("svd (exact)", f"{reps} run(s)", t_svd, compiled(g)))
      for label, kw, start in variants:
        f = _refresh_fn("randomized", r, **kw)
        init = prev if start == "warm" else np.zeros((d, r), np.float32)
        fargs = (g, jnp.asarray(init), jax.random.key(0))
        compiled = f.lower(*fargs).compile()
        t = _timed(compiled, fargs, args.repeats)
        q = kw["power_iters"] if start == "warm" else kw["cold_power_iters"]
        rows.append((label, f"p={kw['oversample']} q={q}", t, compiled(*fargs)))
      for label, setting, (wall, cpu), basis in rows:
        en = energy_of(np.asarray(basis), u, s, r)
        print(
          f"| {name} | {d}x{e} | {r} | {label} | {setting} | {wall:.3f} | {cpu:.2f} | "
          f"{t_svd[0] / wall:.1f}x | {t_svd[1] / cpu:.1f}x | {en:.4f} |",
          flush=True,
        )


# ---------------------------------------------------------------------------------------------
# Accuracy-controlled refresh (energy_tol).

# name: (D, E, r) of the `energy` part: the 1/k + noise matrix's and the 7B attention / MLP shapes.
ENERGY_SHAPES = {
  "2048x5504": (2048, 5504, 256),
  "4096x4096": (4096, 4096, 1024),
  "4096x11008": (4096, 11008, 1024),
}
ENERGY_SPECTRA = ("power-0.5", "power-1", "power-2", "geometric", "flat+noise")


def marchenko_pastur_singular_values(d: int, e: int) -> np.ndarray:
  """The `min(d, e)` quantiles (descending) of the singular values of a `d x e` Gaussian matrix
  divided by `sqrt(max(d, e))`: the Marchenko–Pastur law, support `1 ± sqrt(c)`, `c = d/e <= 1`."""
  c = min(d, e) / max(d, e)
  lo, hi = (1 - np.sqrt(c)) ** 2, (1 + np.sqrt(c)) ** 2
  lam = np.linspace(lo, hi, 200_001)[1:]  # open at lo: the density has a 1/λ pole at 0 when c = 1
  dens = np.sqrt(np.maximum((hi - lam) * (lam - lo), 0.0)) / (2 * np.pi * c * lam)
  cdf = np.cumsum(dens)
  cdf /= cdf[-1]
  n = min(d, e)
  return np.sqrt(np.interp((np.arange(n) + 0.5) / n, cdf, lam))[::-1]


def energy_spectrum(kind: str, d: int, e: int, r: int) -> np.ndarray:
  """Spectra of the `energy` part; `flat+noise`: `r/2` unit values on top of the singular
  values of Gaussian noise of spectral norm ~0.48 (Marchenko–Pastur quantiles)."""
  if kind.startswith("power-"):  # 1/k^a
    return (1.0 + np.arange(min(d, e))) ** -float(kind.split("-")[1])
  if kind == "geometric":
    return spectrum("exponential", min(d, e), r)
  if kind == "flat+noise":
    noise = 0.3 * marchenko_pastur_singular_values(d, e)
    return np.sort(np.concatenate([np.ones(r // 2), noise])[: min(d, e)])[::-1]
  raise ValueError(kind)


def _energy_rows(g, s_top_sq, r, svd_cpu, args):
  """(label, settings, iterations, certificate, energy, CPU s) of each randomized variant."""
  rows = []
  cold_fn = subspace.make_refresh_fn("randomized", r, 8, 1)  # first refresh: COLD_POWER_ITERS
  cold = jax.jit(lambda g, prev, key: cold_fn(g, (prev,), "in", key)[0])
  key = jax.random.key(0)
  zeros = jnp.zeros((g.shape[0], r), jnp.float32)
  c_cold = cold.lower(g, zeros, key).compile()
  # The previous refresh: a cold one of the same matrix (as at GaLore's second refresh).
  prev = c_cold(g, zeros, key)
  captured = jax.jit(lambda g, p: jnp.sum(mm(tr(p), g) ** 2))
  variants = [("fixed", dict(power_iters=1)), ("fixed", dict(power_iters=2))]
  variants += [("adaptive", dict(power_iters=1, energy_tol=t)) for t in args.energy_tols]
  for label, kw in variants:
    fn = subspace.make_refresh_fn(
      "randomized",
      r,
      8,
      kw["power_iters"],
      energy_tol=kw.get("energy_tol"),
      max_power_iters=args.max_power_iters,
    )
    f = jax.jit(lambda g, prev, k, fn=fn: fn(g, (prev,), "in", k))
    compiled = f.lower(g, prev, jax.random.key(1)).compile()
    _, cpu = _timed(compiled, (g, prev, jax.random.key(1)), args.repeats)
    out = compiled(g, prev, jax.random.key(1))
    if "energy_tol" in kw:
      (basis,), (st,) = out
      its, cert = int(st.iterations), f"{float(st.energy_estimate):.4f}"
      setting = f"tol={kw['energy_tol']} max={args.max_power_iters}"
    else:
      (basis,), its, cert = out, kw["power_iters"], ""
      setting = f"q={kw['power_iters']}"
    energy = float(captured(g, basis)) / s_top_sq
    rows.append((f"randomized {label}", setting, its, cert, energy, cpu))
  return rows


def part_energy(args) -> None:
  """Time and captured energy: exact SVD vs randomized fixed and adaptive (`energy_tol`)."""
  print("\n### Accuracy-controlled refresh: time and captured energy vs the exact SVD\n")
  print("Matrices `U diag(s) Vᵀ` (Haar U, V; float32), warm start from a cold randomized refresh")
  print("of the same matrix (as at GaLore's second refresh). energy: ‖Pᵀ G‖² / exact top-r energy;")
  print("certified: the certificate η̂ (<= energy); CPU s: process CPU seconds, compile excluded,")
  print(f"best of {args.repeats}. `1/k+noise`: singular values 1/k (k <= 600) plus 1e-3 Gaussian")
  print("noise (exact energy from float32 singular values).\n")
  print(
    "| shape | r | spectrum | method | settings | iterations | certified | energy | CPU s |"
    " CPU vs SVD |"
  )
  print("|---|---|---|---|---|---|---|---|---|---|")
  for name in args.energy_shapes.split(","):
    d, e, r = ENERGY_SHAPES[name]
    n = min(d, e)
    u = jnp.linalg.qr(jax.random.normal(jax.random.key(10), (d, n)))[0]
    v = jnp.linalg.qr(jax.random.normal(jax.random.key(11), (e, n)))[0]
    build = jax.jit(lambda s, u=u, v=v: mm(u * s, tr(v)))
    svd_cpu = None
    kinds = list(ENERGY_SPECTRA) + (["1/k+noise"] if name == "2048x5504" else [])
    for kind in kinds:
      if kind == "1/k+noise":
        s = np.where(np.arange(n) < 600, 1.0 / (1.0 + np.arange(n)), 0.0)
        noise = 1e-3 * jax.random.normal(jax.random.key(12), (d, e))
        g = build(jnp.asarray(s, jnp.float32)) + noise
        s_top_sq = float(np.sum(np.asarray(jnp.linalg.svd(g, compute_uv=False))[:r] ** 2.0))
      else:
        s = energy_spectrum(kind, d, e, r)
        g = build(jnp.asarray(s, jnp.float32))
        s_top_sq = float(np.sum(s[:r] ** 2))
      if svd_cpu is None:  # the exact SVD's time does not depend on the spectrum: once a shape
        svd = jax.jit(lambda g, r=r: projection.svd_projectors(g, "in", r)[0])
        compiled = svd.lower(g).compile()
        _, svd_cpu = _timed(compiled, (g,), 1)
        print(f"| {name} | {r} | (any) | svd (exact) | | | | 1 | {svd_cpu:.2f} | 1 |", flush=True)
      for label, setting, its, cert, energy, cpu in _energy_rows(g, s_top_sq, r, svd_cpu, args):
        print(
          f"| {name} | {r} | {kind} | {label} | {setting} | {its} | {cert} | {energy:.4f} | "
          f"{cpu:.2f} | {cpu / svd_cpu:.3f} |",
          flush=True,
        )


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("part", choices=["speed", "synthetic", "real", "finish", "energy", "all"])
  ap.add_argument("--energy-shapes", default=",".join(ENERGY_SHAPES), help="energy part")
  ap.add_argument(
    "--energy-tols", type=lambda s: tuple(float(x) for x in s.split(",")), default=(0.99,)
  )
  ap.add_argument("--max-power-iters", type=int, default=subspace.DEFAULT_MAX_POWER_ITERS)
  ap.add_argument("--shapes", default=",".join(SHAPES))
  ap.add_argument("--repeats", type=int, default=2)
  ap.add_argument("--svd-repeats-7b", type=int, default=1)
  ap.add_argument("--skip-svd", action="store_true", help="speed: time the randomized only")
  ap.add_argument("--profile", default="", help="npy of a real gradient spectrum (speed part)")
  ap.add_argument(
    "--warm-energy",
    type=float,
    default=0.95,
    help="speed part: captured energy of the warm start's basis, vs exact",
  )
  ap.add_argument("--grads", default="/tmp/galore_grads_20m.npz")
  ap.add_argument("--size", default="20m")
  ap.add_argument("--rank", type=int, default=64)
  ap.add_argument("--save-profile", default="", help="real: save a spectrum .npy for speed")
  ap.add_argument("--at", type=int, default=None, help="real: the step evaluated (default last)")
  ap.add_argument("--steps", type=int, default=300)
  ap.add_argument("--batch-size", type=int, default=16)
  ap.add_argument("--lr", type=float, default=3e-3)
  ap.add_argument("--warmup", type=int, default=30)
  ap.add_argument(
    "--save-at",
    type=lambda s: tuple(int(x) for x in s.split(",")),
    default=(0, 100, 200, 250, 290, 299, 300),
  )
  args = ap.parse_args()
  cpu = platform.processor() or platform.machine()
  print(f"jax {jax.__version__}, backend {jax.default_backend()}, {os.cpu_count()} CPUs ({cpu})")
  parts = {"speed": part_speed, "synthetic": part_synthetic, "real": part_real}
  parts["finish"] = part_finish
  parts["energy"] = part_energy
  for part in parts if args.part == "all" else (args.part,):
    parts[part](args)


if __name__ == "__main__":
  main()
