"""Step time of `adamw_8bit` vs a float32 AdamW of the same math, on LLaMA-60M-shaped weights.

The float32 twin is the same transform with quantisation disabled (`min_8bit_size` above every
leaf size), so the ratio isolates the cost of the 8-bit state path. `optax.adamw` is timed too.
Weights: 8 layers x (4 x 512x512 attention + 512x1376, 512x1376, 1376x512 MLP), float32 (25.3M
entries; the 60M model's embedding and head are left out, as in the issue's setup).

The same comparison is made for 8-bit GaLore: `galore_adamw_8bit` vs its float32 twin and
`galore_jax.galore_adamw`, rank 128 on every kernel, non-refresh steps (`update_proj_gap` above
the steps timed; the projection GEMMs run, the SVD does not).

Usage: python benchmarks/adam8bit_step.py [--steps 20]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import optax

import galore_jax as gj
from galore_jax import adamw_8bit, galore_adamw_8bit


def llama60m_shaped(key: jax.Array) -> dict:
  shapes = {"q": (512, 512), "k": (512, 512), "v": (512, 512), "o": (512, 512)}
  shapes |= {"gate": (512, 1376), "up": (512, 1376), "down": (1376, 512)}
  params = {}
  for layer in range(8):
    for name, shape in shapes.items():
      key, sub = jax.random.split(key)
      params[f"layer{layer}/{name}"] = 0.02 * jax.random.normal(sub, shape, jnp.float32)
  return params


def time_step(tx: optax.GradientTransformation, params, grads, steps: int) -> tuple[float, float]:
  """Median wall and process-CPU seconds of one jitted update + apply (params, state donated).

  CPU time (all threads of this process) is reported too because on a shared machine wall time
  mostly measures the neighbours.
  """

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  step = jax.jit(step, donate_argnums=(0, 1))
  params = jax.tree.map(jnp.copy, params)
  state = tx.init(params)
  for _ in range(3):  # compile + warm up
    params, state = step(params, state, grads)
  jax.block_until_ready(params)
  wall, cpu = [], []
  for _ in range(steps):
    t0, c0 = time.perf_counter(), time.process_time()
    params, state = step(params, state, grads)
    jax.block_until_ready((params, state))
    wall.append(time.perf_counter() - t0)
    cpu.append(time.process_time() - c0)
  return statistics.median(wall), statistics.median(cpu)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=20)
  args = parser.parse_args()
  params = llama60m_shaped(jax.random.key(0))
  grads = jax.tree.map(lambda p: 1e-3 * jnp.sign(p) + 1e-4, params)
  n = sum(p.size for p in jax.tree.leaves(params))
  print(f"{len(params)} leaves, {n / 1e6:.1f}M entries, backend {jax.default_backend()}")
  galore = dict(rank=128, update_proj_gap=10**6, scale=0.25, weight_decay=0.01)
  txs = {
    "adamw_8bit": adamw_8bit(1e-3, weight_decay=0.01),
    "adamw_8bit float32 twin": adamw_8bit(1e-3, weight_decay=0.01, min_8bit_size=2**62),
    "optax.adamw": optax.adamw(1e-3, eps=1e-8, weight_decay=0.01),
    "galore_adamw_8bit": galore_adamw_8bit(1e-3, **galore),
    "galore_adamw_8bit float32 twin": galore_adamw_8bit(1e-3, min_8bit_size=2**62, **galore),
    "galore_adamw": gj.galore_adamw(1e-3, **galore),
  }
  results = {name: time_step(tx, params, grads, args.steps) for name, tx in txs.items()}
  for name, (wall, cpu) in results.items():
    print(f"{name:>30}: {wall * 1e3:8.1f} ms/step wall, {cpu * 1e3:8.1f} ms/step CPU")
  for name in ("adamw_8bit", "galore_adamw_8bit"):
    for i, kind in enumerate(("wall", "CPU")):
      ratio = results[name][i] / results[f"{name} float32 twin"][i]
      print(f"ratio {name} / float32 twin ({kind}) = {ratio:.2f} (goal <= 1.1)")


if __name__ == "__main__":
  main()
