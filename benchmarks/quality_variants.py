"""Quality variants of GaLore on the bundled C4 sample (the tuned Table 2 is benchmarks/quality.py).

Trains the same model on the same data from the same seed for the same number of steps with
several optimizers, then prints one markdown table (eval perplexity, optimizer-state bytes,
tokens/s, wall time) and writes one PNG with the overlaid eval/train loss curves.

  .venv/bin/python -m benchmarks.quality_variants --workdir=runs/quality [--steps=150] \
    [--variants=a,b]

Each variant is a name from VARIANTS (config overrides on configs/default.py). Runs resume
from their workdirs, so an interrupted benchmark continues where it stopped (its tokens/s and wall
time then cover the resumed part only), and a finished run (`final.json` at `--steps`) is read
back instead of retrained: variants can be run in parallel processes with the same `--workdir`
and one last call with all of them prints the table and the PNG.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

from configs import default
from train import trainer

# name -> (description, overrides of configs/default.py as {"section.field": value})
VARIANTS: dict[str, tuple[str, dict]] = {
  "adamw_1e-3": (
    "AdamW full rank, lr 1e-3",
    {"optimizer.name": "adamw", "optimizer.learning_rate": 1e-3},
  ),
  "adamw_3e-3": (
    "AdamW full rank, lr 3e-3",
    {"optimizer.name": "adamw", "optimizer.learning_rate": 3e-3},
  ),
  "adamw_1e-2": (
    "AdamW full rank, lr 1e-2 (GaLore's lr)",
    {"optimizer.name": "adamw", "optimizer.learning_rate": 1e-2},
  ),
  "galore": ("GaLore-AdamW r=32, exact SVD, lr 1e-2", {}),
  "galore_randomized": (
    "GaLore-AdamW r=32, randomized refresh",
    {"optimizer.subspace_method": "randomized"},
  ),
  "galore_rotate": (
    "GaLore-AdamW r=32, moments rotated at refresh",
    {"optimizer.on_refresh": "rotate"},
  ),
  "galore_align": (
    "GaLore-AdamW r=32, signs aligned at refresh",
    {"optimizer.align_signs": True},
  ),
  "galore_8bit": ("8-bit GaLore-AdamW r=32", {"optimizer.name": "galore_adamw_8bit"}),
  "adamw_8bit_vocab32_3e-3": (
    "8-bit AdamW, embedding/head moments float32, lr 3e-3",
    {
      "optimizer.name": "adamw_8bit",
      "optimizer.learning_rate": 3e-3,
      "optimizer.float32_vocab_moments": True,
    },
  ),
  "adamw_8bit_3e-3": (
    "8-bit AdamW, lr 3e-3",
    {"optimizer.name": "adamw_8bit", "optimizer.learning_rate": 3e-3},
  ),
}


def variant_config(name: str, steps: int):
  config = default.get_config()
  for key, value in VARIANTS[name][1].items():
    section, field = key.split(".")
    config[section][field] = value
  config.train.num_steps = steps
  config.train.eval_every = max(steps // 3, 1)
  config.train.checkpoint_every = steps
  config.train.progress_bar = False
  return config


def plot(results: dict[str, Path], out: Path) -> None:
  import matplotlib  # noqa: PLC0415

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  fig, (ax_train, ax_eval) = plt.subplots(1, 2, figsize=(12, 4.5))
  for name, workdir in results.items():
    records = trainer.load_metrics(workdir)
    train = sorted({r["step"]: r["loss"] for r in records if "loss" in r}.items())
    evals = sorted({r["step"]: r["eval_loss"] for r in records if "eval_loss" in r}.items())
    (line,) = ax_train.plot(*zip(*train), label=name, alpha=0.8)
    ax_eval.plot(*zip(*evals), "o-", color=line.get_color(), label=name)
  for ax, title in ((ax_train, "train loss"), (ax_eval, "eval loss (validation split)")):
    ax.set_xlabel("step")
    ax.set_ylabel("nats/token")
    ax.set_title(title)
    ax.grid(alpha=0.3)
  ax_eval.legend()
  fig.savefig(out, dpi=100, bbox_inches="tight")
  plt.close(fig)


def _finished(workdir: Path, steps: int) -> dict | None:
  """The final record of a run that already finished `steps` steps, else None."""
  path = workdir / "final.json"
  if not path.exists():
    return None
  final = json.loads(path.read_text())
  return final if final.get("steps") == steps and "eval_perplexity" in final else None


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default="runs/quality")
  parser.add_argument("--steps", type=int, default=150)
  parser.add_argument("--variants", default=",".join(VARIANTS))
  args = parser.parse_args()
  root = Path(args.workdir)
  rows, dirs = [], {}
  for name in args.variants.split(","):
    workdir = root / name
    final = _finished(workdir, args.steps)
    if final is None:
      final = trainer.train_and_evaluate(variant_config(name, args.steps), workdir)
    summary = json.loads((workdir / "summary.json").read_text())
    dirs[name] = workdir
    rows.append((name, VARIANTS[name][0], final, summary))
  plot(dirs, root / "quality.png")
  print(
    f"\nLLaMA-9m on the bundled C4 sample, {args.steps} steps of 16 x 256 tokens, seed 0; "
    f"machine: {platform.machine()} CPU, {platform.system()}"
  )
  print("| variant | optimizer | eval ppl | optimizer state | vs AdamW | tokens/s | wall (s) |")
  print("|---|---|---|---|---|---|---|")
  for name, desc, final, summary in rows:
    ratio = summary["optimizer_state_bytes"] / summary["adamw_state_bytes"]
    print(
      f"| {name} | {desc} | {final['eval_perplexity']:.1f} | "
      f"{summary['optimizer_state_bytes'] / 1e6:.1f} MB | {ratio:.1%} | "
      f"{final['tokens_per_second']:.0f} | {final['wall_seconds']:.0f} |"
    )
  floor = next((s.get("unigram_perplexity") for *_, s in rows if "unigram_perplexity" in s), None)
  if floor:
    print(f"\nValidation unigram perplexity (context-free floor): {floor:.1f}")
  print(f"Curves: {root / 'quality.png'}")


if __name__ == "__main__":
  main()
