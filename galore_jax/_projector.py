"""Pure array math of GaLore: side rules, subspaces, projection and back-projection.

Everything here works on arrays in the *canonical layout* `[..., I, O]`: leading batch axes (for
stacked layers), then the input (reduction) axis `I` and the output axis `O` of a Flax kernel.
PyTorch's `nn.Linear.weight` is the transpose, `[O, I]`; the reference's side rules are stated on
that shape and are translated here so that the same matrix gets the same subspace in both.

Sides:
  * ``"in"``: the projector spans the input axis, `P_IxR`; low-rank gradient `R = Pᵀ G`, `[R, O]`.
    (The reference's *right* projector `Vh[:r]` of the `[O, I]` torch weight.)
  * ``"out"``: the projector spans the output axis, `P_OxR`; `R = G P`, `[I, R]`.
    (The reference's *left* projector `U[:, :r]`.)
  * ``"both"``: `R = P_inᵀ G P_out`, `[R, R]` (the reference's ``"full"``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")
SIDES = ("in", "out", "both")


def side_for(proj_type: str, in_dim: int, out_dim: int) -> str:
  """Which axis a `proj_type` reduces, from the reference's rules on the torch shape `[O, I]`."""
  m, n = out_dim, in_dim  # torch: rows = out_features, cols = in_features
  if proj_type == "std":  # reduce the smaller dimension; square -> reduce the input dim
    return "in" if m >= n else "out"
  if proj_type == "reverse_std":
    return "out" if m >= n else "in"
  if proj_type == "right":
    return "in"
  if proj_type == "left":
    return "out"
  if proj_type == "full":
    return "both"
  raise ValueError(f"proj_type must be one of {PROJ_TYPES}, got {proj_type!r}.")


def effective_rank(rank: int, in_dim: int, out_dim: int) -> int:
  """A thin SVD has min(I, O) vectors; like the reference, larger ranks are clipped to that."""
  return min(rank, in_dim, out_dim)


def low_rank_shape(shape: tuple[int, ...], side: str, rank: int) -> tuple[int, ...]:
  """Shape of the projected gradient for a canonical `[..., I, O]` shape."""
  *batch, in_dim, out_dim = shape
  r = effective_rank(rank, in_dim, out_dim)
  tail = {"in": (r, out_dim), "out": (in_dim, r), "both": (r, r)}[side]
  return (*batch, *tail)


def projector_shapes(shape: tuple[int, ...], side: str, rank: int) -> tuple[tuple[int, ...], ...]:
  """Shapes of the projector(s) for a canonical `[..., I, O]` shape."""
  *batch, in_dim, out_dim = shape
  r = effective_rank(rank, in_dim, out_dim)
  return {
    "in": ((*batch, in_dim, r),),
    "out": ((*batch, out_dim, r),),
    "both": ((*batch, in_dim, r), (*batch, out_dim, r)),
  }[side]


def canonical_sign(basis_DxR: jax.Array) -> jax.Array:
  """Flips each column so that its largest-magnitude entry is positive.

  Singular vectors are defined up to sign and LAPACK, cuSOLVER and torch pick different ones.
  With moments kept across a refresh, a flipped basis vector meets a moment row of the opposite
  sign, so runs diverge between libraries and backends. A fixed convention removes that freedom.
  """
  idx = jnp.argmax(jnp.abs(basis_DxR), axis=-2, keepdims=True)
  pivot = jnp.take_along_axis(basis_DxR, idx, axis=-2)
  return basis_DxR * jnp.where(pivot < 0, -1.0, 1.0).astype(basis_DxR.dtype)


def svd_projectors(g_IxO: jax.Array, side: str, rank: int) -> tuple[jax.Array, ...]:
  """Top-`rank` singular vectors of `g` (float32 thin SVD) on the requested side(s)."""
  g32 = g_IxO.astype(jnp.float32)
  u_IxK, _, vh_KxO = jnp.linalg.svd(g32, full_matrices=False)
  r = effective_rank(rank, g_IxO.shape[-2], g_IxO.shape[-1])
  p_in = canonical_sign(u_IxK[..., :r])
  p_out = canonical_sign(jnp.swapaxes(vh_KxO[..., :r, :], -1, -2))
  return {"in": (p_in,), "out": (p_out,), "both": (p_in, p_out)}[side]


def _matmul_dtype(g: jax.Array, projectors: tuple[jax.Array, ...]):
  return jnp.result_type(g.dtype, *(p.dtype for p in projectors))


def project(g_IxO: jax.Array, projectors: tuple[jax.Array, ...], side: str) -> jax.Array:
  """Low-rank gradient `R`, in `g`'s dtype."""
  dt = _matmul_dtype(g_IxO, projectors)
  g = g_IxO.astype(dt)
  ps = [p.astype(dt) for p in projectors]
  if side == "in":
    r = jnp.einsum("...ir,...io->...ro", ps[0], g)
  elif side == "out":
    r = jnp.einsum("...io,...or->...ir", g, ps[0])
  else:
    r = jnp.einsum("...ir,...io,...os->...rs", ps[0], g, ps[1])
  return r.astype(g_IxO.dtype)


def project_back(n: jax.Array, projectors: tuple[jax.Array, ...], side: str) -> jax.Array:
  """Full-size `[..., I, O]` update from a low-rank one, in `n`'s dtype (no `scale`)."""
  dt = _matmul_dtype(n, projectors)
  x = n.astype(dt)
  ps = [p.astype(dt) for p in projectors]
  if side == "in":
    full = jnp.einsum("...ir,...ro->...io", ps[0], x)
  elif side == "out":
    full = jnp.einsum("...ir,...or->...io", x, ps[0])
  else:
    full = jnp.einsum("...ir,...rs,...os->...io", ps[0], x, ps[1])
  return full.astype(n.dtype)


def basis_change(new: tuple[jax.Array, ...], old: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
  """`P_newᵀ P_old` per projector: maps coordinates in the old basis to the new one."""
  dt = jnp.float32
  return tuple(
    jnp.einsum("...dr,...ds->...rs", pn.astype(dt), po.astype(dt)) for pn, po in zip(new, old)
  )


def rotate_low_rank(x: jax.Array, rotations: tuple[jax.Array, ...], side: str, power: int = 1):
  """Carries a low-rank tensor into a new basis; `power=2` uses the squared rotation (for `v`)."""
  rots = [r**power for r in rotations]
  x32 = x.astype(jnp.float32)
  if side == "in":
    y = jnp.einsum("...rs,...so->...ro", rots[0], x32)
  elif side == "out":
    y = jnp.einsum("...is,...rs->...ir", x32, rots[0])
  else:
    y = jnp.einsum("...ra,...ab,...sb->...rs", rots[0], x32, rots[1])
  return y.astype(x.dtype)
