"""Pure array math of subspace refreshes: exact SVD and a warm-started randomized range finder.

All functions take a canonical `[..., I, O]` gradient and return orthonormal bases `[..., D, r]`
with the canonical sign convention of `projection.canonical_sign`, computed in float32. Leading
axes are batch axes (stacked layers): every matrix gets its own subspace, in one code path.

The randomized method is randomized subspace iteration (Halko, Martinsson & Tropp 2011, Alg. 4.4)
started from the previous projector, with a Rayleigh–Ritz finish on the row-space sketch (the
Nyström approximation of `G Gᵀ`). GaLore's subspace moves slowly between refreshes, so the
previous basis is already close to the new one and one iteration suffices; a cold start (no
previous basis: the first refresh) runs more (`COLD_POWER_ITERS`).

References:
  Halko, Martinsson & Tropp, "Finding structure with randomness: probabilistic algorithms for
  constructing approximate matrix decompositions", SIAM Review 2011, https://arxiv.org/abs/0909.4061
  Tropp, Yurtsever, Udell & Cevher, "Fixed-rank approximation of a positive-semidefinite matrix
  from streaming data", NeurIPS 2017, https://arxiv.org/abs/1706.05736
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from galore_jax import projection

METHODS = ("svd", "randomized")
SIGNS = ("canonical", "align")

# Iterations of a cold start (no previous basis): it happens once, at the first refresh, and a
# random start needs more iterations than a warm one to converge (benchmarks/subspace_refresh.py).
COLD_POWER_ITERS = 4

# Upper bound of the adaptive (`energy_tol`) iterations unless given (benchmarks/subspace_refresh.py
# `adaptive`: the certificate of a 1/k spectrum at 2048 x 5504, r=256, settles within it).
DEFAULT_MAX_POWER_ITERS = 8

# Products of orthonormal factors must stay orthonormal to float32 accuracy: never let an
# accelerator's default (TF32 / one bf16 pass) precision round them.
_HIGHEST = jax.lax.Precision.HIGHEST


def _mm(a: jax.Array, b: jax.Array) -> jax.Array:
  return jnp.matmul(a, b, precision=_HIGHEST)


def _t(x: jax.Array) -> jax.Array:
  return jnp.swapaxes(x, -1, -2)


def orthonormalize(y_DxK: jax.Array) -> jax.Array:
  """Orthonormal column basis; Householder QR stays orthonormal when `y` is rank-deficient."""
  q, _ = jnp.linalg.qr(y_DxK, mode="reduced")
  return q


def _gaussian(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Standard normal float32 draws, drawn flat: XLA:CPU compiles a rank-1 threefry draw in a
  fraction of the time of a rank-3 or rank-4 one (0.3 s vs 2 s)."""
  return jax.random.normal(key, (math.prod(shape),), jnp.float32).reshape(shape)


def row_ritz_left(a_DxE: jax.Array, x_DxK: jax.Array, r: int) -> jax.Array:
  """Top-`r` left singular vectors of `a P_Z`, `P_Z` the projector onto `Z = span(aᵀ x)`.

  This is Rayleigh–Ritz on the row-space sketch: `(a P_Z)(a P_Z)ᵀ` is the Nyström approximation
  of `a aᵀ` from the test block `x`, and its column space is span(a aᵀ x), the same `k` dims a
  left-side Ritz step would search. It needs two products with `a` where the classical
  `Q = orth(a aᵀ x)`, `svd(Qᵀ a)` needs three, and selects the same `r` dims to ~1e-4 of the
  captured energy (benchmarks/subspace_refresh.py). Householder QRs keep it defined for
  rank-deficient (even zero) `a`; no `k x k` inverse or Cholesky is involved.
  """
  z_ExK = orthonormalize(_mm(_t(a_DxE), x_DxK))
  q_DxK, r_KxK = jnp.linalg.qr(_mm(a_DxE, z_ExK), mode="reduced")
  u_KxK, _, _ = jnp.linalg.svd(r_KxK, full_matrices=False)
  return _mm(q_DxK, u_KxK[..., :r])


