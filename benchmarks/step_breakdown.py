"""Where one train step's time goes: ours per compiled HLO op next to torch's per aten op.

Ours: the trainer's jitted step (`train.trainer.make_train_step`, the state donated) is traced
with `jax.profiler`; every executed op (an XLA:CPU thunk, or a GPU kernel's HLO op) is joined to
its instruction in the compiled HLO and classified

* by kind: matmul (a `dot` or a fusion around one), transpose/copy (a copy or transpose, or a
  fusion XLA rooted at one: a layout change with its producers fused in), fill (a broadcast
  constant: zeros), slicing (dynamic-slice / update-slice: scan inputs and outputs),
  elementwise/reduce;
* by region, from the `jax.named_scope`s of the model and step: the chunked loss's scan
  (`chunked_loss`, its backward fused in), the optimizer, and the model's forward (`jvp`) and
  backward (`transpose(jvp)`) split into attention projections, `sdpa` (scores, softmax,
  values), `mlp`, `rms_norm`, `rope` and the rest.

Matmuls are grouped by shape with their achieved GFLOP/s next to the float32 matmul probe
(`benchmarks/machine.py`). Torch (transformers `LlamaForCausalLM` + galore-torch / AdamW, as
`train_throughput.py` builds them) runs under `torch.profiler` with shapes recorded; its aten ops
are classified the same way (skipped when torch or transformers is absent).

Runs unchanged on a GPU (ours then reads the device plane's "XLA Ops"; torch runs on cuda).

Usage: python benchmarks/step_breakdown.py [--sizes 9m,20m] [--steps 3] [--optimizers
galore_adamw,adamw] [--no-torch] [--out benchmarks/results/step_breakdown.md]
"""

from __future__ import annotations

import argparse
import collections
import glob
import math
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import machine  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "step_breakdown.md"
KINDS = ("matmul", "transpose/copy", "elementwise/reduce", "slicing", "fill", "other")
_INSTR = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (\(.*?\)|\S+) ([a-z][\w\-]*)\((.*)$")
_HEADER = re.compile(r"^(?:ENTRY )?%([\w.\-]+) .*\{\s*$")
_DIMS = re.compile(r"\[([\d,]*)\]")
_CONTAINERS = ("while", "conditional", "call", "async-start", "async-done")
GPU_NOTE = [
  "## On a lent GPU (prepared, not yet run)",
  "",
  "The same script runs unchanged where `ml_collections` / tfds / grain / transformers are not "
  "installed (the lent H100/H200): ours then builds the trainer's step from `train.model`, "
  "`train.losses` and `galore_jax` (constant lr, synthetic right-padded tokens), reads the "
  "device plane's XLA ops (cuBLAS GEMM custom calls count as matmuls), and skips torch. One "
  "call measures bf16 MFU against a bf16 8192^3 matmul probe at 60M, 350M and 1B, and the "
  "GaLore / AdamW step ratio (both optimizers per size, non-refresh steps):",
  "",
  "    python benchmarks/step_breakdown.py --sizes 60m,350m,1b --optimizers galore_adamw,adamw \\",
  "      --dtype bfloat16 --steps 5 --no-torch --out $OUT/step_breakdown_gpu.md",
  "",
  "(each size compiles two steps and runs one exact-SVD refresh in warm-up; the 1B GaLore "
  "refresh is the longest part). It answers: the share of the step in matmuls vs elementwise "
  "vs copies on the GPU, whether the chunked loss's scan or the optimizer's projections "
  "(small GEMMs) limit MFU, and how far GaLore's non-refresh step is from AdamW's.",
  "",
]


# ----------------------------------------------------------------------------------------------
# HLO: each instruction's kind, region, and (matmuls) FLOPs and shape class.


def _dims(shape: str) -> list[int]:
  m = _DIMS.search(shape)
  return [int(x) for x in m.group(1).split(",") if x] if m else []


def _parse_computations(hlo: str) -> dict[str, dict[str, tuple]]:
  """computation -> {instruction: (shape, opcode, rest of line)}."""
  comps: dict[str, dict[str, tuple]] = {}
  current = None
  for line in hlo.splitlines():
    h = _HEADER.match(line)
    if h and "=" not in line.split("{")[0].split("(")[0]:
      current = comps.setdefault(h.group(1), {})
      continue
    m = _INSTR.match(line)
    if m and current is not None:
      current[m.group(1)] = (m.group(2), m.group(3), m.group(4))
  return comps


def _dot_info(comp: dict[str, tuple], shape: str, rest: str) -> tuple[float, str]:
  """(FLOPs, "BxMxK @ KxN"-style class) of one dot instruction."""
  ops = [o.strip().lstrip("%") for o in rest.split(")")[0].split(",")][:2]
  lhs = _dims(comp[ops[0]][0]) if ops[0] in comp else []
  out = _dims(shape)
  contract = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest)
  batch = re.search(r"lhs_batch_dims=\{([\d,]*)\}", rest)
  k_idx = [int(x) for x in contract.group(1).split(",") if x] if contract else []
  b_idx = [int(x) for x in batch.group(1).split(",") if x] if batch else []
  k = math.prod(lhs[i] for i in k_idx) if lhs else 0
  b = math.prod(lhs[i] for i in b_idx) if lhs else 1
  mn = math.prod(out) // max(b, 1)
  m = math.prod(d for i, d in enumerate(lhs) if i not in k_idx and i not in b_idx) if lhs else 0
  n = mn // m if m else 0
  label = f"{m}x{k} @ {k}x{n}" + (f" (batch {b})" if b > 1 else "")
  return 2.0 * math.prod(out) * k, label


