"""Orbax checkpoints of the full training state plus the data iterator's position.

A checkpoint is complete once orbax has renamed its `<step>.orbax-checkpoint-tmp` folder to
`<step>` (saves are asynchronous: `save` returns once the arrays are copied to host memory,
`wait` once they are on disk). A run killed before that leaves only the tmp folder, which
`CheckpointManager` does not list as a step; the trainer removes such leftovers when it starts.

Orbax verifies metadata and OCDBT b-tree nodes (CRC-32C) but not array bytes, so each save also
stores two wrapping uint32 sums of every array's bits (`checksums`), compared on restore: a
flipped byte in an array file is an error naming the step and the array instead of NaNs.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

_UNSIGNED = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}
UNRESTORABLE_SUFFIX = ".unrestorable"  # a bad step folder set aside (never deleted)


class CheckpointError(RuntimeError):
  """A checkpoint cannot be written or no checkpoint in the directory restores."""


def _leaf_checksum(x: jax.Array) -> jax.Array:
  """uint32[2]: the sum of x's bit patterns and their sum weighted by odd position weights."""
  if x.dtype == jnp.bool_:
    u = x.astype(jnp.uint32)
  else:
    u = jax.lax.bitcast_convert_type(x, _UNSIGNED.get(x.dtype.itemsize, jnp.uint32))
    u = u.astype(jnp.uint32)
  # Linear index from iotas of the array's own shape: no reshape, so no resharding.
  index = jnp.zeros(u.shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(u.ndim)):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, u.shape, axis) * np.uint32(stride)
    stride = (stride * u.shape[axis]) % 2**32
  weights = index * np.uint32(2) + np.uint32(1)
  return jnp.stack([jnp.sum(u, dtype=jnp.uint32), jnp.sum(u * weights, dtype=jnp.uint32)])


_checksums_fn = jax.jit(lambda tree: jax.tree.map(_leaf_checksum, tree))


def checksums(state: Any) -> dict[str, list[int]]:
  """`{array path: [sum, weighted sum]}` of every leaf's bits (integer sums: any sharding gives
  the same numbers)."""
  sums = jax.device_get(_checksums_fn(state))
  flat, _ = jax.tree_util.tree_flatten_with_path(sums)
  return {jax.tree_util.keystr(path): [int(v) for v in value] for path, value in flat}


def shapes(state: Any) -> dict[str, str]:
  """`{array path: "dtype[shape]"}` of every leaf: read before any array on restore."""
  flat, _ = jax.tree_util.tree_flatten_with_path(state)
  return {
    jax.tree_util.keystr(path): f"{jnp.dtype(x.dtype).name}{list(x.shape)}" for path, x in flat
  }


def _shape_mismatch(saved: dict[str, str], want: dict[str, str]) -> str | None:
  """What differs between a checkpoint's `shapes` and the state this config builds, or None."""
  missing, extra = sorted(set(want) - set(saved)), sorted(set(saved) - set(want))
  differ = [(k, saved[k], want[k]) for k in want if k in saved and saved[k] != want[k]]
  if not (missing or extra or differ):
    return None
  parts = [f"{k}: checkpoint {a}, this config {b}" for k, a, b in differ[:3]]
  if missing:
    parts.append(f"{len(missing)} arrays missing from the checkpoint (e.g. {missing[0]})")
  if extra:
    parts.append(f"{len(extra)} arrays not in this config (e.g. {extra[0]})")
  return "; ".join(parts)


