"""Multi-device checks for tests/test_sharding.py, run in a fresh process with CPU devices.

The device count must be fixed before jax is imported, so pytest (whose process has one CPU
device) runs this script as a subprocess:

  python tests/sharding_worker.py checks DATA_DIR OUT.json   # 8 devices: meshes, HLO, resume
  python tests/sharding_worker.py multihost DATA_DIR WORKDIR  # one of 2 processes x 4 devices
  python tests/sharding_worker.py preempt DATA_DIR WORKDIR    # the same, until SIGTERM

`checks` writes a JSON report that the tests assert on. `multihost` is one process of a
2-process run (`JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID` set by the
test) that trains with `train_and_evaluate` on a 2x4 mesh spanning both processes.
"""

from __future__ import annotations

import os
import sys

MODE = sys.argv[1] if len(sys.argv) > 1 else ""
_DEVICES = 4 if MODE in ("multihost", "preempt") else 8
# Unoptimised CPU code generation halves compile time; numerics do not depend on it.
os.environ["XLA_FLAGS"] = (
  f"--xla_force_host_platform_device_count={_DEVICES} --xla_backend_optimization_level=0 "
  "--xla_llvm_disable_expensive_passes=true"
)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

if MODE in ("multihost", "preempt"):
  jax.config.update("jax_cpu_collectives_implementation", "gloo")

import galore_jax as gj  # noqa: E402
from benchmarks import hlo  # noqa: E402
from configs import default  # noqa: E402
from train import checkpoint, data, sharding, trainer  # noqa: E402

MESHES = ((1, 1), (8, 1), (2, 4), (1, 8))
STEPS = 4  # update_proj_gap=2: refreshes at counts 0 (cold start) and 2 (warm start)
SEQ_LEN, BATCH = 32, 8


def tiny_config(data_dir: str, name: str = "galore_adamw", method: str = "randomized"):
  c = default.get_config()
  c.model.update(size="9m", hidden_dim=32, mlp_dim=64, num_heads=2, num_layers=2)
  c.data.update(data_dir=data_dir, seq_len=SEQ_LEN, eval_max_documents=8)
  # rank + oversample = 6 sketch columns: the refresh's tall-skinny factors ([2, 64, 6] at
  # most) stay well below the smallest targeted gradient ([2, 32, 32]).
  c.optimizer.update(name=name, rank=4, oversample=2, update_proj_gap=2, learning_rate=3e-2)
  c.optimizer.subspace_method = method
  c.train.update(
    num_steps=STEPS,
    batch_size=BATCH,
    eval_batch_size=8,
    eval_every=100,
    checkpoint_every=100,
    log_every=1,
    progress_bar=False,
  )
  return c


_COMPILED: dict = {}


def compiled_step(config, mesh_shape):
  """(setup, layout, compiled train step) for a config on a mesh, compiled once."""
  o = config.optimizer
  key = (o.name, o.subspace_method, mesh_shape)
  if key not in _COMPILED:
    setup = trainer.build(config)
    devices = jax.devices()[: mesh_shape[0] * mesh_shape[1]]
    mesh = sharding.make_mesh(*mesh_shape, devices=devices)
    layout = trainer.make_layout(config, setup, mesh)
    step = jax.jit(
      trainer.make_train_step(setup, config.train.grad_accum_steps, layout),
      in_shardings=(layout.state, layout.batch),
      out_shardings=(layout.state, layout.replicated),
      donate_argnums=(0,),
    )
    abstract = jax.eval_shape(lambda: trainer.init_state(setup, 0))
    tokens = jax.ShapeDtypeStruct((BATCH, SEQ_LEN), jnp.int32)
    _COMPILED[key] = (setup, layout, step.lower(abstract, {"tokens": tokens}).compile())
  return _COMPILED[key]


def train_batches(config, n: int) -> list[dict]:
  it = data.make_train_iterator(
    config.data.data_dir,
    seq_len=SEQ_LEN,
    batch_size=BATCH,
    seed=config.data.seed,
    process_index=0,
    process_count=1,
  )
  return [next(it) for _ in range(n)]


def run(config, mesh_shape, batches, host_state):
  """Losses of `len(batches)` steps on a mesh from a host state, and the final state."""
  _, layout, step = compiled_step(config, mesh_shape)
  state = jax.device_put(host_state, layout.state)
  losses = []
  for batch in batches:
    state, out = step(state, layout.put_batch(batch))
    losses.append(float(out["loss"]))
  return losses, jax.tree.map(np.asarray, state)


def rel_diff(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-30)))


def check_equality(data_dir: str, batches) -> dict:
  """Losses per optimizer and mesh, and their largest relative difference from 1x1."""
  out = {}
  for name in ("galore_adamw", "adamw"):
    config = tiny_config(data_dir, name)
    setup, layout, _ = compiled_step(config, (1, 1))
    # One initial state for every mesh (a jitted init per mesh would cost a compile each).
    init = jax.tree.map(np.asarray, trainer.init_state(setup, config.train.seed, layout))
    runs = {m: run(config, m, batches, init) for m in MESHES}
    ref_loss, ref_state = runs[(1, 1)]
    out[name] = {
      f"{m[0]}x{m[1]}": {
        "losses": losses,
        "max_rel_diff": rel_diff(losses, ref_loss),
        "params_max_abs_diff": max(
          float(np.max(np.abs(a - b)))
          for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_state.params))
        ),
      }
      for m, (losses, state) in runs.items()
    }
  return out


