"""galore_jax.memory: exact state bytes, their split, the shape-only estimator, and gpu_bench."""

import math
import subprocess
import sys
from pathlib import Path

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import galore_jax as gj
from galore_jax import adam8bit
from galore_jax.memory import (
  OPTIMIZERS,
  StateBytes,
  estimate_state_bytes,
  split_state_bytes,
  state_bytes,
  tree_bytes,
)
from train.model import Llama, llama_config

REPO = Path(__file__).resolve().parent.parent

# Flax (in, out) layout; "skip" is 2-D but not a target under the mask below.
SHAPES = {
  "attn/square": (8, 8),
  "attn/wide": (6, 20),  # O > I: std reduces the input axis (moments r x O)
  "mlp/tall": (20, 6),  # I > O: std reduces the output axis (moments I x r)
  "mlp/stacked": (3, 10, 16),  # [layers, I, O]
  "skip": (12, 5),
  "bias": (7,),
}
RANK = 4


def _params(dtype=jnp.float32):
  keys = jax.random.split(jax.random.key(0), len(SHAPES))
  return {k: jax.random.normal(key, s, dtype) for key, (k, s) in zip(keys, SHAPES.items())}


def _mask(params):
  return gj.galore_mask_by_path(params, ("attn", "mlp"))


def _optimizers(rank=RANK, proj_type="std"):
  return {
    "adamw": optax.adamw(1e-3),
    "galore_adamw": gj.galore_adamw(1e-3, rank=rank, proj_type=proj_type, mask=_mask),
    "adamw_8bit": gj.adamw_8bit(1e-3, min_8bit_size=64),
    "galore_adamw_8bit": gj.galore_adamw_8bit(
      1e-3, rank=rank, proj_type=proj_type, mask=_mask, min_8bit_size=64
    ),
    "optax.contrib.galore": optax.contrib.galore(1e-3, rank=rank),
  }


@pytest.mark.parametrize("name", list(_optimizers()))
def test_state_bytes_equals_nbytes_of_a_real_state(name):
  tx = _optimizers()[name]
  params = _params()
  state = jax.jit(tx.init)(params)
  nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
  expected = state_bytes(tx, params)
  assert expected.total == nbytes
  assert expected == split_state_bytes(state)  # abstract and concrete states split alike
  assert expected.total == expected.moments + expected.projectors + expected.other


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_galore_split_matches_the_formula(dtype):
  """Projectors: min(I, O) r per target; moments: 2 max(I, O) r per target, full elsewhere."""
  params = _params(dtype)
  itemsize = jnp.dtype(dtype).itemsize
  got = state_bytes(gj.galore_adamw(1e-3, rank=RANK, mask=_mask), params)
  projectors = moments = 0
  for name, shape in SHAPES.items():
    size = math.prod(shape)
    if name in ("skip", "bias"):
      moments += 2 * size * itemsize
      continue
    *batch, i, o = shape
    r = min(RANK, i, o)
    projectors += math.prod(batch) * min(i, o) * r * itemsize
    moments += math.prod(batch) * 2 * max(i, o) * r * itemsize
  # Counters: GaLoreState, the inner Adam state and the weight-decay schedule, int32 each.
  assert got == StateBytes(moments, projectors, 12, moments + projectors + 12)


def test_eight_bit_codes_and_scales_count_as_moments():
  params = {"attn/w": jax.ShapeDtypeStruct((64, 128), jnp.float32)}
  got = state_bytes(gj.adamw_8bit(1e-3), params)
  blocks = 64 * 128 // adam8bit.DEFAULT_BLOCK_SIZE  # 32 blocks of 256: codes uint8 + f32 absmax
  assert got.moments == 2 * (blocks * adam8bit.DEFAULT_BLOCK_SIZE + 4 * blocks)
  assert got.projectors == 0 and got.other == 8


def test_tree_bytes_of_abstract_and_concrete_trees_agree():
  params = _params(jnp.bfloat16)
  abstract = jax.eval_shape(lambda: params)
  assert tree_bytes(params) == tree_bytes(abstract) == sum(x.nbytes for x in params.values())


