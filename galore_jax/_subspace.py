"""Pure array math of subspace refreshes: exact SVD and a warm-started randomized range finder.

All functions take a canonical `[..., I, O]` gradient and return orthonormal bases `[..., D, r]`
with the canonical sign convention of `_projector.canonical_sign`, computed in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from galore_jax import _projector

METHODS = ("svd", "randomized")


def _orth(y_DxK: jax.Array) -> jax.Array:
  q, _ = jnp.linalg.qr(y_DxK, mode="reduced")
  return q


def randomized_left_basis(
  a_DxE: jax.Array,
  prev_DxR: jax.Array,
  rank: int,
  oversample: int,
  power_iters: int,
  key: jax.Array,
) -> jax.Array:
  """Top-`rank` left singular vectors of `a` by warm-started subspace iteration (HMT 2011).

  The start block is `[prev | Ω]` (the previous basis plus `oversample` Gaussian columns), or all
  Gaussian when `prev` is zero (first refresh). Each of the `power_iters` (>= 1) iterations applies
  `a aᵀ` and re-orthonormalises with QR; a final small SVD of `Qᵀ a` (`k x E`, `k = r + p`)
  rotates the sketch onto singular vectors. Cost: `(2 power_iters + 1)` products with `a` of width
  `k`, one `k x E` SVD, instead of a full `D x E` SVD.
  """
  d, e = a_DxE.shape[-2:]
  r = prev_DxR.shape[-1]
  k = min(r + oversample, d, e)
  batch = a_DxE.shape[:-2]
  omega = jax.random.normal(key, (*batch, d, k), jnp.float32)
  warm = jnp.any(prev_DxR != 0, axis=(-2, -1), keepdims=True)
  start = jnp.concatenate([prev_DxR.astype(jnp.float32), omega[..., : k - r]], axis=-1)
  q = _orth(jnp.where(warm, start, omega))
  for _ in range(power_iters):
    q = _orth(a_DxE @ (jnp.swapaxes(a_DxE, -1, -2) @ q))
  b_KxE = jnp.swapaxes(q, -1, -2) @ a_DxE
  ub, _, _ = jnp.linalg.svd(b_KxE, full_matrices=False)
  del rank
  return _projector.canonical_sign(q @ ub[..., :r])


def make_refresh_fn(method: str, rank: int, oversample: int, power_iters: int):
  """Returns `refresh(g_IxO, prev, side, key) -> tuple of bases` for a subspace method."""
  if method == "svd":

    def refresh(g, prev, side, key):
      del prev, key
      return _projector.svd_projectors(g, side, rank)

    return refresh
  if method != "randomized":
    raise ValueError(f"subspace_method must be one of {METHODS}, got {method!r}.")
  if not isinstance(oversample, int) or oversample < 0:
    raise ValueError(f"oversample must be an int >= 0, got {oversample!r}.")
  if not isinstance(power_iters, int) or power_iters < 1:
    raise ValueError(f"power_iters must be an int >= 1, got {power_iters!r}.")

  def refresh(g, prev, side, key):
    g32 = g.astype(jnp.float32)
    k_in, k_out = jax.random.split(key)
    out = []
    if side in ("in", "both"):
      out.append(randomized_left_basis(g32, prev[0], rank, oversample, power_iters, k_in))
    if side in ("out", "both"):
      gt = jnp.swapaxes(g32, -1, -2)
      out.append(randomized_left_basis(gt, prev[-1], rank, oversample, power_iters, k_out))
    return tuple(out)

  return refresh
