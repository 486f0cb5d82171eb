"""Keep XLA:CPU's freed step buffers mapped (glibc malloc settings): no page faults per step.

XLA:CPU allocates each execution's temporaries as one buffer (`temp_size_in_bytes`: 470 MB for
the LLaMA-9m step at 16 x 256) with glibc `malloc` on a worker thread, and frees it when the step
ends. A thread's arena cannot hold a chunk above 64 MB, so glibc serves it with a fresh `mmap`
(even with `M_MMAP_MAX = 0`) and unmaps it on `free`: every step then faults the whole buffer
back in, 4 KiB at a time, each page zeroed by the kernel (~120k minor faults per step at 9m).

With one arena (the main heap, grown with `brk`), no `mmap` and no trimming, the freed buffer
stays mapped and the next step reuses it: 0 faults per step. The cost is that the process keeps
its peak heap (it would reach it again next step anyway). Arenas are picked when a thread first
allocates, so this must run before the jax backend starts its threads; later it still stops
trimming but threads keep the arenas they have.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8


def keep_freed_memory() -> bool:
  """One malloc arena, no mmap, no trim (glibc on Linux); False where that is not available.

  Example::

    from train import host_memory
    host_memory.keep_freed_memory()  # before the first jax computation
  """
  if platform.system() != "Linux" or not platform.libc_ver()[0] == "glibc":
    return False
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mallopt = libc.mallopt
  except (OSError, AttributeError):
    return False
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  # -1 as size_t: never give the heap top back to the kernel.
  ok = [mallopt(p, v) for p, v in ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1))]
  return all(ok)
