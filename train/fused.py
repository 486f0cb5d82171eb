"""Fused layer-wise updates: a LLaMA train step that never holds the full gradient.

The standard step (`value_and_grad -> tx.update -> apply_updates`) materialises every weight
gradient at once: 13.5 GB in bf16 at 7B. The GaLore reference avoids that with PyTorch
post-accumulate-grad hooks (one optimizer per parameter, stepped during `backward`), which
breaks gradient accumulation (upstream issue #78) and silently disables clipping. Here the
same idea is written into the compiled step itself, for the scanned LLaMA (`scan_layers=True`,
stacked `[N, in, out]` weights):

1. forward: embedding, then a `lax.scan` over the N blocks that saves each block's input;
2. head (final norm + LM head): loss, weight gradient and the gradient of the last hidden state
   by `jax.vjp`; the head is updated at once;
3. a reverse scan over the blocks: block i is recomputed from its saved input; the gradient of
   its MLP half is taken and those weights updated, then the attention half's; the optimizer gets
   block i's slice of the parameters and of the optimizer state, and the new slice is written
   back into the (donated) stacked buffers with `dynamic_update_slice`; the input gradient flows
   to block i-1;
4. the embedding is updated last.

So at any time at most one block's gradient exists. The optimizer can be any optax transform
that is *separable*: each leaf's update depends on its own gradient, state and parameter plus
shared scalars (counts, schedules, injected hyperparameters); `galore_adamw`,
`galore_adamw_8bit`, `adamw_8bit`, `optax.adamw` are. It is called on one leaf at a time (so
XLA needs one leaf's float32 temporaries at a time), with the state restricted to that leaf:
stacked entries sliced along their leading axis (Adam moments, GaLore projectors, 8-bit codes
and scales, whose blocks must not straddle two layers), shared scalars kept. The step count, the
learning-rate schedule and GaLore's refresh predicate are therefore read once per step and
advanced once; GaLore's refresh stays a `lax.cond`, so SVDs run on refresh steps only. Leaves of
the head and embedding larger than a block matrix (the LM head, the embedding) are updated in
chunks of rows. The optimizer state is exactly `tx.init(params)`: checkpoints and memory
accounting are shared with the standard step. A probe at construction runs the optimizer whole
and leaf by leaf on a small stand-in model and raises if they differ (e.g. an
`optax.clip_by_global_norm` inside it: pass `grad_clip_norm` here instead).

Gradient accumulation (`grad_accum_steps = K > 1`) never holds full-size gradients of GaLore
matrices: each micro-batch's gradient of such a matrix is projected onto the subspace and summed
(`r x n` per matrix instead of `m x n`, float32); other leaves are summed at full size. After the
K-th micro-batch each block's sum `A` is handed to the optimizer as `P A`, which GaLore projects
back to exactly `A`. A refresh needs a full gradient, which does not exist here: on a refresh step
the new subspace is the one GaLore computes from the *first* micro-batch's gradient (the
optimizer runs on it and only its projectors are kept); all micro-batches are projected onto it,
and the update then refreshes once more, on the accumulated gradient restricted to that subspace
(same span, basis ordered by the accumulated gradient), so moments cross the refresh as GaLore's
`on_refresh` says. Cost: a second SVD per matrix on refresh steps, one more projector set while
accumulating. Without GaLore, K > 1 holds a full float32 gradient sum, like the standard step.

Clipping (`grad_clip_norm > 0`) is by the global norm, as `optax.clip_by_global_norm`:
* K = 1: exact, with two backward passes (the first only takes norms and keeps each block's
  output gradient, `N x B x L x D`; the second recomputes the weight gradients and updates);
* K > 1 without GaLore: exact (every leaf is accumulated at full size);
* K > 1 with GaLore: the norm of the full accumulated gradient is never available; with
  `clip_in_subspace=True` the norm of what is accumulated is used (a GaLore matrix contributes
  `||Pᵀ G||`, which is <= `||G||`); without it, a ValueError.

References:
  Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection", ICML 2024,
  https://arxiv.org/abs/2403.03507 (Sec. 4.3, layer-wise weight updates)
  Lv et al., "Full Parameter Fine-tuning for Large Language Models with Limited Resources"
  (LOMO), https://arxiv.org/abs/2306.09782
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax import lax

import galore_jax as gj
from galore_jax.adam8bit import QuantizedMoment
from train.model import Llama, LlamaConfig, next_token_loss, rope_tables

HEAD, LAYERS, EMBED = "head", "layers", "embed"
_GROUP_OF = {"final_norm": HEAD, "lm_head": HEAD, "layers": LAYERS, "embed": EMBED}
_PROJ_TYPES = ("std", "reverse_std", "right", "left", "full")

# ----------------------------------------------------------------------------------------------
# The model in pieces.


class _Model(NamedTuple):
  """Graph definitions of the pieces of a scanned `Llama`, applied to pure-dict parameters."""

  config: LlamaConfig
  embed: Any
  input_norm: Any
  attn: Any
  post_attention_norm: Any
  mlp: Any
  final_norm: Any
  lm_head: Any


def _model_parts(config: LlamaConfig) -> _Model:
  if not config.scan_layers:
    raise ValueError("the fused update needs LlamaConfig.scan_layers=True (stacked blocks).")
  if config.tie_word_embeddings:  # the embedding would get two updates (head and lookup)
    raise ValueError("the fused update needs an untied LM head (tie_word_embeddings=False).")
  abstract = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0)))
  graph = lambda module: nnx.split(module, nnx.Param)[0]
  b = abstract.layers
  parts = (b.input_norm, b.attn, b.post_attention_norm, b.mlp, abstract.final_norm)
  return _Model(config, graph(abstract.embed), *map(graph, parts), graph(abstract.lm_head))


def _embed(m: _Model, p, tokens_BxL):
  return nnx.merge(m.embed, p["embed"])(tokens_BxL)


# `Block.__call__` in two halves, so that the MLP's weights can be updated before the attention
# weights' gradient exists. They must stay the two lines of `Block.__call__`.
_ATTN_HALF, _MLP_HALF = ("input_norm", "attn"), ("post_attention_norm", "mlp")


def _attention_half(m: _Model, p, x_BxLxD, cos_LxK, sin_LxK):
  """`h = x + attn(input_norm(x))`."""
  normed_BxLxD = nnx.merge(m.input_norm, p["input_norm"])(x_BxLxD)
  return x_BxLxD + nnx.merge(m.attn, p["attn"])(normed_BxLxD, cos_LxK, sin_LxK)


def _mlp_half(m: _Model, p, h_BxLxD):
  """`h + mlp(post_attention_norm(h))`."""
  normed_BxLxD = nnx.merge(m.post_attention_norm, p["post_attention_norm"])(h_BxLxD)
  return h_BxLxD + nnx.merge(m.mlp, p["mlp"])(normed_BxLxD)


def _block(m: _Model, p, x_BxLxD, cos_LxK, sin_LxK):
  return _mlp_half(m, p, _attention_half(m, p, x_BxLxD, cos_LxK, sin_LxK))


def _head_loss(m: _Model, p, x_BxLxD, tokens_BxL):
  """(summed loss, number of targets) from the last hidden state; as `Llama.__call__`."""
  h_BxLxD = nnx.merge(m.final_norm, p["final_norm"])(x_BxLxD)
  return next_token_loss(nnx.merge(m.lm_head, p["lm_head"])(h_BxLxD), tokens_BxL)


# ----------------------------------------------------------------------------------------------
# Tree plumbing: parameter groups and the optimizer state seen per parameter leaf.


def _names(path) -> tuple:
  names = tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path)
  return names[:-1] if names and names[-1] == "value" else names  # nnx.Param's value


class _Layout:
  """Leaves of the parameter tree, split into the head, the stacked blocks and the embedding.

  `index[g]` lists the full-tree leaf positions of group g. The optimizer sees one leaf at a
  time, as a nested dict with the parameter's own names (so name-based masks such as
  `llama_galore_mask` select the same leaves).
  """

  def __init__(self, params):
    flat, self.treedef = jax.tree_util.tree_flatten_with_path(params)
    self.names = [_names(path) for path, _ in flat]
    self.shapes = [np.shape(x) for _, x in flat]
    self.index: dict[str, list[int]] = {HEAD: [], LAYERS: [], EMBED: []}
    for j, names in enumerate(self.names):
      if not names or names[0] not in _GROUP_OF:
        raise ValueError(f"fused update: unexpected parameter {'/'.join(map(str, names))}.")
      self.index[_GROUP_OF[names[0]]].append(j)
    shapes = [self.shapes[j] for j in self.index[LAYERS]]
    self.num_layers = shapes[0][0]
    if any(len(s) < 1 or s[0] != self.num_layers for s in shapes):
      raise ValueError(f"fused update: stacked block parameters disagree on N: {shapes}.")

  def leaves(self, tree) -> list:
    return self.treedef.flatten_up_to(tree)

  def pick(self, g: str, full: list) -> list:
    return [full[j] for j in self.index[g]]

  def put(self, g: str, full: list, part: list) -> list:
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
  try:
    treedef.flatten_up_to(x)
  except (ValueError, TypeError):
    return False
  return True


class _StateView:
  """An optimizer state as parameter-shaped nodes (entries per parameter leaf) and the rest.

  A node is any subtree with the parameters' structure as a prefix (`mu`, `nu`, GaLore's
  projectors, ...); its entries are whatever sits at each parameter position (an array, a
  tuple of projectors, a `QuantizedMoment`, `MaskedNode`). Everything else (counts, injected
  hyperparameters) is shared by all leaves.
  """

  def __init__(self, state, layout: _Layout):
    is_node = lambda x: _has_prefix(layout.treedef, x)
    flat, self.outer = jax.tree_util.tree_flatten_with_path(state, is_leaf=is_node)
    self.is_node = [is_node(x) for _, x in flat]
    node_paths = [p for (p, _), n in zip(flat, self.is_node) if n]
    galore = jax.tree_util.tree_flatten_with_path(
      state, is_leaf=lambda x: isinstance(x, gj.GaLoreState)
    )[0]
    galore = [p for p, x in galore if isinstance(x, gj.GaLoreState)]
    if len(galore) > 1:
      raise ValueError("fused update: more than one GaLoreState in the optimizer state.")
    projectors = (*galore[0], jax.tree_util.GetAttrKey("projectors")) if galore else None
    self.projectors = node_paths.index(projectors) if projectors in node_paths else None

  def split(self, state, leaf_treedef) -> tuple[list[list], list]:
    outer = self.outer.flatten_up_to(state)
    nodes = [leaf_treedef.flatten_up_to(x) for x, n in zip(outer, self.is_node) if n]
    return nodes, [x for x, n in zip(outer, self.is_node) if not n]

  def build(self, nodes: list, shared: list):
    nodes, shared = iter(nodes), iter(shared)
    return self.outer.unflatten([next(nodes) if n else next(shared) for n in self.is_node])


def _chunk(tree, i, n: int):
  def take(a):
    size = a.shape[0] // n
    return lax.dynamic_slice_in_dim(a, i * size, size)

  return jax.tree.map(take, tree)


def _layer_take(tree, i, n: int):
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


def _layer_put(tree, new, i, n: int):
  """Writes block i's share back (in place when the stacked buffer is donated)."""

  def put(a, b):
    return lax.dynamic_update_slice_in_dim(a, b.astype(a.dtype), i * (a.shape[0] // n), 0)

  return jax.tree.map(put, tree, new)


class _Opt(NamedTuple):
  """The optimizer, applied one parameter leaf (or one chunk of a large leaf) at a time.

  Leaf by leaf, XLA frees one update's float32 temporaries before the next; `chunks[j] > 1`
  splits leaf j (the embedding, the LM head) along its leading axis, with its state entries.
  """

  tx: optax.GradientTransformation
  layout: _Layout
  view: _StateView
  chunks: dict

  def update(self, index: list, grads: list, params: list, nodes: list, shared: list):
    """New (params, nodes, shared) of the leaves `index`; lists are in `index`'s order."""
    new_params, new_nodes, new_shared = [], [], shared
    for k, j in enumerate(index):
      entries = [node[k] for node in nodes]
      update = self._leaf if self.chunks.get(j, 1) == 1 else self._chunked
      p, e, new_shared = update(j, grads[k], params[k], entries, shared)
      new_params.append(p)
      new_nodes.append(e)
    return new_params, [list(n) for n in zip(*new_nodes)] if nodes else [], new_shared

  def _leaf(self, j: int, grad, param, entries: list, shared: list):
    d = self.layout.single(j)
    state = self.view.build([d.unflatten([e]) for e in entries], shared)
    updates, state = self.tx.update(d.unflatten([grad]), state, d.unflatten([param]))
    new_param = optax.apply_updates(d.unflatten([param]), updates)
    new_nodes, new_shared = self.view.split(state, d)
    return d.flatten_up_to(new_param)[0], [n[0] for n in new_nodes], new_shared

  def _chunked(self, j: int, grad, param, entries: list, shared: list):
    n = self.chunks[j]

    def body(carry, i):
      param, entries, _ = carry
      p_i, e_i = _layer_take((param, entries), i, n)
      new_p, new_e, new_shared = self._leaf(j, _layer_take(grad, i, n), p_i, e_i, shared)
      return (_layer_put(param, new_p, i, n), _layer_put(entries, new_e, i, n), new_shared), None

    init = (param, entries, shared)
    return lax.scan(body, init, jnp.arange(n))[0]


def _moment_size(shape, projectors) -> int:
  """Entries of the optimizer's per-leaf moments: the leaf's, or GaLore's low-rank ones."""
  if isinstance(projectors, optax.MaskedNode) or not isinstance(projectors, tuple):
    return math.prod(shape)
  *batch, in_dim, out_dim = shape
  if len(projectors) == 2:
    return math.prod(batch) * projectors[0].shape[-1] * projectors[1].shape[-1]
  dim, rank = projectors[0].shape[-2:]
  return math.prod(batch) * rank * (out_dim if dim == in_dim else in_dim)


def _splits_evenly(entries: list, n: int, moment_size: int) -> bool:
  """Whether n equal chunks of every entry's leading axis are n equal chunks of the leaf.

  True for element-wise states (`mu`, `nu` of the leaf's or the low-rank shape), stacked
  projectors, and block-quantised moments whose blocks never straddle two chunks.
  """
  is_q = lambda x: isinstance(x, QuantizedMoment)
  for x in jax.tree.leaves(entries, is_leaf=is_q):
    if is_q(x):
      blocks, block_size = x.codes.shape
      if blocks * block_size != moment_size or (moment_size // n) % block_size:
        return False
      x = x.codes
    if np.ndim(x) < 1 or np.shape(x)[0] % n:
      return False
  return True


def _plan_chunks(layout: _Layout, nodes: list, projectors: int | None) -> dict:
  """Checks that the block state slices per block; picks chunk counts for large other leaves.

  Leaves of the head and the embedding larger than the largest block matrix are updated in
  about that many elements at a time, so their float32 optimizer temporaries stay that small.
  """
  projs = lambda j: nodes[projectors][j] if projectors is not None else None
  entries = lambda j: [node[j] for node in nodes]
  n = layout.num_layers
  for j in layout.index[LAYERS]:
    if not _splits_evenly(entries(j), n, _moment_size(layout.shapes[j], projs(j))):
      raise ValueError(
        f"fused update: the optimizer state of {'/'.join(layout.names[j])} "
        f"{jax.tree.map(np.shape, entries(j))} does not split into {n} equal per-block "
        "parts (a block-quantised moment whose blocks straddle two layers?)."
      )
  largest = max(math.prod(layout.shapes[j][1:]) for j in layout.index[LAYERS])
  chunks = {}
  for j in layout.index[HEAD] + layout.index[EMBED]:
    shape, size = layout.shapes[j], math.prod(layout.shapes[j])
    if size <= largest or projs(j) is not None and not isinstance(projs(j), optax.MaskedNode):
      continue
    for c in range(-(-size // largest), shape[0] + 1):
      if shape[0] % c == 0 and _splits_evenly(entries(j), c, size):
        chunks[j] = c
        break
  return chunks


# ----------------------------------------------------------------------------------------------
# GaLore's projection, for accumulating micro-batch gradients in the subspace.


def _galore_side(proj_type: str, in_dim: int, out_dim: int) -> str:
  """Which axis GaLore reduces for a canonical `[..., I, O]` kernel (see `scale_by_galore`)."""
  if proj_type == "full":
    return "both"
  if proj_type in ("std", "reverse_std"):
    smaller_in = out_dim >= in_dim  # the reference's rule on the torch `[O, I]` weight
    return "in" if smaller_in == (proj_type == "std") else "out"
  return {"right": "in", "left": "out"}[proj_type]


def _project(g, ps, side: str):
  """Low-rank `R` (float32) of a gradient: `Pᵀ G`, `G P` or `P_inᵀ G P_out`."""
  g, ps = g.astype(jnp.float32), [p.astype(jnp.float32) for p in ps]
  if side == "in":
    return jnp.einsum("...ir,...io->...ro", ps[0], g)
  if side == "out":
    return jnp.einsum("...io,...or->...ir", g, ps[0])
  return jnp.einsum("...ir,...io,...os->...rs", ps[0], g, ps[1])


def _project_back(a, ps, side: str):
  """`P R`, `R Pᵀ` or `P_in R P_outᵀ`: a full-size gradient that GaLore projects back to `R`."""
  ps = [p.astype(jnp.float32) for p in ps]
  if side == "in":
    return jnp.einsum("...ir,...ro->...io", ps[0], a)
  if side == "out":
    return jnp.einsum("...ir,...or->...io", a, ps[0])
  return jnp.einsum("...ir,...rs,...os->...io", ps[0], a, ps[1])


def _sides(view: _StateView, params: list, nodes: list, proj_type: str) -> list:
  """Per parameter leaf: GaLore's side, or None for leaves GaLore does not project."""
  if view.projectors is None:
    return [None] * len(params)
  out = []
  for p, ps in zip(params, nodes[view.projectors]):
    if isinstance(ps, optax.MaskedNode) or not isinstance(ps, tuple):
      out.append(None)
      continue
    in_dim, out_dim = np.shape(p)[-2:]
    side = _galore_side(proj_type, in_dim, out_dim)
    want = {"in": (in_dim,), "out": (out_dim,), "both": (in_dim, out_dim)}[side]
    if tuple(np.shape(x)[-2] for x in ps) != want:
      raise ValueError(
        f"fused update: GaLore projectors {[np.shape(x) for x in ps]} of a {np.shape(p)} kernel "
        f"do not fit proj_type={proj_type!r}; pass the optimizer's proj_type (and keep the "
        "default dimension numbers)."
      )
    out.append(side)
  return out


def _low_rank_zeros(p, ps, side, dtype):
  if side is None:
    return jnp.zeros(np.shape(p), dtype)
  *batch, in_dim, out_dim = np.shape(p)
  r = [np.shape(x)[-1] for x in ps]
  tail = {"in": (r[0], out_dim), "out": (in_dim, r[0]), "both": (r[0], r[-1])}[side]
  return jnp.zeros((*batch, *tail), dtype)


# ----------------------------------------------------------------------------------------------
# The step.


def _forward(m: _Model, layout: _Layout, layer_params: list, x_BxLxD, cos, sin):
  """Last hidden state and every block's input, `xs_NxBxLxD`."""
  n = layout.num_layers

  def body(x, i):
    p_i = layout.tree(LAYERS, [a[0] for a in _layer_take(layer_params, i, n)])[LAYERS]
    return _block(m, p_i, x, cos, sin), x

  return lax.scan(body, x_BxLxD, jnp.arange(n))


def _block_backward(m: _Model, layout: _Layout, p_i: list, x, dy, cos, sin, consume, carry):
  """Backward through block i from its input `x`, recomputing it, its MLP half first.

  `carry = consume(which, grads, carry)` receives each half's weight gradient as soon as it
  exists (`which`: the leaves' positions in the stacked group; `grads`: `[1, ...]` leaves).

  Returns:
    (gradient of the block's input, carry).
  """
  tree = layout.tree(LAYERS, [a[0] for a in p_i])[LAYERS]
  names = [layout.names[j][1:] for j in layout.index[LAYERS]]
  half = lambda keys: {key: tree[key] for key in keys}
  h, attn_vjp = jax.vjp(lambda p, x: _attention_half(m, p, x, cos, sin), half(_ATTN_HALF), x)
  _, mlp_vjp = jax.vjp(lambda p, h: _mlp_half(m, p, h), half(_MLP_HALF), h)
  d = dy
  for keys, vjp in ((_MLP_HALF, mlp_vjp), (_ATTN_HALF, attn_vjp)):
    g, d = vjp(d)
    which = [k for k, n in enumerate(names) if n[0] in keys]
    carry = consume(which, [_get(g, names[k])[None] for k in which], carry)
  return d, carry


def _block_grads(m: _Model, layout: _Layout, p_i: list, x, dy, cos, sin):
  """(weight gradient leaves of block i, `[1, ...]` in the stacked group's order, d input)."""
  collect = lambda which, grads, out: {**out, **dict(zip(which, grads))}
  dx, grads = _block_backward(m, layout, p_i, x, dy, cos, sin, collect, {})
  return [grads[k] for k in range(len(grads))], dx


def _get(tree, names):
  for name in names:
    tree = tree[name]
  return tree


def _head_backward(m: _Model, layout: _Layout, params: list, x_last, tokens_BxL):
  """(summed loss, target count, head weight gradient leaves, gradient of `x_last`)."""
  loss = lambda p, x: _head_loss(m, layout.tree(HEAD, p), x, tokens_BxL)
  loss_sum, vjp, count = jax.vjp(loss, params, x_last, has_aux=True)
  grads, dy = vjp(jnp.ones((), jnp.float32))
  return loss_sum, count, grads, dy


def _clip(grads: list, norm, max_norm: float) -> list:
  """`optax.clip_by_global_norm`, given the norm."""
  trigger = norm < max_norm
  return [lax.select(trigger, g, (g / norm.astype(g.dtype)) * max_norm) for g in grads]


def _sq_norm(xs: list):
  return sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in xs)


class _Groups(NamedTuple):
  """Parameters and state entries of one group, as leaf lists."""

  params: list
  nodes: list


def _unpack(opt: _Opt, params, opt_state):
  """Leaf lists of params and state, whole and per group."""
  lay = opt.layout
  full = lay.leaves(params)
  nodes, shared = opt.view.split(opt_state, lay.treedef)
  groups = {g: _Groups(lay.pick(g, full), [lay.pick(g, n) for n in nodes]) for g in lay.index}
  return full, nodes, shared, groups


def _pack(opt: _Opt, full, nodes, shared, groups):
  lay = opt.layout
  for g, grp in groups.items():
    full = lay.put(g, full, grp.params)
    nodes = [lay.put(g, n, part) for n, part in zip(nodes, grp.nodes)]
  state = opt.view.build([lay.treedef.unflatten(n) for n in nodes], shared)
  return lay.treedef.unflatten(full), state


def _update_group(opt: _Opt, g: str, grads: list, grp: _Groups, shared):
  new_params, new_nodes, new_shared = opt.update(
    opt.layout.index[g], grads, grp.params, grp.nodes, shared
  )
  return _Groups(new_params, new_nodes), new_shared


def _update_block(opt: _Opt, i, which: list, grads: list, p_i: list, grp: _Groups, shared):
  """Block i's update of the stacked group's leaves at positions `which`, written back."""
  n, index = opt.layout.num_layers, opt.layout.index[LAYERS]
  sub = lambda xs: [xs[k] for k in which]
  nodes_i = _layer_take([sub(node) for node in grp.nodes], i, n)
  new_p, new_nodes, _ = opt.update(sub(index), grads, sub(p_i), nodes_i, shared)
  params, nodes = list(grp.params), [list(node) for node in grp.nodes]
  for pos, k in enumerate(which):
    params[k] = _layer_put(params[k], new_p[pos], i, n)
    for node, new in zip(nodes, new_nodes):
      node[k] = _layer_put(node[k], new[pos], i, n)
  return _Groups(params, nodes)


def _step_single(m: _Model, opt: _Opt, max_norm: float, params, opt_state, tokens_BxL):
  """K = 1: one forward, then updates during the backward pass (two passes when clipping)."""
  lay, n = opt.layout, opt.layout.num_layers
  full, nodes, shared, grp = _unpack(opt, params, opt_state)
  c = m.config
  cos, sin = rope_tables(tokens_BxL.shape[1], c.head_dim, c.rope_base, c.rope_scaling)
  embed = lambda p: _embed(m, lay.tree(EMBED, p), tokens_BxL)
  x0, embed_vjp = jax.vjp(embed, grp[EMBED].params)
  x_last, xs = _forward(m, lay, grp[LAYERS].params, x0, cos, sin)
  loss_sum, count, g_head, dy = _head_backward(m, lay, grp[HEAD].params, x_last, tokens_BxL)
  denom = jnp.maximum(count, 1).astype(jnp.float32)
  mean = lambda gs, ps: [(g.astype(jnp.float32) / denom).astype(p.dtype) for g, p in zip(gs, ps)]
  g_head = mean(g_head, grp[HEAD].params)
  read = lambda stacked, i: jax.tree.map(lambda a: a[0], _layer_take(stacked, i, n))
  ids = jnp.arange(n)

  dys, scale = None, lambda grads: grads
  if max_norm > 0:
    # Pass 1, norms only; each block's output gradient is kept (N x B x L x D, like `xs`).
    def norms(carry, i):
      dy, sq = carry
      p_i = _layer_take(grp[LAYERS].params, i, n)
      add = lambda which, g, sq: sq + _sq_norm(mean(g, [p_i[k] for k in which]))
      return _block_backward(m, lay, p_i, read(xs, i), dy, cos, sin, add, sq), dy

    (dx0, sq), dys = lax.scan(norms, (dy, _sq_norm(g_head)), ids, reverse=True)
    g_embed = mean(embed_vjp(dx0)[0], grp[EMBED].params)
    norm = jnp.sqrt(sq + _sq_norm(g_embed))
    scale = lambda grads: _clip(grads, norm, max_norm)
  new_head, new_shared = _update_group(opt, HEAD, scale(g_head), grp[HEAD], shared)

  def backward(carry, i):
    dy, layers, sq = carry
    p_i = _layer_take(layers.params, i, n)
    dy = dy if dys is None else read(dys, i)  # pass 2 recomputes the weight gradients only

    def update(which, g, carry):
      layers, sq = carry
      g = mean(g, [p_i[k] for k in which])
      return _update_block(opt, i, which, scale(g), p_i, layers, shared), sq + _sq_norm(g)

    dx, (layers, sq) = _block_backward(m, lay, p_i, read(xs, i), dy, cos, sin, update, (layers, sq))
    return (dx, layers, sq), None

  init = (dy, grp[LAYERS], _sq_norm(g_head))
  (dx0_, new_layers, sq_), _ = lax.scan(backward, init, ids, reverse=True)
  if max_norm <= 0:
    g_embed = mean(embed_vjp(dx0_)[0], grp[EMBED].params)
    norm = jnp.sqrt(sq_ + _sq_norm(g_embed))
  new_embed, _ = _update_group(opt, EMBED, scale(g_embed), grp[EMBED], shared)
  groups = {HEAD: new_head, LAYERS: new_layers, EMBED: new_embed}
  new_params, new_state = _pack(opt, full, nodes, new_shared, groups)
  return new_params, new_state, {"loss": loss_sum / denom, "grad_norm": norm, "tokens": count}


class _Accumulator(NamedTuple):
  """GaLore sides (None: accumulated at full size) and the micro-batch-0 projectors, per leaf."""

  sides: dict
  first: Callable  # (group, is_first, grads, params, nodes_fn, p0) -> p0

  def add(self, g: str, acc: list, grads: list, p0: list) -> list:
    return [
      a + (x if s is None else _project(x, ps, s)).astype(a.dtype)
      for a, x, ps, s in zip(acc, grads, p0, self.sides[g])
    ]

  def full(self, g: str, acc: list, p0: list, params: list, scale) -> list:
    """Full-size gradients (`scale` applied) that the optimizer projects back to `acc`."""
    return [
      ((a if s is None else _project_back(a, ps, s)) * scale).astype(p.dtype)
      for a, ps, s, p in zip(acc, p0, self.sides[g], params)
    ]


def _accumulator(opt: _Opt, full, nodes, shared, grp, proj_type, accum_dtype):
  """(`_Accumulator`, zero accumulators, initial projectors), per group."""
  lay, k_proj = opt.layout, opt.view.projectors
  sides = {g: lay.pick(g, _sides(opt.view, full, nodes, proj_type)) for g in grp}
  p0 = {g: [None] * len(sides[g]) for g in grp}
  if k_proj is not None:
    p0 = {g: [ps if s else None for ps, s in zip(grp[g].nodes[k_proj], sides[g])] for g in grp}
  zeros = {
    g: [
      _low_rank_zeros(p, ps, s, accum_dtype) for p, ps, s in zip(lay.pick(g, full), p0[g], sides[g])
    ]
    for g in grp
  }

  def first(g, is_first, grads, params, nodes_fn, p0):
    """On micro-batch 0, the projectors GaLore computes from its gradient; else `p0`."""
    if not any(sides[g]):
      return p0

    def compute():
      _, new_nodes, _ = opt.update(lay.index[g], grads, params, nodes_fn(), shared)
      return [ps if s else None for ps, s in zip(new_nodes[k_proj], sides[g])]

    return lax.cond(is_first, compute, lambda: p0)

  return _Accumulator(sides, first), zeros, p0


def _step_accumulate(
  m: _Model, opt: _Opt, max_norm, proj_type, accum_dtype, params, opt_state, micro_KxBxL
):
  """K > 1: sum (projected) gradients over the micro-batches, then update block by block."""
  lay, n = opt.layout, opt.layout.num_layers
  full, nodes, shared, grp = _unpack(opt, params, opt_state)
  accum, acc0, p0_init = _accumulator(opt, full, nodes, shared, grp, proj_type, accum_dtype)
  c = m.config
  cos, sin = rope_tables(micro_KxBxL.shape[-1], c.head_dim, c.rope_base, c.rope_scaling)
  ids = jnp.arange(n)
  take = lambda xs, i: _layer_take(xs, i, n)
  put = lambda xs, new, i: [_layer_put(x, y, i, n) for x, y in zip(xs, new)]

  def micro_batch(carry, inp):
    acc, p0, loss_sum, count = carry
    k, tokens_BxL = inp
    embed = lambda p: _embed(m, lay.tree(EMBED, p), tokens_BxL)
    x0, embed_vjp = jax.vjp(embed, grp[EMBED].params)
    x_last, xs = _forward(m, lay, grp[LAYERS].params, x0, cos, sin)
    loss_k, count_k, g_head, dy = _head_backward(m, lay, grp[HEAD].params, x_last, tokens_BxL)
    h, e = grp[HEAD], grp[EMBED]
    p0_head = accum.first(HEAD, k == 0, g_head, h.params, lambda: h.nodes, p0[HEAD])

    def backward(carry, i):
      dy, acc_l, p0_l = carry
      p_i, x = take((grp[LAYERS].params, xs), i)
      g_i, dx = _block_grads(m, lay, p_i, x[0], dy, cos, sin)
      nodes_i = lambda: take(grp[LAYERS].nodes, i)
      p0_i = accum.first(LAYERS, k == 0, g_i, p_i, nodes_i, take(p0_l, i))
      acc_i = accum.add(LAYERS, take(acc_l, i), g_i, p0_i)
      return (dx, put(acc_l, acc_i, i), put(p0_l, p0_i, i)), None

    (dx0, acc_l, p0_l), _ = lax.scan(backward, (dy, acc[LAYERS], p0[LAYERS]), ids, reverse=True)
    g_embed = embed_vjp(dx0)[0]
    p0_embed = accum.first(EMBED, k == 0, g_embed, e.params, lambda: e.nodes, p0[EMBED])
    acc = {
      HEAD: accum.add(HEAD, acc[HEAD], g_head, p0_head),
      LAYERS: acc_l,
      EMBED: accum.add(EMBED, acc[EMBED], g_embed, p0_embed),
    }
    p0 = {HEAD: p0_head, LAYERS: p0_l, EMBED: p0_embed}
    return (acc, p0, loss_sum + loss_k, count + count_k), None

  init = (acc0, p0_init, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32))
  (acc, p0, loss_sum, count), _ = lax.scan(
    micro_batch, init, (jnp.arange(micro_KxBxL.shape[0]), micro_KxBxL)
  )

  denom = jnp.maximum(count, 1).astype(jnp.float32)
  norm = jnp.sqrt(sum(_sq_norm(a) for a in acc.values())) / denom

  def grads(g, acc_g, p0_g, params):
    out = accum.full(g, acc_g, p0_g, params, 1.0 / denom)
    return _clip(out, norm, max_norm) if max_norm > 0 else out

  new_head, new_shared = _update_group(
    opt, HEAD, grads(HEAD, acc[HEAD], p0[HEAD], grp[HEAD].params), grp[HEAD], shared
  )

  def update_block(layers, i):
    p_i, acc_i, p0_i = take((layers.params, acc[LAYERS], p0[LAYERS]), i)
    g_i = grads(LAYERS, acc_i, p0_i, p_i)
    return _update_block(opt, i, range(len(p_i)), g_i, p_i, layers, shared), None

  new_layers, _ = lax.scan(update_block, grp[LAYERS], ids, reverse=True)
  g_embed = grads(EMBED, acc[EMBED], p0[EMBED], grp[EMBED].params)
  new_embed, _ = _update_group(opt, EMBED, g_embed, grp[EMBED], shared)
  groups = {HEAD: new_head, LAYERS: new_layers, EMBED: new_embed}
  new_params, new_state = _pack(opt, full, nodes, new_shared, groups)
  return new_params, new_state, {"loss": loss_sum / denom, "grad_norm": norm, "tokens": count}


# ----------------------------------------------------------------------------------------------
# Public API.


def make_fused_update(
  config: LlamaConfig,
  tx: optax.GradientTransformation,
  grad_accum_steps: int = 1,
  *,
  grad_clip_norm: float = 0.0,
  clip_in_subspace: bool = False,
  proj_type: str | None = None,
  accum_dtype: Any = jnp.float32,
  check_optimizer: bool = True,
) -> Callable:
  """`update(params, opt_state, tokens_BxL) -> (params, opt_state, metrics)`, fused layer-wise.

  The standard step (`value_and_grad` of the token-mean loss, `tx.update`,
  `optax.apply_updates`; float32 sum over micro-batches) with every parameter updated as soon as
  its gradient exists, so the full gradient is never held (see the module docstring). Its
  gradients are bit-identical to those of a standard step with per-block remat; two exceptions
  to "same result": refresh steps of GaLore with K > 1 (subspace from the first micro-batch), and
  GaLore's `subspace_method="randomized"`, whose sketches depend on the leaf's position in the
  tree it is given (here always one leaf). Jit it with params and opt_state donated: the stacked
  blocks are then updated in place.

  Args:
    config: the model's `LlamaConfig` (`scan_layers=True`; `remat_policy` is ignored: each
      block is recomputed from its input in the backward pass anyway).
    tx: a separable optax optimizer, e.g. `galore_jax.galore_adamw(...)`, without clipping.
      GaLore masks must be callables (or None), as `galore_jax.llama_galore_mask`.
    grad_accum_steps: K micro-batches per update; the batch's rows are split into K.
    grad_clip_norm: global-norm clipping threshold (0: off); see the module docstring.
    clip_in_subspace: with K > 1 and GaLore, clip by the norm of the accumulated (projected)
      gradient; required to clip in that case.
    proj_type: the optimizer's GaLore `proj_type` (e.g. `config.optimizer.proj_type`); required
      with K > 1 and GaLore, to project micro-batch gradients as GaLore does (the side of a
      square matrix is not visible in the state).
    accum_dtype: dtype of the accumulators (K > 1).
    check_optimizer: run the separability probe (a few seconds of compilation).

  Returns:
    The update function; `metrics` holds `loss` (token mean), `grad_norm` (global norm of the
    gradient the optimizer sees: projected for GaLore matrices when K > 1) and `tokens`.

  Example::

    tx = gj.galore_adamw(1e-2, rank=128, update_proj_gap=200, mask=gj.llama_galore_mask)
    update = jax.jit(make_fused_update(config, tx), donate_argnums=(0, 1))
    params, opt_state, metrics = update(params, tx.init(params), tokens_BxL)

  References:
    Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection",
    https://arxiv.org/abs/2403.03507
  """
  m = _model_parts(config)
  abstract = nnx.split(nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0))), nnx.Param)[1]
  _validate(tx, abstract, grad_accum_steps, grad_clip_norm, clip_in_subspace, proj_type)
  if check_optimizer:
    _check_separable(tx, abstract)

  def update(params, opt_state, tokens_BxL):
    layout = _Layout(params)
    view = _StateView(opt_state, layout)
    nodes = view.split(opt_state, layout.treedef)[0]
    opt = _Opt(tx, layout, view, _plan_chunks(layout, nodes, view.projectors))
    if grad_accum_steps == 1:
      return _step_single(m, opt, grad_clip_norm, params, opt_state, tokens_BxL)
    micro = tokens_BxL.reshape(grad_accum_steps, -1, tokens_BxL.shape[-1])
    return _step_accumulate(
      m, opt, grad_clip_norm, proj_type, accum_dtype, params, opt_state, micro
    )

  return update


