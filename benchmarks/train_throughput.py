"""End-to-end train step speed: ours (jitted, GaLore and AdamW) vs transformers + galore-torch.

Each contender is one long-lived worker process (so page faults and peak RSS are its own); the
driver sends them the same batches round-robin, one step each per round, so all contenders
share the same neighbours on a shared machine. Per contender:

* s/step: median wall time of the timed steps, with the spread (min - max);
* non-pad tokens/s: the batches' mean non-pad input tokens (`tokens[:, :-1] != 0`, the
  trainer's metric) over the median s/step;
* minor page faults per step (`getrusage(RUSAGE_SELF).ru_minflt` around each step, median);
* peak RSS of the worker (`ru_maxrss`, compilation and warm-up included).

GaLore contenders also time a refresh step each round (the same state, the subspaces recomputed:
ours through a second compiled step with `update_proj_gap=1`, torch by setting its projectors'
gap to 1 for that step); "amortised" is `((T - 1) * step + refresh) / T` at the config's T.

Ours: `train.trainer.build` + `make_train_step` from `configs/default.py` (batch 16 x 256,
pad mode, GaLoreAdamW r=32, T=50, scale 0.25, lr 0.01, float32), jitted with the state donated
as the trainer does; variants with the chunked loss (`model.loss_chunk_size`) and the full
`[B, L, V]` logits (`loss_chunk_size=0`, the path before issue 16). Torch: transformers
`LlamaForCausalLM` of the same shape (untied head, eps 1e-6, sdpa attention) initialised with
our weights (so both start from the same point), labels = tokens with pad -> -100, and
`galore_torch.GaLoreAdamW` with GaLore on the attention/MLP weights (the reference's rule),
or `torch.optim.AdamW`, both with the reference's eps 1e-6 and no weight decay.

Every table names the CPU (model, ISA flags, `XLA_FLAGS`) and the float32 matmul probe of
`benchmarks/machine.py`, and gives each contender's model FLOP utilisation against the probe's
square matmul. Our workers set up glibc malloc as `train.main` does (`train/host_memory.py`);
`ours-galore-chunked-plain-malloc` leaves it as it is (the A/B of that setup).

Usage: python benchmarks/train_throughput.py [--sizes 9m,20m] [--steps 8] [--threads 2]
  [--contenders a,b] [--append]; cap the ISA with `XLA_FLAGS=--xla_cpu_max_isa=AVX2
  ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2` (both stacks)
  to measure AVX2 on an AVX-512 machine.
"""

from __future__ import annotations

