"""Device meshes and shardings of the training state: data parallel + FSDP through jax.sharding.

JAX's SPMD partitioner does all communication; this module only chooses `NamedSharding`s.
The mesh has two axes, `("data", "fsdp")`. Batch rows are split over both (FSDP is data
parallelism whose parameters and optimizer state are also split, over `fsdp`); parameters and
optimizer state are split over `fsdp` only and replicated over `data`. One device is the 1x1 case.

Sharding rules (`param_specs`, `state_specs`, `make_layout`):

* A GaLore-targeted kernel `[..., I, O]` is split along the axis GaLore *keeps* (`O` when the
  input axis is reduced, as `proj_type="std"` does when `O >= I`; `I` otherwise). Then the
  projected gradient `R = Pᵀ G` (`[r, O]`) and the back-projection `P N` contract only unsplit
  axes and run on local shards, and the low-rank moments are split the same way along the
  kept axis: per step, GaLore adds no communication besides gathering the projectors.
* If the kept axis does not divide by the `fsdp` size (LLaMA-1B's F = 5461), the kernel is
  split along its reduced axis instead, and the update reads its projector split the same way:
  the projection then reduces only the `r`-sized result (XLA would otherwise gather the whole
  gradient every step).
* Projectors `[..., D, r]` are stored split along `D` (`shard_projectors=True`) or replicated.
  The update reads them replicated: one all-gather of `D r` entries per matrix per step
  (`r / O` of what FSDP gathers for that weight anyway), and the new ones are split by a local
  slice. Left split, XLA would carry the split into the refresh and gather the sketch at
  every QR and product. Replicated storage moves nothing but costs `D r` entries per device:
  at 7B with r=1024, more than the low-rank moments' share on 8 devices. See
  benchmarks/results/sharding.md.
* Other parameters (embedding, LM head, norms) and every state leaf laid out like one (full-rank
  moments) are split along their largest axis divisible by the `fsdp` size (ties: the last);
  8-bit moments by whole quantisation blocks; leaves with no divisible axis, scalars and the
  RNG are replicated.

With `subspace_method="randomized"` the refresh needs nothing more: the sketch `A (Aᵀ Q)` is a
product of split matrices whose reduction over the split axis is an all-reduce of the
`D x (r + p)` factor, and the Rayleigh–Ritz QR gathers the `E x (r + p)` factor; no full-size
gradient matrix moves. The exact `"svd"` has no distributed form in XLA: every device gathers
each targeted gradient whole (in float32) and runs the same SVD (see
`benchmarks/sharding_collectives.py`).

Example::

  mesh = make_mesh(data=2, fsdp=4)
  specs = param_specs(params, mesh.shape["fsdp"], galore_mask=gj.llama_galore_mask(params))
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import galore_jax as gj

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")  # batch rows are split over every device
FSDP = "fsdp"


# proj_type -> which axis of a canonical `[..., I, O]` kernel GaLore keeps (documented in
# `galore_jax.scale_by_galore`): "std" keeps the larger dim (square: reduces the input, keeps O).
def mesh_shape(data: int, fsdp: int, num_devices: int) -> tuple[int, int]:
  """`(data, fsdp)` sizes with one `-1` resolved to "the remaining devices"; named errors."""
  sizes = {"data": data, "fsdp": fsdp}
  for name, size in sizes.items():
    if not isinstance(size, int) or isinstance(size, bool) or (size < 1 and size != -1):
      raise ValueError(f"config.mesh.{name}={size!r} must be a positive int or -1.")
  free = [name for name, size in sizes.items() if size == -1]
  if len(free) > 1:
    raise ValueError("config.mesh.data and config.mesh.fsdp cannot both be -1.")
  fixed = math.prod(size for size in sizes.values() if size != -1)
  if free:
    if num_devices % fixed:
      other = "fsdp" if free[0] == "data" else "data"
      raise ValueError(
        f"config.mesh.{other}={sizes[other]} does not divide the {num_devices} devices, so "
        f"config.mesh.{free[0]}=-1 has no size."
      )
    sizes[free[0]] = num_devices // fixed
  if sizes["data"] * sizes["fsdp"] != num_devices:
    raise ValueError(
      f"config.mesh.data={data} x config.mesh.fsdp={fsdp} = {sizes['data'] * sizes['fsdp']} "
      f"devices, but there are {num_devices} (jax.device_count()); make the product match "
      "or set one of them to -1."
    )
  return sizes["data"], sizes["fsdp"]


def make_mesh(data: int = -1, fsdp: int = 1, devices: Any = None) -> Mesh:
  """A `("data", "fsdp")` mesh over `devices` (default: all), with GSPMD (Auto) axes."""
  devices = jax.devices() if devices is None else list(devices)
  shape = mesh_shape(data, fsdp, len(devices))
  auto = (AxisType.Auto,) * len(MESH_AXES)
  return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)


def validate_batch(
  mesh: Mesh | Mapping[str, int], *, batch_size: int, grad_accum_steps: int, eval_batch_size: int
) -> None:
  """Named errors (`config.train.<field>`) when a (micro-)batch cannot be split evenly over the
  batch devices of `mesh` (a Mesh or an `{axis: size}` mapping)."""
  shape = getattr(mesh, "shape", mesh)
  shards = math.prod(shape[a] for a in BATCH_AXES)
  micro = batch_size // grad_accum_steps
  if micro % shards:
    raise ValueError(
      f"config.train.batch_size={batch_size} / config.train.grad_accum_steps="
      f"{grad_accum_steps} = {micro} rows per micro-batch is not divisible by the "
      f"{shards} data-parallel devices (config.mesh.data x config.mesh.fsdp = "
      f"{shape['data']} x {shape['fsdp']})."
    )
  if eval_batch_size % shards:
    raise ValueError(
      f"config.train.eval_batch_size={eval_batch_size} is not divisible by the {shards} "
      f"data-parallel devices (config.mesh.data x config.mesh.fsdp = "
      f"{shape['data']} x {shape['fsdp']})."
    )
  if jax.process_count() > 1 and batch_size % jax.process_count():
    raise ValueError(
      f"config.train.batch_size={batch_size} is not divisible by the "
      f"{jax.process_count()} processes."
    )


def param_specs(params: Any, fsdp: int, *, galore_mask: Any = None, proj_type: str = "std") -> Any:
  """`PartitionSpec` per parameter for an `fsdp`-way split (see the module docstring):
  `galore_jax.sharding.param_partition_specs` over the `fsdp` axis.

  Args:
    params: the parameter tree (arrays or `ShapeDtypeStruct`s).
    fsdp: size of the mesh's `fsdp` axis.
    galore_mask: tree of bools, True on GaLore-targeted kernels (`[..., in, out]`, the
      default dimension numbers); None when no GaLore runs.
    proj_type: GaLore's `proj_type`, which fixes the kept axis of each target.

  Returns:
    A tree of `PartitionSpec` shaped like `params`.
  """
  return gj.sharding.param_partition_specs(
    params, FSDP, fsdp, mask=galore_mask, proj_type=proj_type
  )


def state_specs(
  state: Any,
  params: Any,
  specs: Any,
  fsdp: int,
  *,
  shard_projectors: bool = True,
  proj_type: str = "std",
  for_update: bool = False,
) -> Any:
  """`PartitionSpec` per leaf of any tree holding parameters and optimizer state:
  `galore_jax.sharding.state_partition_specs` over the `fsdp` axis (the library's rules, which
  a user's own loop gets too; see the module docstring)."""
  return gj.sharding.state_partition_specs(
    state,
    params,
    specs,
    FSDP,
    fsdp,
    shard_projectors=shard_projectors,
    proj_type=proj_type,
    for_update=for_update,
  )


class Layout(NamedTuple):
  """Shardings of one run: the state tree, batches and scalars, on `mesh`."""

  mesh: Mesh
  state: Any  # tree of NamedSharding shaped like the training state: how it is stored
  update_state: Any  # the same with GaLore projectors replicated: how the update reads it
  params: Any  # tree of NamedSharding shaped like the parameters (for the gradients)
  batch: NamedSharding  # tokens [B, L]: rows over every device
  micro_batches: NamedSharding  # tokens [A, B / A, L] for gradient accumulation
  replicated: NamedSharding

  def put_batch(self, batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
    """This process's rows of a global batch as one global array per key."""
    out = {}
    for k, local in batch.items():
      local = np.asarray(local)
      rows = local.shape[0] * jax.process_count()
      global_shape = (rows, *local.shape[1:])
      out[k] = jax.make_array_from_process_local_data(self.batch, local, global_shape)
    return out


def make_layout(
  mesh: Mesh,
  abstract_state: Any,
  params: Any,
  *,
  galore_mask: Any = None,
  proj_type: str = "std",
  shard_projectors: bool = True,
) -> Layout:
  """Shardings for a state tree (e.g. `jax.eval_shape` of the initial `TrainState`)."""
  fsdp = mesh.shape[FSDP]
  pspecs = param_specs(params, fsdp, galore_mask=galore_mask, proj_type=proj_type)
  kw = dict(shard_projectors=shard_projectors, proj_type=proj_type)
  sspecs = state_specs(abstract_state, params, pspecs, fsdp, **kw)
  # How the update reads and writes the state (projectors replicated, see the module docstring).
  uspecs = state_specs(abstract_state, params, pspecs, fsdp, **kw, for_update=True)
  named = lambda tree: jax.tree.map(
    lambda s: NamedSharding(mesh, s), tree, is_leaf=lambda x: isinstance(x, P)
  )
  return Layout(
    mesh,
    named(sspecs),
    named(uspecs),
    named(pspecs),
    NamedSharding(mesh, P(BATCH_AXES, None)),
    NamedSharding(mesh, P(None, BATCH_AXES, None)),
    NamedSharding(mesh, P()),
  )


def shard_bytes(abstract: Any, shardings: Any) -> int:
  """Bytes per device of a tree laid out with `shardings` (the largest shard of each leaf)."""
  total = 0
  for x, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)):
    total += math.prod(s.shard_shape(tuple(x.shape))) * np.dtype(x.dtype).itemsize
  return total


