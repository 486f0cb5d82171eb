"""GaLore as optax gradient transformations.

`scale_by_galore` projects the gradient of each targeted weight matrix onto a rank-`r` subspace
(refreshed every `update_proj_gap` steps from the current gradient), runs an inner optimizer on the
low-rank gradient, and projects its output back, times `scale`. Leaves that are not targeted go
through the same inner optimizer at full rank, as the reference does for non-GaLore param groups.

References:
  Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection", ICML 2024,
  https://arxiv.org/abs/2403.03507
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from galore_jax import _projector, _subspace

_NO_PARAMS_HINT = (
  "galore: the inner optimizer asked for `params`, but it runs on low-rank projected gradients "
  "whose shapes differ from the parameters, so GaLore never passes them. Put parameter-dependent "
  "transforms (e.g. weight decay) outside GaLore: "
  "optax.chain(gj.galore(inner, ...), optax.add_decayed_weights(...), ...)."
)


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


class GaLoreState(NamedTuple):
  """State of `scale_by_galore`.

  Attributes:
    count: number of updates applied so far (int32); a refresh happens when
      `count % update_proj_gap == 0`, so the first update computes a subspace.
    projectors: a tree shaped like the params; each projected leaf holds a tuple of orthonormal
      bases `P_[batch]xDxR` (one, or two for `proj_type="full"`), others `optax.MaskedNode()`.
    inner_state: the inner optimizer's state, built on the low-rank shapes.
    refresh_stats: None, or with `energy_tol`: a tree like `projectors` whose projected leaves
      hold one `RefreshStats` per basis (`iterations` and certified `energy_estimate` of the
      latest refresh, shaped like the leaf's batch axes); see `galore_refresh_metrics`.
  """

  count: jax.Array
  projectors: Any
  inner_state: optax.OptState
  refresh_stats: Any = None


RefreshStats = _subspace.RefreshStats


class _Plan(NamedTuple):
  """Static per-leaf layout: how to view a leaf as `[batch..., I, O]` and which side to reduce."""

  perm: tuple[int, ...]  # transpose into (batch..., reduction..., output...)
  split_shape: tuple[int, ...]  # shape after the transpose
  canon_shape: tuple[int, ...]  # (batch..., I, O)
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


def _make_plan(shape: tuple[int, ...], dn: GaLoreDimensionNumbers, proj_type: str) -> _Plan:
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
  return _Plan(perm, split_shape, canon, _projector.side_for(proj_type, in_dim, out_dim))


def _to_canonical(x: jax.Array, plan: _Plan) -> jax.Array:
  return jnp.transpose(x, plan.perm).reshape(plan.canon_shape)


def _from_canonical(x: jax.Array, plan: _Plan) -> jax.Array:
  inv = tuple(sorted(range(len(plan.perm)), key=plan.perm.__getitem__))
  return x.reshape(plan.split_shape).transpose(inv)


def _is_dn(x) -> bool:
  return x is None or isinstance(x, GaLoreDimensionNumbers)


def _resolve(tree_or_fn, params):
  return tree_or_fn(params) if callable(tree_or_fn) else tree_or_fn


def _plans(params, mask, dimension_numbers, proj_type: str):
  """Per-leaf `_Plan` or None (not projected), from static shapes only."""
  mask_tree = _resolve(mask, params)
  dn_tree = _resolve(dimension_numbers, params)
  if mask_tree is None:
    mask_tree = jax.tree.map(lambda _: True, params)
  if dn_tree is None or isinstance(dn_tree, GaLoreDimensionNumbers):
    dn_tree = jax.tree.map(lambda _, d=dn_tree: d, params)

  def plan(p, m, dn):
    if not m or p is None:
      return None
    if dn is None:
      if jnp.ndim(p) < 2:
        return None
      dn = GaLoreDimensionNumbers()
    return _make_plan(tuple(jnp.shape(p)), dn, proj_type)

  dn_tree = jax.tree.map(lambda _, d: d, params, dn_tree, is_leaf=_is_dn)
  return jax.tree.map(plan, params, mask_tree, dn_tree, is_leaf=_is_dn)


# Accepted values of the string options (public as galore_jax.PROJ_TYPES etc., for config checks).
PROJ_TYPES = _projector.PROJ_TYPES
SUBSPACE_METHODS = _subspace.METHODS
ON_REFRESH = ("keep", "reset", "rotate")


def _validate_static(rank, update_proj_gap, proj_type, subspace_method, on_refresh):
  for name, value in (("rank", rank), ("update_proj_gap", update_proj_gap)):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      raise ValueError(
        f"galore: `{name}` must be a positive Python int (it fixes state shapes), got {value!r}. "
        "Under optax.inject_hyperparams pass it in static_args=('rank', 'update_proj_gap', "
        "'proj_type', ...)."
      )
  if proj_type not in _projector.PROJ_TYPES:
    raise ValueError(
      f"galore: proj_type must be one of {_projector.PROJ_TYPES}, got {proj_type!r}."
    )
  if subspace_method not in _subspace.METHODS:
    raise ValueError(
      f"galore: subspace_method must be one of {_subspace.METHODS}, got {subspace_method!r}."
    )
  if on_refresh not in ON_REFRESH:
    raise ValueError(f"galore: on_refresh must be one of {ON_REFRESH}, got {on_refresh!r}.")


def scale_by_galore(
  inner: optax.GradientTransformation | None = None,
  rank: int = 128,
  update_proj_gap: int = 200,
  scale: float = 0.25,
  proj_type: str = "std",
  *,
  mask: Any | Callable[[optax.Params], Any] | None = None,
  dimension_numbers: Any = None,
  projector_dtype: Any = None,
  subspace_method: str = "svd",
  oversample: int = 8,
  power_iters: int = 1,
  seed: int = 0,
  on_refresh: str = "keep",
  align_signs: bool = False,
  energy_tol: float | None = None,
  max_power_iters: int = _subspace.DEFAULT_MAX_POWER_ITERS,
) -> optax.GradientTransformation:
  r"""GaLore: runs `inner` on gradients projected onto a refreshed rank-`rank` subspace.

  For a targeted leaf viewed as `G_IxO` (Flax `(in, out)` layout), with `std` reducing the input
  axis when `O >= I` (as the reference does on the torch `[O, I]` weight):

  .. math::
    P_t = \mathrm{top}_r\mathrm{SVD}(G_t) \text{ if } t \bmod T = 0 \text{ else } P_{t-1},\quad
    R_t = P_t^\top G_t,\quad u_t = \alpha\, P_t\, \rho_t(R_t)

  where `ρ` is `inner` and `α = scale`. Non-targeted leaves get `ρ_t(G_t)` unscaled.

  Args:
    inner: optimizer run in the low-rank space (it includes its learning rate if it has one);
      default: the reference's Adam normalisation (`scale_by_transformers_adam()`). It never
      receives `params` (they have full-rank shapes); asking for them raises a clear error.
    rank: subspace rank `r`; clipped per leaf to `min(I, O)` as the reference's thin SVD does.
    update_proj_gap: refresh period `T` in steps. A refresh factorises one matrix at a time
      (each layer of a stacked leaf, each leaf; see `_subspace.refresh_leaves`), so its float32
      workspace is one matrix's, not that of every targeted gradient.
    scale: `α`, multiplies the projected-back update of targeted leaves only.
    proj_type: `"std"` (reduce the smaller dimension; square -> input), `"reverse_std"`,
      `"right"` (reduce the input axis), `"left"` (reduce the output axis), `"full"` (both).
      Names follow the reference's PyTorch layout. Unlike the reference, `reverse_std` projects
      back on the side it projected (the reference mis-selects when `rank >= min(I, O)`).
    mask: pytree of bools or a callable `params -> pytree`; True leaves with ndim >= 2 (or with
      dimension numbers) are projected. Default: all leaves with ndim >= 2. For the paper's
      setup (attention and MLP kernels only) pass `galore_jax.llama_galore_mask`.
    dimension_numbers: None, one `GaLoreDimensionNumbers`, a pytree of them (None entries use
      the default), or a callable `params -> pytree`.
    projector_dtype: storage dtype of the projectors; default each parameter's dtype (the
      reference stores them in the gradient dtype). Subspaces are always computed in float32.
    subspace_method: `"svd"` (exact thin SVD, the reference) or `"randomized"` (warm-started
      randomized subspace iteration; see `oversample`, `power_iters`, `seed`).
    oversample: extra sketch columns for `"randomized"`.
    power_iters: power (subspace) iterations for `"randomized"`; the first refresh (no previous
      basis to start from) runs `max(power_iters, 4)`.
    seed: seed of the `"randomized"` sketches (folded with the step count, the leaf index and,
      for stacked leaves, the layer index; no Python RNG).
    on_refresh: what happens to the inner optimizer's low-rank moments at a refresh: `"keep"`
      (the reference), `"reset"` (zeroed), or `"rotate"` (carried into the new basis, see
      `galore_jax.rotate_moments`).
    align_signs: after a refresh, flip each new basis vector whose dot product with the
      previous one is negative. A singular vector's sign is arbitrary: with `on_refresh="keep"` a
      kept first-moment row can otherwise meet its direction flipped (the canonical sign rule,
      largest-magnitude entry positive, already makes the sign a deterministic function of the
      vector; alignment makes it a function of the history). No effect on the first refresh.
    energy_tol: `"randomized"` only. None: a fixed `power_iters`. A number in (0, 1), e.g.
      0.99: each matrix (each layer of a stack) iterates, from `power_iters` up to
      `max_power_iters` (inside `jit`, a `lax.while_loop`), until an a-posteriori certificate
      says its basis keeps at least this fraction of the exact top-`r` energy
      (`_subspace.adaptive_left_basis`: a Ky Fan bound, conservative; slowly decaying spectra
      cannot be certified and run to the maximum). The iterations and the certificate of the
      latest refresh are kept in `GaLoreState.refresh_stats`. May be injected.
    max_power_iters: the adaptive iterations' upper bound (an int >= 1; may be injected).

  Returns:
    An `optax.GradientTransformation` with `GaLoreState`.

  Example:
    >>> import jax.numpy as jnp, optax, galore_jax as gj
    >>> tx = gj.scale_by_galore(optax.scale_by_adam(), rank=2, update_proj_gap=10)
    >>> params = {"w": jnp.ones((4, 6))}
    >>> state = tx.init(params)
    >>> updates, state = tx.update({"w": jnp.ones((4, 6))}, state)
    >>> state.inner_state.mu["w"].shape  # `std`: O=6 >= I=4, so the input axis is reduced
    (2, 6)

  References:
    Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection",
    https://arxiv.org/abs/2403.03507
  """
  _validate_static(rank, update_proj_gap, proj_type, subspace_method, on_refresh)
  if inner is None:
    inner = scale_by_transformers_adam()
  if not isinstance(align_signs, bool):
    raise ValueError(f"galore: align_signs must be a bool, got {align_signs!r}.")
  refresh_fn = _subspace.make_refresh_fn(
    subspace_method,
    rank,
    oversample,
    power_iters,
    sign="align" if align_signs else "canonical",
    energy_tol=energy_tol,
    max_power_iters=max_power_iters,
  )
  with_stats = energy_tol is not None

  def flat_plans(tree):
    """Leaves of `tree`, their static plans (None = full rank) and the treedef."""
    leaves, treedef = jax.tree.flatten(tree)
    plans = treedef.flatten_up_to(_plans(tree, mask, dimension_numbers, proj_type))
    return leaves, plans, treedef

  def init_fn(params):
    leaves, plans, treedef = flat_plans(params)
    projectors, low = [], []
    for p, plan in zip(leaves, plans):
      if plan is None:
        projectors.append(optax.MaskedNode())
        low.append(p)
        continue
      dtype = projector_dtype or jnp.asarray(p).dtype
      shapes = _projector.projector_shapes(plan.canon_shape, plan.side, rank)
      projectors.append(tuple(jnp.zeros(s, dtype) for s in shapes))
      low_shape = _projector.low_rank_shape(plan.canon_shape, plan.side, rank)
      low.append(jnp.zeros(low_shape, jnp.asarray(p).dtype))
    inner_state = inner.init(treedef.unflatten(low))
    stats = None
    if with_stats:
      stats = treedef.unflatten(
        [
          optax.MaskedNode() if pl is None else _zero_stats(pl.canon_shape[:-2], len(pr))
          for pl, pr in zip(plans, projectors)
        ]
      )
    return GaLoreState(jnp.zeros([], jnp.int32), treedef.unflatten(projectors), inner_state, stats)

  def update_fn(updates, state, params=None):
    del params  # never forwarded: the inner optimizer sees low-rank shapes.
    leaves, plans, treedef = flat_plans(updates)
    old = treedef.flatten_up_to(state.projectors)
    old_stats = treedef.flatten_up_to(state.refresh_stats) if with_stats else [None] * len(old)
    canon = [None if pl is None else _to_canonical(g, pl) for g, pl in zip(leaves, plans)]
    base_key = jax.random.fold_in(jax.random.key(seed), state.count)

    def refresh(canon, old, old_stats):
      todo = [i for i, pl in enumerate(plans) if pl is not None]
      items = [(canon[i], old[i], plans[i].side, jax.random.fold_in(base_key, i)) for i in todo]
      new, new_stats = list(old), list(old_stats)
      for i, res in zip(todo, _subspace.refresh_leaves(refresh_fn, items, with_stats)):
        new[i], new_stats[i] = res if with_stats else (res, None)
      return new, new_stats

    # One real conditional for the whole tree, outside any vmap, so non-refresh steps never run
    # a factorisation (a batched predicate would turn `cond` into `select` and run both).
    do_refresh = state.count % update_proj_gap == 0
    projs, stats = jax.lax.cond(
      do_refresh, refresh, lambda c, o, s: (list(o), list(s)), canon, old, old_stats
    )

    inner_state = state.inner_state
    if on_refresh != "keep":
      inner_state = jax.lax.cond(
        do_refresh & (state.count > 0),
        lambda s: _refresh_moments(s, treedef, plans, projs, old, on_refresh),
        lambda s: s,
        inner_state,
      )

    low = [
      g if pl is None else _projector.project(c, p, pl.side)
      for g, c, pl, p in zip(leaves, canon, plans, projs)
    ]
    try:
      low_updates, inner_state = inner.update(treedef.unflatten(low), inner_state, None)
    except ValueError as e:
      if "params" in str(e):
        raise ValueError(_NO_PARAMS_HINT) from e
      raise

    out = []
    for n, g, pl, p in zip(treedef.flatten_up_to(low_updates), leaves, plans, projs):
      if pl is None:
        out.append(n.astype(g.dtype))
      else:
        full = _projector.project_back(n, p, pl.side) * scale
        out.append(_from_canonical(full, pl).astype(g.dtype))
    new_state = GaLoreState(
      optax.safe_increment(state.count),
      treedef.unflatten(projs),
      inner_state,
      treedef.unflatten(stats) if with_stats else None,
    )
    return treedef.unflatten(out), new_state

  return optax.GradientTransformation(init_fn, update_fn)


def _zero_stats(batch: tuple[int, ...], n_bases: int) -> tuple:
  """Placeholder stats before the first refresh: 0 iterations, estimate 0."""
  zero = RefreshStats(jnp.zeros(batch, jnp.int32), jnp.zeros(batch, jnp.float32))
  return (zero,) * n_bases


def galore_refresh_metrics(opt_state: optax.OptState) -> dict[str, jax.Array]:
  """Summary of the latest refresh of every `GaLoreState` with `refresh_stats` in `opt_state`.

  Over all projected matrices (each layer of a stacked leaf, each basis): the mean and largest
  subspace iterations used and the smallest and mean certified energy fraction. Jit-friendly;
  `{}` when no state has stats (no `energy_tol`).

  Example:
    >>> import jax.numpy as jnp, optax, galore_jax as gj
    >>> tx = gj.galore(optax.sgd(1.0), rank=2, subspace_method="randomized", energy_tol=0.99)
    >>> state = tx.init({"w": jnp.ones((4, 6))})
    >>> _, state = tx.update({"w": jnp.ones((4, 6))}, state)
    >>> float(gj.galore_refresh_metrics(state)["refresh_energy_min"]) >= 0.99
    True
  """
  is_stats = lambda x: isinstance(x, RefreshStats)
  found = [
    s
    for g in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, GaLoreState))
    if isinstance(g, GaLoreState) and g.refresh_stats is not None
    for s in jax.tree.leaves(g.refresh_stats, is_leaf=is_stats)
    if is_stats(s)
  ]
  if not found:
    return {}
  iters = jnp.concatenate([jnp.ravel(s.iterations) for s in found]).astype(jnp.float32)
  est = jnp.concatenate([jnp.ravel(s.energy_estimate) for s in found])
  return {
    "refresh_iters_mean": jnp.mean(iters),
    "refresh_iters_max": jnp.max(iters),
    "refresh_energy_min": jnp.min(est),
    "refresh_energy_mean": jnp.mean(est),
  }


def rotate_moments(mu_or_nu, rotations, side: str, second_moment: bool):
  """Carries one low-rank moment into a new basis at a refresh (`on_refresh="rotate"`).

  The first moment is linear in the gradient, so `m_new = Q m_old` with `Q = P_newᵀ P_old` is
  exact for the part of `m` that lies in the new subspace. The second moment is a per-coordinate
  mean of squares and has no exact linear transport; we use `v_new = Q∘Q v_old` (element-wise
  squared rotation), which keeps `v >= 0`, is exact when the bases differ by a signed permutation
  (e.g. sign flips or reordered singular vectors) and otherwise mixes old variances with the
  weights `Q_rs²` whose rows sum to at most 1.
  """
  return _projector.rotate_low_rank(mu_or_nu, rotations, side, power=2 if second_moment else 1)


def _refresh_moments(inner_state, treedef, plans, new_projs, old_projs, on_refresh):
  """Resets or rotates every `mu`/`nu` field (Adam-like moments) of the inner state."""

  def has_moments(x):
    return hasattr(x, "_fields") and ("mu" in x._fields or "nu" in x._fields)

  def fix(field, tree):
    leaves = treedef.flatten_up_to(tree)
    out = []
    for x, pl, pn, po in zip(leaves, plans, new_projs, old_projs):
      if pl is None:
        out.append(x)
      elif not hasattr(x, "shape"):
        raise ValueError(
          f"galore: on_refresh={on_refresh!r} cannot transform a {type(x).__name__} moment "
          "(e.g. 8-bit quantised states); use on_refresh='keep'."
        )
      elif on_refresh == "reset":
        out.append(jnp.zeros_like(x))
      else:
        rot = _projector.basis_change(pn, po)
        out.append(rotate_moments(x, rot, pl.side, second_moment=field == "nu"))
    return treedef.unflatten(out)

  found = []

  def visit(node):
    if not has_moments(node):
      return node
    found.append(type(node).__name__)
    fields = {f: fix(f, getattr(node, f)) for f in ("mu", "nu") if f in node._fields}
    return node._replace(**fields)

  out = jax.tree.map(visit, inner_state, is_leaf=has_moments)
  if not found:
    raise ValueError(
      f"galore: on_refresh={on_refresh!r} needs an inner state with `mu`/`nu` fields "
      f"(Adam-like); {type(inner_state).__name__} has none. Use on_refresh='keep'."
    )
  return out


def _one_minus_pow(beta, t: jax.Array) -> jax.Array:
  """`1 - beta**t` without float32 cancellation: `-expm1(t log(beta))`, `log` in float64 when
  `beta` is a Python number (`1 - 0.999**1` in float32 is off by 1.3e-5 relative; the reference
  computes it in double precision)."""
  t = t.astype(jnp.float32)
  if isinstance(beta, (int, float)):
    return -jnp.expm1(t * math.log(beta)) if beta > 0 else jnp.ones_like(t)
  return -jnp.expm1(t * jnp.log(jnp.asarray(beta, jnp.float32)))


class ScaleByTransformersAdamState(NamedTuple):
  """State of `scale_by_transformers_adam`."""

  count: jax.Array
  mu: optax.Updates
  nu: optax.Updates


def scale_by_transformers_adam(
  b1: float = 0.9, b2: float = 0.999, eps: float = 1e-6, mu_dtype: Any = None
) -> optax.GradientTransformation:
  r"""Adam as in transformers' legacy `AdamW` (the optimizer `galore_torch.GaLoreAdamW` forks).

  .. math::
    m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t,\quad v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2,\quad
    u_t = \frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}\,\frac{m_t}{\sqrt{v_t} + \epsilon}

  `ε` is added to the square root of the *uncorrected* second moment, so it acts like
  `ε / sqrt(1-β₂ᵗ)` in `optax.scale_by_adam`'s placement. Moments are kept in the gradient's dtype
  (bf16 in the paper's pure-bf16 runs) unless `mu_dtype` is given for the first moment.

  Args:
    b1: first-moment decay.
    b2: second-moment decay.
    eps: added to `sqrt(v)`; the reference's default is 1e-6.
    mu_dtype: optional dtype of the first moment.

  Returns:
    An `optax.GradientTransformation` (no learning rate; chain `optax.scale_by_learning_rate`).

  References:
    Loshchilov & Hutter, "Decoupled Weight Decay Regularization", https://arxiv.org/abs/1711.05101
  """

  def init_fn(params):
    mu = jax.tree.map(lambda p: jnp.zeros_like(p, dtype=mu_dtype or jnp.asarray(p).dtype), params)
    nu = jax.tree.map(jnp.zeros_like, params)
    return ScaleByTransformersAdamState(jnp.zeros([], jnp.int32), mu, nu)

  def update_fn(updates, state, params=None):
    del params
    mu = jax.tree.map(lambda m, g: (b1 * m + (1 - b1) * g).astype(m.dtype), state.mu, updates)
    nu = jax.tree.map(lambda v, g: (b2 * v + (1 - b2) * g * g).astype(v.dtype), state.nu, updates)
    count = optax.safe_increment(state.count)
    step = jnp.sqrt(_one_minus_pow(b2, count)) / _one_minus_pow(b1, count)
    new = jax.tree.map(
      lambda m, v, g: (step * m / (jnp.sqrt(v) + eps)).astype(g.dtype), mu, nu, updates
    )
    return new, ScaleByTransformersAdamState(count, mu, nu)

  return optax.GradientTransformation(init_fn, update_fn)


def add_decayed_weights_after_update(
  weight_decay: float = 0.0,
  learning_rate: optax.ScalarOrSchedule = 1.0,
  mask: Any | Callable[[optax.Params], Any] | None = None,
) -> optax.GradientTransformation:
  """Decoupled weight decay applied *after* the update, as `GaLoreAdamW` does.

  The reference runs `p <- p + u` then `p <- p - lr * wd * p`. As one update that is
  `u - lr * wd * (p + u)`. Place it last in a chain, after the learning rate was applied.

  Args:
    weight_decay: decay coefficient `wd`.
    learning_rate: the (unscaled) learning rate or schedule, evaluated at the same step count as
      `optax.scale_by_learning_rate` in the same chain.
    mask: optional pytree/callable of bools: which leaves decay (default: all).

  Returns:
    An `optax.GradientTransformation` that needs `params`.
  """

  def init_fn(params):
    del params
    return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("add_decayed_weights_after_update needs `params` in update().")
    lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
    mask_tree = _resolve(mask, params)
    if mask_tree is None:
      mask_tree = jax.tree.map(lambda _: True, params)

    def decay(u, p, m):
      if not m:
        return u
      return (u - lr * weight_decay * (p + u)).astype(u.dtype)

    new = jax.tree.map(decay, updates, params, mask_tree)
    return new, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

  return optax.GradientTransformation(init_fn, update_fn)


def galore(
  inner: optax.GradientTransformation,
  rank: int = 128,
  update_proj_gap: int = 200,
  scale: float = 0.25,
  proj_type: str = "std",
  *,
  mask: Any | Callable[[optax.Params], Any] | None = None,
  dimension_numbers: Any = None,
  projector_dtype: Any = None,
  subspace_method: str = "svd",
  oversample: int = 8,
  power_iters: int = 1,
  seed: int = 0,
  on_refresh: str = "keep",
  align_signs: bool = False,
  energy_tol: float | None = None,
  max_power_iters: int = _subspace.DEFAULT_MAX_POWER_ITERS,
) -> optax.GradientTransformation:
  """Wraps any optax optimizer so that it runs in GaLore's low-rank space.

  Use this instead of `optax.chain(galore(...), adam(...))`: in a chain, `adam` would be
  initialised on the full-size params and would receive the already projected-back updates.
  Here `inner` is initialised on the low-rank shapes and runs on the projected gradients.

  Args:
    inner: any optax optimizer, e.g. `optax.adam(1e-3)` or `optax.adafactor(1e-2)`; it must not
      need `params` (chain weight decay after `galore` instead).
    rank: subspace rank.
    update_proj_gap: refresh period in steps.
    scale: multiplies the projected-back update of targeted leaves.
    proj_type: see `scale_by_galore`.
    mask: which leaves are projected; see `scale_by_galore`.
    dimension_numbers, projector_dtype, subspace_method, oversample, power_iters, seed,
      on_refresh, align_signs, energy_tol, max_power_iters: see `scale_by_galore`.

  Returns:
    An `optax.GradientTransformation`.

  Example:
    >>> import optax, galore_jax as gj
    >>> tx = optax.chain(optax.clip_by_global_norm(1.0),
    ...                  gj.galore(optax.adam(1e-3), rank=128, update_proj_gap=200, scale=0.25))

  References:
    Zhao et al., https://arxiv.org/abs/2403.03507
  """
  return scale_by_galore(
    inner,
    rank,
    update_proj_gap,
    scale,
    proj_type,
    mask=mask,
    dimension_numbers=dimension_numbers,
    projector_dtype=projector_dtype,
    subspace_method=subspace_method,
    oversample=oversample,
    power_iters=power_iters,
    seed=seed,
    on_refresh=on_refresh,
    align_signs=align_signs,
    energy_tol=energy_tol,
    max_power_iters=max_power_iters,
  )


def galore_adamw(
  learning_rate: optax.ScalarOrSchedule,
  rank: int = 128,
  update_proj_gap: int = 200,
  scale: float = 0.25,
  proj_type: str = "std",
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-6,
  weight_decay: float = 0.0,
  mask: Any | Callable[[optax.Params], Any] | None = None,
  *,
  dimension_numbers: Any = None,
  projector_dtype: Any = None,
  subspace_method: str = "svd",
  oversample: int = 8,
  power_iters: int = 1,
  seed: int = 0,
  on_refresh: str = "keep",
  align_signs: bool = False,
  energy_tol: float | None = None,
  max_power_iters: int = _subspace.DEFAULT_MAX_POWER_ITERS,
) -> optax.GradientTransformation:
  """`galore_torch.GaLoreAdamW`, exactly.

  Transformers-style Adam (`scale_by_transformers_adam`: eps on `sqrt` of the uncorrected second
  moment, bias correction folded into the step size) on the low-rank gradients of the masked
  leaves and at full rank on the others; `scale` only on projected leaves; decoupled weight decay
  `lr * wd * p` on every leaf, applied after the update; moments kept across refreshes.

  Args:
    learning_rate: learning rate or schedule.
    rank: subspace rank.
    update_proj_gap: refresh period in steps.
    scale: GaLore's `α`.
    proj_type: see `scale_by_galore`.
    b1: first-moment decay.
    b2: second-moment decay.
    eps: added to `sqrt(v)` (reference default 1e-6).
    weight_decay: decoupled decay coefficient.
    mask: which leaves are projected (see `scale_by_galore`); `galore_jax.llama_galore_mask`
      reproduces the paper's attention + MLP selection.
    dimension_numbers, projector_dtype, subspace_method, oversample, power_iters, seed,
      on_refresh, align_signs, energy_tol, max_power_iters: see `scale_by_galore`.

  Under `optax.inject_hyperparams`, declare the shape-fixing arguments static:
  `static_args=("rank", "update_proj_gap", "proj_type", "mask")`.

  Returns:
    An `optax.GradientTransformation`.

  Example:
    >>> import galore_jax as gj
    >>> tx = gj.galore_adamw(1e-2, rank=128, update_proj_gap=200, scale=0.25,
    ...                      mask=gj.llama_galore_mask)

  References:
    Zhao et al., https://arxiv.org/abs/2403.03507
  """
  return optax.chain(
    scale_by_galore(
      scale_by_transformers_adam(b1, b2, eps),
      rank,
      update_proj_gap,
      scale,
      proj_type,
      mask=mask,
      dimension_numbers=dimension_numbers,
      projector_dtype=projector_dtype,
      subspace_method=subspace_method,
      oversample=oversample,
      power_iters=power_iters,
      seed=seed,
      on_refresh=on_refresh,
      align_signs=align_signs,
      energy_tol=energy_tol,
      max_power_iters=max_power_iters,
    ),
    optax.scale_by_learning_rate(learning_rate),
    add_decayed_weights_after_update(weight_decay, learning_rate),
  )


def galore_mask_by_path(params: optax.Params, patterns: tuple[str, ...] = ("attn", "mlp")) -> Any:
  """True for leaves with ndim >= 2 whose `/`-joined key path contains any of `patterns`.

  This is the reference's rule (`"attn" in name or "mlp" in name` over module names).
  """

  def keep(path, leaf):
    name = "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)
    return jnp.ndim(leaf) >= 2 and any(pat in name for pat in patterns)

  return jax.tree_util.tree_map_with_path(keep, params)


def llama_galore_mask(params: optax.Params) -> Any:
  """The paper's targets: attention and MLP kernels of the LLaMA (paths containing attn/mlp)."""
  return galore_mask_by_path(params, ("attn", "mlp"))