def randomized_left_basis(
  a_DxE: jax.Array,
  prev_DxR: jax.Array,
  oversample: int,
  power_iters: int,
  key: jax.Array,
  cold_power_iters: int | None = None,
) -> jax.Array:
  """Top-`r` left singular vectors of `a` by warm-started subspace iteration (HMT 2011).

  The start block `x` is `[prev | Ω]`: the previous basis (`r` columns) plus `oversample`
  Gaussian columns; when `prev` is all zeros (first refresh) it is `r + oversample` Gaussian
  columns. `q - 1` iterations `x <- orth(a aᵀ x)`, then `row_ritz_left`, which applies `a aᵀ`
  once more and keeps the best `r` of the `k = r + oversample` dims. With `q` iterations the
  result lies in span((a aᵀ)^q [prev | Ω]), as in HMT's subspace iteration with `q` passes.

  Cost for `a` of shape `D x E` (`q` iterations): `2 q` products of `a` with `k` columns,
  `q - 1` QRs of `D x k`, one QR of `E x k`, one of `D x k` and one `k x k` SVD, against a full
  `D x E` SVD.

  Args:
    a_DxE: float32 matrix, optionally with leading batch axes.
    prev_DxR: previous orthonormal basis (any float dtype), or zeros for a cold start; its last
      axis fixes `r`.
    oversample: extra sketch columns `p` (clipped so that `r + p <= min(D, E)`).
    power_iters: iterations `q >= 1` when warm-started.
    key: PRNG key of the Gaussian columns.
    cold_power_iters: iterations when a matrix has no previous basis; default
      `max(power_iters, COLD_POWER_ITERS)`. If any matrix of a batch is cold, the whole batch
      runs this count (one loop).

  Returns:
    Orthonormal `[..., D, r]` float32 basis with the canonical sign.
  """
  d, e = a_DxE.shape[-2:]
  r = prev_DxR.shape[-1]
  k = min(r + oversample, d, e)
  batch = a_DxE.shape[:-2]
  # Columns of norm ~1 beside the orthonormal `prev`: the start needs no QR of its own (only
  # span(aᵀ x) is used, through a Householder QR).
  omega = _gaussian(key, (*batch, d, k)) / jnp.sqrt(jnp.float32(d))
  warm = jnp.any(prev_DxR != 0, axis=(-2, -1), keepdims=True)
  start = jnp.concatenate([prev_DxR.astype(jnp.float32), omega[..., : k - r]], axis=-1)
  x = jnp.where(warm, start, omega)
  iters = jnp.where(jnp.all(warm), power_iters, _cold_iters(power_iters, cold_power_iters))
  x = jax.lax.fori_loop(0, iters - 1, lambda _, x: orthonormalize(_mm(a_DxE, _mm(_t(a_DxE), x))), x)
  return projection.canonical_sign(row_ritz_left(a_DxE, x, r))


def _cold_iters(power_iters, cold_power_iters: int | None):
  """Iterations of a cold start; `power_iters` may be traced (injected)."""
  if cold_power_iters is not None:
    return cold_power_iters
  if isinstance(power_iters, int):
    return max(power_iters, COLD_POWER_ITERS)
  return jnp.maximum(power_iters, COLD_POWER_ITERS)


# Block power steps (block of `_RHO_BLOCK` columns) estimating the residual's spectral norm for
# the energy certificate: each costs `2 * _RHO_BLOCK` matrix-vector products, a few percent of
# one subspace iteration's `2 k` at GaLore's ranks.
_RHO_STEPS = 4
_RHO_BLOCK = 4


class RefreshStats(NamedTuple):
  """What a refresh reports per matrix (arrays shaped like the batch axes)."""

  iterations: jax.Array  # int32: subspace iterations run (0 for the exact SVD)
  energy_estimate: jax.Array  # float32: certified fraction of the exact top-r energy (1 for SVD)


def _residual_norm(a_DxE, x_DxK, w_ExK, key) -> jax.Array:
  """Block power estimate of `‖(I - x xᵀ) a‖₂` (`w = aᵀ x`), per matrix: a lower estimate."""
  batch = a_DxE.shape[:-2]
  e = a_DxE.shape[-1]
  v = _gaussian(key, (*batch, e, _RHO_BLOCK))
  res = lambda v: _mm(a_DxE, v) - _mm(x_DxK, _mm(_t(w_ExK), v))  # R v
  res_t = lambda u: _mm(_t(a_DxE), u) - _mm(w_ExK, _mm(_t(x_DxK), u))  # Rᵀ u
  v = jax.lax.fori_loop(
    0, _RHO_STEPS - 1, lambda _, v: orthonormalize(res_t(res(orthonormalize(v)))), v
  )
  return jnp.linalg.svd(res(orthonormalize(v)), compute_uv=False)[..., 0]


