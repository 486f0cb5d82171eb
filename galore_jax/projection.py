"""GaLore's projection math, public: side rules, matrix layouts, subspaces, project and back.

Every rule about *which* side of a weight GaLore compresses and *what shape* its low-rank state
has lives here, and the transform (`galore_jax.transform`), the layer-wise update
(`galore_jax.layerwise`), the memory accounting (`galore_jax.memory`) and the trainer's sharding
rules all call it.

Arrays are handled in the *canonical layout* `[..., I, O]`: leading batch axes (for stacked
layers), then the input (reduction) axis `I` and the output axis `O` of a Flax kernel. A leaf of
any layout is viewed that way through a `MatrixLayout` (from `GaLoreDimensionNumbers`). PyTorch's
`nn.Linear.weight` is the transpose, `[O, I]`; the reference's side rules are stated on that shape
and are translated here so that the same matrix gets the same subspace in both.

Sides:
  * ``"in"``: the projector spans the input axis, `P_IxR`; low-rank gradient `R = Pᵀ G`, `[R, O]`.
    (The reference's *right* projector `Vh[:r]` of the `[O, I]` torch weight.)
  * ``"out"``: the projector spans the output axis, `P_OxR`; `R = G P`, `[I, R]`.
    (The reference's *left* projector `U[:, :r]`.)
  * ``"both"``: `R = P_inᵀ G P_out`, `[R, R]` (the reference's ``"full"``).

Rank: a rank above a matrix's smaller dimension is clipped to it (`effective_rank`), as the
reference's thin SVD does; the trainer refuses such configs by the same rule.
"""

from __future__ import annotations

import math
from typing import NamedTuple

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


def kept_axis(shape: tuple[int, ...], proj_type: str) -> int | None:
  """The axis of a canonical `[..., I, O]` shape that `proj_type` keeps at full size.

  `-1` (O) when the input axis is reduced, `-2` (I) when the output axis is, None for `"full"`.
  The low-rank moments and the projector share that axis with the weight, so a sharding of the
  weight along it carries over to them.
  """
  side = side_for(proj_type, shape[-2], shape[-1])
  return {"in": -1, "out": -2, "both": None}[side]


class GaLoreDimensionNumbers(NamedTuple):
  """Which axes of a weight form the matrix that GaLore projects.

  Attributes:
    reduction_axis: the input (contracted) axis or axes; `0` for a Flax `(in, out)` kernel.
    output_axis: the output axis or axes; `1` for a Flax kernel.

  Every other axis is a batch axis: a stacked `[N, in, out]` weight (from `nnx.scan`) is N
  independent matrices, each with its own subspace. The default, used when no numbers are given
  for a leaf with ndim >= 2, is `reduction_axis=-2, output_axis=-1`.
  """

  reduction_axis: int | tuple[int, ...] = -2
  output_axis: int | tuple[int, ...] = -1


class MatrixLayout(NamedTuple):
  """Static view of one leaf as GaLore's `[batch..., I, O]` matrix, and the side it reduces.

  Attributes:
    perm: transpose of the leaf into (batch..., reduction..., output...).
    split_shape: the leaf's shape after that transpose.
    canon_shape: `(batch..., I, O)`, reduction and output axes each flattened into one.
    side: `"in"`, `"out"` or `"both"` (see `side_for`).
  """

  perm: tuple[int, ...]
  split_shape: tuple[int, ...]
  canon_shape: tuple[int, ...]
  side: str


def _axes(spec: int | tuple[int, ...], ndim: int, shape, name: str) -> tuple[int, ...]:
  axes = (spec,) if isinstance(spec, int) else tuple(spec)
  if not axes or not all(isinstance(a, int) for a in axes):
    raise ValueError(
      f"GaLoreDimensionNumbers.{name} must be an int or tuple of ints, got {spec!r}."
    )
  out = []
  for a in axes:
    if not -ndim <= a < ndim:
      raise ValueError(f"GaLoreDimensionNumbers.{name}={spec!r} is out of range for shape {shape}.")
    out.append(a % ndim)
  return tuple(out)


def matrix_layout(
  shape: tuple[int, ...], dn: GaLoreDimensionNumbers, proj_type: str
) -> MatrixLayout:
  """The `MatrixLayout` of a leaf of `shape` under dimension numbers `dn` and `proj_type`."""
  ndim = len(shape)
  red = _axes(dn.reduction_axis, ndim, shape, "reduction_axis")
  outs = _axes(dn.output_axis, ndim, shape, "output_axis")
  if len(set(red + outs)) != len(red) + len(outs):
    raise ValueError(f"GaLore dimension numbers {dn} repeat an axis for shape {shape}.")
  batch = tuple(a for a in range(ndim) if a not in red + outs)
  perm = batch + red + outs
  split_shape = tuple(shape[a] for a in perm)
  in_dim = math.prod(shape[a] for a in red)
  out_dim = math.prod(shape[a] for a in outs)
  canon = tuple(shape[a] for a in batch) + (in_dim, out_dim)
  return MatrixLayout(perm, split_shape, canon, side_for(proj_type, in_dim, out_dim))


def to_matrix(x: jax.Array, layout: MatrixLayout) -> jax.Array:
  """A leaf in its canonical `[..., I, O]` layout."""
  return jnp.transpose(x, layout.perm).reshape(layout.canon_shape)


def from_matrix(x: jax.Array, layout: MatrixLayout) -> jax.Array:
  """Inverse of `to_matrix`."""
  inv = tuple(sorted(range(len(layout.perm)), key=layout.perm.__getitem__))
  return x.reshape(layout.split_shape).transpose(inv)


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


def project(
  g_IxO: jax.Array, projectors: tuple[jax.Array, ...], side: str, dtype=None
) -> jax.Array:
  """Low-rank gradient `R`: `Pᵀ G`, `G P` or `P_inᵀ G P_out`.

  Computed in the promoted dtype of `g` and the projectors and returned in `g`'s dtype, or
  computed and returned in `dtype` when given (e.g. float32 accumulation of bf16 gradients).
  """
  dt = dtype or _matmul_dtype(g_IxO, projectors)
  g = g_IxO.astype(dt)
  ps = [p.astype(dt) for p in projectors]
  if side == "in":
    r = jnp.einsum("...ir,...io->...ro", ps[0], g)
  elif side == "out":
    r = jnp.einsum("...io,...or->...ir", g, ps[0])
  else:
    r = jnp.einsum("...ir,...io,...os->...rs", ps[0], g, ps[1])
  return r.astype(dtype or g_IxO.dtype)


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
