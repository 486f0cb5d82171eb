"""Block-wise 8-bit quantisation (`galore_jax._quantize`) vs bitsandbytes 0.50 and its own bound.

What runs where (bitsandbytes 0.50.2, checked on this CPU):
* `create_dynamic_map` is plain torch: compared exactly.
* `quantize_blockwise` on a CPU tensor dispatches to the native CPU kernel, which rounds through a
  65536-bin lookup table on [-1, 1] (coarser than the map near 0). Its pure-PyTorch backend
  (the "default" kernel: midpoints + `torch.bucketize`, the exact nearest-value rule of the CUDA
  kernel) also runs on CPU when called through the CompositeExplicitAutograd dispatch key; our codes
  and scales equal that bit for bit. Against the native kernel we check that wherever the two
  disagree, ours is the nearer map value.
"""

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from galore_jax import _quantize as Q

torch = pytest.importorskip("torch")
bnb_functional = pytest.importorskip("bitsandbytes.functional")

SIGNED = Q.create_dynamic_map(signed=True)
UNSIGNED = Q.create_dynamic_map(signed=False)
TINY = np.finfo(np.float32).tiny  # XLA:CPU flushes denormals to zero: allowed absolute slack


def _quantize(x, qmap, block_size, preserve_sign=False):
  fn = jax.jit(Q.quantize_blockwise, static_argnums=2, static_argnames="preserve_sign")
  codes, absmax = fn(jnp.asarray(x), qmap, block_size, preserve_sign=preserve_sign)
  return np.asarray(codes), np.asarray(absmax)


def _dequantize(codes, absmax, qmap, block_size, shape):
  fn = jax.jit(Q.dequantize_blockwise, static_argnums=(3, 4))
  return np.asarray(fn(codes, absmax, qmap, block_size, shape))


def _bnb_default_backend(x: np.ndarray, qmap: np.ndarray, block_size: int):
  """bitsandbytes' pure-PyTorch `quantize_blockwise` kernel (its "default" backend)."""
  op = torch.ops.bitsandbytes.quantize_blockwise.default
  keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
  codes, absmax = op.redispatch(keys, torch.from_numpy(x), torch.from_numpy(qmap), block_size)
  return codes.numpy().reshape(-1), absmax.numpy()


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize(
  ("max_exponent_bits", "total_bits"), [(7, 8), (6, 8), (5, 8), (3, 4), (4, 5)]
)
def test_dynamic_map_equals_bitsandbytes(signed, max_exponent_bits, total_bits):
  try:
    ref = bnb_functional.create_dynamic_map(signed, max_exponent_bits, total_bits).numpy()
  except AssertionError:  # bitsandbytes rejects this combination; so must we
    with pytest.raises(ValueError, match="yields"):
      Q.create_dynamic_map(signed, max_exponent_bits, total_bits)
    return
  ours = Q.create_dynamic_map(signed, max_exponent_bits, total_bits)
  assert ours.dtype == np.float32 and ours.shape == (256,)
  np.testing.assert_array_equal(ours, ref)


def test_default_maps_layout():
  # Signed: 127 negatives, 0 at index 127, 127 positives, then 1.0. Unsigned: 0 first.
  assert SIGNED[127] == 0.0 and SIGNED[255] == 1.0 and SIGNED[0] == np.float32(-0.99296875)
  assert UNSIGNED[0] == 0.0 and UNSIGNED[255] == 1.0 and np.all(np.diff(UNSIGNED) > 0)


CASES = [
  ((64, 128), 256, 0.0),
  ((1000,), 64, -20.0),
  ((3, 5, 7), 128, 15.0),
  ((3, 4096), 4096, -5.0),
  ((37,), 2048, 30.0),
  ((2, 3, 4, 50), 256, -30.0),
]


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize(("shape", "block_size", "log_scale"), CASES)
def test_codes_equal_bitsandbytes_pytorch_backend(signed, shape, block_size, log_scale):
  rng = np.random.default_rng(abs(hash((shape, block_size))) % 2**32)
  x = (rng.standard_normal(shape) * 10.0**log_scale).astype(np.float32)
  if not signed:
    x = np.abs(x)
  x.reshape(-1)[: min(x.size, block_size)] = 0.0  # an all-zero first block
  qmap = SIGNED if signed else UNSIGNED
  codes, absmax = _quantize(x, qmap, block_size)
  ref_codes, ref_absmax = _bnb_default_backend(x, qmap, block_size)
  assert codes.shape == (Q.num_blocks(x.size, block_size), block_size)
  np.testing.assert_array_equal(codes.reshape(-1)[: x.size], ref_codes)
  # bitsandbytes stores 1e-38 as the scale of an all-zero *remainder* block, 0 for a full one.
  np.testing.assert_array_equal(
    absmax[ref_absmax != np.float32(1e-38)], ref_absmax[ref_absmax != np.float32(1e-38)]
  )
  # The padding of the last block is zero and encodes as the zero code.
  assert np.all(qmap[codes.reshape(-1)[x.size :]] == 0.0)