def _gemm_info(comp: dict[str, tuple], shape: str, rest: str) -> tuple[float, str]:
  """(FLOPs, class) of a GEMM custom call (GPU), from its backend config's dot dimensions."""
  lhs_name = rest.split(")")[0].split(",")[0].strip().lstrip("%")
  lhs = _dims(comp[lhs_name][0]) if lhs_name in comp else []
  out = _dims(shape)  # a (result, workspace) tuple: the first array is the result

  def dims(key: str) -> list[int]:
    m = re.search(rf'"{key}":\[([^\]]*)\]', rest)
    return [int(x.strip('" ')) for x in m.group(1).split(",") if x.strip('" ')] if m else []

  k_idx, b_idx = dims("lhs_contracting_dimensions"), dims("lhs_batch_dimensions")
  if not lhs or not out:
    return 0.0, ""
  k = math.prod(lhs[i] for i in k_idx)
  b = math.prod(lhs[i] for i in b_idx)
  m = math.prod(d for i, d in enumerate(lhs) if i not in k_idx and i not in b_idx)
  n = math.prod(out) // max(b * m, 1)
  label = f"{m}x{k} @ {k}x{n}" + (f" (batch {b})" if b > 1 else "")
  return 2.0 * math.prod(out) * k, label


def _region(op_name: str) -> str:
  if "optimizer" in op_name:
    return "optimizer"
  if "chunked_loss" in op_name:
    return "loss scan (chunked, bwd fused)"
  part = "bwd" if "transpose(" in op_name else "fwd"
  for scope, label in (("sdpa", "sdpa"), ("rope", "rope"), ("rms_norm", "rms_norm")):
    if f"/{scope}/" in op_name or op_name.endswith(f"/{scope}"):
      return f"model {part}: {label}"
  for scope, label in (("attention", "attn proj"), ("mlp", "mlp")):
    if f"/{scope}/" in op_name:
      return f"model {part}: {label}"
  if "jvp(" in op_name:
    return f"model {part}: other"
  return "step glue (grads, metrics)"


def classify_hlo(hlo: str) -> dict[str, dict]:
  """HLO instruction name -> {"kind", "region", "flops", "class"} for every leaf instruction."""
  comps = _parse_computations(hlo)
  fused = {  # bodies of fusions: their instructions never run as ops of their own
    m.group(1)
    for comp in comps.values()
    for _, opcode, rest in comp.values()
    if opcode == "fusion" and (m := re.search(r"calls=%([\w.\-]+)", rest))
  }
  out = {}
  for comp_name, comp in comps.items():
    if comp_name in fused:
      continue
    for name, (shape, opcode, rest) in comp.items():
      if opcode in _CONTAINERS or opcode in ("parameter", "get-tuple-element", "tuple"):
        continue
      called = re.search(r"calls=%([\w.\-]+)", rest)
      body = comps.get(called.group(1), {}) if called else {}
      ops = {op for _, op, _ in body.values()} or {opcode}
      flops, label = 0.0, ""
      dots = [(s, r) for s, op, r in body.values() if op in ("dot", "convolution")]
      if opcode in ("dot", "convolution"):
        flops, label = _dot_info(comp, shape, rest)
      elif dots:
        for s, r in dots:
          f, label = _dot_info(body, s, r)
          flops += f
      if opcode == "custom-call" and re.search(r"gemm|matmul", rest, re.IGNORECASE):
        flops, label = _gemm_info(comp, shape, rest)
      if flops or opcode == "custom-call" and re.search(r"gemm|matmul", rest, re.IGNORECASE):
        kind = "matmul"
      elif ops & {"dynamic-slice", "dynamic-update-slice", "gather", "scatter"} and not (
        ops & {"exp", "log", "multiply", "add", "divide", "subtract"}
      ):
        kind = "slicing"
      elif ops <= {"copy", "transpose", "bitcast", "reshape", "parameter"} or (
        opcode == "fusion" and name.startswith(("copy", "transpose"))  # rooted at a layout change
      ):
        kind = "transpose/copy"
      elif ops <= {"broadcast", "constant", "parameter", "bitcast", "reshape"}:
        kind = "fill"
      elif opcode in ("fusion", "add", "multiply", "reduce", "select", "convert") or body:
        kind = "elementwise/reduce"
      else:
        kind = "other"
      op_name = re.search(r'op_name="([^"]*)"', rest)
      region = _region(op_name.group(1) if op_name else "")
      out[name] = {"kind": kind, "region": region, "flops": flops, "class": label}
  return out