import argparse
import ctypes
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import machine  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "train_throughput.md"

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc mallopt parameters (malloc.h)
PEERS = ("torch-galore", "torch-adamw")  # the "vs" columns
# ISA caps of XLA:CPU, torch's ATen kernels and its BLAS (MKL, oneDNN), where set
ENV_SHOWN = ("XLA_FLAGS", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA")

# name -> (framework, optimizer, loss chunk size or None for torch)
CONTENDERS = {
  "ours-galore-chunked": ("jax", "galore_adamw", -1),  # -1: the config's default
  "ours-galore-full": ("jax", "galore_adamw", 0),
  "ours-adamw-chunked": ("jax", "adamw", -1),
  "ours-adamw-full": ("jax", "adamw", 0),
  # as ours-galore-chunked, with glibc malloc left as it is (unmaps XLA's temporaries per step)
  "ours-galore-chunked-plain-malloc": ("jax", "galore_adamw", -1),
  "torch-galore": ("torch", "galore_adamw", None),
  "torch-adamw": ("torch", "adamw", None),
}


def _config(size: str, optimizer: str, chunk: int):
  from configs import default  # noqa: PLC0415

  config = default.get_config()
  config.model.size = size
  config.optimizer.name = optimizer
  if chunk >= 0:
    config.model.loss_chunk_size = chunk
  return config


def _batches(config, count: int):
  import numpy as np  # noqa: PLC0415

  from train import data  # noqa: PLC0415

  data.ensure_bundled_prepared()
  it = data.make_train_iterator(
    seq_len=config.data.seq_len,
    batch_size=config.train.batch_size,
    mode=config.data.mode,
    seed=config.data.seed,
  )
  return [np.asarray(next(it)["tokens"], np.int32) for _ in range(count)]


def _jax_contender(size, optimizer, chunk):
  """(step(batch), refresh(batch) or None, initial params as numpy)."""
  import jax  # noqa: PLC0415

  from train import trainer  # noqa: PLC0415

  config = _config(size, optimizer, chunk)
  setup = trainer.build(config)
  state = trainer.init_state(setup, config.train.seed)
  step = jax.jit(trainer.make_train_step(setup, 1), donate_argnums=(0,))
  box = [state]

  def run(fn, tokens):
    box[0], out = fn(box[0], {"tokens": tokens})
    jax.block_until_ready((box[0], out))

  refresh = None
  if optimizer == "galore_adamw":  # the same state through a step that refreshes every time
    config_r = _config(size, optimizer, chunk)
    config_r.optimizer.update_proj_gap = 1
    refresh_jit = jax.jit(trainer.make_train_step(trainer.build(config_r), 1), donate_argnums=(0,))
    refresh = lambda tokens: run(refresh_jit, tokens)  # noqa: E731
  return (lambda tokens: run(step, tokens)), refresh, config


def _torch_contender(size, optimizer, threads, tuned_malloc, device="cpu"):
  import numpy as np  # noqa: PLC0415
  import torch  # noqa: PLC0415
  import transformers  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415

  from train import trainer  # noqa: PLC0415

  torch.set_num_threads(threads)
  if tuned_malloc:  # the tuned peer: glibc keeps freed memory instead of unmapping it
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(M_MMAP_MAX, 0)
    libc.mallopt(M_TRIM_THRESHOLD, -1)
  config = _config(size, optimizer, 0)
  setup = trainer.build(config)
  c = setup.model_config
  hf_config = transformers.LlamaConfig(
    vocab_size=c.vocab_size,
    hidden_size=c.hidden_dim,
    intermediate_size=c.mlp_dim,
    num_attention_heads=c.num_heads,
    num_hidden_layers=c.num_layers,
    max_position_embeddings=config.data.seq_len,
    rms_norm_eps=c.rms_norm_eps,
    tie_word_embeddings=False,
    attn_implementation="sdpa",
  )
  model = transformers.LlamaForCausalLM(hf_config)
  # Our initial weights (scan-stacked [N, in, out] kernels) in torch's (out, in) layout.
  params = nnx.to_pure_dict(trainer.init_state(setup, config.train.seed).params)
  sd = {
    "model.embed_tokens.weight": params["embed"]["embedding"],
    "model.norm.weight": params["final_norm"]["scale"],
    "lm_head.weight": params["lm_head"]["kernel"].T,
  }
  layers = params["layers"]
  for i in range(c.num_layers):
    for group, torch_group in (("attn", "self_attn"), ("mlp", "mlp")):
      for name, leaf in layers[group].items():
        sd[f"model.layers.{i}.{torch_group}.{name}.weight"] = leaf["kernel"][i].T
    sd[f"model.layers.{i}.input_layernorm.weight"] = layers["input_norm"]["scale"][i]
    sd[f"model.layers.{i}.post_attention_layernorm.weight"] = layers["post_attention_norm"][
      "scale"
    ][i]
  model.load_state_dict({k: torch.tensor(np.asarray(v)) for k, v in sd.items()}, strict=True)
  model.to(device).train()
  o = config.optimizer
  if optimizer == "galore_adamw":
    import galore_torch  # noqa: PLC0415

    targets = [
      p for n, p in model.named_parameters() if ("self_attn" in n or "mlp" in n) and p.ndim == 2
    ]
    ids = {id(p) for p in targets}
    rest = [p for p in model.parameters() if id(p) not in ids]
    groups = [
      {"params": rest},
      {
        "params": targets,
        "rank": o.rank,
        "update_proj_gap": o.update_proj_gap,
        "scale": o.scale,
        "proj_type": o.proj_type,
      },
    ]
    opt = galore_torch.GaLoreAdamW(
      groups, lr=o.learning_rate, eps=o.eps, weight_decay=0.0, no_deprecation_warning=True
    )
  else:
    opt = torch.optim.AdamW(model.parameters(), lr=o.learning_rate, eps=o.eps, weight_decay=0.0)

  def step(tokens):
    ids = torch.from_numpy(tokens).long().to(device)
    labels = ids.masked_fill(ids == 0, -100)
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)

  def refresh(tokens):
    projectors = [s["projector"] for s in opt.state.values() if "projector" in s]
    for p in projectors:
      p.update_proj_gap = 1
    step(tokens)
    for p in projectors:
      p.update_proj_gap = o.update_proj_gap

  return step, (refresh if optimizer == "galore_adamw" else None), config


