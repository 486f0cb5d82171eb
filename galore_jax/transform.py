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
from jax.sharding import AxisType

from galore_jax import projection, subspace, targets
from galore_jax.adam import scale_by_transformers_adam
from galore_jax.masks import leaf_entries, path_names

_NEEDS_PARAMS = (
  "galore: the inner optimizer needs `params` (e.g. weight decay or Adafactor's parameter "
  "scale): pass them, `tx.update(grads, state, params)`; GaLore hands the inner optimizer each "
  "projected leaf's low-rank coordinates `Pᵀ W`."
)


class GaLoreState(NamedTuple):
  """State of `scale_by_galore`.

  Every field is a tree of arrays laid out like the params, one array per parameter position
  (the optax convention): frameworks that wrap each parameter position of an optimizer state in
  a container of their own (`flax.nnx.Optimizer`) and `optax.tree_utils.tree_map_params` see the
  same structure after every update.

  Attributes:
    count: number of updates applied so far (int32); a refresh happens when
      `count % update_proj_gap == 0`, so the first update computes a subspace.
    projectors: a tuple of trees shaped like the params, one per basis: `(bases,)`, or
      `(input-axis bases, output-axis bases)` for `proj_type="full"`. A projected leaf holds an
      orthonormal basis `P_[batch]xDxR`, other leaves `optax.MaskedNode()`.
    inner_state: the inner optimizer's state, built on the low-rank shapes.
    refresh_stats: None, or with `energy_tol`: a `RefreshStats` of two trees shaped like the
      params; a projected leaf holds the `iterations` and the certified `energy_estimate` of the
      latest refresh, shaped `[*batch, num_bases]`, other leaves `MaskedNode()`; see
      `galore_refresh_metrics`.
  """

  count: jax.Array
  projectors: tuple
  inner_state: optax.OptState
  refresh_stats: Any = None


RefreshStats = subspace.RefreshStats


# Accepted values of the string options (public as galore_jax.PROJ_TYPES etc., for config checks).
PROJ_TYPES = projection.PROJ_TYPES
SUBSPACE_METHODS = subspace.METHODS
ON_REFRESH = ("keep", "reset", "rotate")

# Options that fix state shapes or the program's structure: under `optax.inject_hyperparams`
# they must be static (`static_args(factory)` picks those a factory takes). Every other numeric
# option (`scale`, `power_iters`, `seed`, `energy_tol`, `max_power_iters`, and the aliases'
# learning rate, betas, eps, weight decay) can be injected.
STATIC_ARGS = (
  "rank",
  "update_proj_gap",
  "proj_type",
  "mask",
  "dimension_numbers",
  "projector_dtype",
  "subspace_method",
  "oversample",
  "on_refresh",
  "align_signs",
  "block_size",
  "min_8bit_size",
  "float32_mask",
)


def static_args(factory: Callable) -> tuple[str, ...]:
  """The arguments of `factory` (a galore-jax alias) that `optax.inject_hyperparams` must keep
  static: those of `STATIC_ARGS` that it takes.

  Example:
    >>> import optax, galore_jax as gj
    >>> static = gj.static_args(gj.galore_adamw)
    >>> make = optax.inject_hyperparams(gj.galore_adamw, static_args=static)
    >>> tx = make(learning_rate=1e-3, rank=64, subspace_method="randomized")
  """
  params = inspect.signature(factory).parameters
  return tuple(name for name in STATIC_ARGS if name in params)


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


def _static_int(name: str, value, low: int = 1) -> None:
  if not isinstance(value, int) or isinstance(value, bool) or value < low:
    raise ValueError(
      f"galore: `{name}` must be a Python int >= {low} (it fixes state shapes), got {value!r}. "
      "Under optax.inject_hyperparams list it in static_args (galore_jax.static_args(factory) "
      "lists every shape-fixing option)."
    )


