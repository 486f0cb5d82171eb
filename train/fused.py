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
   its MLP half is taken and those weights updated, then the attention half's, one leaf after
   the other (a fence, `_after`, keeps XLA from converting every leaf's gradient at once); the
   optimizer gets block i's slice of the parameters and of the optimizer state, and the new
   slice is written back into the (donated) stacked buffers with `dynamic_update_slice`; the
   input gradient flows to block i-1;
4. the embedding is updated last (its gradient is made after the scan, behind the same fence).

So at any time at most one block's gradient exists (and with `vocab_chunk_size`, one vocabulary
chunk's gradient of the head and the embedding, GaLore-projected or not). The optimizer must
be *separable* (each leaf's update depends on its own gradient, state and parameter plus shared
scalars);
`galore_jax.layerwise` calls it one leaf (or one block's slice, or row chunks of the LM head and
embedding) at a time, so the step count, the schedule and GaLore's refresh predicate are read
once per step and SVDs run on refresh steps only. The optimizer state is exactly
`tx.init(params)`: checkpoints and memory accounting are shared with the standard step. A probe
at construction (`layerwise.check_separable`) raises for e.g. an `optax.clip_by_global_norm`
inside the optimizer: pass `grad_clip_norm` here instead.

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
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax import lax

import galore_jax as gj
from galore_jax import layerwise as lw
from train import losses
from train.model import Block, Llama, LlamaConfig, next_token_loss, param_names, rope_tables

HEAD, LAYERS, EMBED = "head", "layers", "embed"
_GROUP_OF = {"final_norm": HEAD, "lm_head": HEAD, "layers": LAYERS, "embed": EMBED}

# ----------------------------------------------------------------------------------------------
# The model in pieces.


class _Model(NamedTuple):
  """Graph definitions of the pieces of a scanned `Llama`, applied to pure-dict parameters."""

  config: LlamaConfig
  embed: Any
  block: Any
  final_norm: Any
  lm_head: Any
  loss_chunk_size: int = 0


def _model_parts(config: LlamaConfig, loss_chunk_size: int = 0) -> _Model:
  if not config.scan_layers:
    raise ValueError("the fused update needs LlamaConfig.scan_layers=True (stacked blocks).")
  if config.tie_word_embeddings:  # the embedding would get two updates (head and lookup)
    raise ValueError("the fused update needs an untied LM head (tie_word_embeddings=False).")
  abstract = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0)))
  graph = lambda module: nnx.split(module, nnx.Param)[0]
  parts = (abstract.embed, abstract.layers, abstract.final_norm, abstract.lm_head)
  return _Model(config, *map(graph, parts), loss_chunk_size)


def _group_of(names: tuple) -> str:
  if not names or names[0] not in _GROUP_OF:
    raise ValueError(f"fused update: unexpected parameter {'/'.join(map(str, names))}.")
  return _GROUP_OF[names[0]]


def _layout(params) -> lw.TreeLayout:
  """The LLaMA's leaves as the head, the stacked blocks and the embedding."""
  return lw.TreeLayout(params, _group_of, LAYERS, names=param_names)


def _embed(m: _Model, p, tokens_BxL):
  return nnx.merge(m.embed, p["embed"])(tokens_BxL)


def _attention_half(m: _Model, p, x_BxLxD, cos_LxK, sin_LxK):
  return nnx.merge(m.block, p).attention_half(x_BxLxD, cos_LxK, sin_LxK)


def _mlp_half(m: _Model, p, h_BxLxD):
  return nnx.merge(m.block, p).mlp_half(h_BxLxD)


def _block(m: _Model, p, x_BxLxD, cos_LxK, sin_LxK):
  return nnx.merge(m.block, p)(x_BxLxD, cos_LxK, sin_LxK)


def _head_loss(m: _Model, p, x_BxLxD, tokens_BxL, mask_BxL):
  """(summed loss, number of targets) from the last hidden state; as `Llama.__call__`, or, with
  `m.loss_chunk_size`, as `train.losses.chunked_next_token_loss` (no [B, L, V] logits)."""
  h_BxLxD = nnx.merge(m.final_norm, p["final_norm"])(x_BxLxD)
  lm_head = nnx.merge(m.lm_head, p["lm_head"])
  if not m.loss_chunk_size:
    return next_token_loss(lm_head(h_BxLxD), tokens_BxL, loss_mask_BxL=mask_BxL)
  kernel_DxV = lm_head.kernel[...].astype(h_BxLxD.dtype)  # as nnx.Linear casts it
  return losses.chunked_next_token_loss(
    h_BxLxD, kernel_DxV, tokens_BxL, chunk_size=m.loss_chunk_size, loss_mask_BxL=mask_BxL
  )


# ----------------------------------------------------------------------------------------------
# The step.


def _forward(m: _Model, layout: lw.TreeLayout, layer_params: list, x_BxLxD, cos, sin):
  """Last hidden state and every block's input, `xs_NxBxLxD`."""
  n = layout.num_layers

  def body(x, i):
    p_i = layout.tree(LAYERS, [a[0] for a in lw.layer_take(layer_params, i, n)])[LAYERS]
    return _block(m, p_i, x, cos, sin), x

  return lax.scan(body, x_BxLxD, jnp.arange(n))