@pytest.mark.parametrize("signed", [True, False])
def test_native_cpu_kernel_is_never_nearer(signed):
  """bitsandbytes' native CPU kernel rounds via a 65536-bin table; ours is the exact nearest."""
  rng = np.random.default_rng(1)
  x = (rng.standard_normal((256, 256)) * 10.0 ** rng.uniform(-4, 0, (256, 256))).astype(np.float32)
  qmap = SIGNED if signed else UNSIGNED
  if not signed:
    x = np.abs(x)
  codes, absmax = _quantize(x, qmap, 256)
  q_bnb, state = bnb_functional.quantize_blockwise(
    torch.from_numpy(x), code=torch.from_numpy(qmap), blocksize=256
  )
  np.testing.assert_array_equal(absmax, state.absmax.numpy())
  normed = (x.reshape(-1, 256) * (np.float32(1) / absmax)[:, None]).reshape(-1)
  ours_err = np.abs(normed - qmap[codes.reshape(-1)])
  bnb_err = np.abs(normed - qmap[q_bnb.numpy().reshape(-1)])
  assert np.all(ours_err <= bnb_err + 2.0**-22)  # up to float32 rounding at exact midpoints
  assert np.mean(codes.reshape(-1) != q_bnb.numpy().reshape(-1)) > 0  # they do differ


def _numpy_rule(x: np.ndarray, qmap: np.ndarray, block_size: int):
  """The rule restated in numpy: float32 x * (1/absmax), then #(float32 midpoints < value)."""
  flat = np.zeros(Q.num_blocks(x.size, block_size) * block_size, np.float32)
  flat[: x.size] = x.reshape(-1)
  blocks = flat.reshape(-1, block_size)
  absmax = np.abs(blocks).max(axis=1)
  with np.errstate(divide="ignore"):
    inv = np.where(absmax > 0, np.float32(1) / absmax, np.float32(0)).astype(np.float32)
  normed = (blocks * inv[:, None]).astype(np.float32)
  mids = (np.float32(0.5) * (qmap[:-1] + qmap[1:])).astype(np.float32)
  return np.searchsorted(mids, normed, side="left").astype(np.uint8), absmax


def _sample(seed, shape, log_lo, spread, zero_frac, signed) -> np.ndarray:
  """Normal samples with magnitudes spread over 10**[log_lo, log_lo + spread], some zeros."""
  rng = np.random.default_rng(seed)
  mags = 10.0 ** rng.uniform(log_lo, log_lo + spread, shape)
  x = np.asarray(rng.standard_normal(shape) * mags, np.float32)
  x[np.asarray(rng.random(shape)) < zero_frac] = 0.0
  return x if signed else np.abs(x)


# Each example compiles anew (new shapes): keep the count modest.
_SETTINGS = hypothesis.settings(max_examples=15, deadline=None, derandomize=True)
_shapes = st.lists(st.integers(1, 40), min_size=0, max_size=3)


@_SETTINGS
@hypothesis.given(
  shape=_shapes,
  block_size=st.sampled_from([1, 3, 64, 256, 2048]),
  signed=st.booleans(),
  log_lo=st.floats(-30, 25),
  spread=st.floats(0, 5),
  zero_frac=st.sampled_from([0.0, 0.3]),
  seed=st.integers(0, 2**31 - 1),
)
def test_matches_numpy_restatement(shape, block_size, signed, log_lo, spread, zero_frac, seed):
  x = _sample(seed, shape, log_lo, spread, zero_frac, signed)
  qmap = SIGNED if signed else UNSIGNED
  codes, absmax = _quantize(x, qmap, block_size)
  ref_codes, ref_absmax = _numpy_rule(x, qmap, block_size)
  np.testing.assert_array_equal(absmax, ref_absmax)
  np.testing.assert_array_equal(codes, ref_codes)


@pytest.mark.parametrize("signed", [True, False])
def test_lookup_table_equals_binary_search_at_every_midpoint(signed):
  """The bit-pattern lookup table (concrete map) and the binary search (traced map) agree.

  Probed at every float32 midpoint, the 4 floats on either side of each, both signs, the map
  values themselves, 0, ±1 and random values: wherever a wrong bucket boundary could show.
  """
  qmap = SIGNED if signed else UNSIGNED
  mids = (np.float32(0.5) * (qmap[:-1] + qmap[1:])).astype(np.float32)
  probes = [mids, qmap, np.float32([0.0, -0.0, 1.0, -1.0])]
  for direction in (np.inf, -np.inf):
    near = mids
    for _ in range(4):
      near = np.nextafter(near, np.float32(direction))
      probes.append(near)
  rng = np.random.default_rng(0)
  probes.append(rng.uniform(-1, 1, 10_000).astype(np.float32) ** 5)
  x = np.concatenate(probes)
  x = np.concatenate([x, -x])
  lut = jax.jit(lambda n: Q._nearest_code(n, qmap))(x)
  search = jax.jit(Q._nearest_code)(x, jnp.asarray(qmap))
  np.testing.assert_array_equal(np.asarray(lut), np.asarray(search))
  np.testing.assert_array_equal(np.asarray(lut), np.searchsorted(mids, x, side="left"))