def validate_options(options: GaLoreOptions) -> GaLoreOptions:
  """Clear errors for option values the transform cannot honour; returns `options`."""
  _static_int("rank", options.rank)
  _static_int("update_proj_gap", options.update_proj_gap)
  choices = (
    ("proj_type", PROJ_TYPES),
    ("subspace_method", SUBSPACE_METHODS),
    ("on_refresh", ON_REFRESH),
  )
  for name, allowed in choices:
    if not isinstance(getattr(options, name), str) or getattr(options, name) not in allowed:
      raise ValueError(f"galore: {name} must be one of {allowed}, got {getattr(options, name)!r}.")
  if not isinstance(options.align_signs, bool):
    raise ValueError(
      f"galore: align_signs must be a Python bool, got {options.align_signs!r} (under "
      "optax.inject_hyperparams list it in static_args: galore_jax.static_args(factory))."
    )
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
      default: the reference's Adam normalisation (`scale_by_transformers_adam()`). If it reads
      `params` (weight decay, a parameter scale), it gets `Pᵀ W` for each projected leaf (the
      weight's coordinates in the subspace, shaped like the low-rank gradient) and the weight
      itself for the others; optimizers that do not read them never cost that projection.
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
      dimension numbers) are projected, leading axes beyond two being stacked layers unless
      `dimension_numbers` say otherwise. Default: floating-point leaves with exactly two axes
      (more axes need a mask or dimension numbers; such leaves are left at full rank with a
      warning). For the paper's setup (attention and MLP kernels only) pass
      `galore_jax.llama_galore_mask`. A leaf where GaLore would hold more state than Adam (a
      rank too large for the matrix; the rank is clipped to `min(I, O)`) is warned about at
      `init`; `galore_jax.galore_targets` lists every leaf's plan.
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
    An `optax.GradientTransformationExtraArgs` with `GaLoreState`. Its `update` takes two extra
    keyword arguments (optax's chains forward them), for a caller that never holds a leaf's whole
    gradient at once and updates it by chunks along the axis that GaLore keeps (each chunk one
    call, with its slice of the low-rank state and the whole projector):

    * `galore_sides`: None, or a tree shaped like the updates, each entry None (the side rule of
      `proj_type`) or the side (`"in"`, `"out"`, `"both"`, see `galore_jax.projection`) to
      project that leaf on: a chunk's shape can fall on the other side of the rule than the
      whole matrix's (e.g. `[D, V / n]` with `V / n < D`), and must be projected as the whole.

    * `galore_bases`: None, or a callable `() -> tree` shaped like the updates, each entry None
      (refresh from the gradient, as usual) or the leaf's new bases (an array or a tuple like
      its `GaLoreState.projectors` entries, any float dtype; e.g. the top-`r` eigenvectors of
      `G Gᵀ` summed over column chunks of `G`, see `subspace.gram_left_basis`). It is called
      inside the refresh's conditional only, so whatever it computes runs on refresh steps
      only; the bases get the transform's sign convention (canonical, then `align_signs`) and
      stand for this step's subspace: `on_refresh` and the update use them as they would an
      SVD's (with `energy_tol` they are reported as exact: 0 iterations, energy 1).

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
  num_bases = 2 if o.proj_type == "full" else 1

  def flat_plans(tree, warn=False):
    """Leaves of `tree`, their static layouts (None = full rank) and the treedef."""
    leaves, plans, treedef, rows = targets.plan_leaves(
      tree, o.mask, o.dimension_numbers, o.proj_type, o.rank, o.projector_dtype
    )
    if warn:
      targets.warn_about(rows)
    return leaves, plans, treedef

  def per_leaf(trees, treedef):
    """A tuple of parameter-shaped trees -> per leaf, the tuple of its entries."""
    return list(zip(*(leaf_entries(t, treedef) for t in trees)))

  def per_tree(entries, plans, treedef, n):
    """The inverse of `per_leaf`; leaves that are not projected get `MaskedNode`s."""
    return tuple(
      treedef.unflatten(
        [optax.MaskedNode() if pl is None else e[k] for e, pl in zip(entries, plans)]
      )
      for k in range(n)
    )

  def init_fn(params):
    check_auto_sharding(params, "parameter")
    leaves, plans, treedef = flat_plans(params, warn=True)
    projectors, low = [], []
    for p, plan in zip(leaves, plans):
      if plan is None:
        projectors.append(None)
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
      zero = [None if pl is None else _zero_stats(pl.canon_shape[:-2], num_bases) for pl in plans]
      stats = RefreshStats(*per_tree(zero, plans, treedef, 2))
    projs = per_tree(projectors, plans, treedef, num_bases)
    return GaLoreState(jnp.zeros([], jnp.int32), projs, inner_state, stats)

  def update_fn(updates, state, params=None, *, galore_bases=None, galore_sides=None, **extra):
    del extra  # meant for other transforms of a chain
    check_auto_sharding(updates, "gradient")
    leaves, plans, treedef = flat_plans(updates)
    if galore_sides is not None:
      plans = [_with_side(pl, s) for pl, s in zip(plans, treedef.flatten_up_to(galore_sides))]
    old = per_leaf(state.projectors, treedef)
    if with_stats:
      old_stats = per_leaf(state.refresh_stats, treedef)
      old_stats = [None if pl is None else RefreshStats(*s) for s, pl in zip(old_stats, plans)]
    else:
      old_stats = [None] * len(old)
    canon = [None if pl is None else projection.to_matrix(g, pl) for g, pl in zip(leaves, plans)]
    base_key = jax.random.fold_in(jax.random.key(o.seed), state.count)

    def refresh(canon, old, old_stats):
      given = [None] * len(plans) if galore_bases is None else treedef.flatten_up_to(galore_bases())
      todo = [i for i, pl in enumerate(plans) if pl is not None and given[i] is None]
      items = [(canon[i], old[i], plans[i].side, jax.random.fold_in(base_key, i)) for i in todo]
      new, new_stats = list(old), list(old_stats)
      for i in [i for i, pl in enumerate(plans) if pl is not None and given[i] is not None]:
        new[i] = _given_bases(given[i], old[i], o.align_signs)
        if with_stats:  # exact, as the SVD's: 0 iterations, all of the energy
          shape = (*plans[i].canon_shape[:-2], num_bases)
          new_stats[i] = RefreshStats(jnp.zeros(shape, jnp.int32), jnp.ones(shape, jnp.float32))
      for i, res in zip(todo, subspace.refresh_leaves(refresh_fn, items, with_stats)):
        if with_stats:
          new[i], per_basis = res
          new_stats[i] = RefreshStats(*(jnp.stack(x, axis=-1) for x in zip(*per_basis)))
        else:
          new[i] = res
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
    low_params = None
    if params is not None:
      # What the inner optimizer sees as the parameter of a projected leaf: its coordinates in
      # the subspace, `Pᵀ W` (shaped like the low-rank gradient). Weight decay inside `inner`
      # then decays the weight's component in the subspace (times `scale`), and a parameter
      # scale (Adafactor's) uses `RMS(Pᵀ W)`, which equals `RMS(W)` in expectation for a
      # subspace independent of W. Computed only when `inner` reads params.
      low_params = treedef.unflatten(
        [
          w if pl is None else projection.project(projection.to_matrix(w, pl), p, pl.side)
          for w, pl, p in zip(treedef.flatten_up_to(params), plans, projs)
        ]
      )
    low_updates, inner_state = _inner_update(inner, treedef.unflatten(low), inner_state, low_params)

    out = []
    for n, g, pl, p in zip(treedef.flatten_up_to(low_updates), leaves, plans, projs):
      if pl is None:
        out.append(n.astype(g.dtype))
      else:
        full = projection.project_back(n, p, pl.side) * o.scale
        out.append(projection.from_matrix(full, pl).astype(g.dtype))
    new_stats = None
    if with_stats:
      stats_entries = [None if pl is None else tuple(s) for s, pl in zip(stats, plans)]
      new_stats = RefreshStats(*per_tree(stats_entries, plans, treedef, 2))
    new_state = GaLoreState(
      optax.safe_increment(state.count),
      per_tree(projs, plans, treedef, num_bases),
      inner_state,
      new_stats,
    )
    return treedef.unflatten(out), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _with_side(plan, side):
  """`plan` with the side given by `galore_sides` (None: unchanged)."""
  if side is None:
    return plan
  if plan is None or side not in projection.SIDES:
    raise ValueError(
      f"galore: galore_sides gave {side!r} for a leaf that GaLore "
      f"{'does not project' if plan is None else 'projects'}; sides are {projection.SIDES}."
    )
  return plan._replace(side=side)


