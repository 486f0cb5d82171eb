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

import jax
import jax.numpy as jnp

from galore_jax import projection

METHODS = ("svd", "randomized")
SIGNS = ("canonical", "align")

# Iterations of a cold start (no previous basis): it happens once, at the first refresh, and a
# random start needs more iterations than a warm one to converge (benchmarks/subspace_refresh.py).
COLD_POWER_ITERS = 4

# Products of orthonormal factors must stay orthonormal to float32 accuracy: never let an
# accelerator's default (TF32 / one bf16 pass) precision round them.
_HIGHEST = jax.lax.Precision.HIGHEST


def _mm(a: jax.Array, b: jax.Array) -> jax.Array:
  return jnp.matmul(a, b, precision=_HIGHEST)


def _t(x: jax.Array) -> jax.Array:
  return jnp.swapaxes(x, -1, -2)


def _orth(y_DxK: jax.Array) -> jax.Array:
  """Orthonormal column basis; Householder QR stays orthonormal when `y` is rank-deficient."""
  q, _ = jnp.linalg.qr(y_DxK, mode="reduced")
  return q


def _gaussian(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Standard normal float32 draws, drawn flat: XLA:CPU compiles a rank-1 threefry draw in a
  fraction of the time of a rank-3 or rank-4 one (0.3 s vs 2 s)."""
  return jax.random.normal(key, (math.prod(shape),), jnp.float32).reshape(shape)


def _row_ritz_left(a_DxE: jax.Array, x_DxK: jax.Array, r: int) -> jax.Array:
  """Top-`r` left singular vectors of `a P_Z`, `P_Z` the projector onto `Z = span(aᵀ x)`.

  This is Rayleigh–Ritz on the row-space sketch: `(a P_Z)(a P_Z)ᵀ` is the Nyström approximation
  of `a aᵀ` from the test block `x`, and its column space is span(a aᵀ x), the same `k` dims a
  left-side Ritz step would search. It needs two products with `a` where the classical
  `Q = orth(a aᵀ x)`, `svd(Qᵀ a)` needs three, and selects the same `r` dims to ~1e-4 of the
  captured energy (benchmarks/subspace_refresh.py). Householder QRs keep it defined for
  rank-deficient (even zero) `a`; no `k x k` inverse or Cholesky is involved.
  """
  z_ExK = _orth(_mm(_t(a_DxE), x_DxK))
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
  columns. `q - 1` iterations `x <- orth(a aᵀ x)`, then `_row_ritz_left`, which applies `a aᵀ`
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
  x = jax.lax.fori_loop(0, iters - 1, lambda _, x: _orth(_mm(a_DxE, _mm(_t(a_DxE), x))), x)
  return projection.canonical_sign(_row_ritz_left(a_DxE, x, r))


def _cold_iters(power_iters: int, cold_power_iters: int | None) -> int:
  return max(power_iters, COLD_POWER_ITERS) if cold_power_iters is None else cold_power_iters


def align_signs(new_DxR: jax.Array, prev_DxR: jax.Array) -> jax.Array:
  """Flips each new column whose dot product with the matching previous column is negative.

  Columns with a zero dot product (and a cold start, where `prev` is zero) keep their sign.
  """
  dots = jnp.sum(new_DxR * prev_DxR.astype(new_DxR.dtype), axis=-2, keepdims=True)
  return new_DxR * jnp.where(dots < 0, -1.0, 1.0).astype(new_DxR.dtype)


def make_refresh_fn(
  method: str,
  rank: int,
  oversample: int,
  power_iters: int,
  *,
  cold_power_iters: int | None = None,
  sign: str = "canonical",
):
  """Returns `refresh(g_IxO, prev, side, key) -> tuple of bases` for a subspace method.

  `prev` is the tuple of current bases (zeros before the first refresh) and `side` one of
  `projection.SIDES`. `sign="align"` flips each new vector to agree with the previous one
  (`align_signs`) after the canonical sign; `"canonical"` keeps the canonical sign only.
  """
  if sign not in SIGNS:
    raise ValueError(f"sign must be one of {SIGNS}, got {sign!r}.")
  if method == "svd":
    compute = _svd_refresh(rank)
  elif method == "randomized":
    checks = [("oversample", oversample, 0), ("power_iters", power_iters, 1)]
    if cold_power_iters is not None:
      checks.append(("cold_power_iters", cold_power_iters, 1))
    for name, value, low in checks:
      if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}.")
    compute = _randomized_refresh(oversample, power_iters, cold_power_iters)
  else:
    raise ValueError(f"subspace_method must be one of {METHODS}, got {method!r}.")

  def refresh(g, prev, side, key):
    bases = compute(g, prev, side, key)
    if sign == "align":
      bases = tuple(align_signs(b, p) for b, p in zip(bases, prev))
    return bases

  return refresh


def refresh_leaves(refresh, leaves: list) -> list:
  """`refresh(g, prev, side, key)` run on one `I x O` matrix at a time over a list of
  `(g_[batch]xIxO, prev, side, key)`; returns each entry's bases, cast to its `prev`'s dtypes.

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
      return tuple(b.astype(o.dtype) for b, o in zip(refresh(g, prev, side, k), prev))

    if len(picks) == 1:
      bases = tuple(b[None] for b in one(*picks[0](), entries[0][2][0]))
    else:
      keys = jnp.stack([k for *_, ks in entries for k in ks])
      bases = jax.lax.map(
        lambda a, picks=picks, one=one: one(*jax.lax.switch(a[0], picks), a[1]),
        (jnp.arange(len(picks)), keys),
      )
    start = 0
    for i, _, ks in entries:
      prev = leaves[i][1]
      out[i] = tuple(b[start : start + len(ks)].reshape(p.shape) for b, p in zip(bases, prev))
      start += len(ks)
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