# ----------------------------------------------------------------------------------------------
# Ours: profile the jitted step and join the executed ops to the HLO.


def _profile_events(trace_dir: str, known: dict) -> tuple[dict[str, float], dict[str, int]]:
  """{HLO op: total ns}, {HLO op: count} from the newest xplane under `trace_dir` (device plane
  if one names HLO ops, else the host's thunks)."""
  from jax.profiler import ProfileData  # noqa: PLC0415

  path = max(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True), key=os.path.getmtime)
  data = ProfileData.from_file(path)
  per_plane = []
  for plane in data.planes:
    ns, count = collections.Counter(), collections.Counter()
    for line in plane.lines:
      if line.name == "python" or (plane.name.startswith("/device") and "XLA Ops" not in line.name):
        continue
      for ev in line.events:
        name = ev.name.split(" ")[0].lstrip("%")  # GPU op lines may show "%name = ..."
        if name in known:
          ns[name] += ev.duration_ns
          count[name] += 1
    per_plane.append((plane.name.startswith("/device"), ns, count))
  device = [p for p in per_plane if p[0] and p[1]]
  chosen = device or [p for p in per_plane if p[1]]
  ns, count = collections.Counter(), collections.Counter()
  for _, n, c in chosen:
    ns.update(n)
    count.update(c)
  return ns, count