def _after(fn, x, dep):
  """`fn(x)`, computed only once `dep` exists, and none of it before.

  On CPU a conditional with `fn` in both branches, whose predicate reads one element of `dep`
  (its value does not matter): CPU optimization barriers are removed before scheduling, a
  conditional that only passed `x` through would be simplified away, and code motion does not
  enter a conditional (see `layerwise.layer_take`). Elsewhere an optimization barrier.
  """
  if jax.default_backend() != "cpu":
    return fn(lax.optimization_barrier((x, dep))[0])
  return lax.cond(jnp.isnan(dep[(0,) * jnp.ndim(dep)]), fn, fn, x)  # one element, no reshape


def _block_backward(m: _Model, layout: lw.TreeLayout, p_i: list, x, dy, cos, sin, consume, carry):
  """Backward through block i from its input `x`, recomputing it, its MLP half first.

  `carry = consume(which, grads, carry)` receives each half's weight gradient as soon as it
  exists (`which`: the leaves' positions in the stacked group; `grads`: `[1, ...]` leaves).

  Returns:
    (gradient of the block's input, carry).
  """
  tree = layout.tree(LAYERS, [a[0] for a in p_i])[LAYERS]
  names = [layout.names[j][1:] for j in layout.index[LAYERS]]
  half = lambda keys: {key: tree[key] for key in keys}
  attn = lambda q, x: _attention_half(m, {**tree, **q}, x, cos, sin)
  h, attn_vjp = jax.vjp(attn, half(Block.ATTENTION_HALF), x)
  _, mlp_vjp = jax.vjp(lambda q, h: _mlp_half(m, {**tree, **q}, h), half(Block.MLP_HALF), h)
  d = dy
  for keys, vjp in ((Block.MLP_HALF, mlp_vjp), (Block.ATTENTION_HALF, attn_vjp)):
    g, d = vjp(d)
    which = [k for k, n in enumerate(names) if n[0] in keys]
    carry = consume(which, [_get(g, names[k])[None] for k in which], carry)
  return d, carry


def _block_grads(m: _Model, layout: lw.TreeLayout, p_i: list, x, dy, cos, sin):
  """(weight gradient leaves of block i, `[1, ...]` in the stacked group's order, d input)."""
  collect = lambda which, grads, out: {**out, **dict(zip(which, grads))}
  dx, grads = _block_backward(m, layout, p_i, x, dy, cos, sin, collect, {})
  return [grads[k] for k in range(len(grads))], dx


def _get(tree, names):
  for name in names:
    tree = tree[name]
  return tree


def _head_backward(m: _Model, layout: lw.TreeLayout, params: list, x_last, tokens_BxL, mask_BxL):
  """(summed loss, target count, head weight gradient leaves, gradient of `x_last`)."""
  loss = lambda p, x: _head_loss(m, layout.tree(HEAD, p), x, tokens_BxL, mask_BxL)
  loss_sum, vjp, count = jax.vjp(loss, params, x_last, has_aux=True)
  grads, dy = vjp(jnp.ones((), jnp.float32))
  return loss_sum, count, grads, dy


# ----------------------------------------------------------------------------------------------
# The LM head and the embedding, one vocabulary chunk at a time (`vocab_chunk_size`).


class _VocabChunks(NamedTuple):
  """Leaf `j` (`[V, D]` embedding: rows = 1; `[D, V]` head: rows = D) as `n` vocabulary chunks.

  Every split state entry k of the leaf is viewed as `[entry_rows[k], n, -1]` and chunk c is
  `[:, c]`, reshaped to the entry the optimizer makes for a `[V / n, D]` (`[D, V / n]`)
  parameter (`shapes`): true for element-wise moments and for block-quantised ones whose blocks
  do not straddle chunks, which `_vocab_chunks` checks by sizes. A leaf that GaLore projects on its
  D side (`bases`: its projector nodes) has low-rank moments `[r, V]` (head: rows = r) or
  `[V, r]` (rows = 1) that split the same way, and a projector that every chunk uses whole.
  """

  j: int
  n: int
  axis: int  # the vocabulary axis of the leaf
  rows: int  # the parameter's rows in the `[rows, n, -1]` view
  shape: tuple  # a chunk's parameter shape
  shapes: list  # per state node: a chunk's entry shape (None: a MaskedNode; _WHOLE: not split)
  entry_rows: list  # per state node: rows of its `[rows, n, -1]` view
  bases: tuple = ()  # GaLore's projector nodes of a projected leaf split in n > 1 chunks
  side: str | None = None  # GaLore's side of that leaf (`galore_sides`)

  def take(self, x, c, shape, rows=None):
    view = x.reshape(rows or self.rows, self.n, -1)
    return lax.dynamic_index_in_dim(view, c, 1, False).reshape(shape)

  def put(self, x, new, c, rows=None):
    view = x.reshape(rows or self.rows, self.n, -1)
    # The barrier keeps XLA from moving the cast across the write: it would otherwise cast the
    # whole leaf to float32, write the chunk there and cast back (a new leaf-sized buffer).
    new = lax.optimization_barrier(new.reshape(rows or self.rows, 1, -1).astype(x.dtype))
    return lax.dynamic_update_index_in_dim(view, new, c, 1).reshape(x.shape)

  def take_all(self, param, entries, c):
    """Chunk c of the parameter and of its state entries, behind `layerwise`'s fence (CPU)."""

    def take(tree, c):
      param, entries = tree
      e = [
        e if s is None or s is _WHOLE else self.take(e, c, s, r)
        for e, s, r in zip(entries, self.shapes, self.entry_rows)
      ]
      return self.take(param, c, self.shape), e

    return _fenced(take, (param, entries), c)

  def put_all(self, param, entries, new_param, new_entries, c):
    e = [
      e if s is None else x if s is _WHOLE else self.put(e, x, c, r)
      for e, x, s, r in zip(entries, new_entries, self.shapes, self.entry_rows)
    ]
    return self.put(param, new_param, c), e