def energy_certificate(a_DxE, x_DxK, r: int, a_sq, key):
  """`(z = orth(aᵀ x), η̂)`: the certified energy fraction of `P = x[:, :r]` (see
  `adaptive_left_basis`) and the row-space basis the next iteration needs."""
  w_ExK = _mm(_t(a_DxE), x_DxK)
  z_ExK, rw_KxK = jnp.linalg.qr(w_ExK, mode="reduced")
  captured = jnp.sum(w_ExK[..., :r] ** 2, axis=(-2, -1))  # ‖Pᵀ a‖², exact
  sv = jnp.linalg.svd(rw_KxK, compute_uv=False)  # singular values of xᵀ a
  top = jnp.sum(sv[..., :r] ** 2, axis=-1)
  tail_f = jnp.maximum(a_sq - jnp.sum(sv**2, axis=-1), 0.0)  # ‖(I - x xᵀ) a‖_F²
  rho = _residual_norm(a_DxE, x_DxK, w_ExK, key)
  bound = top + jnp.minimum(r * rho**2, tail_f)
  est = jnp.where(bound > 0, captured / jnp.where(bound > 0, bound, 1.0), 1.0)
  return z_ExK, jnp.minimum(est, 1.0)


def adaptive_left_basis(
  a_DxE: jax.Array,
  prev_DxR: jax.Array,
  oversample: int,
  min_iters,
  max_iters,
  energy_tol,
  key: jax.Array,
  cold_min_iters=None,
) -> tuple[jax.Array, RefreshStats]:
  r"""`randomized_left_basis` with as many iterations as a certified energy fraction needs.

  Each iteration is `x <- Q U` with `Q, R = qr(a z)`, `z = orth(aᵀ x)`, `U` the left singular
  vectors of `R` (row-space Rayleigh–Ritz: the first `r` columns of `x` are the candidate
  basis `P`). After each one, with `w = aᵀ x` (the next iteration's first product, so the
  check costs no extra pass over `a` but the `ρ̂` power steps):

  .. math::
    \hat\eta = \frac{\|P^\top a\|_F^2}
      {\sum_{i \le r} \sigma_i(x^\top a)^2 + \min(r\,\hat\rho^2,\ \|a\|_F^2 - \|x^\top a\|_F^2)}

  where `ρ̂` estimates `‖R‖₂`, `R = (I - x xᵀ) a`. Since `aᵀa = aᵀ x xᵀ a + Rᵀ R`, Ky Fan's
  inequality bounds the exact top-`r` energy `E* = Σ_{i<=r} σ_i(a)²` by the denominator with
  `ρ̂ = ‖R‖₂`, and `Σ_{i<=r} λ_i(RᵀR) <= min(r ‖R‖₂², ‖R‖_F²)`. So `η̂ <= ‖Pᵀa‖² / E*`: a
  certificate, rigorous up to `ρ̂` (a block power estimate, `_RHO_STEPS` steps, from below;
  `r ρ̂²` is seldom the binding term). It is loose by at most the denominator's excess,
  `true - η̂ <= η (min(r ρ², ‖R‖_F²) + top - E*) / E*`, which vanishes as the spectrum decays
  past `k = r + p`; for slow spectra (`σ_{k+1} ≈ σ_r`) no `k`-column sketch can certify
  much, and the loop runs to `max_iters`.

  The loop stops when `η̂ >= energy_tol` after at least `min_iters` iterations (warm) or
  `cold_min_iters` (cold: `prev` all zeros), or at `max_iters`. With batch axes, each matrix
  stops on its own (later iterations leave it unchanged) and reports its own count.

  Returns:
    `(basis [..., D, r] float32 with the canonical sign, RefreshStats)`.
  """
  d, e = a_DxE.shape[-2:]
  r = prev_DxR.shape[-1]
  k = min(r + oversample, d, e)
  batch = a_DxE.shape[:-2]
  k_omega, k_rho = jax.random.split(key)
  omega = _gaussian(k_omega, (*batch, d, k)) / jnp.sqrt(jnp.float32(d))
  warm = jnp.any(prev_DxR != 0, axis=(-2, -1))
  start = jnp.concatenate([prev_DxR.astype(jnp.float32), omega[..., : k - r]], axis=-1)
  x = jnp.where(warm[..., None, None], start, omega)
  cold_min = _cold_iters(min_iters, None) if cold_min_iters is None else cold_min_iters
  lo = jnp.where(warm, min_iters, cold_min)
  hi = jnp.maximum(max_iters, lo)
  a_sq = jnp.sum(a_DxE**2, axis=(-2, -1))

  def advance(x, z):
    q, rr = jnp.linalg.qr(_mm(a_DxE, z), mode="reduced")
    return _mm(q, jnp.linalg.svd(rr, full_matrices=True)[0])

  def running(j, est):
    return (j < hi) & ((j < lo) | (est < energy_tol))

  def body(c):
    x, z, est, j = c
    go = running(j, est)
    x_new = advance(x, z)
    z_new, est_new = energy_certificate(a_DxE, x_new, r, a_sq, jax.random.fold_in(k_rho, j.max()))
    keep = lambda new, old: jnp.where(go.reshape(go.shape + (1,) * (new.ndim - go.ndim)), new, old)
    return keep(x_new, x), keep(z_new, z), keep(est_new, est), j + go.astype(jnp.int32)

  z, est = energy_certificate(a_DxE, x, r, a_sq, k_rho)
  j = jnp.zeros(batch, jnp.int32)
  x, _, est, j = jax.lax.while_loop(lambda c: jnp.any(running(c[3], c[2])), body, (x, z, est, j))
  basis = projection.canonical_sign(x[..., :r])
  return basis, RefreshStats(j, est.astype(jnp.float32))