class Checkpointer:
  """Saves `TrainState` (params, optimizer state with projectors, step, RNG) and data state.

  Restores into an abstract tree (`jax.eval_shape` of a fresh state), so dtypes and shapes are
  checked against the current config: a checkpoint from another model or optimizer fails
  with an error naming the mismatch instead of loading garbage.

  Args:
    directory: where step folders go.
    keep: how many recent checkpoints to keep (>= 1).
    clean_unfinished: remove `*.orbax-checkpoint-tmp*` folders left by a killed save (only the
      process that will write here should do this, never a reader of a live run).
  """

  def __init__(self, directory: str | os.PathLike, keep: int = 2, clean_unfinished: bool = False):
    if not isinstance(keep, int) or keep < 1:
      raise ValueError(f"keep={keep!r} must be an int >= 1 (config.train.keep_checkpoints).")
    self.directory = Path(directory).absolute()
    if clean_unfinished and jax.process_index() == 0:
      for tmp in sorted(self.directory.glob("*.orbax-checkpoint-tmp*")):
        print(f"Removing unfinished checkpoint {tmp} (a save that was interrupted).")
    options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=True, cleanup_tmp_directories=clean_unfinished
    )
    self._manager = ocp.CheckpointManager(self.directory, options=options)
    self._pending: int | None = None  # step of an asynchronous save not yet waited for

  def latest_step(self) -> int | None:
    """The newest step saved (possibly still being written: `wait` first to be sure)."""
    return self._manager.latest_step()

  def save(self, step: int, state: Any, data_state: dict) -> None:
    """Starts saving step `step` (asynchronously); raises `CheckpointError` naming the step and
    folder if this or the previous save failed."""
    self.wait()
    # Fail here, before orbax starts: if its own folder creation fails, its writer threads wait
    # for that folder until their timeout (300 s) and keep the process from exiting.
    probe = self.directory / f".write-probe-{step}-{jax.process_index()}"
    try:
      probe.mkdir()
      probe.rmdir()
    except OSError as e:
      raise self._save_error(step, e) from e
    args = ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=ocp.args.JsonSave(data_state),
      checksums=ocp.args.JsonSave(checksums(state)),
      shapes=ocp.args.JsonSave(shapes(state)),
    )
    try:
      self._manager.save(step, args=args)
    except Exception as e:  # noqa: BLE001 (orbax and the file system raise many types)
      raise self._save_error(step, e) from e
    self._pending = step

  def wait(self) -> None:
    """Blocks until the last save is on disk; `CheckpointError` if it failed."""
    step, self._pending = self._pending, None
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001
      raise self._save_error(step, e) from e

  def _save_error(self, step: int | None, e: Exception) -> CheckpointError:
    previous = [s for s in self._manager.all_steps() if s != step]
    kept = f"step {max(previous)}" if previous else "none"
    return CheckpointError(
      f"saving checkpoint step {step} to {self.directory / str(step)} failed: "
      f"{type(e).__name__}: {e}. The previous checkpoint ({kept}) in {self.directory} is "
      "intact; free disk space or make the directory writable, then restart to resume from it."
    )

  def restore(self, step: int, like: Any) -> tuple[Any, dict]:
    """(state, data_state) of checkpoint `step`, shaped like `like`, checksums verified."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    if (self.directory / str(step) / "shapes").is_dir():  # older checkpoints: none
      # Compared before any array is read: a failed array restore leaves orbax's reads running
      # in the background, whose errors are printed long after the one-line message.
      saved = self._manager.restore(step, args=ocp.args.Composite(shapes=ocp.args.JsonRestore()))
      differ = _shape_mismatch(saved.shapes, shapes(abstract))
      if differ:
        raise CheckpointError(f"its arrays do not match this config's: {differ}")
    items = dict(state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore())
    has_sums = (self.directory / str(step) / "checksums").is_dir()  # older checkpoints: none
    if has_sums:
      items["checksums"] = ocp.args.JsonRestore()
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    if has_sums:
      bad = [k for k, v in checksums(restored.state).items() if restored.checksums.get(k) != v]
      if bad:
        raise CheckpointError(
          f"{len(bad)} arrays of {self.directory / str(step) / 'state'} do not match the "
          f"checksums saved with them (corrupted files): {', '.join(bad[:4])}"
          + (", ..." if len(bad) > 4 else "")
        )
    return restored.state, restored.data

  def restore_latest(self, like: Any, set_aside: bool = False) -> tuple[Any, dict] | None:
    """(state, data_state) of the newest checkpoint that restores; None if there are none.

    A checkpoint that fails (corrupted, truncated, or from another config) is reported on
    stderr with its step and error and the next older one is tried. With `set_aside`, failed
    folders newer than the one restored are renamed `<step>.unrestorable` (kept for
    inspection, out of the way of new saves). If none restores: `CheckpointError` naming
    every step tried; nothing is renamed or deleted then.
    """
    steps = sorted(self._manager.all_steps(), reverse=True)
    errors = []
    for step in steps:
      try:
        restored = self.restore(step, like)
      except Exception as e:  # noqa: BLE001 (orbax raises many types for bad files)
        errors.append((step, e))
        print(
          f"WARNING: checkpoint step {step} in {self.directory} cannot be restored: "
          f"{type(e).__name__}: {_short(e)}",
          file=sys.stderr,
        )
        continue
      if errors:
        print(
          f"WARNING: resuming from step {step}, the newest checkpoint in {self.directory} that "
          f"restores (skipped steps {[s for s, _ in errors]}).",
          file=sys.stderr,
        )
        if set_aside:
          self._set_aside([s for s, _ in errors])
      return restored
    if errors:
      tried = "; ".join(f"step {s}: {type(e).__name__}: {_short(e)}" for s, e in errors)
      raise CheckpointError(
        f"no checkpoint in {self.directory} can be restored (tried steps "
        f"{[s for s, _ in errors]}): {tried}. They are corrupted or were written by a different "
        "model/optimizer config; move them away or use another --workdir (nothing was deleted)."
      ) from errors[0][1]
    return None

  def _set_aside(self, steps: list[int]) -> None:
    if jax.process_index() == 0:
      for step in steps:
        target = self.directory / f"{step}{UNRESTORABLE_SUFFIX}"
        n = 1
        while target.exists():
          target, n = self.directory / f"{step}{UNRESTORABLE_SUFFIX}.{n}", n + 1
        (self.directory / str(step)).rename(target)
        print(f"WARNING: moved unrestorable checkpoint step {step} to {target}.", file=sys.stderr)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # noqa: PLC0415

      multihost_utils.sync_global_devices("galore_jax_checkpoint_set_aside")
    self._manager.reload()


def _short(e: Exception, limit: int = 600) -> str:
  """The first `limit` characters of an error message on one line (TensorStore's are long)."""
  text = " ".join(str(e).split())
  return text if len(text) <= limit else text[:limit] + " ..."
