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

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from galore_jax import projection, subspace
from galore_jax.adam import scale_by_transformers_adam
from galore_jax.masks import resolve_tree
from galore_jax.projection import GaLoreDimensionNumbers

_NO_PARAMS_HINT = (
  "galore: the inner optimizer asked for `params`, but it runs on low-rank projected gradients "
  "whose shapes differ from the parameters, so GaLore never passes them. Put parameter-dependent "
  "transforms (e.g. weight decay) outside GaLore: "
  "optax.chain(gj.galore(inner, ...), optax.add_decayed_weights(...), ...)."
)


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


RefreshStats = subspace.RefreshStats


def _is_dn(x) -> bool:
  return x is None or isinstance(x, GaLoreDimensionNumbers)


def _layouts(params, mask, dimension_numbers, proj_type: str):
  """Per-leaf `MatrixLayout` or None (not projected), from static shapes only."""
  mask_tree = resolve_tree(mask, params)
  dn_tree = resolve_tree(dimension_numbers, params)
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
    return projection.matrix_layout(tuple(jnp.shape(p)), dn, proj_type)

  dn_tree = jax.tree.map(lambda _, d: d, params, dn_tree, is_leaf=_is_dn)
  return jax.tree.map(plan, params, mask_tree, dn_tree, is_leaf=_is_dn)


# Accepted values of the string options (public as galore_jax.PROJ_TYPES etc., for config checks).
PROJ_TYPES = projection.PROJ_TYPES
SUBSPACE_METHODS = subspace.METHODS
ON_REFRESH = ("keep", "reset", "rotate")


class GaLoreOptions(NamedTuple):
  """GaLore's options, with their defaults; documented once, in `scale_by_galore`.

  Every GaLore alias (`galore`, `galore_adamw`, `galore_adamw_8bit`) takes them as keyword
  arguments and lists them in its signature (so `optax.inject_hyperparams` sees each one); they
  are validated once, by `validate_options`, when the transform is built.
  """

  rank: int = 128
  update_proj_gap: int = 200
  scale: float = 0.25
  proj_type: str = "std"
  mask: Any = None
  dimension_numbers: Any = None
  projector_dtype: Any = None
  subspace_method: str = "svd"
  oversample: int = 8
  power_iters: int = 1
  seed: int = 0
  on_refresh: str = "keep"
  align_signs: bool = False
  energy_tol: float | None = None
  max_power_iters: int = subspace.DEFAULT_MAX_POWER_ITERS


def _positive_int(name: str, value) -> None:
  if not isinstance(value, int) or isinstance(value, bool) or value < 1:
    raise ValueError(
      f"galore: `{name}` must be a positive Python int (it fixes state shapes), got {value!r}. "
      "Under optax.inject_hyperparams pass it in static_args=('rank', 'update_proj_gap', "
      "'proj_type', ...)."
    )


def validate_options(options: GaLoreOptions) -> GaLoreOptions:
  """Clear errors for option values the transform cannot honour; returns `options`."""
  _positive_int("rank", options.rank)
  _positive_int("update_proj_gap", options.update_proj_gap)
  choices = (
    ("proj_type", PROJ_TYPES),
    ("subspace_method", SUBSPACE_METHODS),
    ("on_refresh", ON_REFRESH),
  )
  for name, allowed in choices:
    if getattr(options, name) not in allowed:
      raise ValueError(f"galore: {name} must be one of {allowed}, got {getattr(options, name)!r}.")
  if not isinstance(options.align_signs, bool):
    raise ValueError(f"galore: align_signs must be a bool, got {options.align_signs!r}.")
  return options


def make_options(**kwargs) -> GaLoreOptions:
  """`GaLoreOptions` from keyword arguments, validated; unknown names are a clear error."""
  unknown = sorted(set(kwargs) - set(GaLoreOptions._fields))
  if unknown:
    raise TypeError(
      f"galore: unknown option(s) {unknown}; GaLore's options are {list(GaLoreOptions._fields)}."
    )
  return validate_options(GaLoreOptions(**kwargs))


def with_galore_options(fn: Callable) -> Callable:
  """Gives `fn(..., **options)` a signature that lists GaLore's options as keyword arguments.

  `inspect.signature` (which `optax.inject_hyperparams` binds arguments with) then sees each
  option by name, with its default, so injected and static options work as with explicit ones.
  """
  sig = inspect.signature(fn)
  own = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
  names = {p.name for p in own}
  extra = [
    inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default)
    for name, default in GaLoreOptions._field_defaults.items()
    if name not in names
  ]
  fn.__signature__ = sig.replace(parameters=own + extra)
  return fn


