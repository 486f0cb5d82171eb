"""Collectives of a compiled XLA program, parsed from its optimized HLO text.

Measurement code, not part of the trainer, for `benchmarks/sharding_collectives.py` and the
sharding tests (`tests/test_sharding.py`, `tests/sharding_worker.py`): which all-gathers,
all-reduces, reduce-scatters ... a compiled step runs, how many bytes each moves, and in which
branch of a conditional (GaLore's refresh `lax.cond`) or how many times inside a loop (the
layer scan).

Example::

  compiled = jax.jit(step).lower(state, batch).compile()
  colls = hlo.hlo_collectives(compiled.as_text())
  every_step = hlo.collective_bytes(colls) + hlo.collective_bytes(colls, branch=0)
"""

from __future__ import annotations

import math
import re
from typing import NamedTuple

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2}
_DTYPE_BYTES.update({"s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8})
_ARRAY = re.compile(r"\b(pred|[subfc]\d+|bf16|f8\w*)\[([\d,]*)\]")
_HEADER = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\) -> .*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*?) ([a-z][\w\-]*)\((.*)$")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


class Collective(NamedTuple):
  """One collective of a compiled HLO module.

  `bytes` is the size of what it works on: the result of an all-gather, the operand of the
  others (each device sends about `(n-1)/n` of it; a ring all-reduce twice that), summed over
  the `arrays` of a combined (tuple-shaped) collective; `shape` and `largest` describe the
  largest of those arrays. `count` is how often it runs per execution (the product of the
  enclosing known loop trip counts); `branch` is `None` outside conditionals, else the index
  of the enclosing `conditional`'s branch (for `lax.cond`: 1 = the true function, e.g.
  GaLore's refresh).
  """

  op: str
  shape: str
  arrays: int
  bytes: int
  largest: int
  count: int
  branch: int | None


def _arrays(text: str) -> list[tuple[int, str]]:
  """(bytes, "dtype[dims]") of each array shape in an HLO shape or operand list."""
  out = []
  for dtype, dims in _ARRAY.findall(text):
    n = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
    out.append(
      (n * _DTYPE_BYTES.get(dtype, int(re.sub(r"\D", "", dtype) or 8) // 8), f"{dtype}[{dims}]")
    )
  return out


def _operands(rest: str) -> str:
  depth = 1
  for i, ch in enumerate(rest):
    depth += {"(": 1, ")": -1}.get(ch, 0)
    if depth == 0:
      return rest[:i]
  return rest


def hlo_collectives(hlo_text: str) -> list[Collective]:
  """Every collective of an optimized HLO module (`jax.jit(f).lower(...).compile().as_text()`),
  with its array size and how often it runs (while loops with a known trip count multiply)."""
  comps: dict[str, list[str]] = {}
  entry, current = None, None
  for line in hlo_text.splitlines():
    m = _HEADER.match(line)
    if m:
      current = comps.setdefault(m.group(1), [])
      entry = m.group(1) if line.startswith("ENTRY") else entry
    elif current is not None and line.strip() == "}":
      current = None
    elif current is not None:
      current.append(line)
  out: list[Collective] = []

  def visit(name: str, count: int, branch: int | None, seen: tuple[str, ...]) -> None:
    for line in comps.get(name, ()):
      m = _INSTR.match(line)
      if not m:
        continue
      _, shape, op, rest = m.groups()
      base = op.removesuffix("-start")
      if base in COLLECTIVES:
        result, operands = _arrays(shape), _arrays(_operands(rest))
        side = result if sum(b for b, _ in result) >= sum(b for b, _ in operands) else operands
        big = max(side, default=(0, ""))
        total = sum(b for b, _ in side)
        out.append(Collective(base, big[1], len(side), total, big[0], count, branch))
      if op == "while":
        trip = _TRIP.search(line)
        body = re.search(r"body=%?([\w.\-]+)", line).group(1)
        n = int(trip.group(1)) if trip else 1
        if body not in seen:
          visit(body, count * n, branch, (*seen, body))
      elif op == "conditional":
        names = re.search(r"branch_computations=\{([^}]*)\}", line)
        if names:
          branches = [b.strip().lstrip("%") for b in names.group(1).split(",")]
        else:
          branches = [
            re.search(rf"{k}_computation=%?([\w.\-]+)", line).group(1) for k in ("false", "true")
          ]
        for i, b in enumerate(branches):
          visit(b, count, i if branch is None else branch, (*seen, b))
      else:
        for callee in re.findall(r"(?:to_apply|calls)=%?([\w.\-]+)", line):
          if callee not in seen:
            visit(callee, count, branch, (*seen, callee))

  if entry is not None:
    visit(entry, 1, None, (entry,))
  return out


def collective_bytes(collectives: list[Collective], branch: int | None = None) -> int:
  """Total array bytes per execution of the collectives outside conditionals (`branch=None`)
  or in branch `branch` of them."""
  return sum(c.bytes * c.count for c in collectives if c.branch == branch)
