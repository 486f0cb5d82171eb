"""benchmarks/peak_buffers.py reads XLA's own dump: the temp allocation it reports is XLA's
`temp_size_in_bytes`, and the buffers it lists at the peak add up to the bytes live there
(each offset once)."""

import os
import re
import subprocess
import sys

import pytest

from benchmarks import peak_buffers

# A program with one large temporary: a [512, 512] float32 matrix (1 MiB) reduced to a scalar.
PROGRAM = """
import jax, jax.numpy as jnp
def update(x_NxN):
  y_NxN = jnp.sin(x_NxN) @ jnp.cos(x_NxN).T
  return jnp.sum(jnp.tanh(y_NxN) * y_NxN)
c = jax.jit(update).lower(jax.ShapeDtypeStruct((512, 512), jnp.float32)).compile()
print(c.memory_analysis().temp_size_in_bytes)
"""


def test_peak_matches_xla_temp(tmp_path):
  env = dict(os.environ, XLA_FLAGS=f"--xla_dump_to={tmp_path}", JAX_PLATFORMS="cpu")
  out = subprocess.run(
    [sys.executable, "-c", PROGRAM], env=env, capture_output=True, text=True, check=True
  )
  temp = int(out.stdout.split()[-1])
  p = peak_buffers.peak(str(tmp_path), module="jit_update")
  assert p.temp_bytes == temp
  assert 0 < p.live_bytes <= p.temp_bytes
  by_offset = {}
  for b in p.buffers:  # aliases (one offset, overlapping lives) are one buffer
    by_offset[b.offset] = max(b.size, by_offset.get(b.offset, 0))
  assert sum(by_offset.values()) == p.live_bytes
  assert any(b.shape.startswith("f32[512,512]") for b in p.buffers)
  peak_buffers.main([str(tmp_path), "--top", "3"])  # the table prints


def test_missing_dump_names_the_directory(tmp_path):
  with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path))):
    peak_buffers.peak(str(tmp_path))