# Environment variables of an explicit multi-process launch (JAX reads only the first itself).
DISTRIBUTED_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
# Cluster launchers whose variables `jax.distributed.initialize()` detects by itself.
_CLUSTER_SIZE_ENV = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")


def initialize_distributed(mode: str = "auto", environ: Mapping[str, str] | None = None) -> bool:
  """Joins a multi-process run (`jax.distributed.initialize`) before any device is used.

  Args:
    mode: "auto": from `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID` when
      set, else from a detected SLURM or Open MPI launch of more than one task, else a single
      process; "on": always call `jax.distributed.initialize()` (JAX's own cluster detection,
      e.g. Cloud TPU pods, Kubernetes); "off": never.
    environ: the environment (default `os.environ`).

  Returns:
    Whether this is a multi-process run.
  """
  env = os.environ if environ is None else environ
  if mode not in ("auto", "on", "off"):
    raise ValueError(f"config.mesh.distributed={mode!r} must be 'auto', 'on' or 'off'.")
  if jax.distributed.is_initialized():
    return True
  if mode == "off":
    return False
  given = [k for k in DISTRIBUTED_ENV if env.get(k)]
  if given:
    missing = [k for k in DISTRIBUTED_ENV if k not in given]
    if missing:
      raise ValueError(f"multi-process run: {', '.join(given)} set but {', '.join(missing)} not.")
    jax.distributed.initialize(
      env["JAX_COORDINATOR_ADDRESS"], int(env["JAX_NUM_PROCESSES"]), int(env["JAX_PROCESS_ID"])
    )
    return True
  if mode == "on" or any(int(env.get(k, "1")) > 1 for k in _CLUSTER_SIZE_ENV):
    jax.distributed.initialize()
    return True
  return False


def training_layout(
  mesh: Mesh,
  abstract_state: Any,
  *,
  galore: bool,
  proj_type: str = "std",
  shard_projectors: bool = True,
) -> Layout:
  """`make_layout` for a `trainer.TrainState`: GaLore's targets (`gj.llama_galore_mask`)
  when `galore`, with `proj_type` and `shard_projectors` as in the config's sections."""
  params = abstract_state.params
  return make_layout(
    mesh,
    abstract_state,
    params,
    galore_mask=gj.llama_galore_mask(params) if galore else None,
    proj_type=proj_type,
    shard_projectors=shard_projectors,
  )