def align_signs(new_DxR: jax.Array, prev_DxR: jax.Array) -> jax.Array:
  """Flips each new column whose dot product with the matching previous column is negative.

  Columns with a zero dot product (and a cold start, where `prev` is zero) keep their sign.
  """
  dots = jnp.sum(new_DxR * prev_DxR.astype(new_DxR.dtype), axis=-2, keepdims=True)
  return new_DxR * jnp.where(dots < 0, -1.0, 1.0).astype(new_DxR.dtype)


def gram_left_basis(gram_DxD: jax.Array, rank: int) -> jax.Array:
  """Top-`rank` eigenvectors of a symmetric PSD `G Gᵀ`: the top left singular vectors of `G`.

  For a gradient that exists only as column chunks, `G = [G_1 | ... | G_n]`, the caller sums
  `G Gᵀ = Σ_c G_c G_cᵀ` (`D x D`, float32) chunk by chunk and gets GaLore's subspace without
  ever holding `G` (the right singular vectors: the same from `Gᵀ G = Σ_c G_cᵀ G_c` of row
  chunks). Eigenvectors of `G Gᵀ` span the same top-`r` subspace as the SVD's but are less
  accurate: a float32 perturbation of `G Gᵀ` of `ε ‖G‖²` moves the `i`-th vector by about
  `ε ‖G‖² / (σ_i² - σ_{i+1}²)` (Davis–Kahan), against `ε ‖G‖ / (σ_i - σ_{i+1})` for the SVD.

  Args:
    gram_DxD: `G Gᵀ`, optionally with leading batch axes; computed in float32.
    rank: `r`, clipped to `D`.

  Returns:
    Orthonormal `[..., D, r]` float32 basis, largest eigenvalue first, with the canonical sign
    (`projection.canonical_sign`), so that it equals `svd_projectors`' basis up to rounding.

  Example:
    >>> import jax.numpy as jnp, galore_jax as gj
    >>> g = jnp.diag(jnp.array([3.0, 2.0, 1.0]))
    >>> gj.subspace.gram_left_basis(g @ g.T, 2).tolist()
    [[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]
  """
  r = min(rank, gram_DxD.shape[-1])
  _, vecs = jnp.linalg.eigh(gram_DxD.astype(jnp.float32), symmetrize_input=True)
  return projection.canonical_sign(vecs[..., ::-1][..., :r])


