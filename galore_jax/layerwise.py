"""Layer-wise optimizer updates: one leaf, or one layer of a stacked leaf, at a time, in place.

A train step that updates each parameter as soon as its gradient exists (GaLore's Sec. 4.3,
LOMO) never holds the full gradient, but must call the optimizer on one leaf at a time and write
the result into the (donated) parameter and state buffers. This module is that machinery,
independent of any model:

* `TreeLayout`: the parameter leaves split into named groups, one of them stacked (`[N, ...]`
  leaves of N layers, e.g. from `nnx.scan`).
* `StateView`: an optimizer state seen as parameter-shaped nodes (moments, GaLore projectors,
  8-bit codes: one entry per parameter leaf) and shared entries (counts, hyperparameters).
* `LeafwiseOptimizer`: `tx.update` on one leaf with its state entries, or on row chunks of a
  large leaf; `update_group` / `update_layer` apply it to a group or to layer i of the stacked
  group, writing back with `layer_put` (`dynamic_update_slice`, in place when donated).
* `check_separable`: a probe that the optimizer gives the same result whole and leaf by leaf.

An optimizer is *separable* when each leaf's update depends on its own gradient, state and
parameter plus shared scalars: `galore_adamw`, `galore_adamw_8bit`, `adamw_8bit`,
`optax.adamw` are; anything with a global norm is not.

References:
  Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection", ICML 2024,
  https://arxiv.org/abs/2403.03507 (Sec. 4.3, layer-wise weight updates)
  Lv et al., "Full Parameter Fine-tuning for Large Language Models with Limited Resources"
  (LOMO), https://arxiv.org/abs/2306.09782
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from galore_jax import projection
from galore_jax.masks import path_names
from galore_jax.transform import GaLoreState

__all__ = [
  "Group",
  "LeafwiseOptimizer",
  "ProjectedAccumulator",
  "StateView",
  "TreeLayout",
  "check_separable",
  "clip_by_norm",
  "layer_put",
  "layer_take",
  "leafwise_update",
  "make_accumulator",
  "pack",
  "plan_chunks",
  "sq_norm",
  "unpack",
  "update_group",
  "update_layer",
]


class TreeLayout:
  """Leaves of a parameter tree, split into named groups, one of them stacked along axis 0.

  `index[g]` lists the full-tree leaf positions of group g; every leaf of the `stacked` group
  has the same leading size `num_layers` (N layers, e.g. from `nnx.scan`). The optimizer sees one
  leaf at a time, as a nested dict with the parameter's own names (so name-based masks such as
  `llama_galore_mask` select the same leaves).

  Args:
    params: the parameter tree (arrays or `ShapeDtypeStruct` leaves).
    group_of: maps a leaf's names (from `names`) to its group's name.
    stacked: the name of the stacked group.
    names: a key path's names; default `galore_jax.masks.path_names`.
  """

  def __init__(
    self,
    params,
    group_of: Callable[[tuple], str],
    stacked: str,
    names: Callable[[tuple], tuple] | None = None,
  ):
    names = names or path_names
    flat, self.treedef = jax.tree_util.tree_flatten_with_path(params)
    self.names = [names(path) for path, _ in flat]
    self.shapes = [np.shape(x) for _, x in flat]
    self.group_of, self.stacked, self.names_fn = group_of, stacked, names
    self.index: dict[str, list[int]] = {}
    for j, leaf_names in enumerate(self.names):
      self.index.setdefault(group_of(leaf_names), []).append(j)
    shapes = [self.shapes[j] for j in self.index.get(stacked, [])]
    if not shapes:
      raise ValueError(f"layerwise: no leaves in the stacked group {stacked!r}.")
    self.num_layers = shapes[0][0] if shapes[0] else 0
    if any(len(s) < 1 or s[0] != self.num_layers for s in shapes):
      raise ValueError(f"layerwise: stacked parameters disagree on N: {shapes}.")

  def like(self, params) -> TreeLayout:
    """The same grouping rules applied to another tree of the same structure."""
    return TreeLayout(params, self.group_of, self.stacked, self.names_fn)

  def leaves(self, tree) -> list:
    """The leaves of a parameter-shaped `tree`, in full-tree order."""
    return self.treedef.flatten_up_to(tree)

  def pick(self, g: str, full: list) -> list:
    """Group g's entries of a full-tree leaf list."""
    return [full[j] for j in self.index[g]]

  def put(self, g: str, full: list, part: list) -> list:
    """A copy of the full-tree list `full` with group g's entries replaced by `part`."""
    out = list(full)
    for j, x in zip(self.index[g], part):
      out[j] = x
    return out

  def tree(self, g: str, part: list):
    """Group g's leaves as a nested dict of names (what the model's modules take)."""
    tree: dict = {}
    for j, x in zip(self.index[g], part):
      node = tree
      for name in self.names[j][:-1]:
        node = node.setdefault(name, {})
      node[self.names[j][-1]] = x
    return tree

  def single(self, j: int):
    """Treedef of leaf j alone, as a nested dict of its names."""
    tree = 0
    for name in reversed(self.names[j]):
      tree = {name: tree}
    return jax.tree.structure(tree)


