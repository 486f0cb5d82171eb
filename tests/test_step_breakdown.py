"""The step breakdown's HLO classification, the model-FLOP count and the host malloc setup."""

import platform
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from benchmarks import machine, step_breakdown
from train.model import llama_config


def test_classify_hlo_finds_the_matmul_and_its_flops():
  m, k, n = 64, 32, 48

  def f(a, b):
    with jax.named_scope("optimizer"):
      return jnp.tanh(a @ b).T

  a, b = jnp.ones((m, k)), jnp.ones((k, n))
  ops = step_breakdown.classify_hlo(jax.jit(f).lower(a, b).compile().as_text())
  matmuls = [op for op in ops.values() if op["kind"] == "matmul"]
  assert len(matmuls) == 1
  assert matmuls[0]["flops"] == 2 * m * k * n
  assert matmuls[0]["class"] == f"{m}x{k} @ {k}x{n}"
  assert matmuls[0]["region"] == "optimizer"


def test_model_flops_of_llama_9m():
  # The count: 6 x 4.9 M matmul parameters x ~4,080 positions + attention = ~126 GFLOP.
  flops = machine.model_flops(llama_config("9m"), batch=16, seq_len=256)
  body = 4 * (4 * 128 * 128 + 3 * 128 * 352)
  expected = 6 * body * 16 * 256 + 6 * 128 * 32000 * 16 * 255 + 12 * 4 * 256 * 128 * 16 * 256
  assert flops == expected
  assert 126e9 < flops < 127e9


@pytest.mark.skipif(
  platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc mallopt"
)
def test_keep_freed_memory_sets_up_glibc():
  # In a fresh process: the settings are process-wide and must come before jax's threads.
  code = "from train import host_memory; print(host_memory.keep_freed_memory())"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "True"