def make_fused_train_step(setup, grad_accum_steps: int = 1, **options) -> Callable:
  """`train_step(state, batch) -> (state, metrics)` for `train.trainer`, fused layer-wise.

  `setup` needs `model_config` and `tx` (a `train.trainer.Setup`); `state` is a
  `train.trainer.TrainState` (any NamedTuple with step, params, opt_state, rng). The batch's
  `"tokens"` are split into `grad_accum_steps` micro-batches. `options` go to
  `make_fused_update` (`grad_clip_norm`, `clip_in_subspace`, `proj_type`, ...).
  """
  update = make_fused_update(setup.model_config, setup.tx, grad_accum_steps, **options)

  def train_step(state, batch):
    params, opt_state, metrics = update(state.params, state.opt_state, batch["tokens"])
    rng, _ = jax.random.split(state.rng)
    new = state._replace(step=state.step + 1, params=params, opt_state=opt_state, rng=rng)
    return new, metrics

  return train_step


def _validate(tx, abstract_params, grad_accum_steps, grad_clip_norm, clip_in_subspace, proj_type):
  """Clear errors for settings the fused step cannot honour."""
  if not isinstance(grad_accum_steps, int) or grad_accum_steps < 1:
    raise ValueError(f"fused update: grad_accum_steps={grad_accum_steps!r} must be an int >= 1.")
  if not grad_clip_norm >= 0:
    raise ValueError(f"fused update: grad_clip_norm={grad_clip_norm!r} must be >= 0 (0: off).")
  if proj_type is not None and proj_type not in _PROJ_TYPES:
    raise ValueError(f"fused update: proj_type={proj_type!r} is not one of {_PROJ_TYPES}.")
  state = jax.eval_shape(tx.init, abstract_params)
  is_galore = lambda x: isinstance(x, gj.GaLoreState)
  galore = [x for x in jax.tree.leaves(state, is_leaf=is_galore) if is_galore(x)]
  projected = any(
    not isinstance(ps, optax.MaskedNode)
    for g in galore
    for ps in jax.tree.leaves(g.projectors, is_leaf=lambda x: isinstance(x, tuple))
  )
  if grad_accum_steps > 1 and projected and proj_type is None:
    raise ValueError(
      "fused update: grad_accum_steps > 1 with GaLore accumulates projected gradients and needs "
      "the optimizer's proj_type (e.g. proj_type=config.optimizer.proj_type)."
    )
  if grad_accum_steps > 1 and grad_clip_norm > 0 and projected and not clip_in_subspace:
    raise ValueError(
      "fused update: clipping by the global norm of the accumulated gradient is not possible "
      f"with grad_accum_steps={grad_accum_steps} and GaLore: only the projected gradient of "
      "each GaLore matrix is accumulated. Pass clip_in_subspace=True to clip by the norm of "
      "what is accumulated (<= the full norm), use grad_accum_steps=1, or grad_clip_norm=0."
    )


