"""Which leaves GaLore projects, how, and what that costs: the static plan of a parameter tree.

`plan_leaves` resolves `mask` and `dimension_numbers` against a parameter tree once, from shapes
and dtypes only, with errors that name the leaf and the argument; `galore_targets` is its public
face, one `Target` row per leaf (path, matrix shape, side, rank, state bytes against Adam's).

The default targets (`mask=None`) are the floating-point leaves with exactly two axes. A leaf
with more axes is a matrix only once its axes are named: a stacked `[N, in, out]` kernel (pass a
mask that selects it, or `dimension_numbers`) and an attention kernel `[in, heads, head_dim]`
(`GaLoreDimensionNumbers(reduction_axis=0, output_axis=(1, 2))`) look alike, and guessing wrong
makes GaLore hold more state than Adam. So by default such leaves are left at full rank, with a
warning that says how to target them.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from galore_jax import projection
from galore_jax.masks import path_names, resolve_tree
from galore_jax.projection import GaLoreDimensionNumbers, MatrixLayout


class Target(NamedTuple):
  """One parameter leaf in GaLore's plan.

  Attributes:
    path: the leaf's key path, `/`-joined.
    shape: the leaf's shape.
    projected: whether GaLore projects it (else the inner optimizer runs at full rank).
    matrix: `(batch..., I, O)`, the leaf as GaLore's matrices (None when not projected).
    side: `"in"`, `"out"` or `"both"`: the axis GaLore reduces (None when not projected).
    rank: the rank used, `min(rank, I, O)` (None when not projected).
    galore_bytes: bytes of the projector(s) plus two low-rank moments in the leaf's dtype (an
      Adam-like inner optimizer); for a leaf that is not projected, two full moments.
    adam_bytes: bytes of two full-size moments in the leaf's dtype (Adam on this leaf).
    note: why a leaf is not projected, or a warning about it; "" otherwise.
  """

  path: str
  shape: tuple[int, ...]
  projected: bool
  matrix: tuple[int, ...] | None
  side: str | None
  rank: int | None
  galore_bytes: int
  adam_bytes: int
  note: str


def _is_dn(x) -> bool:
  return x is None or isinstance(x, GaLoreDimensionNumbers)


def _flat_option(name: str, value, params, treedef, is_leaf=None) -> list:
  """`mask` / `dimension_numbers` (None, one value, a tree or a callable) as one entry per leaf."""
  tree = resolve_tree(value, params)
  if tree is None or isinstance(tree, (bool, GaLoreDimensionNumbers)):
    return [tree] * treedef.num_leaves
  try:
    return treedef.flatten_up_to(tree)
  except (ValueError, TypeError) as e:
    got = jax.tree.structure(tree, is_leaf=is_leaf)
    raise ValueError(
      f"galore: `{name}` must be a pytree with the params' structure (or a callable params -> "
      f"such a tree); the params are {treedef}, `{name}` is {got}. ({e})"
    ) from None


def _mask_value(m, path: str) -> bool | None:
  if m is None:
    return None
  if isinstance(m, jax.core.Tracer):
    raise ValueError(
      f"galore: `mask` at {path} is a traced array: under optax.inject_hyperparams a mask of "
      "bools is turned into arrays. List 'mask' in static_args (see "
      "galore_jax.static_args) or pass a callable."
    )
  try:
    return bool(np.asarray(m))
  except (TypeError, ValueError):
    raise ValueError(f"galore: `mask` at {path} must be a bool, got {m!r}.") from None


def _state_bytes(shape, dtype, layout: MatrixLayout | None, rank: int, proj_dtype) -> int:
  itemsize = jnp.dtype(dtype).itemsize
  if layout is None:
    return 2 * math.prod(shape) * itemsize
  low = projection.low_rank_shape(layout.canon_shape, layout.side, rank)
  projs = projection.projector_shapes(layout.canon_shape, layout.side, rank)
  proj_item = jnp.dtype(proj_dtype or dtype).itemsize
  return 2 * math.prod(low) * itemsize + sum(math.prod(s) for s in projs) * proj_item


def plan_leaves(
  params,
  mask,
  dimension_numbers,
  proj_type: str,
  rank: int,
  projector_dtype=None,
) -> tuple[list, list[MatrixLayout | None], Any, list[Target]]:
  """(leaves, per-leaf `MatrixLayout` or None, treedef, `Target` rows) of a parameter tree.

  Raises ValueErrors naming the leaf for: a mask or dimension numbers whose structure does not
  match, a traced mask, dimension numbers out of range, a non-floating leaf selected by the mask.
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  masks = _flat_option("mask", mask, params, treedef)
  dns = _flat_option("dimension_numbers", dimension_numbers, params, treedef, _is_dn)
  leaves, plans, rows = [], [], []
  for (key_path, p), m, dn in zip(flat, masks, dns):
    path = "/".join(map(str, path_names(key_path))) or "<root>"
    shape, dtype = tuple(np.shape(p)), jnp.result_type(p)
    if not (dn is None or isinstance(dn, GaLoreDimensionNumbers)):
      raise ValueError(
        f"galore: `dimension_numbers` at {path} must be None or a GaLoreDimensionNumbers, "
        f"got {dn!r}."
      )
    chosen = _mask_value(m, path)
    floating = jnp.issubdtype(dtype, jnp.floating)
    note = ""
    if chosen is None:  # the default targets
      target = floating and (dn is not None or len(shape) == 2)
      if floating and dn is None and len(shape) > 2:
        note = (
          f"not projected: {len(shape)}-D without dimension_numbers (pass a mask selecting it "
          "to treat leading axes as stacked layers, or dimension_numbers)"
        )
    else:
      target = chosen and (dn is not None or len(shape) >= 2)
      if target and not floating:
        raise ValueError(
          f"galore: `mask` selects {path} of dtype {dtype}; GaLore projects floating-point "
          "matrices only (integer leaves get no gradient)."
        )
    layout = None
    if target:
      try:
        layout = projection.matrix_layout(shape, dn or GaLoreDimensionNumbers(), proj_type)
      except ValueError as e:
        raise ValueError(f"galore: leaf {path} of shape {shape}: {e}") from None
    r = None if layout is None else projection.effective_rank(rank, *layout.canon_shape[-2:])
    gal = _state_bytes(shape, dtype, layout, r or 0, projector_dtype)
    adam = _state_bytes(shape, dtype, None, 0, None)
    if layout is not None and gal > adam:
      note = (
        f"GaLore holds more state than Adam here ({gal:,} vs {adam:,} bytes: rank {rank} is "
        f"too large for {layout.canon_shape[-2]}x{layout.canon_shape[-1]} matrices); lower the "
        "rank or leave it out of the mask"
      )
    leaves.append(p)
    plans.append(layout)
    rows.append(
      Target(
        path,
        shape,
        layout is not None,
        None if layout is None else layout.canon_shape,
        None if layout is None else layout.side,
        r,
        gal,
        adam,
        note,
      )
    )
  return leaves, plans, treedef, rows