def make_refresh_fn(
  method: str,
  rank: int,
  oversample: int,
  power_iters: int,
  *,
  cold_power_iters: int | None = None,
  sign: str = "canonical",
  energy_tol=None,
  max_power_iters=DEFAULT_MAX_POWER_ITERS,
):
  """Returns `refresh(g_IxO, prev, side, key) -> tuple of bases` for a subspace method.

  `prev` is the tuple of current bases (zeros before the first refresh) and `side` one of
  `projection.SIDES`. `sign="align"` flips each new vector to agree with the previous one
  (`align_signs`) after the canonical sign; `"canonical"` keeps the canonical sign only.
  With `energy_tol` (randomized only) the iterations adapt (`adaptive_left_basis`, between
  `power_iters` and `max_power_iters`) and `refresh` returns `(bases, stats)`, one
  `RefreshStats` per basis. `energy_tol` and `max_power_iters` may be traced (injected).
  """
  if sign not in SIGNS:
    raise ValueError(f"sign must be one of {SIGNS}, got {sign!r}.")
  if method == "svd":
    if energy_tol is not None:
      raise ValueError(
        f"energy_tol={energy_tol!r} applies to subspace_method='randomized' only (the exact SVD "
        "captures all of the top-r energy); leave it None."
      )
    compute = _svd_refresh(rank)
  elif method == "randomized":
    checks = [("oversample", oversample, 0)]
    if cold_power_iters is not None:
      checks.append(("cold_power_iters", cold_power_iters, 1))
    for name, value, low in checks:
      if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(
          f"{name} must be a Python int >= {low} (it fixes shapes or the program), got "
          f"{value!r}; under optax.inject_hyperparams list it in static_args "
          "(galore_jax.static_args(factory))."
        )
    # `power_iters` only sets a loop's trip count, so it may be injected (traced).
    its = _concrete(power_iters)
    if isinstance(power_iters, bool) or (
      its is not None and not (np.issubdtype(its.dtype, np.integer) and int(its) >= 1)
    ):
      raise ValueError(f"power_iters must be an int >= 1, got {power_iters!r}.")
    if energy_tol is None:
      compute = _randomized_refresh(oversample, power_iters, cold_power_iters)
    else:
      check_energy_tol(energy_tol, max_power_iters)
      compute = _adaptive_refresh(
        oversample, power_iters, cold_power_iters, energy_tol, max_power_iters
      )
  else:
    raise ValueError(f"subspace_method must be one of {METHODS}, got {method!r}.")

  def refresh(g, prev, side, key):
    out = compute(g, prev, side, key)
    bases, stats = out if energy_tol is not None else (out, None)
    if sign == "align":
      bases = tuple(align_signs(b, p) for b, p in zip(bases, prev))
    return bases if stats is None else (bases, stats)

  return refresh


