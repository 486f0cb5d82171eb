"""The machine a benchmark ran on: CPU model, vector ISA, XLA flags, and a float32 matmul probe.

Shared by `train_throughput.py` and `step_breakdown.py`, so every speed table names its CPU and
the matmul rate its model FLOP utilisation (MFU) is measured against.
"""

from __future__ import annotations

import os
import platform
import time

# ISA flags worth naming (from /proc/cpuinfo); XLA:CPU and oneDNN/YNNPACK pick kernels by them.
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")

# The probe's shapes: a square matmul, and the LM head's (B L x D @ D x V at LLaMA-9m).
PROBES = {"square 2048^3": (2048, 2048, 2048), "LM head 4096x128 @ 128x32000": (4096, 128, 32000)}


def cpu_info() -> dict[str, str]:
  """{"model", "family", "isa", "cores", "xla_flags"} from /proc/cpuinfo and the environment."""
  info = {"model": platform.processor() or platform.machine(), "family": "?", "isa": "?"}
  try:
    text = open("/proc/cpuinfo").read()  # noqa: SIM115
  except OSError:
    text = ""
  fields = {}
  for line in text.splitlines():
    key, _, value = line.partition(":")
    fields.setdefault(key.strip(), value.strip())
  if fields:
    info["model"] = fields.get("model name", info["model"])
    info["family"] = f"family {fields.get('cpu family', '?')} model {fields.get('model', '?')}"
    flags = set(fields.get("flags", "").split())
    info["isa"] = " ".join(f for f in ISA_FLAGS if f in flags) or "none of " + ",".join(ISA_FLAGS)
  info["cores"] = str(os.cpu_count())
  info["xla_flags"] = os.environ.get("XLA_FLAGS", "")
  return info


def describe(info: dict[str, str] | None = None) -> str:
  """One line naming the CPU, its ISA flags, core count and the XLA flags in force."""
  i = info or cpu_info()
  xla = f"; XLA_FLAGS=`{i['xla_flags']}`" if i["xla_flags"] else ""
  return f"{i['model']} ({i['family']}), {i['cores']} cores, ISA flags: {i['isa']}{xla}"


def matmul_probe(repeats: int = 5, dtype: str = "float32") -> dict[str, float]:
  """Best-of-`repeats` GFLOP/s of a jitted matmul at each `PROBES` shape on jax's device (plus a
  square 8192^3 off the CPU, where 2048^3 is too small to fill the chip)."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  out = {}
  matmul = jax.jit(jnp.matmul)
  shapes = dict(PROBES)
  if jax.devices()[0].platform != "cpu":
    shapes["square 8192^3"] = (8192, 8192, 8192)
  for name, (m, k, n) in shapes.items():
    a = jax.random.normal(jax.random.key(0), (m, k), dtype)
    b = jax.random.normal(jax.random.key(1), (k, n), dtype)
    jax.block_until_ready(matmul(a, b))
    best = float("inf")
    for _ in range(repeats):
      t = time.perf_counter()
      jax.block_until_ready(matmul(a, b))
      best = min(best, time.perf_counter() - t)
    out[name] = 2 * m * k * n / best / 1e9
  return out


def probe_line(probe: dict[str, float], dtype: str = "float32", how: str = "best of 5") -> str:
  return f"{dtype} matmul probe (jitted, {how}): " + ", ".join(
    f"{name} {gflops:.0f} GFLOP/s" for name, gflops in probe.items()
  )


def model_flops(config, batch: int, seq_len: int) -> float:
  """Model FLOPs of one train step (forward + backward) of a LLaMA `LlamaConfig`.

  6 x (attention/MLP kernel parameters) per position over B L positions, 6 x (LM head) over the
  B (L - 1) predicting positions, and 12 N L D per position for the attention scores and
  values (full L x L, as XLA computes the causal mask; half of it is masked).
  """
  d, f, n, v = config.hidden_dim, config.mlp_dim, config.num_layers, config.vocab_size
  q, kv = config.num_heads * config.head_dim, config.kv_heads * config.head_dim
  body = n * (d * q + 2 * d * kv + q * d + 3 * d * f)
  positions = batch * seq_len
  return 6 * body * positions + 6 * d * v * batch * (seq_len - 1) + 12 * n * seq_len * q * positions
