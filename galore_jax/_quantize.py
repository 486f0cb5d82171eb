"""Block-wise 8-bit quantisation with bitsandbytes' dynamic maps: pure array math.

A tensor is flattened (row-major), zero-padded to a whole number of blocks of `block_size`
entries and stored as

* `codes_BxS`: uint8 `[num_blocks, block_size]`, an index into a sorted 256-entry map `qmap`;
* `absmax_B`: float32 `[num_blocks]`, the largest `|x|` of each block (the padding is zero, so
  it never changes a block's maximum).

Dequantisation is `qmap[codes] * absmax` per block. Quantisation normalises each block by its
absmax (multiplying by the float32 reciprocal, as bitsandbytes does) and picks the nearest map
value. "Nearest" is decided against the float32 midpoints `0.5 * (qmap[i] + qmap[i+1])`; a value
exactly on a midpoint takes the lower code. That is the rule of bitsandbytes' pure-PyTorch backend
(`torch.bucketize` on the same midpoints) and of its CUDA kernels up to ties. bitsandbytes 0.50's
native CPU kernel instead rounds through a 65536-bin lookup table on `[-1, 1]`, which is coarser
than the map near zero (it merges every `|x| / absmax < 1.5e-5` into one code).

Storage of `n` entries: `num_blocks * block_size` bytes of codes plus `4 * num_blocks` bytes of
scales, with `num_blocks = ceil(n / block_size)` (see `quantized_nbytes`).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_BLOCK_SIZE = 256  # bitsandbytes 0.50 `Optimizer2State.init_state`: blocksize = 256

# Buckets of the lookup table are float32 bit patterns with the low `_LUT_SHIFT` mantissa bits
# dropped: 2**17 buckets, each at most 2**-8 of its values' magnitude wide, narrower than every
# gap of the 8-bit dynamic maps (so a bucket holds at most one midpoint for them).
_LUT_SHIFT = 15
_LUT_MAX_COMPARES = 2  # maps needing more compares per bucket fall back to a binary search


def create_dynamic_map(
  signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8
) -> np.ndarray:
  """bitsandbytes' dynamic (tree) quantisation map, bit for bit, as a sorted float32 `[256]`.

  Re-states `bitsandbytes.functional.create_dynamic_map`: for exponent `i` in
  `0..max_exponent_bits-1`, the midpoints of a uniform grid of `2**(i + k) + 1` points on
  `[0.1, 1]` (`k = total_bits - 1 - max_exponent_bits`, one more bit if unsigned) are scaled by
  `10**(i + 1 - max_exponent_bits)` (and mirrored if signed); then `0` and `1` are added, the list
  is zero-padded to 256 entries and sorted. The signed 8-bit map spans `[-0.993, 1]`, the
  unsigned one `[0, 1]`; both contain 0 exactly.

  Args:
    signed: include negative values (bitsandbytes uses the signed map for Adam's first moment and
      the unsigned one for the second).
    max_exponent_bits: number of decades.
    total_bits: bits per code (at most 8).

  Returns:
    A numpy float32 array of shape `[256]`, sorted ascending.

  References:
    Dettmers, "8-Bit Approximations for Parallelism in Deep Learning",
    https://arxiv.org/abs/1511.04561
  """
  if not 1 <= max_exponent_bits <= total_bits - 1 or not 1 < total_bits <= 8:
    raise ValueError(
      f"create_dynamic_map needs 1 <= max_exponent_bits < total_bits <= 8, got "
      f"max_exponent_bits={max_exponent_bits}, total_bits={total_bits}."
    )
  non_sign_bits = total_bits - 1
  additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
  data: list[np.float32] = []

  def add(num_points: int, decade: int) -> None:
    means = _grid_midpoints(num_points)
    scale = np.float32(10.0**decade)  # torch multiplies by the Python scalar cast to float32
    data.extend((scale * means).astype(np.float32))
    if signed:
      data.extend((-scale * means).astype(np.float32))

  for i in range(max_exponent_bits):
    extra = 0 if signed else 1
    add(2 ** (i + non_sign_bits - max_exponent_bits + extra) + 1, i + 1 - max_exponent_bits)
  if additional_items > 0:  # bitsandbytes reuses the last loop's decade, 10**0, here
    add(additional_items + 1, 0)
  data += [np.float32(0.0), np.float32(1.0)]
  if len(data) != 2**total_bits:
    raise ValueError(
      f"create_dynamic_map(signed={signed}, max_exponent_bits={max_exponent_bits}, "
      f"total_bits={total_bits}) yields {len(data)} values, not {2**total_bits} (bitsandbytes "
      "asserts the same)."
    )
  data += [np.float32(0.0)] * (256 - len(data))
  return np.sort(np.asarray(data, np.float32))


def _grid_midpoints(num_points: int) -> np.ndarray:
  """Midpoints of `torch.linspace(0.1, 1, num_points, dtype=float32)`, reproduced exactly."""
  # torch's CPU linspace evaluates `start + step * i` (first half) and `end - step * (n - 1 - i)`
  # (second half) with a single rounding (a fused multiply-add in its vector path); float64
  # arithmetic is exact here, so one final rounding to float32 reproduces it.
  start, end = np.float32(0.1), np.float32(1.0)
  step = np.float32((end - start) / np.float32(num_points - 1))
  idx = np.arange(num_points, dtype=np.float64)
  lo = np.float64(start) + np.float64(step) * idx
  hi = np.float64(end) - np.float64(step) * (num_points - 1 - idx)
  grid = np.where(idx < num_points // 2, lo, hi).astype(np.float32)
  return ((grid[:-1] + grid[1:]) / np.float32(2.0)).astype(np.float32)


def num_blocks(size: int, block_size: int) -> int:
  """Number of blocks holding `size` entries."""
  return -(-size // block_size)


def quantized_nbytes(size: int, block_size: int = DEFAULT_BLOCK_SIZE) -> int:
  """Bytes of one quantised tensor of `size` entries: padded uint8 codes + float32 scales."""
  b = num_blocks(size, block_size)
  return b * block_size + 4 * b


def quantize_blockwise(
  x: jax.Array,
  qmap: np.ndarray | jax.Array,
  block_size: int = DEFAULT_BLOCK_SIZE,
  *,
  preserve_sign: bool = False,
) -> tuple[jax.Array, jax.Array]:
  """Quantises `x` block-wise to the nearest value of `qmap` (see the module docstring).

  Args:
    x: array of any shape and float dtype (computed in float32).
    qmap: sorted map of 256 float32 values in `[-1, 1]`; a concrete map (numpy or a non-traced
      array) uses a fast lookup table, a traced one a binary search with the same results.
    block_size: entries per block (a static Python int).
    preserve_sign: bitsandbytes' 8-bit optimizer rule for the first moment: when the chosen code's
      value has the other sign bit than `x` (a negative `x` rounded to the zero code), step one code
      towards `x`'s sign, so a small negative moment is never stored as zero.

  Returns:
    `(codes_BxS, absmax_B)`: uint8 `[num_blocks, block_size]` and float32 `[num_blocks]`.
  """
  x_n = jnp.asarray(x, jnp.float32).reshape(-1)
  b = num_blocks(x_n.size, block_size)
  x_BxS = jnp.pad(x_n, (0, b * block_size - x_n.size)).reshape(b, block_size)
  absmax_B = jnp.max(jnp.abs(x_BxS), axis=1, initial=0.0)
  # bitsandbytes multiplies by 1/absmax. A reciprocal below 2**-126 would be a denormal, which
  # XLA's CPU backend flushes to zero; scaling huge blocks by an exact power of two first keeps
  # it normal without changing the result. All-zero blocks (and all-denormal ones, flushed to
  # zero) are normalised to 0 instead of 0/0 = NaN.
  pre_B = jnp.where(absmax_B > 2.0**100, jnp.float32(2.0**-64), jnp.float32(1.0))
  scaled_B = absmax_B * pre_B
  inv_B = jnp.where(scaled_B > 0, 1.0 / jnp.where(scaled_B > 0, scaled_B, 1.0), 0.0)
  normed_BxS = (x_BxS * pre_B[:, None]) * inv_B[:, None]
  codes = _nearest_code(normed_BxS, qmap)
  if preserve_sign:
    codes = _preserve_sign(codes, x_BxS, qmap)
  return codes.astype(jnp.uint8), absmax_B


def zeros_blockwise(
  size: int, qmap: np.ndarray, block_size: int = DEFAULT_BLOCK_SIZE
) -> tuple[jax.Array, jax.Array]:
  """`quantize_blockwise` of `size` zeros, built directly (no float32 array of that size)."""
  q = np.asarray(qmap, np.float32)
  zero_code = int(np.searchsorted(0.5 * (q[:-1] + q[1:]), np.float32(0), side="left"))
  b = num_blocks(size, block_size)
  return jnp.full((b, block_size), zero_code, jnp.uint8), jnp.zeros((b,), jnp.float32)


def dequantize_blockwise(
  codes: jax.Array,
  absmax: jax.Array,
  qmap: np.ndarray | jax.Array,
  block_size: int,
  shape: tuple[int, ...],
  dtype=jnp.float32,
) -> jax.Array:
  """Inverse of `quantize_blockwise`: `qmap[codes] * absmax` per block, cut to `shape`.

  Args:
    codes: uint8 codes with `num_blocks * block_size` entries (any shape, usually `[B, S]`).
    absmax: float32 `[num_blocks]` scales.
    qmap: the map used to quantise.
    block_size: entries per block.
    shape: shape of the original array.
    dtype: output dtype (the product is computed in float32, as bitsandbytes does).

  Returns:
    An array of `shape` and `dtype`.
  """
  size = math.prod(shape)
  b = num_blocks(size, block_size)
  values_BxS = _lookup(jnp.asarray(qmap, jnp.float32), codes.reshape(b, block_size))
  out = (values_BxS * absmax[:, None]).reshape(-1)[:size]
  return out.reshape(shape).astype(dtype)


def _nearest_code(normed: jax.Array, qmap) -> jax.Array:
  """Index of the nearest `qmap` value: the number of midpoints strictly below `normed`."""
  table = _concrete_table(qmap)
  if table is None:
    q = jnp.asarray(qmap, jnp.float32)
    mids = 0.5 * (q[:-1] + q[1:])
    return jnp.searchsorted(mids, normed, side="left", method="scan_unrolled")
  base, mids_ext, compares = table
  bucket = jax.lax.bitcast_convert_type(normed, jnp.uint32) >> _LUT_SHIFT
  idx = _lookup(jnp.asarray(base), bucket).astype(jnp.int32)
  mids_ext = jnp.asarray(mids_ext)
  for _ in range(compares):  # at most `compares` midpoints share a bucket
    idx = idx + (normed > _lookup(mids_ext, idx)).astype(jnp.int32)
  return idx


def _lookup(table: jax.Array, idx: jax.Array) -> jax.Array:
  """`table[idx]` for in-range unsigned or non-negative indices, as one plain gather."""
  # jnp indexing adds negative-index fix-ups and an index relayout that keep XLA:CPU from
  # fusing the gather into its consumers' loops.
  dnums = jax.lax.GatherDimensionNumbers(
    offset_dims=(), collapsed_slice_dims=(0,), start_index_map=(0,)
  )
  return jax.lax.gather(
    table,
    idx[..., None],
    dnums,
    slice_sizes=(1,),
    mode=jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS,
  )


def _preserve_sign(codes: jax.Array, x: jax.Array, qmap) -> jax.Array:
  """bitsandbytes' first-moment fix-up: a code whose value has the wrong sign bit moves by one."""
  q = jnp.asarray(qmap, jnp.float32)
  negative_codes = jnp.sum(jnp.signbit(q))  # a sorted map without -0.0: these come first
  code_negative = codes < negative_codes
  step = jnp.where(x > 0, 1, -1)
  return jnp.where(code_negative != jnp.signbit(x), codes + step, codes)