_DEFAULTS = GaLoreOptions()


@with_galore_options
def scale_by_galore(
  inner: optax.GradientTransformation | None = None,
  rank: int = _DEFAULTS.rank,
  update_proj_gap: int = _DEFAULTS.update_proj_gap,
  scale: float = _DEFAULTS.scale,
  proj_type: str = _DEFAULTS.proj_type,
  **options,
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
      (each layer of a stacked leaf, each leaf; see `subspace.refresh_leaves`), so its float32
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
      (`subspace.adaptive_left_basis`: a Ky Fan bound, conservative; slowly decaying spectra
      cannot be certified and run to the maximum). The iterations and the certificate of the
      latest refresh are kept in `GaLoreState.refresh_stats`. May be injected.
    max_power_iters: the adaptive iterations' upper bound (an int >= 1; may be injected).

  Returns:
    An `optax.GradientTransformation` with `GaLoreState`.

  All options but `inner` are fields of `GaLoreOptions`; the aliases take the same keywords.

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
  o = make_options(
    rank=rank, update_proj_gap=update_proj_gap, scale=scale, proj_type=proj_type, **options
  )
  if inner is None:
    inner = scale_by_transformers_adam()
  sign = "align" if o.align_signs else "canonical"
  refresh_fn = subspace.make_refresh_fn(
    o.subspace_method,
    o.rank,
    o.oversample,
    o.power_iters,
    sign=sign,
    energy_tol=o.energy_tol,
    max_power_iters=o.max_power_iters,
  )
  with_stats = o.energy_tol is not None

  def flat_plans(tree):
    """Leaves of `tree`, their static layouts (None = full rank) and the treedef."""
    leaves, treedef = jax.tree.flatten(tree)
    plans = treedef.flatten_up_to(_layouts(tree, o.mask, o.dimension_numbers, o.proj_type))
    return leaves, plans, treedef

  def init_fn(params):
    leaves, plans, treedef = flat_plans(params)
    projectors, low = [], []
    for p, plan in zip(leaves, plans):
      if plan is None:
        projectors.append(optax.MaskedNode())
        low.append(p)
        continue
      dtype = o.projector_dtype or jnp.asarray(p).dtype
      shapes = projection.projector_shapes(plan.canon_shape, plan.side, o.rank)
      projectors.append(tuple(jnp.zeros(s, dtype) for s in shapes))
      low_shape = projection.low_rank_shape(plan.canon_shape, plan.side, o.rank)
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
    canon = [None if pl is None else projection.to_matrix(g, pl) for g, pl in zip(leaves, plans)]
    base_key = jax.random.fold_in(jax.random.key(o.seed), state.count)

    def refresh(canon, old, old_stats):
      todo = [i for i, pl in enumerate(plans) if pl is not None]
      items = [(canon[i], old[i], plans[i].side, jax.random.fold_in(base_key, i)) for i in todo]
      new, new_stats = list(old), list(old_stats)
      for i, res in zip(todo, subspace.refresh_leaves(refresh_fn, items, with_stats)):
        new[i], new_stats[i] = res if with_stats else (res, None)
      return new, new_stats

    # One real conditional for the whole tree, outside any vmap, so non-refresh steps never run
    # a factorisation (a batched predicate would turn `cond` into `select` and run both).
    do_refresh = state.count % o.update_proj_gap == 0
    projs, stats = jax.lax.cond(
      do_refresh, refresh, lambda c, old, s: (list(old), list(s)), canon, old, old_stats
    )

    inner_state = state.inner_state
    if o.on_refresh != "keep":
      inner_state = jax.lax.cond(
        do_refresh & (state.count > 0),
        lambda s: _refresh_moments(s, treedef, plans, projs, old, o.on_refresh),
        lambda s: s,
        inner_state,
      )

    low = [
      g if pl is None else projection.project(c, p, pl.side)
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
        full = projection.project_back(n, p, pl.side) * o.scale
        out.append(projection.from_matrix(full, pl).astype(g.dtype))
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
  return projection.rotate_low_rank(mu_or_nu, rotations, side, power=2 if second_moment else 1)


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
        rot = projection.basis_change(pn, po)
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
