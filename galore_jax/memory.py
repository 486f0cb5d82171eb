"""Memory accounting of optimizer states: exact bytes from shapes, split by what they hold.

Two ways to count, which agree to the byte on the optimizers of this library:

* `state_bytes(tx, params)`: builds the state abstractly (`jax.eval_shape(tx.init, params)`,
  nothing is allocated, so a 7B model is counted on a laptop) and classifies every leaf by where
  it sits: the `projectors` of a `GaLoreState` (or the `projector` of
  `optax.contrib.GaLoreState`) are *projectors*; scalars (step counters, injected
  hyperparameters) are *other*; everything else (Adam moments, 8-bit codes and their scales) is
  *moments*. `split_state_bytes(state)` does the same for a state you already have.
* `estimate_state_bytes(named_shapes, optimizer, ...)`: the same numbers by arithmetic from a
  list of named parameter shapes, for the paper's optimizers (`OPTIMIZERS`), without building
  any transform; the library never imports a model, so the caller supplies the shapes (e.g. from
  `nnx.eval_shape` of its model).

References:
  Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection", ICML 2024,
  https://arxiv.org/abs/2403.03507
  Dettmers et al., "8-bit Optimizers via Block-wise Quantization", ICLR 2022,
  https://arxiv.org/abs/2110.02861
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from galore_jax import projection
from galore_jax.adam8bit import DEFAULT_BLOCK_SIZE, DEFAULT_MIN_8BIT_SIZE, adam8bit_state_bytes
from galore_jax.transform import GaLoreState

# Optimizers `estimate_state_bytes` knows, and the transform each one stands for (constant lr):
#   "adamw":             optax.adamw                      (1 int32 counter)
#   "galore_adamw":      galore_jax.galore_adamw          (3 counters)
#   "adamw_8bit":        galore_jax.adamw_8bit             (2 counters)
#   "galore_adamw_8bit": galore_jax.galore_adamw_8bit      (3 counters)
# A learning-rate schedule adds one int32 counter (`scale_by_schedule`) to optax.adamw.
OPTIMIZERS: dict[str, int] = {
  "adamw": 1,
  "galore_adamw": 3,
  "adamw_8bit": 2,
  "galore_adamw_8bit": 3,
}
_COUNTER_BYTES = 4  # int32

ShapeList = Mapping[str, Sequence[int]] | Iterable[tuple[str, Sequence[int]]]


class StateBytes(NamedTuple):
  """Bytes of an optimizer state, split by what they hold.

  Attributes:
    moments: optimizer statistics (Adam's `mu`/`nu`, low-rank under GaLore; for 8-bit states the
      uint8 codes plus their float32 block scales).
    projectors: GaLore's orthonormal bases.
    other: scalars: step counters, injected hyperparameters.
    total: `moments + projectors + other`.
  """

  moments: int
  projectors: int
  other: int
  total: int


def _state_bytes(moments: int, projectors: int, other: int) -> StateBytes:
  return StateBytes(moments, projectors, other, moments + projectors + other)


def _leaf_bytes(leaf: Any) -> int:
  """Bytes of an array-like leaf (array or `jax.ShapeDtypeStruct`); 0 for non-arrays."""
  if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
    return 0
  if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.extended):  # typed PRNG keys: count raw data
    leaf = jax.eval_shape(jax.random.key_data, leaf)
  return math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize


def tree_bytes(tree: Any) -> int:
  """Total bytes of the array leaves of `tree` (arrays or `jax.ShapeDtypeStruct` leaves).

  Args:
    tree: any pytree, e.g. params, gradients or an `jax.eval_shape` result.

  Returns:
    Bytes, as an int.

  Example:
    >>> import jax.numpy as jnp
    >>> tree_bytes({"w": jnp.zeros((4, 8), jnp.bfloat16), "b": jnp.zeros(8)})
    96
  """
  return sum(_leaf_bytes(x) for x in jax.tree.leaves(tree))


def _is_galore_state(x: Any) -> bool:
  return isinstance(x, (GaLoreState, optax.contrib.GaLoreState))


def split_state_bytes(state: optax.OptState) -> StateBytes:
  """Bytes of an existing (or abstract) optimizer state, split into moments/projectors/other.

  A leaf is a *projector* when it sits in the `projectors` field of a `galore_jax.GaLoreState`
  (or `projector` of `optax.contrib.GaLoreState`), *other* when it is a scalar (counters and
  injected hyperparameters), and a *moment* otherwise. GaLore states nested anywhere (in
  chains, masks, `inject_hyperparams`) are found.

  Args:
    state: an optimizer state, concrete or from `jax.eval_shape`.

  Returns:
    A `StateBytes`.
  """
  moments = projectors = other = 0
  for leaf in jax.tree.leaves(state, is_leaf=_is_galore_state):
    if isinstance(leaf, GaLoreState):
      inner = split_state_bytes(leaf.inner_state)
      projectors += tree_bytes(leaf.projectors) + inner.projectors
      moments += inner.moments
      # Refresh statistics (with `energy_tol`): a few bytes per matrix, like counters.
      other += _leaf_bytes(leaf.count) + tree_bytes(leaf.refresh_stats) + inner.other
    elif isinstance(leaf, optax.contrib.GaLoreState):
      inner = split_state_bytes(leaf.base_optimizer_state)
      projectors += tree_bytes(leaf.projector) + inner.projectors
      moments += inner.moments
      other += _leaf_bytes(leaf.count) + inner.other
    elif len(getattr(leaf, "shape", ())) == 0:
      other += _leaf_bytes(leaf)
    else:
      moments += _leaf_bytes(leaf)
  return _state_bytes(moments, projectors, other)


def state_bytes(tx: optax.GradientTransformation, params: optax.Params) -> StateBytes:
  """Exact bytes of `tx.init(params)`, from shapes alone (nothing is allocated).

  Args:
    tx: any optax transformation.
    params: the parameters, as arrays or `jax.ShapeDtypeStruct`s (e.g. from `jax.eval_shape`).

  Returns:
    A `StateBytes` (see `split_state_bytes` for the classification).

  Example:
    >>> import jax, jax.numpy as jnp, galore_jax as gj
    >>> from galore_jax.memory import state_bytes
    >>> params = {"attn": jax.ShapeDtypeStruct((512, 512), jnp.bfloat16)}
    >>> state_bytes(gj.galore_adamw(1e-2, rank=128), params)
    StateBytes(moments=262144, projectors=131072, other=12, total=393228)
  """
  return split_state_bytes(jax.eval_shape(tx.init, params))


def _named(named_shapes: ShapeList) -> list[tuple[str, tuple[int, ...]]]:
  items = named_shapes.items() if isinstance(named_shapes, Mapping) else named_shapes
  return [(str(name), tuple(int(d) for d in shape)) for name, shape in items]


def estimate_state_bytes(
  named_shapes: ShapeList,
  optimizer: str,
  *,
  rank: int = 128,
  dtype: Any = np.float32,
  proj_type: str = "std",
  targets: Sequence[str] = ("attn", "mlp"),
  projector_dtype: Any = None,
  block_size: int = DEFAULT_BLOCK_SIZE,
  min_8bit_size: int = DEFAULT_MIN_8BIT_SIZE,
) -> StateBytes:
  r"""Optimizer-state bytes by arithmetic from named parameter shapes.

  For a GaLore target viewed as `G_IxO` (last two axes; leading axes are stacked layers) at rank
  `r' = min(r, I, O)`, `std` keeps moments of shape `r' x O` when `O >= I`, else `I x r'`
  (the reference's rule on the torch `[O, I]` weight), and one projector of `I x r'` or
  `O x r'`:

  .. math::
    \text{moments} = 2\, r' \max(I, O)\, b,\qquad \text{projector} = r' \min(I, O)\, b_P

  with `b` the moment itemsize (`dtype`; 8-bit: `galore_jax.adam8bit.adam8bit_state_bytes`
  of the low-rank shape) and `b_P` the projector itemsize. Other leaves get full-size moments.
  `other` counts the int32 step counters of the transform named in `OPTIMIZERS`. The result
  equals `state_bytes` of that transform with `mask=galore_jax.llama_galore_mask` (or
  `galore_mask_by_path(params, targets)`) and a constant learning rate.

  Args:
    named_shapes: `{name: shape}` or `[(name, shape), ...]`; names are `/`-joined paths such as
      `"layers/0/attn/q_proj/kernel"`, shapes Flax `(in, out)` (`[N, in, out]` when stacked).
    optimizer: one of `OPTIMIZERS`.
    rank: GaLore rank `r` (ignored for full-rank optimizers).
    dtype: parameter dtype; 16-/32-bit moments are kept in it, as the reference does.
    proj_type: GaLore projection type (see `galore_jax.scale_by_galore`).
    targets: a leaf with ndim >= 2 is a GaLore target when its name contains one of these.
    projector_dtype: projector storage dtype; default `dtype`.
    block_size: 8-bit quantisation block size.
    min_8bit_size: leaves (low-rank shapes under GaLore) smaller than this keep float32 moments.

  Returns:
    A `StateBytes`.

  Example:
    >>> from galore_jax.memory import estimate_state_bytes
    >>> shapes = {"layers/attn/q_proj/kernel": (512, 512), "embed": (32000, 512)}
    >>> estimate_state_bytes(shapes, "galore_adamw", rank=128, dtype="bfloat16").moments
    65798144

  References:
    Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection",
    https://arxiv.org/abs/2403.03507
  """
  if optimizer not in OPTIMIZERS:
    raise ValueError(
      f"estimate_state_bytes: optimizer must be one of {list(OPTIMIZERS)}, got {optimizer!r}."
    )
  galore = optimizer.startswith("galore")
  eight_bit = optimizer.endswith("8bit")
  itemsize = jnp.dtype(dtype).itemsize
  proj_itemsize = jnp.dtype(projector_dtype or dtype).itemsize

  def moment_bytes(shape: tuple[int, ...]) -> int:
    if eight_bit:
      return adam8bit_state_bytes(shape, block_size=block_size, min_8bit_size=min_8bit_size)
    return 2 * math.prod(shape) * itemsize

  moments = projectors = 0
  for name, shape in _named(named_shapes):
    if galore and len(shape) >= 2 and any(t in name for t in targets):
      plan = projection.matrix_layout(shape, projection.GaLoreDimensionNumbers(), proj_type)
      moments += moment_bytes(projection.low_rank_shape(plan.canon_shape, plan.side, rank))
      for s in projection.projector_shapes(plan.canon_shape, plan.side, rank):
        projectors += math.prod(s) * proj_itemsize
    else:
      moments += moment_bytes(shape)
  return _state_bytes(moments, projectors, OPTIMIZERS[optimizer] * _COUNTER_BYTES)
