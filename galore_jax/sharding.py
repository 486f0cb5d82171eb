"""Partition specs of parameters and of any optimizer state built on them, for one split axis.

For a user's own sharded loop (FSDP as in MaxText or levanter): parameters and optimizer state
are split over one mesh axis (any name, e.g. `"fsdp"`), batches over the others. The rules:

* A GaLore-targeted kernel `[..., I, O]` is split along the axis GaLore *keeps* (`O` when the
  input axis is reduced, `I` otherwise): the projected gradient `Pᵀ G` and the back-projection
  then contract only unsplit axes, and the low-rank moments split the same way, so a
  non-refresh step moves no full-size gradient. If the kept axis does not divide, the reduced
  axis is split instead.
* Other leaves are split along their largest divisible axis (ties: the last).
* Optimizer state: leaves laid out like a parameter follow its spec on every axis of equal
  size (full and low-rank moments); GaLore projectors `[..., D, r]` are split along `D`
  (`shard_projectors`) or replicated; 8-bit codes `[blocks, block_size]` and their scales
  `[blocks]` are split by whole blocks together; scalars (counts, injected hyperparameters)
  are replicated.

`optax.tree_utils.tree_map_params` cannot express these rules (GaLore's state holds trees laid
out like the params whose leaves do not have the params' shapes), hence `state_partition_specs`.

Meshes: use GSPMD (`AxisType.Auto`) axes, e.g. `jax.make_mesh(shape, names,
axis_types=(jax.sharding.AxisType.Auto,) * len(names))`. `jax.make_mesh`'s default Explicit axes
make sharding part of every array's type, which the refresh's SVD and the projection's `cond`
do not support; GaLore raises a clear error for them (`check_auto_sharding`).

Example:
  >>> import jax, jax.numpy as jnp, galore_jax as gj
  >>> params = {"mlp": {"kernel": jnp.zeros((64, 256))}, "norm": jnp.zeros(64)}
  >>> specs = gj.sharding.param_partition_specs(params, "fsdp", 4, mask=gj.llama_galore_mask)
  >>> specs["mlp"]["kernel"], specs["norm"]
  (P(None, 'fsdp'), P('fsdp',))
  >>> tx = gj.galore_adamw(1e-3, rank=8, mask=gj.llama_galore_mask)
  >>> state = jax.eval_shape(tx.init, params)
  >>> s = gj.sharding.state_partition_specs(state, params, specs, "fsdp", 4)
  >>> s[0].projectors[0]["mlp"]["kernel"], s[0].inner_state.mu["mlp"]["kernel"]
  (P('fsdp', None), P(None, 'fsdp'))
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import PartitionSpec as P
from jax.tree_util import GetAttrKey, SequenceKey

from galore_jax import projection
from galore_jax.adam8bit import ScaleByAdam8bitState
from galore_jax.masks import path_names, resolve_tree
from galore_jax.transform import GaLoreState, check_auto_sharding

__all__ = [
  "check_auto_sharding",
  "param_partition_specs",
  "split_largest",
  "state_partition_specs",
]


def _on_axis(ndim: int, axis: int, name: str) -> P:
  return P(*(name if a == axis % ndim else None for a in range(ndim)))


def split_largest(shape: tuple[int, ...], name: str, size: int) -> P:
  """Split the largest axis divisible by `size` (ties: the last) over `name`; else replicate."""
  if size == 1:
    return P()
  best = None
  for axis, dim in enumerate(shape):
    if dim % size == 0 and (best is None or dim >= shape[best]):
      best = axis
  return P() if best is None else _on_axis(len(shape), best, name)


def param_partition_specs(
  params: Any, axis: str, axis_size: int, *, mask: Any = None, proj_type: str = "std"
) -> Any:
  """`PartitionSpec` per parameter for a split over the mesh axis `axis` of size `axis_size`.

  Args:
    params: the parameter tree (arrays or `ShapeDtypeStruct` leaves).
    axis: the mesh axis name parameters are split over.
    axis_size: its size.
    mask: GaLore's targets (a tree of bools or a callable, as given to GaLore); None: none.
      Targets are `[..., in, out]` kernels (GaLore's default dimension numbers).
    proj_type: GaLore's `proj_type`, which fixes the kept axis of each target.

  Returns:
    A tree of `PartitionSpec` shaped like `params`.
  """
  targets = resolve_tree(mask, params)
  targets = jax.tree.map(lambda _: False, params) if targets is None else targets

  def spec(p, targeted):
    shape = tuple(np.shape(p))
    kept = projection.kept_axis(shape, proj_type) if targeted and len(shape) >= 2 else None
    if kept is not None and axis_size > 1:
      for a in (kept, -3 - kept):  # the kept axis, else the reduced one (-1 <-> -2)
        if shape[a] % axis_size == 0:
          return _on_axis(len(shape), a, axis)
    return split_largest(shape, axis, axis_size)

  return jax.tree.map(spec, params, targets)


def _find_param(keys: tuple, index: Mapping):
  """The parameter whose path occurs in `keys` (longest first): a state leaf laid out for it."""
  for start in range(len(keys)):
    for end in range(len(keys), start, -1):
      if keys[start:end] in index:
        return index[keys[start:end]]
  return None


def _like_param(shape, param_shape, spec: P, axis: str, axis_size: int) -> P:
  """A state leaf of a parameter: the parameter's spec if every split axis has the same size
  (full-rank moments; low-rank moments, which shrink only the reduced axis), else the largest
  divisible axis."""
  if len(shape) == len(param_shape) and all(
    name is None or shape[a] == param_shape[a] for a, name in enumerate(spec)
  ):
    return spec
  return split_largest(shape, axis, axis_size)


def split_on_reduced_axis(param, proj_type: str, axis: str) -> bool:
  """Whether a target `(shape, spec)` is split along the axis GaLore reduces."""
  if param is None:
    return False
  shape, spec = param
  kept = projection.kept_axis(shape, proj_type)
  if kept is None or axis not in tuple(spec):
    return False
  reduced = len(shape) - (1 if kept % len(shape) == len(shape) - 2 else 2)
  return tuple(spec).index(axis) == reduced


def state_partition_specs(
  state: Any,
  params: Any,
  specs: Any,
  axis: str,
  axis_size: int,
  *,
  shard_projectors: bool = True,
  proj_type: str = "std",
  for_update: bool = False,
) -> Any:
  """`PartitionSpec` per leaf of any tree holding parameters and optimizer state built on them.

  Leaves are matched to parameters by key path (optax states mirror the parameter tree), so
  the same call covers a bare optimizer state, an `inject_hyperparams` / `MultiSteps` state, or
  a whole train state holding params and opt_state.

  Args:
    state: the tree (concrete or from `jax.eval_shape`).
    params: the parameter tree.
    specs: the parameters' `PartitionSpec`s (e.g. `param_partition_specs`).
    axis: the mesh axis name parameters are split over.
    axis_size: its size.
    shard_projectors: store GaLore projectors split along `D` (else replicated).
    proj_type: GaLore's `proj_type`.
    for_update: the specs the update should read the state with: projectors replicated (one
      all-gather of `D x r` per matrix per step) except where the target itself is split
      along its reduced axis `D` (there the projection contracts the split axis locally).

  Returns:
    A tree of `PartitionSpec` (and `MaskedNode`s) with the structure of `state`.
  """
  flat, _ = jax.tree_util.tree_flatten_with_path(params)
  spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
  index = {path_names(k): (tuple(np.shape(p)), s) for (k, p), s in zip(flat, spec_leaves)}
  special = lambda x: isinstance(x, (GaLoreState, ScaleByAdam8bitState))

  def leaf(path, x):
    found = _find_param(path_names(path), index)
    if found is None or not np.ndim(x):
      return P()
    return _like_param(tuple(np.shape(x)), *found, axis, axis_size)

  def projector(path, p):
    param = _find_param(path_names(path), index)
    split = shard_projectors
    if for_update:
      split = split_on_reduced_axis(param, proj_type, axis)
    shape = tuple(np.shape(p))
    if not (split and axis_size > 1 and shape[-2] % axis_size == 0):
      return P()
    return _on_axis(len(shape), -2, axis)

  def quantized(path, codes_tree, absmax_tree):
    codes_flat, treedef = jax.tree_util.tree_flatten_with_path(codes_tree)
    codes, scales = [], []
    for (sub, c), a in zip(codes_flat, treedef.flatten_up_to(absmax_tree)):
      if isinstance(a, optax.MaskedNode):
        codes.append(leaf((*path, *sub), c))
        scales.append(optax.MaskedNode())
        continue
      split = axis_size > 1 and np.shape(a)[0] % axis_size == 0
      codes.append(P(axis, None) if split else P())
      scales.append(P(axis) if split else P())
    return treedef.unflatten(codes), treedef.unflatten(scales)

  def node(prefix, path, x):
    path = (*prefix, *path)
    if isinstance(x, ScaleByAdam8bitState):
      mu, mu_absmax = quantized((*path, GetAttrKey("mu")), x.mu, x.mu_absmax)
      nu, nu_absmax = quantized((*path, GetAttrKey("nu")), x.nu, x.nu_absmax)
      return ScaleByAdam8bitState(P(), mu, nu, mu_absmax, nu_absmax)
    if not isinstance(x, GaLoreState):
      return leaf(path, x)
    projs = tuple(
      jax.tree_util.tree_map_with_path(
        lambda sub, p, k=k: projector((*path, SequenceKey(k), *sub), p), tree
      )
      for k, tree in enumerate(x.projectors)
    )
    stats = jax.tree.map(lambda _: P(), x.refresh_stats)  # energy_tol's few scalars
    return GaLoreState(P(), projs, walk(path, x.inner_state), stats)

  def walk(prefix, tree):
    return jax.tree_util.tree_map_with_path(
      lambda path, x: node(prefix, path, x), tree, is_leaf=special
    )

  return walk((), state)