def _tiny_llama_shapes(scan_layers, num_kv_heads=0):
  config = llama_config(
    "9m",
    num_layers=2,
    vocab_size=300,
    param_dtype=jnp.bfloat16,
    scan_layers=scan_layers,
    num_kv_heads=num_kv_heads,
  )
  params = nnx.state(nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0))), nnx.Param)
  named = [("/".join(map(str, p)), tuple(v.shape)) for p, v in nnx.to_flat_state(params)]
  return params, named


def _alias(name, rank, proj_type):
  """The transform that `estimate_state_bytes(optimizer=name)` stands for."""
  kw = dict(rank=rank, proj_type=proj_type, mask=gj.llama_galore_mask)
  return {
    "adamw": lambda: optax.adamw(1e-3),
    "galore_adamw": lambda: gj.galore_adamw(1e-3, **kw),
    "adamw_8bit": lambda: gj.adamw_8bit(1e-3),
    "galore_adamw_8bit": lambda: gj.galore_adamw_8bit(1e-3, **kw),
  }[name]()


@pytest.mark.parametrize("num_kv_heads", [0, 2])  # 2: grouped-query k/v kernels [D, D / 2]
@pytest.mark.parametrize("scan_layers", [False, True])
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_estimator_matches_state_bytes_on_a_tiny_llama(optimizer, scan_layers, num_kv_heads):
  params, named = _tiny_llama_shapes(scan_layers, num_kv_heads)
  for rank, proj_type in ((16, "std"), (64, "reverse_std"), (500, "full")):  # 500: clipped
    exact = state_bytes(_alias(optimizer, rank, proj_type), params)
    est = estimate_state_bytes(named, optimizer, rank=rank, dtype=jnp.bfloat16, proj_type=proj_type)
    assert est == exact, (rank, proj_type)


@hypothesis.settings(max_examples=25, deadline=None)
@hypothesis.given(
  shape=st.lists(st.integers(1, 40), min_size=2, max_size=3).map(tuple),
  rank=st.integers(1, 48),
  proj_type=st.sampled_from(["std", "reverse_std", "left", "right", "full"]),
  optimizer=st.sampled_from(list(OPTIMIZERS)),
)
def test_estimator_matches_state_bytes_for_any_shape(shape, rank, proj_type, optimizer):
  named = {"attn/w": shape, "norm": (shape[-1],)}
  params = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in named.items()}
  exact = state_bytes(_alias(optimizer, rank, proj_type), params)
  assert estimate_state_bytes(named, optimizer, rank=rank, proj_type=proj_type) == exact


def test_estimator_rejects_unknown_optimizer():
  with pytest.raises(ValueError, match="optimizer must be one of"):
    estimate_state_bytes({"w": (2, 2)}, "sgd")


def test_galore_saves_state_memory_at_60m_shapes():
  """Sanity of the headline: GaLore r=128 on LLaMA-60M's BF16 states is ~30% below AdamW."""
  config = llama_config("60m", param_dtype=jnp.bfloat16, scan_layers=True)
  params = nnx.state(nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0))), nnx.Param)
  named = [("/".join(map(str, p)), tuple(v.shape)) for p, v in nnx.to_flat_state(params)]
  adamw = estimate_state_bytes(named, "adamw", dtype=jnp.bfloat16)
  galore = estimate_state_bytes(named, "galore_adamw", rank=128, dtype=jnp.bfloat16)
  assert adamw.total == 4 * 58_073_600 + 4  # 2 BF16 moments per parameter + one counter
  np.testing.assert_allclose(1 - galore.total / adamw.total, 0.295, atol=0.005)


def test_gpu_bench_runs_on_cpu_in_quick_mode():
  """The accelerator benchmark end to end on a tiny LLaMA (what CI can check without a GPU)."""
  # One optimizer (the one with the most moving parts), one refresh and one plain step: ~10 s of
  # CPU, almost all of it compiling; the table's other rows run the same code.
  args = ["--quick", "--optimizers", "galore_adamw_8bit", "--steps", "1", "--warmup", "0"]
  out = subprocess.run(
    [sys.executable, "benchmarks/gpu_bench.py", *args, "--seq", "64"],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  rows = [line.split(" | ") for line in out.stdout.splitlines() if line.startswith("| tiny |")]
  assert [row[1] for row in rows] == ["galore_adamw_8bit"]
  assert float(rows[0][6]) > 0  # step ms
