"""Orbax checkpoints of the full training state plus the data iterator's position."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Saves `TrainState` (params, optimizer state with projectors, step, RNG) and data state.

  Restores into an abstract tree (`jax.eval_shape` of a fresh state), so dtypes and shapes are
  checked against the current config: a checkpoint from another model or optimizer fails
  with an error naming the mismatch instead of loading garbage.
  """

  def __init__(self, directory: str | os.PathLike, keep: int = 2):
    self.directory = Path(directory).absolute()
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, data_state: dict) -> None:
    args = ocp.args.Composite(
      state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)
    )
    self._manager.save(step, args=args)

  def restore_latest(self, like: Any) -> tuple[Any, dict] | None:
    """(state, data_state) of the newest checkpoint, shaped like `like`; None if there is none."""
    step = self._manager.latest_step()
    if step is None:
      return None
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore())
    try:
      restored = self._manager.restore(step, args=args)
    except Exception as e:  # noqa: BLE001 (orbax raises many types for bad files)
      raise RuntimeError(
        f"cannot restore checkpoint step {step} from {self.directory}: {e}. The checkpoint is "
        "corrupted or was written by a different model/optimizer config; move it away or use "
        "another --workdir (nothing was deleted)."
      ) from e
    return restored.state, restored.data

  def wait(self) -> None:
    self._manager.wait_until_finished()