def warn_about(rows: list[Target]) -> None:
  """One warning listing the leaves with a note (skipped >2-D leaves, GaLore above Adam)."""
  noted = [f"  {r.path} {r.shape}: {r.note}" for r in rows if r.note]
  if noted:
    warnings.warn("galore:\n" + "\n".join(noted), UserWarning, stacklevel=3)


def galore_targets(
  params,
  *,
  rank: int = 128,
  proj_type: str = "std",
  mask=None,
  dimension_numbers=None,
  projector_dtype=None,
) -> list[Target]:
  """What GaLore does with each leaf of `params`, with the same options as `scale_by_galore`.

  Args:
    params: the parameter tree (arrays or `jax.ShapeDtypeStruct` leaves).
    rank: GaLore's rank.
    proj_type: see `scale_by_galore`.
    mask: see `scale_by_galore`.
    dimension_numbers: see `scale_by_galore`.
    projector_dtype: see `scale_by_galore`.

  Returns:
    One `Target` per leaf, in tree order; `format_targets` prints them as a table.

  Example:
    >>> import jax.numpy as jnp, galore_jax as gj
    >>> params = {"w": jnp.zeros((64, 256)), "b": jnp.zeros(256)}
    >>> [(t.path, t.projected, t.side, t.rank) for t in gj.galore_targets(params, rank=16)]
    [('b', False, None, None), ('w', True, 'in', 16)]
  """
  return plan_leaves(params, mask, dimension_numbers, proj_type, rank, projector_dtype)[3]


def format_targets(targets: list[Target]) -> str:
  """A Markdown table of `galore_targets`' rows with the state totals against Adam's."""
  lines = [
    "| leaf | shape | projected as | side | rank | GaLore state | Adam state | note |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for t in targets:
    matrix = "x".join(map(str, t.matrix)) if t.matrix else "-"
    lines.append(
      f"| {t.path} | {t.shape} | {matrix} | {t.side or '-'} | {t.rank or '-'} | "
      f"{t.galore_bytes:,} | {t.adam_bytes:,} | {t.note} |"
    )
  gal, adam = sum(t.galore_bytes for t in targets), sum(t.adam_bytes for t in targets)
  lines.append(f"| total | | | | | {gal:,} | {adam:,} | {gal / max(adam, 1):.1%} of Adam |")
  return "\n".join(lines)
