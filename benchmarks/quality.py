"""The paper's Table 2 in miniature: every baseline in the same trainer, each with its lr tuned.

For each method (AdamW with one lr, AdamW with a per-group lr on the attention/MLP kernels,
GaLore, low-rank W = BA, LoRA, ReLoRA) a learning-rate sweep on LLaMA-9m, pad mode, then the
best setting of each method rerun with a second seed (`train.seed` and `data.seed` = 1).
Where the best value sits at an end of its grid, the grid is extended one step (same ratio)
beyond it, up to `MAX_EXTEND` times, so no method is reported at the edge of what was tried.
Defaults are the issue's recipe: 200 steps of 16 x 256 tokens (the torch peer's numbers used it).

  .venv/bin/python -m benchmarks.quality --workdir=runs/table2 [--steps=200] [--batch=16]
      [--seq_len=256] [--shard=0/2]   # run the shards as parallel processes, then:
  .venv/bin/python -m benchmarks.quality --workdir=runs/table2 --run=lora:0.001 --run=lora:0.001:1
  .venv/bin/python -m benchmarks.quality --workdir=runs/table2 --report

A shard owns whole methods (sweep, then its best rerun), so parallel shards never wait on each
other. Every finished run writes `<run>/result.json` and is skipped when the command is run
again (resumable); `--report` (or the end of any shard) writes `results.json`, prints the tables
from whatever has finished and draws `table2.png`. `--run=METHOD:VALUE[:SEED]` runs just those
settings (to fill in a grid point or a seed by hand). `--dry_run` only builds every config.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import jax
from flax import nnx

from configs import default
from train import lowrank, optim, trainer
from train.model import Llama, count_params

# method -> (description, fixed overrides, swept overrides, paper's 60M perplexity)
METHODS: dict[str, tuple[str, dict, list[dict], float | None]] = {
  "adamw": (
    "AdamW, one lr",
    {"optimizer.name": "adamw"},
    [{"optimizer.learning_rate": lr} for lr in (1e-3, 3e-3, 1e-2)],
    34.06,
  ),
  "adamw_group": (
    "AdamW, lr 0.01 x target_lr_scale on attention/MLP",
    {"optimizer.name": "adamw", "optimizer.learning_rate": 1e-2},
    [{"optimizer.target_lr_scale": s} for s in (0.03125, 0.0625, 0.125, 0.25)],
    34.06,
  ),
  "galore_adamw": (
    "GaLore-AdamW r=32, T=50, scale 0.25",
    {"optimizer.name": "galore_adamw"},
    [{"optimizer.learning_rate": lr} for lr in (3e-3, 1e-2, 3e-2)],
    34.88,
  ),
  "galore_group": (
    "GaLore-AdamW r=32, T=50, lr 0.01 x scale on attention/MLP",
    {"optimizer.name": "galore_adamw", "optimizer.learning_rate": 1e-2},
    [{"optimizer.scale": s} for s in (0.03125, 0.0625, 0.125, 0.25)],
    34.88,
  ),
  "low_rank": (
    "low-rank W = BA, r=32",
    {"optimizer.name": "low_rank"},
    [{"optimizer.learning_rate": lr} for lr in (1e-3, 3e-3, 1e-2)],
    78.18,
  ),
  "lora": (
    "LoRA r=32, alpha 32",
    {"optimizer.name": "lora"},
    [{"optimizer.learning_rate": lr} for lr in (3e-3, 1e-2, 3e-2)],
    34.99,
  ),
  "relora": (
    "ReLoRA r=32, alpha 32, merge every 50",
    {"optimizer.name": "relora"},
    [{"optimizer.learning_rate": lr} for lr in (3e-3, 1e-2, 3e-2)],
    37.04,
  ),
}


MAX_EXTEND = 2  # extra grid points per method when the best is at an end of the grid


def run_name(method: str, sweep: dict, seed: int) -> str:
  parts = [f"{k.split('.')[-1]}{v:g}" for k, v in sweep.items()]
  return "_".join([method, *parts, f"seed{seed}"])


def run_config(method: str, sweep: dict, seed: int, args):
  c = default.get_config()
  for key, value in {**METHODS[method][1], **sweep}.items():
    section, field = key.split(".")
    c[section][field] = value
  c.train.update(num_steps=args.steps, batch_size=args.batch, seed=seed, progress_bar=False)
  eval_every = args.eval_every or max(args.steps // 2, 1)
  c.train.update(eval_every=eval_every, checkpoint_every=min(args.checkpoint_every, args.steps))
  c.data.update(seq_len=args.seq_len, mode="pad", seed=seed)
  return c


def sizes(config) -> dict[str, int]:
  """Trainable parameters and weights + optimizer-state bytes, from shapes only."""
  setup = trainer.build(config)
  state = jax.eval_shape(lambda: trainer.init_state(setup, 0))
  if setup.adapter is not None:
    c = lowrank.count(state.params)
    trainable, weights = c["trainable"], c["weight_bytes"]
  else:
    abstract = nnx.eval_shape(lambda: Llama(setup.model_config, rngs=nnx.Rngs(0)))
    trainable = count_params(setup.model_config)["total"]
    weights = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(abstract)))
  return {"trainable": trainable, "bytes": weights + optim.state_bytes(setup.tx, state.params)}


def run(root: Path, method: str, sweep: dict, seed: int, args) -> dict:
  workdir = root / run_name(method, sweep, seed)
  done = workdir / "result.json"
  if done.exists():
    return json.loads(done.read_text())
  config = run_config(method, sweep, seed, args)
  if args.dry_run:
    return {"method": method, **sizes(config)}
  final = trainer.train_and_evaluate(config, workdir)
  result = {"method": method, "sweep": sweep, "seed": seed, "run": workdir.name, **sizes(config)}
  result.update({k: final[k] for k in ("eval_loss", "eval_perplexity", "wall_seconds")})
  done.write_text(json.dumps(result, indent=1))
  return result


def best(results: list[dict], method: str) -> dict | None:
  mine = [r for r in results if r["method"] == method and r["seed"] == 0]
  return min(mine, key=lambda r: r["eval_perplexity"], default=None)


def grid(results: list[dict], method: str) -> list[float]:
  """The swept values of `method` tried so far with seed 0, ascending."""
  key = next(iter(METHODS[method][2][0]))
  return sorted(r["sweep"][key] for r in results if r["method"] == method and r["seed"] == 0)


def extension(results: list[dict], method: str) -> dict | None:
  """The next grid point beyond the best when the best is at an end of the grid, else None."""
  key = next(iter(METHODS[method][2][0]))
  values, b = grid(results, method), best(results, method)
  if b is None or len(values) < 2 or len(values) >= len(METHODS[method][2]) + MAX_EXTEND:
    return None
  v = b["sweep"][key]
  if v == values[0]:
    return {key: values[0] * values[0] / values[1]}
  if v == values[-1]:
    return {key: values[-1] * values[-1] / values[-2]}
  return None


def parse_run(spec: str) -> tuple[str, dict, int]:
  """`METHOD:VALUE[:SEED]` -> (method, {swept key: VALUE}, seed), with a clear error."""
  method, *rest = spec.split(":")
  if method not in METHODS or len(rest) not in (1, 2):
    raise SystemExit(f"--run={spec!r}: expected METHOD:VALUE[:SEED], METHOD one of {list(METHODS)}")
  key = next(iter(METHODS[method][2][0]))
  try:
    return method, {key: float(rest[0])}, int(rest[1]) if len(rest) == 2 else 0
  except ValueError:
    raise SystemExit(f"--run={spec!r}: VALUE must be a number and SEED an integer") from None


def finished(root: Path) -> list[dict]:
  return [json.loads(p.read_text()) for p in sorted(root.glob("*/result.json"))]


def report(root: Path, args) -> None:
  results = finished(root)
  (root / "results.json").write_text(json.dumps(results, indent=1))
  print(f"\nLLaMA-9m, pad mode, {args.steps} steps of {args.batch} x {args.seq_len} tokens")
  print("| method | setting | best lr | eval ppl (mean) | seed 0 / 1 / ... | trainable params "
        "| weights + state | paper 60M |")  # fmt: skip
  print("|---|---|---|---|---|---|---|---|")
  for method, (desc, fixed, _, paper) in METHODS.items():
    b = best(results, method)
    if b is None:
      continue
    setting = {**fixed, **b["sweep"]}
    other = [r for r in results if r["method"] == method and r["seed"] != 0]
    other = sorted((r for r in other if r["sweep"] == b["sweep"]), key=lambda r: r["seed"])
    ppls = [b["eval_perplexity"], *(r["eval_perplexity"] for r in other)]
    values = grid(results, method)
    at_end = b["sweep"][next(iter(b["sweep"]))] in (values[0], values[-1])
    edge = " (best at an end of the grid)" if at_end else ""
    lr = setting.get("optimizer.learning_rate", 1e-2)
    for group_key in ("optimizer.target_lr_scale", "optimizer.scale"):
      if group_key in setting:
        lr = f"{lr:g} x {setting[group_key]:g}"
    print(
      f"| {method} | {desc} | {lr} | {sum(ppls) / len(ppls):.1f} | "
      f"{' / '.join(f'{p:.1f}' for p in ppls)}{edge} | {b['trainable'] / 1e6:.2f}M | "
      f"{b['bytes'] / 1e6:.1f} MB | {paper if paper else '-'} |"
    )
  print("\nEvery run: " + "; ".join(f"{r['run']} {r['eval_perplexity']:.1f}" for r in results))
  plot(root, results)


def curves(root: Path) -> None:
  """Eval perplexity every `eval_every` steps of each run under `root` (finished or not), the
  mean train loss of the steps before each eval, and `curves.png`."""
  runs = sorted(p.parent for p in root.glob("*/metrics.jsonl"))
  table = {}
  for run_dir in runs:
    records = trainer.load_metrics(run_dir)
    evals = {r["step"]: r["eval_perplexity"] for r in records if "eval_perplexity" in r}
    losses = sorted((r["step"], r["loss"]) for r in records if "loss" in r)
    prev, train = 0, {}
    for step in sorted(evals):
      window = [v for s, v in losses if prev < s <= step]
      train[step] = sum(window) / len(window) if window else float("nan")
      prev = step
    table[run_dir.name] = (evals, train)
  steps = sorted({s for evals, _ in table.values() for s in evals})
  print("\neval perplexity (train loss, mean over the steps since the previous eval)")
  print("| run | " + " | ".join(f"step {s}" for s in steps) + " |")
  print("|---|" + "---|" * len(steps))
  for name, (evals, train) in table.items():
    cells = [f"{evals[s]:.1f} ({train[s]:.2f})" if s in evals else "-" for s in steps]
    print(f"| {name} | " + " | ".join(cells) + " |")
  import matplotlib  # noqa: PLC0415

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  fig, ax = plt.subplots(figsize=(7, 4.5))
  for name, (evals, _) in table.items():
    xs = sorted(evals)
    ax.plot(xs, [evals[s] for s in xs], "o-", label=name)
  ax.set(xlabel="step", ylabel="eval perplexity", yscale="log", title=str(root.name))
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.savefig(root / "curves.png", dpi=100, bbox_inches="tight")
  plt.close(fig)


def plot(root: Path, results: list[dict]) -> None:
  import matplotlib  # noqa: PLC0415

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(12, 4.5))
  for method in METHODS:
    b = best(results, method)
    if b is None:
      continue
    records = trainer.load_metrics(root / b["run"])
    train = sorted({r["step"]: r["loss"] for r in records if "loss" in r}.items())
    k = 3  # moving mean over 3 logged steps (train.log_every apart): single batches are noisy
    steps = [s for s, _ in train][k - 1 :]
    smooth = [sum(v for _, v in train[i - k + 1 : i + 1]) / k for i in range(k - 1, len(train))]
    ax_loss.plot(steps, smooth, label=f"{method} ({b['run']})")
    mine = sorted(
      (r for r in results if r["method"] == method and r["seed"] == 0),
      key=lambda r: list(r["sweep"].values())[0],
    )
    xs = [list(r["sweep"].values())[0] for r in mine]
    ax_lr.plot(xs, [math.log(r["eval_perplexity"]) for r in mine], "o-", label=method)
  ylabel = "train loss (mean of 3 logged steps)"
  ax_loss.set(xlabel="step", ylabel=ylabel, title="best setting, seed 0")
  ax_lr.set(xscale="log", xlabel="swept lr (adamw_group: scale)", ylabel="eval loss")
  for ax in (ax_loss, ax_lr):
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.savefig(root / "table2.png", dpi=100, bbox_inches="tight")
  plt.close(fig)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default="runs/table2")
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--seq_len", type=int, default=256)
  parser.add_argument("--eval_every", type=int, default=0, help="default: steps // 2")
  parser.add_argument(
    "--checkpoint_every", type=int, default=100, help="checkpoint period (runs resume from it)"
  )
  parser.add_argument("--shard", default="0/1", help="i/n: this process runs methods i::n")
  parser.add_argument(
    "--run",
    action="append",
    default=[],
    metavar="METHOD:VALUE[:SEED]",
    help="run only this setting (the method's swept value; seed 0 unless given); repeatable",
  )
  parser.add_argument("--report", action="store_true", help="only print the tables and plot")
  parser.add_argument(
    "--curves", action="store_true", help="only print each run's eval curve and plot it"
  )
  parser.add_argument("--dry_run", action="store_true", help="only build every config")
  args = parser.parse_args()
  root = Path(args.workdir)
  root.mkdir(parents=True, exist_ok=True)
  if args.curves:
    curves(root)
    return
  if args.run:
    for spec in args.run:
      method, sweep, seed = parse_run(spec)
      run(root, method, sweep, seed, args)
  elif not args.report:
    i, n = map(int, args.shard.split("/"))
    mine = list(METHODS)[i::n]
    for method in mine:
      for sweep in METHODS[method][2]:
        out = run(root, method, sweep, 0, args)
        if args.dry_run:
          print(method, sweep, out)
    if args.dry_run:
      return
    for method in mine:  # extend the grid while its best is at an end, then a second seed
      while (more := extension(finished(root), method)) is not None:
        run(root, method, more, 0, args)
      b = best(finished(root), method)
      if b is not None:
        run(root, method, b["sweep"], 1, args)
  report(root, args)


if __name__ == "__main__":
  main()