def _worker(conn, name, size, threads, steps, tuned_malloc):
  import resource  # noqa: PLC0415

  os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # jax's SVD: see optimizer_speed.py
  sys.path.insert(0, str(ROOT))
  framework, optimizer, chunk = CONTENDERS[name]
  if framework == "jax":
    if tuned_malloc and not name.endswith("plain-malloc"):  # as `train.main`, before jax starts
      from train import host_memory  # noqa: PLC0415

      host_memory.keep_freed_memory()
    step, refresh, config = _jax_contender(size, optimizer, chunk)
  else:
    step, refresh, config = _torch_contender(size, optimizer, threads, tuned_malloc)
  batches = _batches(config, steps + 2)
  t0 = time.perf_counter()
  step(batches[0])  # compile (ours) / first-step allocations; a refresh in both GaLores
  if refresh is not None:
    refresh(batches[1])
  conn.send(("ready", time.perf_counter() - t0, config.model.loss_chunk_size))

  def timed(fn, tokens):
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = time.perf_counter()
    fn(tokens)
    dt = time.perf_counter() - t
    return dt, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0

  while True:
    cmd, i = conn.recv()
    if cmd == "stop":
      conn.send(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
      return
    fn = step if cmd == "step" else refresh
    conn.send(timed(fn, batches[2 + i]))


def _nonpad_tokens(size: str, steps: int) -> float:
  cfg = _config(size, "adamw", 0)
  batches = _batches(cfg, steps + 2)[2:]
  return statistics.mean(float((b[:, :-1] != 0).sum()) for b in batches)


def run_size(size: str, names: list[str], steps: int, threads: int, tuned_malloc: bool, log):
  ctx = mp.get_context("spawn")
  workers = {}
  for name in names:  # started one by one: compilation does not overlap the others' warm-up
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_worker, args=(child, name, size, threads, steps, tuned_malloc))
    proc.start()
    msg = parent.recv()
    log(f"  {size} {name}: ready in {msg[1]:.1f} s (loss_chunk_size={msg[2]})")
    workers[name] = (proc, parent)
  rows = {n: {"step": [], "refresh": [], "faults": [], "chunk": None} for n in names}
  # The matmul probe runs once per round too, so MFU shares the contenders' neighbours.
  probe_conn, child = ctx.Pipe()
  probe_proc = ctx.Process(target=_probe_worker, args=(child,))
  probe_proc.start()
  probes = []
  for i in range(steps):
    for name, (_, conn) in workers.items():
      conn.send(("step", i))
      dt, faults = conn.recv()
      rows[name]["step"].append(dt)
      rows[name]["faults"].append(faults)
      if CONTENDERS[name][1] == "galore_adamw":
        conn.send(("refresh", i))
        rows[name]["refresh"].append(conn.recv()[0])
    probe_conn.send("probe")
    probes.append(probe_conn.recv())
    log(
      f"  round {i + 1}/{steps}: "
      + ", ".join(f"{n} {r['step'][-1]:.2f}s" for n, r in rows.items())
      + f"; {machine.probe_line(probes[-1])}"
    )
  for name, (proc, conn) in workers.items():
    conn.send(("stop", 0))
    rows[name]["peak_rss"] = conn.recv()
    proc.join()
  probe_conn.send("stop")
  probe_proc.join()
  probe = {k: statistics.median(p[k] for p in probes) for k in probes[0]}
  return rows, probe


def _probe_worker(conn) -> None:
  from train import host_memory  # noqa: PLC0415

  host_memory.keep_freed_memory()  # as our workers: the probe's outputs do not page-fault
  machine.matmul_probe(repeats=1)  # compile
  while conn.recv() == "probe":
    conn.send(machine.matmul_probe(repeats=3))