def _has_prefix(treedef, x) -> bool:
  """Whether `x` has `treedef`'s structure as a prefix (a parameter-shaped state node)."""
  try:
    treedef.flatten_up_to(x)
  except (ValueError, TypeError):
    return False
  return True


class StateView:
  """An optimizer state as parameter-shaped nodes (entries per parameter leaf) and the rest.

  A node is any subtree with the parameters' structure as a prefix (`mu`, `nu`, GaLore's
  projectors, ...); its entries are whatever sits at each parameter position (an array or a
  `MaskedNode`). Everything else (counts, injected hyperparameters) is shared by all leaves.
  `projectors` holds the node indices of GaLore's bases (one node per basis).
  """

  def __init__(self, state, layout: TreeLayout):
    is_node = lambda x: _has_prefix(layout.treedef, x)
    flat, self.outer = jax.tree_util.tree_flatten_with_path(state, is_leaf=is_node)
    self.is_node = [is_node(x) for _, x in flat]
    node_paths = [p for (p, _), n in zip(flat, self.is_node) if n]
    galore = jax.tree_util.tree_flatten_with_path(
      state, is_leaf=lambda x: isinstance(x, GaLoreState)
    )[0]
    galore = [p for p, x in galore if isinstance(x, GaLoreState)]
    if len(galore) > 1:
      raise ValueError("layerwise: more than one GaLoreState in the optimizer state.")
    # GaLore's projectors: one node per basis (`GaLoreState.projectors` is a tuple of trees).
    self.projectors = None
    if galore:
      base = (*galore[0], jax.tree_util.GetAttrKey("projectors"))
      found = tuple(i for i, p in enumerate(node_paths) if p[: len(base)] == base)
      self.projectors = found or None

  def split(self, state, leaf_treedef) -> tuple[list[list], list]:
    """`state` as (per node, its entries flattened up to `leaf_treedef`; shared entries)."""
    outer = self.outer.flatten_up_to(state)
    nodes = [leaf_treedef.flatten_up_to(x) for x, n in zip(outer, self.is_node) if n]
    return nodes, [x for x, n in zip(outer, self.is_node) if not n]

  def build(self, nodes: list, shared: list):
    """The optimizer state from `split`'s two lists (the inverse of `split`)."""
    nodes, shared = iter(nodes), iter(shared)
    return self.outer.unflatten([next(nodes) if n else next(shared) for n in self.is_node])


def _chunk(tree, i, n: int):
  """The i-th of n equal chunks along the leading axis of every leaf of `tree`."""

  def take(a):
    size = a.shape[0] // n
    return lax.dynamic_slice_in_dim(a, i * size, size)

  return jax.tree.map(take, tree)


def layer_take(tree, i, n: int):
  """Block i's share of a stacked entry: the i-th of n equal chunks of every leading axis.

  The slice is materialised behind a fence before anything reads it. Otherwise XLA fuses the
  slice into its readers, some of which (the input gradient through a weight) it may schedule
  after the in-place write of the new block, and then copies the whole stack to keep the old
  value (seen at 7B in float32: a copy of every MLP stack). On CPU the fence is a conditional on
  an always-true predicate, which also stops a bf16 problem: XLA:CPU has no bf16 data movement,
  rewrites the slice of a bf16 stack as a slice of its float32 conversion, and loop-invariant
  code motion hoists that conversion out of the loop (a float32 copy of every weight, 26 GB at
  7B). Code motion does not enter conditionals, and CPU optimization barriers are removed
  before it runs. Elsewhere the fence is an optimization barrier.
  """
  if jax.default_backend() != "cpu":
    return lax.optimization_barrier(_chunk(tree, i, n))
  take = lambda tree, i: _chunk(tree, i, n)
  return lax.cond(i >= 0, take, take, tree, i)