def _concrete_table(qmap):
  """Lookup table for a concrete map, or None for a traced map or one too dense for it."""
  try:
    q = np.asarray(qmap, np.float32)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return None
  return _build_table(q.tobytes())


@functools.lru_cache(maxsize=16)
def _build_table(qmap_bytes: bytes):
  """Per float32 bit-pattern bucket: midpoints below it, and the compares needed inside it."""
  q = np.frombuffer(qmap_bytes, np.float32)
  if q.shape != (256,) or np.any(np.diff(q) < 0):
    raise ValueError(f"qmap must be a sorted float32 array of 256 values, got shape {q.shape}.")
  mids = (np.float32(0.5) * (q[:-1] + q[1:])).astype(np.float32)
  top = np.arange(2 ** (32 - _LUT_SHIFT), dtype=np.uint64) << np.uint64(_LUT_SHIFT)
  first = top.astype(np.uint32).view(np.float32)
  last = (top | np.uint64(2**_LUT_SHIFT - 1)).astype(np.uint32).view(np.float32)
  with np.errstate(invalid="ignore"):
    lo, hi = np.fmin(first, last), np.fmax(first, last)  # NaN buckets keep their finite end
  lo = np.where(np.isnan(lo), np.inf, lo)
  hi = np.where(np.isnan(hi), np.inf, hi)
  below = np.searchsorted(mids, lo, side="left")  # midpoints < every value of the bucket
  inside = np.searchsorted(mids, hi, side="right") - below  # midpoints within [lo, hi]
  compares = int(inside.max())
  if compares > _LUT_MAX_COMPARES:
    return None
  mids_ext = np.append(mids, np.full(compares + 1, np.inf, np.float32))
  return below.astype(np.uint8), mids_ext, compares