_WHOLE = "whole"  # `_VocabChunks.shapes` entry of a state entry that every chunk uses whole


def _vocab_chunks(tx, view: lw.StateView, layout, nodes: list, param, j: int, axis, max_size):
  """`_VocabChunks` of leaf j (`param`) split along `axis` into the fewest chunks of at most
  `max_size` vocabulary entries whose state entries split too (one chunk if none does)."""
  shape = layout.shapes[j]
  vocab, rows = shape[axis], shape[0] if axis == 1 else 1
  whole = [node[j] for node in nodes]
  bases = _projector_nodes(view, whole)
  d = layout.single(j)
  candidates = [n for n in range(2, vocab + 1) if vocab % n == 0 and vocab // n <= max_size]
  for n in candidates if vocab > max_size else []:
    chunk = tuple(vocab // n if a == axis else size for a, size in enumerate(shape))
    if bases:
      vc = _galore_vocab_chunks(tx, view, layout, whole, param, j, axis, n, chunk, bases)
      if vc is not None:
        return vc
      continue
    state = jax.eval_shape(tx.init, d.unflatten([jax.ShapeDtypeStruct(chunk, param.dtype)]))
    parts = [p[0] for p in view.split(state, d)[0]]
    if all(_splits(e, p, n, rows) for e, p in zip(whole, parts)):
      return _VocabChunks(j, n, axis, rows, chunk, [_shape(p) for p in parts], [rows] * len(parts))
  # One chunk: the whole leaf (GaLore, if it projects the leaf, refreshes from its gradient).
  return _VocabChunks(j, 1, axis, 1, shape, [_shape(e) for e in whole], [1] * len(whole))


def _galore_vocab_chunks(tx, view, layout, whole, param, j, axis, n, chunk, bases):
  """`_VocabChunks` of a leaf that GaLore projects, in n chunks, or None if its state does not
  split so: the projector must span D (the Flax layout: the head's `[D, V]` on its input side,
  the embedding's `[V, D]` on its output side), the low-rank moments (`[r, V]`: r rows; `[V, r]`:
  one row, with 8-bit blocks inside a chunk's rows) split along V, and an update of one chunk,
  projected on the whole leaf's side (`galore_sides`), must keep every entry's shape."""
  vocab, dim = param.shape[axis], param.shape[1 - axis]
  side, rank = ("in" if axis == 1 else "out"), np.shape(whole[bases[0]])[-1]
  if len(bases) != 1 or np.shape(whole[bases[0]]) != (dim, rank) or vocab // n < rank:
    return None
  rows = rank if axis == 1 else 1
  shapes = []
  for k, e in enumerate(whole):
    if isinstance(e, optax.MaskedNode) or k in bases:
      shapes.append(None if k not in bases else _WHOLE)
      continue
    e_shape = list(np.shape(e))
    ax = max((a for a, size in enumerate(e_shape) if size == vocab), default=0)
    e_shape[ax] //= n
    codes = np.ndim(e) == 2 and jnp.result_type(e) == jnp.uint8
    if codes and math.prod(np.shape(e)) != rank * vocab:  # padded blocks
      return None
    part = jax.ShapeDtypeStruct(tuple(e_shape), jnp.result_type(e))
    if not _splits(e, part, n, rows):
      return None
    shapes.append(part.shape)
  p_rows = param.shape[0] if axis == 1 else 1
  vc = _VocabChunks(j, n, axis, p_rows, chunk, shapes, [rows] * len(whole), bases, side)
  d = layout.single(j)
  whole_param = jax.ShapeDtypeStruct(param.shape, param.dtype)
  shared = view.split(jax.eval_shape(tx.init, d.unflatten([whole_param])), d)[1]
  one = lw.LeafwiseOptimizer(tx, layout, view, {})
  struct = lambda e, s: jax.ShapeDtypeStruct(np.shape(e) if s is _WHOLE else s, e.dtype)
  entries = [e if s is None else struct(e, s) for e, s in zip(whole, shapes)]
  p_c = jax.ShapeDtypeStruct(chunk, param.dtype)
  sides = d.unflatten([side])
  try:
    out = jax.eval_shape(
      lambda p, es, sh: one.update([j], [p], [p], [[e] for e in es], sh, galore_sides=sides)[1],
      p_c,
      entries,
      shared,
    )
  except (ValueError, TypeError):  # e.g. a transform that does not take galore_sides
    return None
  same = lambda a, b: jax.tree.map(
    lambda x, y: (np.shape(x), x.dtype) == (np.shape(y), y.dtype), a, b
  )
  if not all(jax.tree.leaves(same([[e] for e in entries], out))):
    return None
  return vc


def _shape(entry):
  return None if isinstance(entry, optax.MaskedNode) else np.shape(entry)


def _projector_nodes(view: lw.StateView, entries: list) -> tuple:
  """The state nodes holding GaLore's bases of a leaf (`entries`: its entry per node); () if
  GaLore does not project it."""
  return tuple(k for k in view.projectors or () if not isinstance(entries[k], optax.MaskedNode))


def _fenced(fn, tree, c):
  """`fn(tree, c)` behind the fence of `layerwise.layer_take` (see there: on CPU a conditional,
  so that XLA neither hoists a float32 copy of the whole leaf nor reads it after the write)."""
  if jax.default_backend() != "cpu":
    return lax.optimization_barrier(fn(tree, c))
  return lax.cond(c >= 0, fn, fn, tree, c)


def _splits(whole, part, n: int, rows: int) -> bool:
  """Whether state entry `whole` is n chunks `part` of `rows` rows each (see `_VocabChunks`)."""
  if isinstance(whole, optax.MaskedNode) or isinstance(part, optax.MaskedNode):
    return isinstance(whole, optax.MaskedNode) and isinstance(part, optax.MaskedNode)
  size, chunk = math.prod(np.shape(whole)), math.prod(np.shape(part))
  return size == n * chunk and chunk % rows == 0 and np.ndim(whole) >= 1


def _vocab_update(
  opt: lw.LeafwiseOptimizer, vc: _VocabChunks, grad_fn, scale, param, entries, shared, aux=()
):
  """Leaf `vc.j` updated one chunk at a time; `grad_fn(c, p_c)` is (chunk c's mean gradient,
  chunk c's term of a sum that starts at `aux`), `p_c` the chunk before its update. A leaf that
  GaLore projects (`vc.bases`) gets its projectors from `_vocab_bases` first; every chunk's
  update then uses them, as this step's refresh if it is one.

  Returns:
    (param, entries, shared, sum of squares of the unclipped gradient, the sum of the terms).
  """
  one = opt._replace(chunks={})  # each chunk is one leaf to the optimizer
  extra, d = {}, opt.layout.single(vc.j)
  if vc.bases:
    new = _vocab_bases(one, vc, grad_fn, scale, param, entries, shared)
    extra = {"galore_bases": lambda: d.unflatten([new]), "galore_sides": d.unflatten([vc.side])}

  def body(carry, c):
    param, entries, _, sq, aux = carry
    p_c, e_c = vc.take_all(param, entries, c)
    g_c, term = grad_fn(c, p_c)
    new_p, new_e, new_shared = one.update(
      [vc.j], scale([g_c]), [p_c], [[e] for e in e_c], shared, **extra
    )
    param, entries = vc.put_all(param, entries, new_p[0], [e[0] for e in new_e], c)
    aux = jax.tree.map(jnp.add, aux, term)
    return (param, entries, new_shared, sq + lw.sq_norm([g_c]), aux), None

  init = (param, entries, shared, jnp.zeros((), jnp.float32), aux)
  return lax.scan(body, init, jnp.arange(vc.n))[0]


def _vocab_bases(
  one: lw.LeafwiseOptimizer, vc: _VocabChunks, grad_fn, scale, param, entries, shared
) -> tuple:
  """This step's GaLore bases of leaf `vc.j`, whose gradient exists one chunk at a time.

  GaLore decides whether the step refreshes: chunk 0 is updated with a zero gradient (a probe
  whose result is dropped but its bases) and `galore_bases`, which GaLore calls inside its
  refresh conditional only. There, pass A: every chunk's gradient is recomputed and its Gram
  matrix summed in float32 (`Σ_c G_c G_cᵀ` for the head's `[D, V]`, `Σ_c G_cᵀ G_c` for the
  embedding's `[V, D]`, `D x D`); its top-`r` eigenvectors (`galore_jax.subspace.
  gram_left_basis`) span the top-`r` singular subspace of the whole gradient that an SVD would
  give, and get GaLore's sign convention as an SVD's basis does (`canonical_sign`, then
  `align_signs` if set), so they equal its vectors up to rounding (the Gram matrix squares the
  gradient's conditioning: see `gram_left_basis`); `subspace_method` is not used for them.
  On other steps the probe returns the current bases and pass A never runs; the probe's other
  outputs are dropped, so XLA removes their computation (a 20M model with a 32,000 vocabulary:
  step time equal, 0.365 s, with the probe and with the bases read from the state instead).

  Signs: an eigenvector's sign is as arbitrary as a singular vector's. At the first refresh it
  would not matter for Adam (moments zero: flipping basis vector i flips row i of `Pᵀ G`, of
  `m`, and of the update in the subspace, and `P` flips it back; `v` is a square), but with
  `on_refresh="keep"` later refreshes meet kept moments, so both paths fix the sign the same
  way, and whole-leaf and chunked steps agree to rounding.
  """
  d, used = one.layout.single(vc.j), []

  def gram_bases():
    used.append(True)

    def add(gram, c):
      p_c = _fenced(lambda p, c: vc.take(p, c, vc.shape), param, c)
      g = scale([grad_fn(c, p_c)[0]])[0].astype(jnp.float32)
      g_DxC = g if vc.axis == 1 else g.T
      return gram + jnp.matmul(g_DxC, g_DxC.T, precision=lax.Precision.HIGHEST), None

    dim = vc.shape[1 - vc.axis]
    gram_DxD = lax.scan(add, jnp.zeros((dim, dim), jnp.float32), jnp.arange(vc.n))[0]
    rank = np.shape(entries[vc.bases[0]])[-1]
    return d.unflatten([(gj.subspace.gram_left_basis(gram_DxD, rank),)])

  p_0, e_0 = vc.take_all(param, entries, 0)
  zero = [jnp.zeros(vc.shape, param.dtype)]
  sides = d.unflatten([vc.side])
  new_e = one.update(
    [vc.j], zero, [p_0], [[e] for e in e_0], shared, galore_bases=gram_bases, galore_sides=sides
  )[1]
  if not used:
    raise ValueError(
      "fused update: GaLore on the LM head / embedding with vocabulary chunks needs the "
      "optimizer to pass update's extra arguments on to scale_by_galore (optax.chain and "
      "optax.inject_hyperparams do); it dropped `galore_bases`."
    )
  return tuple(new_e[k][0] for k in vc.bases)


def _vocab_sq_norm(vc: _VocabChunks, grad_fn, param, aux=()):
  """(Squared norm of leaf `vc.j`'s gradient, the sum of `grad_fn`'s terms from `aux`), chunk
  by chunk (no update); `grad_fn` as `_vocab_update`'s."""

  def body(carry, c):
    sq, aux = carry
    g_c, term = grad_fn(c, _fenced(lambda p, c: vc.take(p, c, vc.shape), param, c))
    return (sq + lw.sq_norm([g_c]), jax.tree.map(jnp.add, aux, term)), None

  return lax.scan(body, (jnp.zeros((), jnp.float32), aux), jnp.arange(vc.n))[0]


class _HeadPass(NamedTuple):
  """The head's loss by vocabulary chunks, before any gradient (see `_head_pass`)."""

  loss_sum: jax.Array
  count: jax.Array
  dh0_BxLxD: jax.Array  # float32 zeros: the start of d loss / d h's sum over the chunks
  kernel_grad: Callable  # (c, kernel_c) -> (d kernel_c in the kernel's dtype, d h term)
  backward: Callable  # d loss / d h (float32) -> (final norm's gradient leaves, d x_last)


def _head_pass(m: _Model, vh: _VocabChunks, params: dict, x_last, tokens_BxL, mask_BxL):
  """The head (final norm, then the LM head `vh` splits) with its kernel only ever read one
  vocabulary chunk at a time: loss and softmax statistics by an online softmax over the chunks
  (`train.losses.vocab_chunked_loss`); each chunk's kernel gradient and term of the hidden
  state's gradient later, from the statistics (`train.losses.vocab_chunk_grads`). So no dot
  ever takes the whole `[D, V]` kernel, which on XLA:CPU (no BF16 dots) would make float32
  copies of it and of its transpose (2.1 GB each at LLaMA-3-8B)."""
  norm = lambda p, x: nnx.merge(m.final_norm, p)(x)
  h_BxLxD, norm_vjp = jax.vjp(norm, params["final_norm"], x_last)
  kernel_DxV = params["lm_head"]["kernel"]
  dtype = h_BxLxD.dtype  # the compute dtype; nnx.Linear casts the kernel to it
  columns = lambda c: _fenced(lambda k, c: vh.take(k, c, vh.shape), kernel_DxV, c).astype(dtype)
  grad_opts = dict(loss_mask_BxL=mask_BxL)
  loss_sum, count, stats = losses.vocab_chunked_loss(
    h_BxLxD, columns, vh.n, tokens_BxL, **grad_opts
  )

  def kernel_grad(c, kernel_DxC):
    dk, dh = losses.vocab_chunk_grads(
      h_BxLxD, kernel_DxC.astype(dtype), stats, tokens_BxL, c * vh.shape[1], **grad_opts
    )
    return dk.astype(dtype), dh  # the chunked loss's kernel gradient is in the compute dtype

  def backward(dh_BxLxD):
    g_norm, dy = norm_vjp(dh_BxLxD.astype(dtype))
    return jax.tree.leaves(g_norm), dy

  dh0 = jnp.zeros(h_BxLxD.shape, jnp.float32)
  return _HeadPass(loss_sum, count, dh0, kernel_grad, backward)


def _embed_grad_rows(dx_BxLxD, tokens_BxL, c, shape):
  """Rows `c * R .. (c + 1) * R - 1` of the embedding's gradient (`shape` `[R, D]`), float32:
  the scatter-add of the input gradient onto the rows of the tokens that fall in them."""
  rows = shape[0]
  idx = tokens_BxL.reshape(-1) - c * rows
  idx = jnp.where((idx >= 0) & (idx < rows), idx, rows)  # others out of range: dropped
  dx = dx_BxLxD.reshape(-1, shape[1]).astype(jnp.float32)
  return jnp.zeros(shape, jnp.float32).at[idx].add(dx, mode="drop")


def _step_single(
  m: _Model,
  opt: lw.LeafwiseOptimizer,
  max_norm: float,
  vocab: dict | None,
  params,
  opt_state,
  tokens_BxL,
  mask_BxL,
):
  """K = 1: one forward, then updates during the backward pass (two passes when clipping).

  With `vocab` (`{HEAD: _VocabChunks, EMBED: _VocabChunks}`), the LM head's kernel and the
  embedding are updated one vocabulary chunk at a time, each chunk's gradient computed just
  before its update: no `[V, D]` gradient exists.
  """
  lay, n = opt.layout, opt.layout.num_layers
  full, nodes, shared, grp = lw.unpack(opt, params, opt_state)
  c = m.config
  cos, sin = rope_tables(tokens_BxL.shape[1], c.head_dim, c.rope_base, c.rope_scaling)
  embed = lambda p: _embed(m, lay.tree(EMBED, p), tokens_BxL)
  x0, embed_vjp = jax.vjp(embed, grp[EMBED].params)
  x_last, xs = _forward(m, lay, grp[LAYERS].params, x0, cos, sin)
  if vocab is None:
    loss_sum, count, g_head, dy = _head_backward(
      m, lay, grp[HEAD].params, x_last, tokens_BxL, mask_BxL
    )
  else:
    vh, ve = vocab[HEAD], vocab[EMBED]
    head = _head_pass(m, vh, lay.tree(HEAD, grp[HEAD].params), x_last, tokens_BxL, mask_BxL)
    loss_sum, count = head.loss_sum, head.count
    k_pos = lay.index[HEAD].index(vh.j)  # the kernel's position in the head group
    rest = lambda xs: [x for i, x in enumerate(xs) if i != k_pos]
  denom = jnp.maximum(count, 1).astype(jnp.float32)
  mean = lambda gs, ps: [(g.astype(jnp.float32) / denom).astype(p.dtype) for g, p in zip(gs, ps)]
  if vocab is None:
    g_head = mean(g_head, grp[HEAD].params)
    g_embed_of = lambda dx0: mean(embed_vjp(dx0)[0], grp[EMBED].params)
  else:

    def kernel_mean(c, k_c):  # (the mean gradient of kernel chunk c, its d h term)
      dk, dh = head.kernel_grad(c, k_c)
      return mean([dk], [k_c])[0], dh

    embed_mean = lambda dx0: (
      lambda c, e_c: (
        mean([_embed_grad_rows(dx0, tokens_BxL, c, ve.shape).astype(e_c.dtype)], [e_c])[0],
        (),
      )
    )
    g_embed_of = None
  read = lambda stacked, i: jax.tree.map(lambda a: a[0], lw.layer_take(stacked, i, n))
  ids = jnp.arange(n)
  e_param = lambda: grp[EMBED].params[lay.index[EMBED].index(ve.j)]
  k_param = lambda: grp[HEAD].params[k_pos]

  dys, scale = None, lambda grads: grads
  if vocab is not None and max_norm > 0:  # the kernel's norm, and d h for pass 1
    sq_k, dh = _vocab_sq_norm(vh, kernel_mean, k_param(), head.dh0_BxLxD)
    g_head, dy = head.backward(dh)
    g_head = mean(g_head, rest(grp[HEAD].params))
  if max_norm > 0:
    # Pass 1, norms only; each block's output gradient is kept (N x B x L x D, like `xs`).
    def norms(carry, i):
      dy, sq = carry
      p_i = lw.layer_take(grp[LAYERS].params, i, n)
      add = lambda which, g, sq: sq + lw.sq_norm(mean(g, [p_i[k] for k in which]))
      return _block_backward(m, lay, p_i, read(xs, i), dy, cos, sin, add, sq), dy

    (dx0, sq), dys = lax.scan(norms, (dy, lw.sq_norm(g_head)), ids, reverse=True)
    if vocab is None:
      sq = sq + lw.sq_norm(_after(g_embed_of, dx0, dx0))  # after the scan, as below
    else:
      sq = sq + _vocab_sq_norm(ve, embed_mean(dx0), e_param())[0] + sq_k
    norm = jnp.sqrt(sq)
    scale = lambda grads: lw.clip_by_norm(grads, norm, max_norm)
  if vocab is None:
    sq0 = lw.sq_norm(g_head)
    new_head, new_shared = lw.update_group(opt, HEAD, scale(g_head), grp[HEAD], shared)
  else:
    # The kernel first: its chunks also sum d h (unless pass 1 did), then the final norm.
    h = grp[HEAD]
    kernel_fn = kernel_mean if max_norm <= 0 else lambda c, k_c: (kernel_mean(c, k_c)[0], ())
    dh0 = head.dh0_BxLxD if max_norm <= 0 else ()
    k, e_k, _, sq_k, dh = _vocab_update(
      opt, vh, kernel_fn, scale, k_param(), [node[k_pos] for node in h.nodes], shared, dh0
    )
    if max_norm <= 0:
      g_head, dy = head.backward(dh)
      g_head = mean(g_head, rest(h.params))
    sq0 = lw.sq_norm(g_head) + sq_k
    others = rest(lay.index[HEAD])
    p_o, e_o, new_shared = opt.update(
      others, scale(g_head), rest(h.params), [rest(node) for node in h.nodes], shared
    )
    p_o.insert(k_pos, k)
    e_o = [[*e[:k_pos], x, *e[k_pos:]] for e, x in zip(e_o, e_k)] if h.nodes else []
    new_head = lw.Group(p_o, e_o)

  def backward(carry, i):
    dy, layers, sq = carry
    p_i = lw.layer_take(layers.params, i, n)
    dy = dy if dys is None else read(dys, i)  # pass 2 recomputes the weight gradients only

    def update(which, g, carry):
      layers, sq = carry
      for pos, k in enumerate(which):
        # One leaf at a time: XLA would otherwise convert every leaf's gradient at once (a
        # float32 copy for the norm and one for GaLore's projection dot, at 8B 1.4 GB for the
        # MLP's three kernels); each gradient is read only once the previous leaf is written.
        mean_k = lambda g, k=k: mean([g], [p_i[k]])[0]
        prev = layers.params[which[pos - 1]] if pos else None
        g_k = mean_k(g[pos]) if prev is None else _after(mean_k, g[pos], prev)
        sq = sq + lw.sq_norm([g_k])
        layers = lw.update_layer(opt, i, [k], scale([g_k]), p_i, layers, shared)
      return layers, sq

    dx, (layers, sq) = _block_backward(m, lay, p_i, read(xs, i), dy, cos, sin, update, (layers, sq))
    return (dx, layers, sq), None

  init = (dy, grp[LAYERS], sq0)
  (dx0_, new_layers, sq_), _ = lax.scan(backward, init, ids, reverse=True)
  dx0 = dx0 if max_norm > 0 else dx0_  # pass 1's when clipping: the gradient that was measured
  if vocab is None:
    g_embed = _after(g_embed_of, dx0, dx0)  # its float32 scatter-add buffer after the scan
    new_embed, _ = lw.update_group(opt, EMBED, scale(g_embed), grp[EMBED], shared)
    sq_ = sq_ + lw.sq_norm(g_embed)
  else:
    e = grp[EMBED]
    e_pos = lay.index[EMBED].index(ve.j)
    if len(e.params) != 1:
      raise ValueError(f"fused update: the embedding group has {len(e.params)} leaves, not 1.")
    table, e_e, _, sq_e, _ = _vocab_update(
      opt, ve, embed_mean(dx0), scale, e.params[e_pos], [node[e_pos] for node in e.nodes], shared
    )
    new_embed = lw.Group([table], [[x] for x in e_e])
    sq_ = sq_ + sq_e
  if max_norm <= 0:
    norm = jnp.sqrt(sq_)
  groups = {HEAD: new_head, LAYERS: new_layers, EMBED: new_embed}
  new_params, new_state = lw.pack(opt, full, nodes, new_shared, groups)
  return new_params, new_state, {"loss": loss_sum / denom, "grad_norm": norm, "tokens": count}


def _step_accumulate(
  m: _Model,
  opt: lw.LeafwiseOptimizer,
  max_norm,
  proj_type,
  accum_dtype,
  params,
  opt_state,
  micro_KxBxL,
  mask_KxBxL,
):
  """K > 1: sum (projected) gradients over the micro-batches, then update block by block."""
  lay, n = opt.layout, opt.layout.num_layers
  full, nodes, shared, grp = lw.unpack(opt, params, opt_state)
  accum, acc0, p0_init = lw.make_accumulator(opt, full, nodes, shared, grp, proj_type, accum_dtype)
  c = m.config
  cos, sin = rope_tables(micro_KxBxL.shape[-1], c.head_dim, c.rope_base, c.rope_scaling)
  ids = jnp.arange(n)
  take = lambda xs, i: lw.layer_take(xs, i, n)
  put = lambda xs, new, i: [lw.layer_put(x, y, i, n) for x, y in zip(xs, new)]

  def micro_batch(carry, inp):
    acc, p0, loss_sum, count = carry
    k, tokens_BxL, mask_BxL = inp
    embed = lambda p: _embed(m, lay.tree(EMBED, p), tokens_BxL)
    x0, embed_vjp = jax.vjp(embed, grp[EMBED].params)
    x_last, xs = _forward(m, lay, grp[LAYERS].params, x0, cos, sin)
    loss_k, count_k, g_head, dy = _head_backward(
      m, lay, grp[HEAD].params, x_last, tokens_BxL, mask_BxL
    )
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
    micro_batch, init, (jnp.arange(micro_KxBxL.shape[0]), micro_KxBxL, mask_KxBxL)
  )

  denom = jnp.maximum(count, 1).astype(jnp.float32)
  norm = jnp.sqrt(sum(lw.sq_norm(a) for a in acc.values())) / denom

  def grads(g, acc_g, p0_g, params):
    out = accum.full(g, acc_g, p0_g, params, 1.0 / denom)
    return lw.clip_by_norm(out, norm, max_norm) if max_norm > 0 else out

  new_head, new_shared = lw.update_group(
    opt, HEAD, grads(HEAD, acc[HEAD], p0[HEAD], grp[HEAD].params), grp[HEAD], shared
  )

  def update_block(layers, i):
    p_i, acc_i, p0_i = take((layers.params, acc[LAYERS], p0[LAYERS]), i)
    g_i = grads(LAYERS, acc_i, p0_i, p_i)
    return lw.update_layer(opt, i, range(len(p_i)), g_i, p_i, layers, shared), None

  new_layers, _ = lax.scan(update_block, grp[LAYERS], ids, reverse=True)
  g_embed = grads(EMBED, acc[EMBED], p0[EMBED], grp[EMBED].params)
  new_embed, _ = lw.update_group(opt, EMBED, g_embed, grp[EMBED], shared)
  groups = {HEAD: new_head, LAYERS: new_layers, EMBED: new_embed}
  new_params, new_state = lw.pack(opt, full, nodes, new_shared, groups)
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
  loss_chunk_size: int = 0,
  vocab_chunk_size: int = 0,
) -> Callable:
  """`update(params, opt_state, tokens_BxL, loss_mask_BxL=None) -> (params, opt_state, metrics)`,
  fused layer-wise.

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
    loss_chunk_size: positions per chunk of the head's loss (`train.losses`; the [B, L, V]
      logits and their gradient never exist); 0 for full logits.
    vocab_chunk_size: with `loss_chunk_size` and K = 1, at most this many vocabulary entries
      per chunk of the LM head (columns) and the embedding (rows): each chunk's gradient is
      computed and the chunk updated at once, so neither `[V, D]` gradient exists; the head's
      loss is then taken by vocabulary chunks too (an online softmax,
      `train.losses.vocab_chunked_loss`; the logits are computed twice, a chunk at a time), so
      no dot reads the whole kernel (on XLA:CPU that would make float32 copies of it). The
      chunk is the largest that divides the vocabulary and splits the optimizer state (8-bit
      blocks must not straddle chunks: 768 columns and 16,032 rows for LLaMA-3's 128,256
      entries with 256-entry blocks). 0: whole leaves. GaLore on the head or the embedding
      (its projector on the D side, as `proj_type="std"` puts it for V > D) chunks too: its
      low-rank moments split like the weight, every chunk uses the whole projector (projected
      on the leaf's side, `galore_sides`), and a refresh step first sums the `D x D` Gram
      matrix of the gradient over the chunks (pass A, recomputing each chunk's gradient) and
      takes its top-r eigenvectors as this step's projector (`galore_bases`); see
      `_vocab_bases`. Otherwise (e.g. `energy_tol`, a V-side projector) the leaf is whole.

  `loss_mask_BxL` (bool, optional) selects the targets that count, as in
  `train.model.next_token_loss` (instruction data: the response tokens).

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
  m = _model_parts(config, loss_chunk_size)
  abstract = nnx.split(nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0))), nnx.Param)[1]
  _validate(tx, abstract, grad_accum_steps, grad_clip_norm, clip_in_subspace, proj_type)
  _validate_vocab(vocab_chunk_size, loss_chunk_size, grad_accum_steps)
  if check_optimizer:
    lw.check_separable(tx, _layout(abstract))

  def update(params, opt_state, tokens_BxL, loss_mask_BxL=None):
    layout = _layout(params)
    view = lw.StateView(opt_state, layout)
    nodes = view.split(opt_state, layout.treedef)[0]
    opt = lw.LeafwiseOptimizer(tx, layout, view, lw.plan_chunks(layout, nodes, view.projectors))
    if grad_accum_steps == 1:
      vocab = _vocab_plan(opt, nodes, params, vocab_chunk_size) if vocab_chunk_size else None
      return _step_single(
        m, opt, grad_clip_norm, vocab, params, opt_state, tokens_BxL, loss_mask_BxL
      )
    split = lambda x: None if x is None else x.reshape(grad_accum_steps, -1, x.shape[-1])
    return _step_accumulate(
      m,
      opt,
      grad_clip_norm,
      proj_type,
      accum_dtype,
      params,
      opt_state,
      split(tokens_BxL),
      split(loss_mask_BxL),
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
    params, opt_state, metrics = update(
      state.params, state.opt_state, batch["tokens"], batch.get("loss_mask")
    )
    rng, _ = jax.random.split(state.rng)
    new = state._replace(step=state.step + 1, params=params, opt_state=opt_state, rng=rng)
    return new, metrics

  return train_step


def _vocab_plan(opt: lw.LeafwiseOptimizer, nodes: list, params, max_size: int) -> dict:
  """`{HEAD: chunks of the LM head's kernel columns, EMBED: chunks of the embedding's rows}`."""
  lay, leaves = opt.layout, opt.layout.leaves(params)
  out = {}
  for g, names, axis in ((HEAD, ("lm_head", "kernel"), 1), (EMBED, None, 0)):
    j = next(j for j in lay.index[g] if names is None or lay.names[j] == names)
    out[g] = _vocab_chunks(opt.tx, opt.view, lay, nodes, leaves[j], j, axis, max_size)
    if out[g].n == 1 and leaves[j].shape[axis] > max_size:
      warnings.warn(
        f"fused update: {'/'.join(map(str, lay.names[j]))} {tuple(leaves[j].shape)} is updated "
        f"whole, not by vocabulary chunks of <= {max_size} entries: its optimizer state does "
        "not split along the vocabulary (e.g. GaLore with energy_tol or proj_type='full', or "
        "8-bit blocks that straddle chunks), so its whole gradient is held at once.",
        stacklevel=3,
      )
  return out


def _validate_vocab(vocab_chunk_size, loss_chunk_size, grad_accum_steps):
  if not isinstance(vocab_chunk_size, int) or vocab_chunk_size < 0:
    raise ValueError(f"fused update: vocab_chunk_size={vocab_chunk_size!r} must be an int >= 0.")
  if vocab_chunk_size and not loss_chunk_size:
    raise ValueError(
      f"fused update: vocab_chunk_size={vocab_chunk_size} needs the chunked loss "
      "(loss_chunk_size > 0): with full logits the head's gradient exists whole anyway."
    )
  if vocab_chunk_size and grad_accum_steps > 1:
    raise ValueError(
      f"fused update: vocab_chunk_size={vocab_chunk_size} needs grad_accum_steps=1 "
      f"(got {grad_accum_steps}): accumulating sums the head's and embedding's whole gradients."
    )


def _validate(tx, abstract_params, grad_accum_steps, grad_clip_norm, clip_in_subspace, proj_type):
  """Clear errors for settings the fused step cannot honour."""
  if not isinstance(grad_accum_steps, int) or grad_accum_steps < 1:
    raise ValueError(f"fused update: grad_accum_steps={grad_accum_steps!r} must be an int >= 1.")
  if not grad_clip_norm >= 0:
    raise ValueError(f"fused update: grad_clip_norm={grad_clip_norm!r} must be >= 0 (0: off).")
  if proj_type is not None and proj_type not in gj.PROJ_TYPES:
    raise ValueError(f"fused update: proj_type={proj_type!r} is not one of {gj.PROJ_TYPES}.")
  state = jax.eval_shape(tx.init, abstract_params)
  is_galore = lambda x: isinstance(x, gj.GaLoreState)
  galore = [x for x in jax.tree.leaves(state, is_leaf=is_galore) if is_galore(x)]
  projected = any(jax.tree.leaves(g.projectors) for g in galore)  # MaskedNodes have no leaves
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