def _half_gap_bound(normed: np.ndarray, qmap: np.ndarray) -> np.ndarray:
  """Half the gap between the two map values around each normalised value.

  Nearest rounding moves a value by at most half the gap of the interval it falls in. The signed
  map stops at -0.993, so [-1, -0.993) is bounded by its full width (extend the map with -1).
  """
  ext = np.concatenate([[-1.0], qmap.astype(np.float64)])
  hi = np.clip(np.searchsorted(ext, normed, side="left"), 1, len(ext) - 1)
  gap = ext[hi] - ext[hi - 1]
  below_map = normed < qmap[0]
  return np.where(below_map, qmap[0] - normed, gap / 2)


@_SETTINGS
@hypothesis.given(
  shape=_shapes,
  block_size=st.sampled_from([1, 7, 256, 4096]),
  signed=st.booleans(),
  log_lo=st.floats(-45, 29),  # from float32 denormals (>= 1e-45) to ~1e37
  spread=st.floats(0, 8),
  zero_frac=st.sampled_from([0.0, 0.5, 1.0]),
  seed=st.integers(0, 2**31 - 1),
)
def test_roundtrip_error_bounded_by_map_resolution(
  shape, block_size, signed, log_lo, spread, zero_frac, seed
):
  """|x - deq(q(x))| <= absmax * (half the local map gap + 2**-22) + tiny, per entry.

  The half gap is the rounding error in normalised units; 2**-22 covers the float32 roundings of
  x * (1/absmax) and of qmap * absmax (a few ulps); `tiny` covers denormals, which XLA:CPU
  flushes to zero. All-zero blocks must come back as exact zeros, never NaN.
  """
  x = _sample(seed, shape, log_lo, spread, zero_frac, signed)
  qmap = SIGNED if signed else UNSIGNED
  codes, absmax = _quantize(x, qmap, block_size)
  back = _dequantize(codes, absmax, qmap, block_size, tuple(shape))
  assert back.shape == tuple(shape) and back.dtype == np.float32
  assert np.all(np.isfinite(back)) and np.all(np.isfinite(absmax))

  flat = np.zeros(codes.size, np.float64)
  flat[: x.size] = x.reshape(-1)
  scale = np.repeat(absmax.astype(np.float64), block_size)
  with np.errstate(invalid="ignore", divide="ignore"):
    normed = np.where(scale > 0, flat / scale, 0.0)
  bound = scale * (_half_gap_bound(normed, qmap) + 2.0**-22) + TINY
  err = np.abs(flat[: x.size] - back.reshape(-1))
  assert np.all(err <= bound[: x.size])
  zero_blocks = absmax == 0
  assert np.all(back.reshape(-1)[np.repeat(zero_blocks, block_size)[: x.size]] == 0.0)


def test_preserve_sign_keeps_small_negatives_negative():
  """bitsandbytes' first-moment rule: a negative value never decodes to zero (or positive)."""
  x = np.array([1.0, -1e-9, -1e-3, 1e-9, 0.0, -0.0, -0.5], np.float32)
  plain, absmax = _quantize(x, SIGNED, 256)
  fixed, _ = _quantize(x, SIGNED, 256, preserve_sign=True)
  values = SIGNED[fixed.reshape(-1)[: x.size]]
  assert SIGNED[plain.reshape(-1)[1]] == 0.0  # nearest is the zero code ...
  assert values[1] < 0 and values[5] < 0  # ... bumped one code down (also for -0.0)
  assert values[3] == 0.0 and values[4] == 0.0  # positives and +0 stay
  np.testing.assert_array_equal(fixed.reshape(-1)[[0, 2, 6]], plain.reshape(-1)[[0, 2, 6]])


@pytest.mark.parametrize("qmap", [SIGNED, UNSIGNED])
def test_zeros_blockwise_equals_quantised_zeros(qmap):
  codes, absmax = Q.zeros_blockwise(1000, qmap, 256)
  ref_codes, ref_absmax = _quantize(np.zeros(1000, np.float32), qmap, 256)
  np.testing.assert_array_equal(np.asarray(codes), ref_codes)
  np.testing.assert_array_equal(np.asarray(absmax), ref_absmax)


def test_storage_bytes_and_shapes():
  for size, block_size in [(1, 256), (256, 256), (257, 256), (4096, 2048), (10_000, 7)]:
    x = jax.ShapeDtypeStruct((size,), jnp.float32)
    codes, absmax = jax.eval_shape(lambda x, b=block_size: Q.quantize_blockwise(x, SIGNED, b), x)
    assert codes.dtype == np.uint8 and absmax.dtype == np.float32
    assert codes.shape == (Q.num_blocks(size, block_size), block_size)
    assert codes.size + 4 * absmax.size == Q.quantized_nbytes(size, block_size)


def test_rejects_bad_maps():
  with pytest.raises(ValueError, match="max_exponent_bits"):
    Q.create_dynamic_map(True, 0, 8)
  with pytest.raises(ValueError, match="sorted"):
    Q.quantize_blockwise(jnp.ones(4), SIGNED[::-1], 2)
