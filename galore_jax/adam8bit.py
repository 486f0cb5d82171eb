"""8-bit Adam(W) as optax transforms, with bitsandbytes' block-wise 8-bit optimizer states.

`scale_by_adam_8bit` is the Adam of bitsandbytes' `Optimizer2State("adam")` with 8-bit blockwise
states: each moment of a leaf with at least `min_8bit_size` entries is stored as uint8 codes into
a dynamic quantisation map (signed for `m`, unsigned for `v`) plus one float32 absmax per block of
`block_size` entries; smaller leaves keep float32 moments. Under `jit` each leaf is dequantised,
stepped in float32 and requantised within the step; float32 moments exist only as temporaries
(on CPU one leaf at a time, see `update_fn`).

The aliases built on it, `adamw_8bit` (bitsandbytes' `AdamW8bit`) and `galore_adamw_8bit`
(`galore_torch.GaLoreAdamW8bit`: GaLore with 8-bit low-rank moments), are in `galore_jax.alias`.

References:
  Dettmers et al., "8-bit Optimizers via Block-wise Quantization", ICLR 2022,
  https://arxiv.org/abs/2110.02861
  Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection", ICML 2024,
  https://arxiv.org/abs/2403.03507
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from galore_jax import _quantize
from galore_jax.masks import leaf_entries

DEFAULT_BLOCK_SIZE = _quantize.DEFAULT_BLOCK_SIZE  # bitsandbytes 0.50's 8-bit optimizer blocks
DEFAULT_MIN_8BIT_SIZE = 4096  # bitsandbytes' `min_8bit_size`: smaller leaves stay float32

_SIGNED_MAP = _quantize.create_dynamic_map(signed=True)  # first moment
_UNSIGNED_MAP = _quantize.create_dynamic_map(signed=False)  # second moment

_STATIC_HINT = (
  "Under optax.inject_hyperparams it may stay injected (it is read once, in init) or be listed in "
  "static_args=('block_size', 'min_8bit_size')."
)


class QuantizedMoment(NamedTuple):
  """One optimizer moment of one leaf in 8 bits (see `galore_jax._quantize`): the per-leaf view
  of `ScaleByAdam8bitState`'s `mu` / `mu_absmax` (or `nu` / `nu_absmax`) entries.

  Attributes:
    codes: uint8 `[num_blocks, block_size]`, indices into the moment's dynamic map; the
      flattened leaf is zero-padded to whole blocks.
    absmax: float32 `[num_blocks]`, each block's largest magnitude.
  """

  codes: jax.Array
  absmax: jax.Array


class ScaleByAdam8bitState(NamedTuple):
  """State of `scale_by_adam_8bit`.

  Every field is a tree laid out like the params with one array (or `optax.MaskedNode()`) per
  parameter position, the optax convention that `flax.nnx.Optimizer` and
  `optax.tree_utils.tree_map_params` rely on.

  Attributes:
    count: number of updates so far (int32).
    mu: first moments: per leaf with at least `min_8bit_size` entries, the uint8 codes
      `[num_blocks, block_size]` of the flattened, zero-padded leaf; else a float32 array of
      the leaf's shape.
    nu: second moments, laid out like `mu`.
    mu_absmax: per 8-bit leaf, the float32 scale of each block of `mu`, `[num_blocks]`;
      `MaskedNode()` for float32 leaves.
    nu_absmax: the same for `nu`.

  Sharding: the codes and their scales split along the block axis (axis 0) together; a leaf's
  blocks follow its row-major flattening, so splitting the blocks into `n` equal parts splits
  the leaf's leading axis into `n` equal parts when `size / n` is a multiple of `block_size`.
  """

  count: jax.Array
  mu: optax.Updates
  nu: optax.Updates
  mu_absmax: optax.Updates
  nu_absmax: optax.Updates


def scale_by_adam_8bit(
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  *,
  block_size: int = DEFAULT_BLOCK_SIZE,
  min_8bit_size: int = DEFAULT_MIN_8BIT_SIZE,
  float32_mask: Any | Callable[[optax.Params], Any] | None = None,
) -> optax.GradientTransformation:
  r"""Adam with 8-bit block-wise moments, as bitsandbytes' 8-bit Adam kernel computes it.

  Per entry, with `m`, `v` dequantised from the state and `t` the 1-based step:

  .. math::
    m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t,\quad v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2,\quad
    u_t = \frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}\,
          \frac{m_t}{\sqrt{v_t} + \epsilon\sqrt{1-\beta_2^t}}

  which is textbook Adam (`ε` added to `sqrt(v̂_t)`, as in `optax.scale_by_adam`) written the way
  bitsandbytes' CUDA kernel evaluates it, not the transformers/GaLoreAdamW placement
  (`ε` on the uncorrected `sqrt(v_t)`). The update uses the float32 `m_t`, `v_t`; they are then
  requantised: `m` to the signed dynamic map (a negative `m` never rounds to the zero code),
  `v` to the unsigned one, each block normalised by its absmax. As in bitsandbytes' CUDA kernel,
  an entry whose gradient is NaN or ±Inf gets zero moments and a zero update (so one bad value
  cannot poison its block's scale).

  Args:
    b1: first-moment decay.
    b2: second-moment decay.
    eps: `ε` (bitsandbytes' default 1e-8).
    block_size: entries per quantisation block (static; bitsandbytes 0.50 uses 256).
    min_8bit_size: leaves with fewer entries keep float32 moments (static; bitsandbytes: 4096).
    float32_mask: leaves whose moments stay float32 whatever their size: a pytree of bools or a
      callable `params -> pytree` (default: none). bitsandbytes' per-parameter `optim_bits=32`
      override, which it advises for embeddings (see `llama_vocab_mask`): an 8-bit second moment
      rounds to zero below ~1e-7 of its block's maximum, and an entry whose gradient then
      vanishes (an embedding row of a token absent from the batch) gets the update
      `m / ε`, orders of magnitude too large.

  Returns:
    An `optax.GradientTransformation` with `ScaleByAdam8bitState`; no learning rate (chain
    `optax.scale_by_learning_rate`). Updates come back in each gradient's dtype. It never reads
    `params`, so it can be the inner optimizer of `scale_by_galore` on any ranks (>= 0 dims).

  Example:
    >>> import jax.numpy as jnp, optax, galore_jax as gj
    >>> tx = optax.chain(gj.scale_by_adam_8bit(), optax.scale_by_learning_rate(1e-3))
    >>> params = {"w": jnp.ones((64, 128)), "b": jnp.ones((128,))}
    >>> state = tx.init(params)
    >>> state[0].mu["w"].shape, state[0].mu_absmax["w"].shape, state[0].mu["b"].dtype
    ((32, 256), (32,), dtype('float32'))

  References:
    Dettmers et al., "8-bit Optimizers via Block-wise Quantization",
    https://arxiv.org/abs/2110.02861
  """
  for name, value in (("block_size", block_size), ("min_8bit_size", min_8bit_size)):
    if not isinstance(value, jax.Array):  # injected (possibly traced) arrays are read in init
      _static_int(value, name)

  def init_fn(params):
    bs = _static_int(block_size, "block_size")
    min_size = _static_int(min_8bit_size, "min_8bit_size")

    if float32_mask is None:
      keep32 = jax.tree.map(lambda _: False, params)
    else:
      keep32 = float32_mask(params) if callable(float32_mask) else float32_mask

    def zeros(p, keep, qmap):
      shape = jnp.shape(p)
      if keep or math.prod(shape) < min_size:
        return jnp.zeros(shape, jnp.float32), optax.MaskedNode()
      return _quantize.zeros_blockwise(math.prod(shape), qmap, bs)

    leaves, treedef = jax.tree.flatten(params)
    keep32 = treedef.flatten_up_to(keep32)
    mu, mu_absmax = (
      list(zip(*[zeros(p, k, _SIGNED_MAP) for p, k in zip(leaves, keep32)])) or [()] * 2
    )
    nu, nu_absmax = (
      list(zip(*[zeros(p, k, _UNSIGNED_MAP) for p, k in zip(leaves, keep32)])) or [()] * 2
    )
    trees = [treedef.unflatten(list(x)) for x in (mu, nu, mu_absmax, nu_absmax)]
    return ScaleByAdam8bitState(jnp.zeros([], jnp.int32), *trees)

  def update_fn(updates, state, params=None):
    del params
    count = optax.safe_increment(state.count)
    t = count.astype(jnp.float32)
    beta1, beta2 = jnp.asarray(b1, jnp.float32), jnp.asarray(b2, jnp.float32)
    correction1 = 1.0 - beta1**t
    correction2 = jnp.sqrt(1.0 - beta2**t)
    coeffs = (beta1, beta2, correction2 / correction1, jnp.asarray(eps, jnp.float32) * correction2)

    leaves, treedef = jax.tree.flatten(updates)
    entries = lambda t: leaf_entries(t, treedef)
    mus = [_view(c, a) for c, a in zip(*map(entries, (state.mu, state.mu_absmax)))]
    nus = [_view(c, a) for c, a in zip(*map(entries, (state.nu, state.nu_absmax)))]

    # XLA:CPU performance, not semantics (both branches below are the same function): fused
    # with its several consumers (the Adam math, the block maxima, the requantisation), the
    # dequantising gather is materialised through a slow gather-rooted fusion and the update is
    # recomputed in each consumer. A `cond` on a predicate XLA cannot evaluate makes each leaf's
    # float32 moments real buffers instead, and chaining the predicate through the previous
    # leaf's result runs leaves one after another, so each leaf's buffers are still in cache
    # when it is requantised. Together 3-4x faster on CPU. Skipped elsewhere: GPU gathers fuse
    # well and a conditional there costs a device-to-host round trip.
    fence = _fence_on_cpu()
    pred = count > 0  # always true
    out, new_mu, new_nu = [], [], []
    for g, m_state, v_state in zip(leaves, mus, nus):
      fenced = fence and isinstance(m_state, QuantizedMoment)
      if fenced:
        u, m, v = jax.lax.cond(pred, _adam_leaf, _adam_leaf, g, m_state, v_state, coeffs)
      else:
        u, m, v = _adam_leaf(g, m_state, v_state, coeffs)
      out.append(u.astype(jnp.asarray(g).dtype))
      new_mu.append(_store(m, m_state, _SIGNED_MAP, preserve_sign=True))
      new_nu.append(_store(v, v_state, _UNSIGNED_MAP, preserve_sign=False))
      if fenced and m_state.absmax.shape[0]:
        pred = pred | (new_nu[-1].absmax[0] < 0)  # still always true, now after this leaf
    (mu, mu_absmax), (nu, nu_absmax) = _unview(treedef, new_mu), _unview(treedef, new_nu)
    new_state = ScaleByAdam8bitState(count, mu, nu, mu_absmax, nu_absmax)
    return treedef.unflatten(out), new_state

  return optax.GradientTransformation(init_fn, update_fn)


def _adam_leaf(g, m_state, v_state, coeffs):
  """One leaf: dequantised moments -> bitsandbytes' Adam step in float32 -> (u, m, v)."""
  beta1, beta2, step_size, eps_hat = coeffs
  g32 = jnp.asarray(g).astype(jnp.float32)
  m = _load(m_state, _SIGNED_MAP, g32.shape)
  v = _load(v_state, _UNSIGNED_MAP, g32.shape)
  finite = jnp.isfinite(g32)
  m = jnp.where(finite, m * beta1 + (1.0 - beta1) * g32, 0.0)
  v = jnp.where(finite, v * beta2 + ((1.0 - beta2) * g32) * g32, 0.0)
  u = jnp.where(finite, step_size * (m / (jnp.sqrt(v) + eps_hat)), 0.0)
  return u, m, v


def _fence_on_cpu() -> bool:
  """Whether the default backend is XLA:CPU (see the conditional in `update_fn`)."""
  return jax.default_backend() == "cpu"


def _view(codes, absmax):
  """A leaf's moment from its state entries: a `QuantizedMoment`, or the float32 array."""
  return codes if isinstance(absmax, optax.MaskedNode) else QuantizedMoment(codes, absmax)


def _unview(treedef, moments: list) -> tuple:
  """Per-leaf moments -> (codes-or-float32 tree, absmax tree with `MaskedNode`s)."""
  is_q = [isinstance(m, QuantizedMoment) for m in moments]
  codes = [m.codes if q else m for m, q in zip(moments, is_q)]
  absmax = [m.absmax if q else optax.MaskedNode() for m, q in zip(moments, is_q)]
  return treedef.unflatten(codes), treedef.unflatten(absmax)


def _load(state, qmap, shape):
  """A moment as float32 in the leaf's shape."""
  if isinstance(state, QuantizedMoment):
    block_size = state.codes.shape[-1]  # static: read from the state, never from a hyperparam
    return _quantize.dequantize_blockwise(state.codes, state.absmax, qmap, block_size, shape)
  return state.astype(jnp.float32)


def _store(x, state, qmap, preserve_sign):
  """A float32 moment back in the storage format of `state`."""
  if isinstance(state, QuantizedMoment):
    block_size = state.codes.shape[-1]
    codes, absmax = _quantize.quantize_blockwise(x, qmap, block_size, preserve_sign=preserve_sign)
    return QuantizedMoment(codes, absmax)
  return x.astype(state.dtype)


def _static_int(value, name: str) -> int:
  """A Python int from an int or a concrete integer array (what inject_hyperparams passes)."""
  try:
    if isinstance(value, bool):
      raise TypeError
    arr = np.asarray(value)
    if arr.shape != () or not np.issubdtype(arr.dtype, np.integer):
      raise TypeError
  except (TypeError, jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    raise ValueError(
      f"scale_by_adam_8bit: `{name}` fixes state shapes and must be a concrete integer, got "
      f"{value!r}. {_STATIC_HINT}"
    ) from None
  out = int(arr)
  if out < (1 if name == "block_size" else 0):
    raise ValueError(f"scale_by_adam_8bit: `{name}` must be positive, got {out}.")
  return out


def adam8bit_state_bytes(
  shape: tuple[int, ...],
  dtype: Any = None,
  block_size: int = DEFAULT_BLOCK_SIZE,
  min_8bit_size: int = DEFAULT_MIN_8BIT_SIZE,
) -> int:
  """Exact bytes of the two moments `scale_by_adam_8bit` keeps for one leaf.

  `2 * (B * block_size + 4 * B)` with `B = ceil(n / block_size)` (padded uint8 codes and float32
  scales) for a leaf of `n >= min_8bit_size` entries, else `2 * 4 * n` (float32 moments). The
  transform's state adds one int32 `count` (4 bytes) for the whole tree.

  Args:
    shape: the leaf's shape (the low-rank shape when it is GaLore's inner optimizer).
    dtype: the leaf's dtype; unused, since the moments are uint8/float32 whatever the parameter
      dtype (as in bitsandbytes). Accepted so all state-size helpers share one call.
    block_size: as given to `scale_by_adam_8bit`.
    min_8bit_size: as given to `scale_by_adam_8bit`.

  Returns:
    Bytes, as an int.
  """
  del dtype
  size = math.prod(shape)
  if size < min_8bit_size:
    return 2 * 4 * size
  return 2 * _quantize.quantized_nbytes(size, block_size)