def _check_separable(tx, abstract_params):
  """Runs `tx` on a small stand-in model whole and leaf by leaf; raises if they differ."""
  layout = _Layout(abstract_params)
  stacked = set(layout.index[LAYERS])
  keys = iter(jax.random.split(jax.random.key(0), 2 * len(layout.shapes)))

  def leaf(j, scale=1.0):
    shape = [min(d, 4) for d in layout.shapes[j]]
    shape = [2, *shape[1:]] if j in stacked else [min(d, 8) for d in layout.shapes[j]]
    return scale * jax.random.normal(next(keys), shape)

  params = layout.treedef.unflatten([leaf(j) for j in range(len(layout.shapes))])
  # Large gradients, so that any clipping by a global norm would change the result.
  grads = layout.treedef.unflatten([leaf(j, 1e3) for j in range(len(layout.shapes))])
  layout = _Layout(params)

  @jax.jit
  def whole(params, grads):
    updates, state = tx.update(grads, tx.init(params), params)
    return optax.apply_updates(params, updates), state

  @jax.jit
  def by_leaf(params, grads):
    state = tx.init(params)
    view = _StateView(state, layout)
    full, nodes, shared, grp = _unpack(_Opt(tx, layout, view, {}), params, state)
    opt = _Opt(tx, layout, view, _plan_chunks(layout, nodes, view.projectors))
    g = layout.leaves(grads)
    new, shared_out = {}, {}
    for name in (HEAD, EMBED):
      p, n, shared_out[name] = opt.update(
        layout.index[name], layout.pick(name, g), *grp[name], shared
      )
      new[name] = _Groups(p, n)
    layers = grp[LAYERS]
    for i in range(layout.num_layers):
      g_i = [_chunk(x, i, layout.num_layers) for x in layout.pick(LAYERS, g)]
      p_i = _chunk(layers.params, i, layout.num_layers)
      layers = _update_block(opt, i, range(len(g_i)), g_i, p_i, layers, shared)
    new[LAYERS] = layers
    return _pack(opt, full, nodes, shared_out[HEAD], new)

  expected, got = whole(params, grads), by_leaf(params, grads)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(expected)[0], jax.tree.leaves(got)):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if np.linalg.norm(a - b) > 1e-4 * np.linalg.norm(a) + 1e-6:
      raise ValueError(
        "fused update: the optimizer is not separable: updating leaf by leaf changes "
        f"{jax.tree_util.keystr(path)} (probe on a small stand-in model). The fused step calls "
        "it on one leaf (or one block's slice) at a time, so transforms that look at all "
        "gradients (optax.clip_by_global_norm, apply_if_finite, ...) cannot be in it. Build the "
        "optimizer without them and pass grad_clip_norm= to the fused step instead."
      )
