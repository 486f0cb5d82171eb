"""Stopping a run cleanly on SIGTERM or SIGINT: finish the step, save, exit with `EXIT_CODE`.

SIGTERM is what a preemptible VM, SLURM's time limit, `docker stop` and Kubernetes send before
they kill a process (SIGKILL follows after a grace period of seconds to minutes); Ctrl-C sends
SIGINT. Inside `StopSignals` both become a request that the training loop reads once per step
(`should_stop`): it finishes the step it is on, saves a checkpoint, waits until it is on disk
and raises `Preempted`; `python -m train.main` then prints how to resume and exits with
`EXIT_CODE`.

A further signal while that save runs is reported and otherwise ignored: the save finishes.
(SIGKILL cannot be ignored; orbax's atomic rename then leaves the previous checkpoint as the
newest complete one.) Leaving `StopSignals` restores the handlers it replaced.

With several JAX processes (`jax.distributed`) each may receive the signal at a different step,
and a process that stops alone would hang the others in their next collective. They agree on
the step through JAX's preemption sync service (`multihost_utils.reached_preemption_sync_point`,
what orbax uses), which installs its own SIGTERM handler in `jax.distributed.initialize`: SIGTERM
is left to it, and SIGINT is forwarded to it as SIGTERM.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

import jax

# EX_TEMPFAIL of sysexits.h, "a temporary failure; the user is invited to retry": the run saved
# its state and the same command resumes it. (143, 128 + SIGTERM, would read as "killed".)
EXIT_CODE = 75
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
  """The run stopped on a signal after its checkpoint of step `step` was written."""

  def __init__(self, step: int, signal_name: str, checkpoint_dir: os.PathLike):
    self.step, self.signal_name, self.checkpoint_dir = step, signal_name, checkpoint_dir
    super().__init__(
      f"Stopped by {signal_name} after step {step}; its checkpoint is saved in {checkpoint_dir}."
    )


class StopSignals:
  """SIGTERM and SIGINT, while inside this context, ask the loop to stop at a step boundary.

  Handlers are installed only in the main thread (Python allows no other); elsewhere, and in
  a multi-process run without JAX's preemption service, signals keep their usual effect.
  """

  def __init__(self):
    self.received: str | None = None  # name of the first signal received
    self._previous: dict[int, object] = {}
    self._synced = False  # several processes: ask JAX's preemption sync service

  def __enter__(self) -> StopSignals:
    if threading.current_thread() is not threading.main_thread():
      return self
    if jax.process_count() > 1:
      from jax._src import distributed  # noqa: PLC0415 (whether the service is running)

      if distributed.global_state.preemption_sync_manager is None:
        print(
          "WARNING: JAX's preemption service is off (jax_enable_preemption_service): SIGTERM "
          "and SIGINT stop this multi-process run without a checkpoint.",
          file=sys.stderr,
        )
        return self
      self._synced = True
    for sig in SIGNALS:
      if not (self._synced and sig == signal.SIGTERM):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}

  def _handle(self, signum: int, frame) -> None:
    del frame
    name = signal.Signals(signum).name
    # os.write, not print: the handler may interrupt a print to the same stream (tqdm's bar),
    # and a re-entrant buffered write would raise inside the training loop.
    if self.received is None:
      self.received = name
      _say(f"Received {name}: finishing the current step, then saving a checkpoint and stopping.")
      if self._synced:
        signal.raise_signal(signal.SIGTERM)  # to JAX's handler: every process then agrees
    else:
      _say(f"Received {name} again: stopping as soon as the checkpoint is on disk.")

  def should_stop(self, step: int) -> bool:
    """Whether to save and stop after `step`; call it once per step, for every step."""
    if self._synced:
      from jax.experimental import multihost_utils  # noqa: PLC0415

      if multihost_utils.reached_preemption_sync_point(step):
        self.received = self.received or "SIGTERM"  # the signal may have come to another process
        return True
      return False
    return self.received is not None


def _say(message: str) -> None:
  os.write(2, (message + "\n").encode())  # fd 2 even where sys.stderr is replaced


__all__ = ["EXIT_CODE", "SIGNALS", "Preempted", "StopSignals"]