def check_collectives(data_dir: str) -> dict:
  """Collectives of the refresh branch under FSDP (1x8): randomized vs exact SVD."""
  out = {}
  for method in ("randomized", "svd"):
    config = tiny_config(data_dir, "galore_adamw", method)
    setup, _, compiled = compiled_step(config, (1, 8))
    colls = hlo.hlo_collectives(compiled.as_text())
    abstract = jax.eval_shape(lambda s=setup: trainer.init_state(s, 0))
    mask = gj.llama_galore_mask(abstract.params)
    # float32 bytes of one matrix (one layer of a stacked [N, I, O] kernel): the refresh
    # factorises one matrix at a time, so that is what the exact SVD gathers.
    targets = [
      int(np.prod(p.shape[-2:])) * 4
      for p, m in zip(jax.tree.leaves(abstract.params), jax.tree.leaves(mask))
      if m
    ]
    refresh = [c for c in colls if c.branch == 1]
    out[method] = {
      "target_matrix_bytes": sorted(set(targets)),
      # The largest single array of each (possibly combined) refresh collective.
      "refresh": [[c.op, c.shape, c.largest] for c in refresh],
      "refresh_bytes": hlo.collective_bytes(colls, 1),
      "step_bytes": hlo.collective_bytes(colls) + hlo.collective_bytes(colls, 0),
      "refresh_full_gradient_moves": sum(c.largest >= min(targets) for c in refresh),
    }
  return out


def restore(config, workdir: Path, mesh_shape):
  """The newest checkpoint in `workdir`, restored onto a mesh, and that mesh's shardings."""
  setup, layout, _ = compiled_step(config, mesh_shape)
  abstract = jax.eval_shape(lambda: trainer.init_state(setup, 0))
  like = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, layout.state
  )
  state, _ = checkpoint.Checkpointer(workdir / "checkpoints").restore_latest(like)
  return state, layout.state


def check_resume_across_meshes(data_dir: str, workdir: Path, ref: dict) -> dict:
  """`train_and_evaluate` on 2x4 stopped after 2 steps, resumed on 1x8: losses and state."""
  config = tiny_config(data_dir, "galore_adamw")
  config.mesh.update(data=2, fsdp=4)
  config.train.stop_after_steps = 2
  trainer.train_and_evaluate(config, workdir)
  # The step-2 checkpoint restored onto its own 2x4 mesh and onto 1x8: the same bits.
  (on_2x4, _), (on_1x8, shardings) = (
    restore(config, workdir, (2, 4)),
    restore(config, workdir, (1, 8)),
  )
  same = all(
    np.array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(jax.tree.leaves(on_2x4), jax.tree.leaves(on_1x8))
  )
  resharded = all(
    a.sharding.is_equivalent_to(s, a.ndim)
    for a, s in zip(jax.tree.leaves(on_1x8), jax.tree.leaves(shardings))
  )
  config.mesh.update(data=1, fsdp=8)
  config.train.stop_after_steps = 0
  trainer.train_and_evaluate(config, workdir)
  losses = [r["loss"] for r in trainer.load_metrics(workdir) if "loss" in r]
  return {
    "losses": losses,
    "restored_same_bits_on_both_meshes": same,
    "restored_has_new_shardings": resharded,
    "max_rel_diff_vs_1x1": rel_diff(losses, ref["galore_adamw"]["1x1"]["losses"]),
    "max_rel_diff_vs_2x4": rel_diff(losses, ref["galore_adamw"]["2x4"]["losses"]),
  }


def main_checks(data_dir: str, out_path: str) -> None:
  t0 = time.time()
  cpu = {"start": time.process_time()}
  batches = train_batches(tiny_config(data_dir), STEPS)
  report = {"devices": jax.device_count()}
  cpu["data"] = time.process_time()
  report["equality"] = check_equality(data_dir, batches)
  cpu["equality"] = time.process_time()
  report["collectives"] = check_collectives(data_dir)
  cpu["collectives"] = time.process_time()
  workdir = Path(out_path).parent / "resume"
  report["resume"] = check_resume_across_meshes(data_dir, workdir, report["equality"])
  cpu["resume"] = time.process_time()
  report["seconds"] = time.time() - t0
  report["cpu_seconds"] = cpu
  Path(out_path).write_text(json.dumps(report, indent=1))


def main_multihost(data_dir: str, workdir: str) -> None:
  config = tiny_config(data_dir, "galore_adamw")
  config.mesh.update(data=2, fsdp=4)
  trainer.train_and_evaluate(config, workdir)
  print("process", jax.process_index(), "of", jax.process_count(), "devices", jax.device_count())


def main_preempt(data_dir: str, workdir: str) -> None:
  """`multihost` with 40 steps; process 1 pauses after logging step 2 and writes
  `WORKDIR.paused`, for the test's SIGTERM to reach it alone, mid-run. Exits 75 if preempted."""
  from train import preemption  # noqa: PLC0415

  log_step = trainer._StepLog.__call__

  def log_then_pause(self, step_done, out):
    values = log_step(self, step_done, out)
    if step_done == 2 and jax.process_index() == 1:
      Path(workdir + ".paused").write_text("")
      time.sleep(2)
    return values

  trainer._StepLog.__call__ = log_then_pause
  config = tiny_config(data_dir, "galore_adamw")
  config.mesh.update(data=2, fsdp=4)
  config.train.num_steps = 40
  try:
    trainer.train_and_evaluate(config, workdir)
  except preemption.Preempted as e:
    print(f"process {jax.process_index()}: {e}", flush=True)
    sys.exit(preemption.EXIT_CODE)


if __name__ == "__main__":
  if MODE == "preempt":
    main_preempt(sys.argv[2], sys.argv[3])
  elif MODE == "checks":
    main_checks(sys.argv[2], sys.argv[3])
  elif MODE == "multihost":
    main_multihost(sys.argv[2], sys.argv[3])
  else:
    raise SystemExit(__doc__)