def _concrete(value):
  """`value` as a numpy scalar, or None when it is traced (checked only when concrete)."""
  try:
    arr = np.asarray(value)
  except (TypeError, jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return None
  return arr if arr.shape == () else np.asarray(np.nan)


def check_energy_tol(energy_tol, max_power_iters) -> None:
  """ValueErrors naming `energy_tol` / `max_power_iters` for concrete out-of-range values."""
  tol = _concrete(np.nan if isinstance(energy_tol, bool) else energy_tol)
  if tol is not None and not (np.issubdtype(tol.dtype, np.number) and 0 < float(tol) < 1):
    raise ValueError(
      f"energy_tol must be None (fixed power_iters) or a number in (0, 1), the fraction of the "
      f"exact top-r energy to certify (e.g. 0.99); got {energy_tol!r}."
    )
  bad = isinstance(max_power_iters, bool)
  its = _concrete(max_power_iters)
  if bad or (its is not None and not (np.issubdtype(its.dtype, np.integer) and int(its) >= 1)):
    raise ValueError(f"max_power_iters must be an int >= 1, got {max_power_iters!r}.")


def refresh_leaves(refresh, leaves: list, with_stats: bool = False) -> list:
  """`refresh(g, prev, side, key)` run on one `I x O` matrix at a time over a list of
  `(g_[batch]xIxO, prev, side, key)`; returns each entry's bases, cast to its `prev`'s dtypes
  (with `with_stats`, for a `refresh` returning `(bases, stats)`: each entry's `(bases,
  stats)`, the stats shaped `[batch...]`).

  A batched factorisation of stacked layers `[N, I, O]` holds the float32 copies and factors of
  all `N` matrices at once, and XLA schedules independent factorisations of separate leaves side
  by side (XLA:CPU drops `optimization_barrier`s before scheduling). Here every matrix of the
  same shape, dtype and side, the layers of a stacked leaf and unrolled leaves alike, goes through
  one `lax.map` whose body picks its matrix with a `lax.switch` over static slices: a dynamic
  slice of a bf16 array would make XLA:CPU upcast (copy) the whole array first. Matrix `n` of a
  batched entry gets the key `fold_in(key, n)`; an entry without batch axes gets `key` itself.
  """
  groups: dict = {}
  for i, (g, prev, side, key) in enumerate(leaves):
    *batch, in_dim, out_dim = g.shape
    n = math.prod(batch)
    flat = g.reshape(n, in_dim, out_dim), tuple(p.reshape(n, *p.shape[-2:]) for p in prev)
    keys = [key] if not batch else [jax.random.fold_in(key, b) for b in range(n)]
    sig = (g.shape[-2:], g.dtype, side, tuple((p.shape[-2:], p.dtype) for p in prev))
    groups.setdefault(sig, []).append((i, flat, keys))

  out = [None] * len(leaves)
  for (_, _, side, _), entries in groups.items():
    picks = [
      lambda g=g, p=p, b=b: (g[b], tuple(x[b] for x in p))
      for _, (g, p), keys in entries
      for b in range(len(keys))
    ]

    def one(g, prev, k, side=side):
      res = refresh(g, prev, side, k)
      bases, stats = res if with_stats else (res, ())
      return tuple(b.astype(o.dtype) for b, o in zip(bases, prev)), stats

    if len(picks) == 1:
      bases, stats = jax.tree.map(lambda b: b[None], one(*picks[0](), entries[0][2][0]))
    else:
      keys = jnp.stack([k for *_, ks in entries for k in ks])
      bases, stats = jax.lax.map(
        lambda a, picks=picks, one=one: one(*jax.lax.switch(a[0], picks), a[1]),
        (jnp.arange(len(picks)), keys),
      )
    start = 0
    for i, _, ks in entries:
      prev, n = leaves[i][1], len(ks)
      out[i] = tuple(b[start : start + n].reshape(p.shape) for b, p in zip(bases, prev))
      if with_stats:
        batch = leaves[i][0].shape[:-2]
        cut = jax.tree.map(lambda x, s=start, n=n, b=batch: x[s : s + n].reshape(b), stats)
        out[i] = (out[i], cut)
      start += n
  return out


def _svd_refresh(rank: int):
  def compute(g, prev, side, key):
    del prev, key
    return projection.svd_projectors(g, side, rank)

  return compute


def _randomized_refresh(oversample: int, power_iters: int, cold_power_iters: int | None):
  def compute(g, prev, side, key):
    g32 = g.astype(jnp.float32)
    k_in, k_out = jax.random.split(key)
    args = (oversample, power_iters)
    out = []
    if side in ("in", "both"):
      out.append(randomized_left_basis(g32, prev[0], *args, k_in, cold_power_iters))
    if side in ("out", "both"):
      out.append(randomized_left_basis(_t(g32), prev[-1], *args, k_out, cold_power_iters))
    return tuple(out)

  return compute


def _adaptive_refresh(oversample, power_iters, cold_power_iters, energy_tol, max_power_iters):
  def compute(g, prev, side, key):
    g32 = g.astype(jnp.float32)
    k_in, k_out = jax.random.split(key)
    args = (oversample, power_iters, max_power_iters, energy_tol)
    out = []
    if side in ("in", "both"):
      out.append(adaptive_left_basis(g32, prev[0], *args, k_in, cold_power_iters))
    if side in ("out", "both"):
      out.append(adaptive_left_basis(_t(g32), prev[-1], *args, k_out, cold_power_iters))
    return tuple(b for b, _ in out), tuple(s for _, s in out)

  return compute
