"""A user's own sharded loop on 4 CPU devices (run by tests/test_contract.py in a subprocess).

The user shards parameters and optimizer state with `galore_jax.sharding` over an `fsdp` axis
of a GSPMD (Auto) mesh, jits the step with those shardings, and compares it with the same steps
on one device. Prints one JSON line of results.
"""

import os

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
).strip()

import json  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402

import galore_jax as gj  # noqa: E402


def params_and_batches():
  k = jax.random.split(jax.random.key(0), 6)
  params = {
    "attn": {"kernel": jax.random.normal(k[0], (32, 64)) / 6},  # O >= I: keeps O (64)
    "mlp": {"kernel": jax.random.normal(k[1], (64, 16)) / 8},  # keeps I (64)
    "norm": jnp.ones((32,)),
  }
  batches = [
    (jax.random.normal(k[2 + t], (8, 32)), jax.random.normal(k[5], (8, 16))) for t in range(3)
  ]
  return params, batches


def loss(p, x, y):
  h = jnp.tanh((x * p["norm"]) @ p["attn"]["kernel"])
  return jnp.mean((h @ p["mlp"]["kernel"] - y) ** 2)


def run(tx, shard: bool):
  params, batches = params_and_batches()

  def step(p, s, x, y):
    u, s = tx.update(jax.grad(loss)(p, x, y), s, p)
    return optax.apply_updates(p, u), s

  if shard:
    mesh = jax.make_mesh((4,), ("fsdp",), axis_types=(AxisType.Auto,))
    mask = gj.llama_galore_mask
    pspecs = gj.sharding.param_partition_specs(params, "fsdp", 4, mask=mask)
    sspecs = gj.sharding.state_partition_specs(
      jax.eval_shape(tx.init, params), params, pspecs, "fsdp", 4
    )
    named = lambda specs: jax.tree.map(
      lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, jax.P)
    )
    p_sh, s_sh = named(pspecs), named(sspecs)
    params = jax.device_put(params, p_sh)
    state = jax.jit(tx.init, out_shardings=s_sh)(params)
    step = jax.jit(step, in_shardings=(p_sh, s_sh, None, None), out_shardings=(p_sh, s_sh))
  else:
    state = tx.init(params)
    step = jax.jit(step)
  for x, y in batches:
    params, state = step(params, state, x, y)
  split = [getattr(a.sharding, "spec", None) for a in jax.tree.leaves(params)]
  return params, [str(s) for s in split]


def main():
  report = {"devices": jax.device_count()}
  for name, tx in {
    "galore_adamw": gj.galore_adamw(1e-2, rank=4, update_proj_gap=2, mask=gj.llama_galore_mask),
    "galore_adamw_8bit": gj.galore_adamw_8bit(
      1e-2, rank=4, update_proj_gap=2, mask=gj.llama_galore_mask, min_8bit_size=64, block_size=16
    ),
  }.items():
    ref, _ = run(tx, shard=False)
    got, specs = run(tx, shard=True)
    diff = max(
      float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))
      for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref))
    )
    report[name] = {"rel_diff": diff, "param_specs": specs}
  # jax.make_mesh's default axis types are Explicit: GaLore says what to do, at init.
  mesh = jax.make_mesh((4,), ("fsdp",))
  params, _ = params_and_batches()
  sharded = jax.device_put(params["attn"]["kernel"], NamedSharding(mesh, jax.P(None, "fsdp")))
  try:
    gj.galore_adamw(1e-2, rank=4).init({"attn": {"kernel": sharded}})
    report["explicit_error"] = None
  except ValueError as e:
    report["explicit_error"] = str(e)
  print(json.dumps(report))


if __name__ == "__main__":
  main()