def _given_bases(bases, old: tuple, align: bool) -> tuple:
  """Bases handed to a refresh (`galore_bases`), with the sign convention and dtypes of one that
  the transform computes: canonical sign, then alignment with `old` when `align`."""
  bases = (bases,) if not isinstance(bases, (tuple, list)) else tuple(bases)
  if [b.shape for b in bases] != [p.shape for p in old]:
    raise ValueError(
      f"galore: galore_bases gave bases {[b.shape for b in bases]} for projectors "
      f"{[p.shape for p in old]}."
    )
  out = []
  for b, p in zip(bases, old):
    b = projection.canonical_sign(b.astype(jnp.float32))
    out.append((subspace.align_signs(b, p) if align else b).astype(p.dtype))
  return tuple(out)


def check_auto_sharding(tree: Any, where: str) -> None:
  """A clear error when a leaf is sharded over Explicit mesh axes (see the module docstring)."""
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    try:
      sharding = jax.typeof(x).sharding
    except (TypeError, AttributeError):
      continue
    mesh = getattr(sharding, "mesh", None)
    types = getattr(mesh, "axis_types", None) or ()
    spec = tuple(getattr(sharding, "spec", ()) or ())
    if any(t == AxisType.Explicit for t in types) and any(s is not None for s in spec):
      name = "/".join(map(str, path_names(path)))
      raise ValueError(
        f"galore: {where} {name} is sharded over Explicit mesh axes ({sharding.spec}); GaLore "
        "needs GSPMD (Auto) axes. Build the mesh with jax.make_mesh(shape, names, "
        "axis_types=(jax.sharding.AxisType.Auto,) * len(names)); see galore_jax.sharding."
      )


