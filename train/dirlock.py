"""A directory owned by one live process: an exclusive `flock` on a file inside it.

Two trainers on one workdir would both write `checkpoints/` and interleave their steps
silently; two `prepare_data` runs would remove each other's unfinished datasets. A `DirLock`
held for the whole run stops the second one at once, with an error naming the PID, host and
command of the first.

The lock is the kernel's `flock`, not the file's existence: it is released when its process
ends in any way (`kill -9`, a crash, a lost machine on a local disk), so a lock file left
behind never blocks a restart. The file itself only records who holds the lock, for the
error message. On NFS, Linux maps `flock` to NFS byte-range locks, which also work across
machines (NFSv4, or v3 with lockd).

Example::

  with DirLock("runs/default"):  # DirectoryInUse if another process holds it
    ...  # train
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import shlex
import socket
import sys
from pathlib import Path

LOCK_FILE = "LOCK"


class DirectoryInUse(RuntimeError):
  """Another live process holds the directory's lock."""


class DirLock:
  """An exclusive, non-blocking lock on `directory` (created if missing), held until `release`.

  Args:
    directory: the directory to own; the lock file is `directory/LOCK`.
    what: how the error names the directory's role (e.g. "workdir").
    advice: what the error tells the user to do about the holder.
  """

  def __init__(self, directory: str | os.PathLike, what: str = "directory", advice: str = ""):
    self.path = Path(directory) / LOCK_FILE
    self._what, self._advice = what, advice
    self._file = None

  def acquire(self) -> DirLock:
    """Takes the lock; `DirectoryInUse` naming the holder if another process has it."""
    self.path.parent.mkdir(parents=True, exist_ok=True)
    # Not truncated on open: until we hold the lock, the file names the current holder.
    file = open(self.path, "a+")  # noqa: SIM115 (held until release)
    try:
      fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      file.seek(0)
      holder = _describe(file.read())
      file.close()
      raise DirectoryInUse(
        f"{self._what} {self.path.parent} is in use: {holder} holds its lock {self.path}. "
        + self._advice
      ) from None
    file.seek(0)
    file.truncate()
    file.write(json.dumps(_this_process()) + "\n")
    file.flush()
    self._file = file
    return self

  def release(self) -> None:
    """Releases the lock (the file stays: removing it could race with the next holder)."""
    if self._file is not None:
      self._file.close()  # closing the last descriptor releases the flock
      self._file = None

  def __enter__(self) -> DirLock:
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


def is_locked(directory: str | os.PathLike) -> bool:
  """Whether a live process holds `directory`'s lock (False when it has no lock file)."""
  path = Path(directory) / LOCK_FILE
  if not path.is_file():
    return False
  with open(path) as file:
    try:
      fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      return True
  return False


def _this_process() -> dict:
  return {
    "pid": os.getpid(),
    "host": socket.gethostname(),
    "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    "command": shlex.join(sys.argv),
  }


def _describe(text: str) -> str:
  """'PID 123 on host h (started ..., command ...)' from a lock file's contents."""
  try:
    info = json.loads(text)
    return (
      f"PID {info['pid']} on host {info['host']} (started {info['started']}, command: "
      f"{info['command']})"
    )
  except (ValueError, KeyError, TypeError):  # the holder has not written its details yet
    return "another process (its PID and host are not written yet)"


__all__ = ["LOCK_FILE", "DirLock", "DirectoryInUse", "is_locked"]