def _table(size: str, rows: dict, tokens: float, gap: int, probe: dict, cpu: str) -> list[str]:
  from train.model import llama_config  # noqa: PLC0415

  torch_tps = {}
  for peer in PEERS:
    if peer in rows:
      torch_tps[peer] = tokens / statistics.median(rows[peer]["step"])
  cfg = _config(size, "adamw", 0)
  flops = machine.model_flops(llama_config(size), cfg.train.batch_size, cfg.data.seq_len)
  square = next(iter(probe.values()))
  out = [
    f"### LLaMA-{size}",
    "",
    f"CPU: {cpu}. {machine.probe_line(probe, 'float32', 'per round: best of 3; median')}. "
    f"Model FLOPs {flops / 1e9:.1f} G/step; "
    "MFU = model FLOPs / median s/step / square-matmul probe.",
    "",
    "| contender | s/step median (min-max) | non-pad tokens/s | vs torch GaLoreAdamW "
    "| vs torch AdamW | MFU (vs probe) "
    f"| refresh step s | amortised s/step (T={gap}) | minor faults/step | peak RSS |",
    "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for name, r in rows.items():
    med = statistics.median(r["step"])
    tps = tokens / med
    ref = statistics.median(r["refresh"]) if r["refresh"] else None
    amort = ((gap - 1) * med + ref) / gap if ref is not None else med
    rel = [f"{tps / torch_tps[p]:.2f}x" if p in torch_tps else "-" for p in PEERS]
    out.append(
      f"| {name} | {med:.3f} ({min(r['step']):.3f}-{max(r['step']):.3f}) | {tps:,.0f} "
      f"| {rel[0]} | {rel[1]} | {flops / med / 1e9 / square:.0%} "
      f"| {f'{ref:.3f}' if ref is not None else '-'} | {amort:.3f} "
      f"| {statistics.median(r['faults']):,.0f} | {r['peak_rss'] / 2**30:.2f} GiB |"
    )
  ratios = []
  for kind in ("chunked", "full"):
    g, a = rows.get(f"ours-galore-{kind}"), rows.get(f"ours-adamw-{kind}")
    if g and a:
      med_g = statistics.median(g["step"])
      amort = ((gap - 1) * med_g + statistics.median(g["refresh"])) / gap
      ratios.append(
        f"ours GaLore / AdamW ({kind} loss): {med_g / statistics.median(a['step']):.3f} "
        f"non-refresh, {amort / statistics.median(a['step']):.3f} amortised over T={gap}"
      )
  return [*out, "", *[f"- {r}" for r in ratios], ""]


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--sizes", default="9m,20m")
  p.add_argument("--steps", type=int, default=8, help="timed steps per contender")
  p.add_argument("--threads", type=int, default=2, help="torch threads (XLA uses every core)")
  p.add_argument(
    "--plain-malloc",
    action="store_true",
    help="leave glibc malloc as it is in every worker (default: ours as `train.main` sets it up, "
    "`train/host_memory.py`; torch with mmap_max=0, no trim)",
  )
  p.add_argument("--append", action="store_true", help="add this run to --out, keeping the rest")
  p.add_argument("--contenders", default=",".join(CONTENDERS), help="comma-separated names")
  p.add_argument("--out", default=str(RESULTS))
  args = p.parse_args()
  names = [n.strip() for n in args.contenders.split(",")]
  unknown = [n for n in names if n not in CONTENDERS]
  if unknown:
    raise SystemExit(f"--contenders: unknown {unknown}; known: {list(CONTENDERS)}")
  from configs import default  # noqa: PLC0415

  gap = default.get_config().optimizer.update_proj_gap
  lines = []
  log = lambda s: (print(s, flush=True), None)[1]  # noqa: E731
  load0 = os.getloadavg()
  cpu = machine.describe()
  log(cpu)
  for size in args.sizes.split(","):
    rows, probe = run_size(size, names, args.steps, args.threads, not args.plain_malloc, log)
    tokens = _nonpad_tokens(size, args.steps)
    table = _table(size, rows, tokens, gap, probe, cpu)
    print("\n".join(table), flush=True)
    lines += table
  load1 = os.getloadavg()
  env = " ".join(f"{k}={os.environ[k]}" for k in ENV_SHOWN if k in os.environ)
  cmd = f"{env} python benchmarks/train_throughput.py " + " ".join(sys.argv[1:])
  header = [
    f"## {cpu}",
    "",
    f"Command: `{cmd.strip()}`",
    "",
    f"Machine: {cpu}, CPU only; load average "
    f"{load0[0]:.1f} at start, {load1[0]:.1f} at end (shared machine: the contenders run "
    "interleaved, one step each per round, so the ratios share the same neighbours).",
    "",
    "Matmul probe: run once per round between the contenders (median over rounds, per size "
    "in each table).",
    "",
    f"Batch 16 x 256 from the bundled sample (pad mode), float32, {args.steps} timed steps per "
    "contender after a warm-up step and a refresh step; torch with "
    f"{args.threads} threads"
    + (
      ""
      if args.plain_malloc
      else " and glibc told to keep freed memory (the issue's tuned peer: "
      "`mallopt(M_MMAP_MAX, 0)`, `M_TRIM_THRESHOLD = -1`); ours with `train/host_memory.py`'s "
      "setup as `train.main` does (one arena, no mmap, no trim), except `*-plain-malloc`"
    )
    + ". Non-pad tokens/s = mean non-pad input tokens per batch "
    "/ median s/step. Chunked loss: `train/losses.py` at the default `model.loss_chunk_size`.",
    "",
  ]
  title = ["# End-to-end train step: ours vs transformers + galore-torch", ""]
  out = Path(args.out)
  if args.append and out.exists():
    title = [out.read_text().rstrip(), ""]
  out.write_text("\n".join(title + header + lines))
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