def layer_put(tree, new, i, n: int):
  """Writes block i's share back (in place when the stacked buffer is donated)."""

  def put(a, b):
    return lax.dynamic_update_slice_in_dim(a, b.astype(a.dtype), i * (a.shape[0] // n), 0)

  return jax.tree.map(put, tree, new)


class LeafwiseOptimizer(NamedTuple):
  """The optimizer, applied one parameter leaf (or one chunk of a large leaf) at a time.

  Leaf by leaf, XLA frees one update's float32 temporaries before the next; `chunks[j] > 1`
  splits leaf j (the embedding, the LM head) along its leading axis, with its state entries.
  """

  tx: optax.GradientTransformation
  layout: TreeLayout
  view: StateView
  chunks: dict

  def update(self, index: list, grads: list, params: list, nodes: list, shared: list, **extra):
    """New (params, nodes, shared) of the leaves `index`; lists are in `index`'s order.

    `extra`: keyword arguments of `tx.update` (optax's extra args, e.g. GaLore's
    `galore_bases`), passed only when given, for one leaf's tree (`layout.single(j)`).
    """
    new_params, new_nodes, new_shared = [], [], shared
    for k, j in enumerate(index):
      entries = [node[k] for node in nodes]
      update = self._leaf if self.chunks.get(j, 1) == 1 else self._chunked
      p, e, new_shared = update(j, grads[k], params[k], entries, shared, **extra)
      new_params.append(p)
      new_nodes.append(e)
    return new_params, [list(n) for n in zip(*new_nodes)] if nodes else [], new_shared

  def _leaf(self, j: int, grad, param, entries: list, shared: list, **extra):
    d = self.layout.single(j)
    state = self.view.build([d.unflatten([e]) for e in entries], shared)
    updates, state = self.tx.update(d.unflatten([grad]), state, d.unflatten([param]), **extra)
    new_param = optax.apply_updates(d.unflatten([param]), updates)
    new_nodes, new_shared = self.view.split(state, d)
    return d.flatten_up_to(new_param)[0], [n[0] for n in new_nodes], new_shared

  def _chunked(self, j: int, grad, param, entries: list, shared: list, **extra):
    n = self.chunks[j]

    def body(carry, i):
      param, entries, _ = carry
      p_i, e_i = layer_take((param, entries), i, n)
      new_p, new_e, new_shared = self._leaf(j, layer_take(grad, i, n), p_i, e_i, shared, **extra)
      return (layer_put(param, new_p, i, n), layer_put(entries, new_e, i, n), new_shared), None

    init = (param, entries, shared)
    return lax.scan(body, init, jnp.arange(n))[0]


def _leaf_projectors(nodes: list, projectors: tuple | None) -> list:
  """Per parameter leaf, the tuple of its GaLore bases (`MaskedNode`s if not projected), from
  the nodes of a `StateView` and its `projectors` indices; None entries without GaLore."""
  if projectors is None:
    return [None] * (len(nodes[0]) if nodes else 0)
  return list(zip(*(nodes[k] for k in projectors)))


def _is_projected(projectors) -> bool:
  """Whether a leaf's `_leaf_projectors` entry holds bases."""
  return bool(projectors) and not isinstance(projectors[0], optax.MaskedNode)


def _moment_size(shape, projectors) -> int:
  """Entries of the optimizer's per-leaf moments: the leaf's, or GaLore's low-rank ones."""
  if not _is_projected(projectors):
    return math.prod(shape)
  *batch, in_dim, out_dim = shape
  if len(projectors) == 2:
    return math.prod(batch) * projectors[0].shape[-1] * projectors[1].shape[-1]
  dim, rank = projectors[0].shape[-2:]
  return math.prod(batch) * rank * (out_dim if dim == in_dim else in_dim)


def _splits_evenly(entries: list, n: int, size: int) -> bool:
  """Whether n equal chunks of every entry's leading axis are n equal chunks of the leaf.

  True for element-wise states (`mu`, `nu` of the leaf's or the low-rank shape), stacked
  projectors, and block-quantised moments (uint8 codes `[blocks, block_size]`, and their
  scales `[blocks]`) whose blocks never straddle two chunks.
  """
  for x in jax.tree.leaves(entries):
    if np.ndim(x) == 2 and jnp.result_type(x) == jnp.uint8:  # 8-bit codes [blocks, block_size]
      blocks, block_size = np.shape(x)
      if blocks * block_size != size or (size // n) % block_size:
        return False
    if np.ndim(x) < 1 or np.shape(x)[0] % n:
      return False
  return True


def plan_chunks(layout: TreeLayout, nodes: list, projectors: tuple | None) -> dict:
  """Checks that the block state slices per block; picks chunk counts for large other leaves.

  Leaves of the head and the embedding larger than the largest block matrix are updated in
  about that many elements at a time, so their float32 optimizer temporaries stay that small.
  """
  leaf_projs = _leaf_projectors(nodes, projectors)
  projs = lambda j: leaf_projs[j] if j < len(leaf_projs) else None
  entries = lambda j: [node[j] for node in nodes]
  n = layout.num_layers
  for j in layout.index[layout.stacked]:
    if not _splits_evenly(entries(j), n, _moment_size(layout.shapes[j], projs(j))):
      raise ValueError(
        f"layerwise: the optimizer state of {'/'.join(layout.names[j])} "
        f"{jax.tree.map(np.shape, entries(j))} does not split into {n} equal per-block "
        "parts (a block-quantised moment whose blocks straddle two layers?)."
      )
  largest = max(math.prod(layout.shapes[j][1:]) for j in layout.index[layout.stacked])
  chunks = {}
  for j in [j for g, idx in layout.index.items() if g != layout.stacked for j in idx]:
    shape, size = layout.shapes[j], math.prod(layout.shapes[j])
    if size <= largest or _is_projected(projs(j)):
      continue
    for c in range(-(-size // largest), shape[0] + 1):
      if shape[0] % c == 0 and _splits_evenly(entries(j), c, size):
        chunks[j] = c
        break
  return chunks


def clip_by_norm(grads: list, norm, max_norm: float) -> list:
  """`optax.clip_by_global_norm`, given the norm."""
  trigger = norm < max_norm
  return [lax.select(trigger, g, (g / norm.astype(g.dtype)) * max_norm) for g in grads]


def sq_norm(xs: list):
  """The squared L2 norm of a list of arrays, summed in float32 (for a global-norm clip)."""
  return sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in xs)


class Group(NamedTuple):
  """Parameters and state entries of one group, as leaf lists."""

  params: list
  nodes: list


def unpack(opt: LeafwiseOptimizer, params, opt_state):
  """Leaf lists of params and state, whole and per group."""
  lay = opt.layout
  full = lay.leaves(params)
  nodes, shared = opt.view.split(opt_state, lay.treedef)
  groups = {g: Group(lay.pick(g, full), [lay.pick(g, n) for n in nodes]) for g in lay.index}
  return full, nodes, shared, groups


def pack(opt: LeafwiseOptimizer, full, nodes, shared, groups):
  """The inverse of `unpack`: (params, optimizer state) with each group's leaves put back."""
  lay = opt.layout
  for g, grp in groups.items():
    full = lay.put(g, full, grp.params)
    nodes = [lay.put(g, n, part) for n, part in zip(nodes, grp.nodes)]
  state = opt.view.build([lay.treedef.unflatten(n) for n in nodes], shared)
  return lay.treedef.unflatten(full), state


def update_group(opt: LeafwiseOptimizer, g: str, grads: list, grp: Group, shared):
  """The update of every leaf of group g (not the stacked one): (new `Group`, shared)."""
  new_params, new_nodes, new_shared = opt.update(
    opt.layout.index[g], grads, grp.params, grp.nodes, shared
  )
  return Group(new_params, new_nodes), new_shared


def update_layer(
  opt: LeafwiseOptimizer, i, which: list, grads: list, p_i: list, grp: Group, shared
):
  """Block i's update of the stacked group's leaves at positions `which`, written back."""
  n, index = opt.layout.num_layers, opt.layout.index[opt.layout.stacked]
  sub = lambda xs: [xs[k] for k in which]
  nodes_i = layer_take([sub(node) for node in grp.nodes], i, n)
  new_p, new_nodes, _ = opt.update(sub(index), grads, sub(p_i), nodes_i, shared)
  params, nodes = list(grp.params), [list(node) for node in grp.nodes]
  for pos, k in enumerate(which):
    params[k] = layer_put(params[k], new_p[pos], i, n)
    for node, new in zip(nodes, new_nodes):
      node[k] = layer_put(node[k], new[pos], i, n)
  return Group(params, nodes)


# Gradient accumulation in GaLore's subspace.


def _galore_sides(view: StateView, params: list, nodes: list, proj_type: str) -> list:
  """Per parameter leaf: GaLore's side, or None for leaves GaLore does not project.

  The side comes from `proj_type` (a square matrix's side is not visible in the state) and is
  checked against the projectors' shapes.
  """
  if view.projectors is None:
    return [None] * len(params)
  out = []
  for p, ps in zip(params, _leaf_projectors(nodes, view.projectors)):
    if not _is_projected(ps):
      out.append(None)
      continue
    in_dim, out_dim = np.shape(p)[-2:]
    side = projection.side_for(proj_type, in_dim, out_dim)
    want = projection.projector_shapes(np.shape(p), side, np.shape(ps[0])[-1])
    if tuple(np.shape(x) for x in ps) != want:
      raise ValueError(
        f"layerwise: GaLore projectors {[np.shape(x) for x in ps]} of a {np.shape(p)} kernel "
        f"do not fit proj_type={proj_type!r}; pass the optimizer's proj_type (and keep the "
        "default dimension numbers)."
      )
    out.append(side)
  return out


def _accumulator_zeros(p, ps, side: str | None, dtype):
  """An accumulator: the leaf's shape, or GaLore's low-rank shape for a projected leaf."""
  shape = np.shape(p)
  if side is not None:
    shape = projection.low_rank_shape(shape, side, np.shape(ps[0])[-1])
  return jnp.zeros(shape, dtype)


class ProjectedAccumulator(NamedTuple):
  """Sums micro-batch gradients, GaLore matrices in their subspace (`r x n` instead of `m x n`).

  `sides[g]`: per leaf of group g, GaLore's side (None: summed at full size). `first` gives the
  projectors to sum in: on micro-batch 0 those GaLore computes from that gradient (on a refresh
  step, a new subspace), else the ones passed in.
  """

  sides: dict
  first: Callable  # (group, is_first, grads, params, nodes_fn, p0) -> p0

  def add(self, g: str, acc: list, grads: list, p0: list) -> list:
    """`acc` plus one micro-batch's gradients of group g, projected ones in their subspace."""
    return [
      a + (x if s is None else projection.project(x, ps, s, jnp.float32)).astype(a.dtype)
      for a, x, ps, s in zip(acc, grads, p0, self.sides[g])
    ]

  def full(self, g: str, acc: list, p0: list, params: list, scale) -> list:
    """Full-size gradients (`scale` applied) that the optimizer projects back to `acc`."""
    return [
      ((a if s is None else projection.project_back(a, ps, s)) * scale).astype(p.dtype)
      for a, ps, s, p in zip(acc, p0, self.sides[g], params)
    ]


def make_accumulator(opt: LeafwiseOptimizer, full, nodes, shared, grp, proj_type, accum_dtype):
  """(`ProjectedAccumulator`, zero accumulators, initial projectors), per group of `grp`."""
  lay, k_proj = opt.layout, opt.view.projectors
  sides = {g: lay.pick(g, _galore_sides(opt.view, full, nodes, proj_type)) for g in grp}
  p0 = {g: [None] * len(sides[g]) for g in grp}
  if k_proj is not None:
    p0 = {
      g: [ps if s else None for ps, s in zip(_leaf_projectors(grp[g].nodes, k_proj), sides[g])]
      for g in grp
    }
  zeros = {
    g: [
      _accumulator_zeros(p, ps, s, accum_dtype)
      for p, ps, s in zip(lay.pick(g, full), p0[g], sides[g])
    ]
    for g in grp
  }

  def first(g, is_first, grads, params, nodes_fn, p0):
    """On micro-batch 0, the projectors GaLore computes from its gradient; else `p0`."""
    if not any(sides[g]):
      return p0

    def compute():
      _, new_nodes, _ = opt.update(lay.index[g], grads, params, nodes_fn(), shared)
      new = _leaf_projectors(new_nodes, k_proj)
      return [ps if s else None for ps, s in zip(new, sides[g])]

    return lax.cond(is_first, compute, lambda: p0)

  return ProjectedAccumulator(sides, first), zeros, p0


def leafwise_update(tx: optax.GradientTransformation, layout: TreeLayout, grads, params, state):
  """`tx` applied one leaf (and one layer of the stacked group) at a time: (params, state).

  For a separable `tx` this equals `optax.apply_updates(params, tx.update(grads, state,
  params)[0])` and the new state, while XLA needs one leaf's (one layer's) temporaries at a time.
  Shared state entries (counts) advance once. A train step that interleaves the updates with its
  backward pass uses `update_group` / `update_layer` directly, as this function does.
  """
  view = StateView(state, layout)
  nodes = view.split(state, layout.treedef)[0]
  opt = LeafwiseOptimizer(tx, layout, view, plan_chunks(layout, nodes, view.projectors))
  full, nodes, shared, grp = unpack(opt, params, state)
  g = layout.leaves(grads)
  new, shared_out = {}, shared
  for name in (g_ for g_ in layout.index if g_ != layout.stacked):
    p, n, shared_out = opt.update(layout.index[name], layout.pick(name, g), *grp[name], shared)
    new[name] = Group(p, n)
  n_layers, layers = layout.num_layers, grp[layout.stacked]
  for i in range(n_layers):
    g_i = [_chunk(x, i, n_layers) for x in layout.pick(layout.stacked, g)]
    p_i = _chunk(layers.params, i, n_layers)
    layers = update_layer(opt, i, range(len(g_i)), g_i, p_i, layers, shared)
  new[layout.stacked] = layers
  return pack(opt, full, nodes, shared_out, new)


def check_separable(tx: optax.GradientTransformation, layout: TreeLayout) -> None:
  """Runs `tx` on a small stand-in of `layout`'s tree whole and leaf by leaf; raises if they differ.

  The stand-in keeps every leaf's rank with small sizes (2 layers in the stacked group), random
  parameters and large gradients, so that a transform that looks at all gradients at once (a
  global-norm clip) changes the result.
  """
  stacked = set(layout.index[layout.stacked])
  keys = iter(jax.random.split(jax.random.key(0), 2 * len(layout.shapes)))

  def leaf(j, scale=1.0):
    shape = [min(d, 4) for d in layout.shapes[j]]
    shape = [2, *shape[1:]] if j in stacked else [min(d, 8) for d in layout.shapes[j]]
    return scale * jax.random.normal(next(keys), shape)

  params = layout.treedef.unflatten([leaf(j) for j in range(len(layout.shapes))])
  # Large gradients, so that any clipping by a global norm would change the result.
  grads = layout.treedef.unflatten([leaf(j, 1e3) for j in range(len(layout.shapes))])
  layout = layout.like(params)

  @jax.jit
  def whole(params, grads):
    updates, state = tx.update(grads, tx.init(params), params)
    return optax.apply_updates(params, updates), state

  @jax.jit
  def by_leaf(params, grads):
    return leafwise_update(tx, layout, grads, params, tx.init(params))

  expected, got = whole(params, grads), by_leaf(params, grads)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(expected)[0], jax.tree.leaves(got)):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if np.linalg.norm(a - b) > 1e-4 * np.linalg.norm(a) + 1e-6:
      raise ValueError(
        "layerwise: the optimizer is not separable: updating leaf by leaf changes "
        f"{jax.tree_util.keystr(path)} (probe on a small stand-in model). A layer-wise update "
        "calls it on one leaf (or one layer's slice) at a time, so transforms that look at all "
        "gradients (optax.clip_by_global_norm, apply_if_finite, ...) cannot be in it. Build the "
        "optimizer without them and clip with the layer-wise step's own option "
        "(e.g. grad_clip_norm=) instead."
      )