def _synthetic_batches(vocab: int, batch: int, seq_len: int, count: int) -> list:
  """Right-padded random tokens (where the bundled data pipeline is not installed, e.g. a GPU)."""
  import numpy as np  # noqa: PLC0415

  rng = np.random.default_rng(0)
  out = []
  for _ in range(count):
    tokens = rng.integers(1, vocab, (batch, seq_len), dtype=np.int32)
    lengths = rng.integers(seq_len // 4, seq_len + 1, batch)
    out.append(np.where(np.arange(seq_len)[None] < lengths[:, None], tokens, 0).astype(np.int32))
  return out


def _trainer_step(size: str, optimizer: str, dtype: str):
  """(jitted step, state, batches, model config, batch, seq) of `train.trainer` on the default
  config; ImportError where its data / config stack is not installed."""
  import jax  # noqa: PLC0415

  from benchmarks import train_throughput as tt  # noqa: PLC0415
  from train import trainer  # noqa: PLC0415

  config = tt._config(size, optimizer, -1)
  config.model.dtype = config.model.param_dtype = dtype
  setup = trainer.build(config)
  state = trainer.init_state(setup, config.train.seed)
  batches = [{"tokens": jax.device_put(b)} for b in tt._batches(config, 2)]
  step = jax.jit(trainer.make_train_step(setup, 1), donate_argnums=(0,))
  return step, state, batches, setup.model_config, config.train.batch_size, config.data.seq_len


def _plain_step(size: str, optimizer: str, dtype: str, batch: int = 16, seq_len: int = 256):
  """The trainer's step rebuilt from `train.model`, `train.losses` and `galore_jax` alone (the
  default config's optimizer at a constant lr, chunked loss of 16 positions)."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  import optax  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415

  import galore_jax as gj  # noqa: PLC0415
  from train import losses  # noqa: PLC0415
  from train.model import Llama, llama_config  # noqa: PLC0415

  cfg = llama_config(size, dtype=dtype, param_dtype=dtype, scan_layers=True)
  graphdef, params = nnx.split(Llama(cfg, rngs=nnx.Rngs(0)), nnx.Param)
  if optimizer == "galore_adamw":
    tx = gj.galore_adamw(
      0.01, rank=32, update_proj_gap=50, scale=0.25, eps=1e-6, mask=gj.llama_galore_mask
    )
  else:
    tx = optax.adamw(0.01, eps=1e-6, weight_decay=0.0)

  def loss_fn(p, tokens_BxL):
    model = nnx.merge(graphdef, p)
    h_BxLxD = model.hidden_states(tokens_BxL)
    kernel_DxV = model.head_kernel().astype(h_BxLxD.dtype)
    return losses.chunked_next_token_loss(h_BxLxD, kernel_DxV, tokens_BxL, chunk_size=16)

  def step(state, batch_):
    p, opt_state = state
    (loss_sum, n), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, batch_["tokens"])
    grads = jax.tree.map(lambda g: g / jnp.maximum(n, 1).astype(g.dtype), grads)
    with jax.named_scope("optimizer"):
      updates, opt_state = tx.update(grads, opt_state, p)
      p = optax.apply_updates(p, updates)
    return (p, opt_state), {"loss": loss_sum / n}

  batches = [
    {"tokens": jax.device_put(b)} for b in _synthetic_batches(cfg.vocab_size, batch, seq_len, 2)
  ]
  state = (params, tx.init(params))
  return jax.jit(step, donate_argnums=(0,)), state, batches, cfg, batch, seq_len


def ours(
  size: str, optimizer: str, steps: int, dtype: str = "float32", top: int = 12, plain: bool = False
) -> dict:
  import jax  # noqa: PLC0415

  try:
    if plain:
      raise ImportError("--plain-step")
    step, state, batches, cfg, batch, seq_len = _trainer_step(size, optimizer, dtype)
    how = "train.trainer step"
  except ImportError:
    step, state, batches, cfg, batch, seq_len = _plain_step(size, optimizer, dtype)
    how = "plain step (no data stack here; synthetic tokens)"
  compiled = step.lower(state, batches[0]).compile()
  ops = classify_hlo(compiled.as_text())
  for b in batches:  # warm-up: the first refresh (step 0) and a plain step
    state, _ = compiled(state, b)
  jax.block_until_ready(state)
  walls = []
  for i in range(steps):
    t = time.perf_counter()
    state, _ = compiled(state, batches[i % 2])
    jax.block_until_ready(state)
    walls.append(time.perf_counter() - t)
  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir)
    for i in range(steps):
      state, _ = compiled(state, batches[i % 2])
      jax.block_until_ready(state)
    jax.profiler.stop_trace()
    ns, count = _profile_events(trace_dir, ops)
  del state
  flops = machine.model_flops(cfg, batch, seq_len)
  cells = collections.Counter()
  mm = collections.defaultdict(lambda: [0, 0.0, 0.0, set()])  # class -> count, flops, ns, regions
  for name, t in ns.items():
    op = ops[name]
    cells[(op["region"], op["kind"])] += t / steps / 1e6
    if op["kind"] == "matmul":
      row = mm[op["class"]]
      row[0] += count[name] / steps
      row[1] += op["flops"] * count[name] / steps
      row[2] += t / steps / 1e6
      row[3].add(op["region"])
  return {
    "name": f"ours {optimizer} ({how})",
    "wall_s": statistics.median(walls),
    "cells": cells,
    "matmuls": mm,
    "model_flops": flops,
    "xla_flops": compiled.cost_analysis().get("flops", float("nan")),
    "top": [
      (name, ops[name], count[name] / steps, t / steps / 1e6) for name, t in ns.most_common(top)
    ],
  }


# ----------------------------------------------------------------------------------------------
# Torch: the same model under torch.profiler.

_TORCH_MATMUL = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"}
_TORCH_SDPA = "scaled_dot_product"
_TORCH_COPY = {"aten::copy_", "aten::clone", "aten::contiguous", "aten::_to_copy", "aten::cat"}
_TORCH_LOSS = ("log_softmax", "nll_loss", "cross_entropy")
_TORCH_FILL = {"aten::zero_", "aten::fill_", "aten::zeros", "aten::empty", "aten::zeros_like"}


def _torch_kind(name: str) -> str:
  if name in _TORCH_MATMUL:
    return "matmul"
  if name in _TORCH_COPY:
    return "transpose/copy"
  if name in _TORCH_FILL:
    return "fill"
  return "elementwise/reduce"


def _torch_region(event) -> str:
  root, names = event, [event.name]
  while root.cpu_parent is not None:
    root = root.cpu_parent
    names.append(root.name)
  path = " ".join(names)
  if "Optimizer.step" in path:
    return "optimizer"
  part = "bwd" if "autograd::engine" in path or "Backward" in path else "fwd"
  if any(k in path for k in _TORCH_LOSS):
    return f"loss ({part})"
  if _TORCH_SDPA in path:
    return f"model {part}: sdpa"
  return f"model {part}"


def theirs(size: str, optimizer: str, steps: int, threads: int) -> dict:
  import torch  # noqa: PLC0415

  from benchmarks import train_throughput as tt  # noqa: PLC0415
  from train import trainer  # noqa: PLC0415

  device = "cuda" if torch.cuda.is_available() else "cpu"
  step, _, config = tt._torch_contender(size, optimizer, threads, tuned_malloc=True, device=device)
  batches = tt._batches(config, 2)
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  for b in batches:
    step(b)
  sync()
  walls = []
  for i in range(steps):
    t = time.perf_counter()
    step(batches[i % 2])
    sync()
    walls.append(time.perf_counter() - t)
  activities = [torch.profiler.ProfilerActivity.CPU]
  if device == "cuda":
    activities.append(torch.profiler.ProfilerActivity.CUDA)
  with torch.profiler.profile(activities=activities, record_shapes=True) as prof:
    for i in range(steps):
      step(batches[i % 2])
    sync()
  cells = collections.Counter()
  mm = collections.defaultdict(lambda: [0, 0.0, 0.0, set()])
  for ev in prof.events():
    self_us = ev.self_device_time_total if device == "cuda" else ev.self_cpu_time_total
    if not self_us:
      continue
    kind, region = _torch_kind(ev.name), _torch_region(ev)
    cells[(region, kind)] += self_us / steps / 1e3
    if kind == "matmul" and ev.input_shapes:
      shapes = [s for s in ev.input_shapes if s]
      a, b = shapes[-2], shapes[-1]  # addmm(bias, a, b), mm(a, b), bmm(a, b)
      m, k, n = math.prod(a[:-1]), a[-1], b[-1]
      label = f"{m}x{k} @ {k}x{n}"
      row = mm[label]
      row[0] += 1 / steps
      row[1] += 2.0 * m * k * n / steps
      row[2] += self_us / steps / 1e3
      row[3].add(region)
  setup = trainer.build(config)
  flops = machine.model_flops(setup.model_config, config.train.batch_size, config.data.seq_len)
  label = "GaLoreAdamW" if optimizer == "galore_adamw" else "AdamW"
  return {
    "name": f"torch {label}",
    "wall_s": statistics.median(walls),
    "cells": cells,
    "matmuls": mm,
    "model_flops": flops,
  }


# ----------------------------------------------------------------------------------------------
# Report.


def _tables(r: dict, probe: dict[str, float]) -> list[str]:
  square = max(v for k, v in probe.items() if k.startswith("square"))
  total = sum(r["cells"].values())
  regions = sorted({reg for reg, _ in r["cells"]})
  kinds = [k for k in KINDS if any(r["cells"].get((reg, k)) for reg in regions)]
  mfu = r["model_flops"] / r["wall_s"] / 1e9
  lines = [
    f"#### {r['name']}",
    "",
    f"Wall {r['wall_s']:.3f} s/step (median, unprofiled); profiled op time {total / 1e3:.3f} "
    f"s/step; model FLOPs {r['model_flops'] / 1e9:.1f} G/step -> {mfu:.0f} GFLOP/s = "
    f"{mfu / square:.0%} of the square-matmul probe"
    + (
      f"; XLA cost analysis {r['xla_flops'] / 1e9:.1f} GFLOP (each loop body once)"
      if "xla_flops" in r
      else ""
    )
    + ".",
    "",
    "| region | " + " | ".join(kinds) + " | total ms | share |",
    "|---|" + "---|" * (len(kinds) + 2),
  ]
  for reg in regions:
    row = [r["cells"].get((reg, k), 0.0) for k in kinds]
    lines.append(
      f"| {reg} | " + " | ".join(f"{v:.1f}" for v in row) + f" | {sum(row):.1f} "
      f"| {sum(row) / total:.0%} |"
    )
  col = [sum(r["cells"].get((reg, k), 0.0) for reg in regions) for k in kinds]
  lines.append(
    "| **all** | " + " | ".join(f"**{v:.1f}**" for v in col) + f" | **{total:.1f}** | 100% |"
  )
  lines += [
    "",
    "| matmul class (M x K @ K x N) | per step | GFLOP/step | ms/step | GFLOP/s | vs square probe "
    "| regions |",
    "|---|---|---|---|---|---|---|",
  ]
  for label, (n, flops, ms, regs) in sorted(r["matmuls"].items(), key=lambda kv: -kv[1][2]):
    if ms < 0.05 * total / 100:  # below 0.05% of the step
      continue
    rate = flops / ms / 1e6 if ms else 0.0
    lines.append(
      f"| {label} | {n:.0f} | {flops / 1e9:.2f} | {ms:.1f} | {rate:.0f} | {rate / square:.0%} "
      f"| {', '.join(sorted(regs))} |"
    )
  if "top" in r:
    lines += ["", "| top HLO ops | kind | region | runs/step | ms/step |", "|---|---|---|---|---|"]
    for name, op, n, ms in r["top"]:
      shape = f" ({op['class']})" if op["class"] else ""
      lines.append(f"| `{name}`{shape} | {op['kind']} | {op['region']} | {n:.0f} | {ms:.1f} |")
  return [*lines, ""]


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--sizes", default="9m,20m")
  p.add_argument("--steps", type=int, default=3, help="timed and profiled steps per contender")
  p.add_argument("--optimizers", default="galore_adamw,adamw")
  p.add_argument("--threads", type=int, default=2, help="torch threads")
  p.add_argument("--dtype", default="float32", help="ours: compute and parameter dtype")
  p.add_argument("--top", type=int, default=12, help="ours: list this many most costly HLO ops")
  p.add_argument("--no-torch", action="store_true")
  p.add_argument("--plain-step", action="store_true", help="ours: the rebuilt step (GPU path)")
  p.add_argument("--out", default=str(RESULTS))
  args = p.parse_args()
  os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
  from train import host_memory  # noqa: PLC0415

  host_memory.keep_freed_memory()  # as `train.main` runs the step: before jax starts
  import jax  # noqa: PLC0415

  try:
    import torch  # noqa: F401, PLC0415
    import transformers  # noqa: F401, PLC0415

    with_torch = not args.no_torch
  except ImportError:
    with_torch = False
  load0 = os.getloadavg()
  probe = machine.matmul_probe(dtype=args.dtype)
  print(machine.probe_line(probe, args.dtype), flush=True)
  body = []
  for size in args.sizes.split(","):
    body += [f"### LLaMA-{size}", ""]
    for opt in args.optimizers.split(","):
      results = [ours(size, opt, args.steps, args.dtype, args.top, args.plain_step)]
      if with_torch and args.dtype == "float32" and (opt != "galore_adamw" or _has("galore_torch")):
        results.append(theirs(size, opt, args.steps, args.threads))
      for r in results:
        table = _tables(r, probe)
        print("\n".join(table), flush=True)
        body += table
  load1 = os.getloadavg()
  dev = jax.devices()[0]
  where = machine.describe() if dev.platform == "cpu" else f"{dev.device_kind} ({dev.platform})"
  header = [
    "# Train-step breakdown: ours per HLO op, torch per aten op",
    "",
    f"Command: `python benchmarks/step_breakdown.py {' '.join(sys.argv[1:])}`".replace(" `", "`"),
    "",
    f"Machine: {where}; jax {jax.__version__}; load average {load0[0]:.1f} at start, "
    f"{load1[0]:.1f} at end (shared machine: absolute times are noisy, shares less so).",
    "",
    machine.probe_line(probe, args.dtype) + ".",
    "",
    "Batch 16 x 256 (bundled sample, pad mode), float32, `configs/default.py` (chunked loss, "
    f"GaLore r=32); {args.steps} profiled steps after warm-up. Cells are ms per step of op "
    "time (ours: XLA thunks / kernels; torch: aten self time), summed over threads, so op "
    "time can exceed wall time where ops overlap. MFU = model FLOPs / wall time / square probe.",
    "",
  ]
  Path(args.out).write_text("\n".join(header + body + GPU_NOTE))
  print(f"wrote {args.out}")


def _has(module: str) -> bool:
  try:
    __import__(module)
  except ImportError:
    return False
  return True


if __name__ == "__main__":
  main()
