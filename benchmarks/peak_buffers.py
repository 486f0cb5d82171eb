"""What is live at the peak of a compiled XLA program's temp memory, from an XLA dump.

Measurement code, not part of the trainer (`benchmarks/results/finetune_memory.md` cites it).
XLA's `memory_analysis().temp_size_in_bytes` is the size of one preallocated temp buffer in
which the buffer assignment packs every temporary at an offset; this reads that assignment
(`*buffer-assignment.txt`) and the program's flattened schedule (`*live-range.txt`), finds the
schedule position where the most temp bytes are live, and lists the largest buffers live
there with the op that defines each (from the optimized HLO's metadata). The difference
between the temp size and the most bytes live at once is packing (fragmentation).

Usage:
  XLA_FLAGS=--xla_dump_to=DIR python benchmarks/finetune_memory.py --sizes llama3-8b ...
  python benchmarks/peak_buffers.py DIR [--top 20] [--module jit_update]
"""

from __future__ import annotations

import argparse
import glob
import os
import re
from typing import NamedTuple

_VALUE = re.compile(r"<\d+ (\S+)(?: \(phi\))? @\d+> \(size=(\d+),offset=(\d+)\): (\S+)")
_RANGE = re.compile(r"^\s+(\S+):(\d+)-(\d+)$")
_DEF = re.compile(r"^\s*(?:ROOT )?%(\S+) = (\S+) .*?(?:op_name=\"([^\"]*)\")?")


class Buffer(NamedTuple):
  name: str
  size: int
  offset: int
  shape: str
  op_name: str


class Peak(NamedTuple):
  temp_bytes: int  # the preallocated temp buffer (XLA's temp_size_in_bytes)
  live_bytes: int  # the most temp bytes live at one schedule position (offsets counted once)
  position: int
  buffers: list  # [Buffer] live there, largest first (aliases of one offset each listed)


def _temp_values(lines: list[str]) -> tuple[int, dict]:
  """(size of the preallocated temp allocation, {value name: (size, offset, shape)})."""
  start = next(k for k, line in enumerate(lines) if "preallocated-temp" in line)
  total = int(re.search(r"size (\d+)", lines[start])[1])
  values = {}
  for line in lines[start + 1 :]:
    if line.startswith("allocation"):
      break
    m = _VALUE.search(line)
    if m:
      values[m[1]] = (int(m[2]), int(m[3]), m[4])
  return total, values


def _ranges(lines: list[str]) -> dict:
  out = {}
  for line in lines:
    m = _RANGE.match(line)
    if m:
      out[m[1]] = (int(m[2]), int(m[3]))
  return out


def _op_names(hlo_lines: list[str]) -> dict:
  out = {}
  for line in hlo_lines:
    m = _DEF.match(line)
    if m:
      meta = re.search(r'op_name="([^"]*)"', line)
      out[m[1]] = meta[1] if meta else ""
  return out


def peak(dump_dir: str, module: str = "jit_update") -> Peak:
  """The temp-memory peak of the (last) dumped module whose name contains `module`."""
  pattern = os.path.join(dump_dir, f"*{module}*cpu_after_optimizations-buffer-assignment.txt")
  paths = sorted(glob.glob(pattern)) or sorted(
    glob.glob(os.path.join(dump_dir, f"*{module}*after_optimizations-buffer-assignment.txt"))
  )
  if not paths:
    raise FileNotFoundError(f"no *{module}*-buffer-assignment.txt in {dump_dir}")
  prefix = paths[-1][: -len("-buffer-assignment.txt")]
  read = lambda suffix: open(prefix + suffix).read().splitlines()
  total, values = _temp_values(read("-buffer-assignment.txt"))
  ranges = _ranges(read("-live-range.txt"))
  ops = _op_names(read(".txt"))
  key = lambda name: name if name in ranges else name + "{}"
  spans = {n: ranges[key(n)] for n in values if key(n) in ranges}
  # Values at the same offset whose lives overlap are one buffer (an in-place update, a
  # loop-carried value): a position's live bytes count each live offset once, at its largest.
  starts: dict[int, list] = {}
  ends: dict[int, list] = {}
  for name, (s, e) in spans.items():
    starts.setdefault(s, []).append(name)
    ends.setdefault(e + 1, []).append(name)
  active: dict[int, dict] = {}  # offset -> {value name: size}
  best, where = -1, 0
  for t in sorted(set(starts) | set(ends)):
    for name in ends.get(t, []):
      active[values[name][1]].pop(name)
    for name in starts.get(t, []):
      active.setdefault(values[name][1], {})[name] = values[name][0]
    live = sum(max(sizes.values()) for sizes in active.values() if sizes)
    if live > best:
      best, where = live, t
  at = [n for n, (s, e) in spans.items() if s <= where <= e]
  buffers = [
    Buffer(n, values[n][0], values[n][1], values[n][2], ops.get(n.split("{")[0], "")) for n in at
  ]
  buffers.sort(key=lambda b: -b.size)
  return Peak(total, best, where, buffers)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("dump_dir")
  parser.add_argument("--top", type=int, default=20)
  parser.add_argument("--module", default="jit_update")
  args = parser.parse_args(argv)
  p = peak(args.dump_dir, args.module)
  print(
    f"temp allocation {p.temp_bytes / 1e9:.3f} GB; most live at once {p.live_bytes / 1e9:.3f} GB"
  )
  print(f"(schedule position {p.position}); packing {(p.temp_bytes - p.live_bytes) / 1e9:.3f} GB\n")
  print("| MB | shape | buffer | op |\n|---|---|---|---|")
  for b in p.buffers[: args.top]:
    print(f"| {b.size / 1e6:.1f} | `{b.shape}` | {b.name} | {b.op_name[-70:]} |")


if __name__ == "__main__":
  main()