def _zero_stats(batch: tuple[int, ...], n_bases: int) -> tuple:
  """Placeholder stats before the first refresh: 0 iterations, estimate 0, per basis."""
  return jnp.zeros((*batch, n_bases), jnp.int32), jnp.zeros((*batch, n_bases), jnp.float32)


def _inner_update(inner, low_updates, inner_state, low_params):
  """`inner.update`, given the low-rank params only when it asks for them (a ValueError that
  names params, as optax's `add_decayed_weights` raises), so that optimizers that do not read
  them never pay for the extra projection of the weights."""
  try:
    return inner.update(low_updates, inner_state, None)
  except ValueError as e:
    if "param" not in str(e).lower():
      raise
    if low_params is None:
      raise ValueError(_NEEDS_PARAMS) from e
  return inner.update(low_updates, inner_state, low_params)


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
  found = [
    g.refresh_stats
    for g in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, GaLoreState))
    if isinstance(g, GaLoreState) and g.refresh_stats is not None
  ]
  iters = [jnp.ravel(x) for s in found for x in jax.tree.leaves(s.iterations)]
  est = [jnp.ravel(x) for s in found for x in jax.tree.leaves(s.energy_estimate)]
  if not iters:
    return {}
  iters, est = jnp.concatenate(iters).astype(jnp.float32), jnp.concatenate(est)
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
      elif not hasattr(x, "shape") or not jnp.issubdtype(x.dtype, jnp.floating):
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
