"""Soak test of the trainer: the default model trained for a wall time, watched for slow drifts.

Trains `configs/default.py` (LLaMA-9m with GaLore on the bundled C4 sample) for `--minutes`,
with checkpoints and evals every few minutes, and records what a short run cannot show:

* host memory (RSS) over time, and its slope after warm-up (a leak shows as MB/hour);
* XLA compilations (`jax.monitoring`'s backend-compile events), and how many come after
  warm-up (the first eval and checkpoint): each one is a recompilation and should not exist;
* how long the loop stalls for each checkpoint save and each eval (`checkpoint_seconds` and
  `eval_seconds` in metrics.jsonl);
* disk use of the workdir over time (flat once `keep_checkpoints` old steps are deleted);
* steps per minute over time (a slowdown shows as a negative slope).

The run ends the way a preempted one does: a timer sends SIGTERM at `--minutes`, the trainer
saves and stops (`preemption.Preempted`), so the preemption path is soaked too. Writes
`<out>.md` (the numbers, the command and the machine) and `<out>.png` (the curves, with fits).

  python benchmarks/soak.py [--minutes=45 --checkpoint_every=40 --eval_every=80 \
                             --workdir=runs/soak --out=benchmarks/results/soak]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # Run from any directory.

import jax  # noqa: E402

from configs import default  # noqa: E402
from train import host_memory, preemption, trainer  # noqa: E402

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class Watcher:
  """Samples RSS, workdir disk use and the latest logged step every `period` seconds, and
  records every backend compilation with its time and function name."""

  def __init__(self, workdir: Path, period: float):
    self.workdir, self.period, self.t0 = workdir, period, time.time()
    self.samples: list[dict] = []  # {t, rss_mb, disk_mb, step}
    self.compiles: list[dict] = []  # {t, fun_name, seconds}
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)
    jax.monitoring.register_event_duration_secs_listener(self._on_event)

  def _on_event(self, event: str, seconds: float, **kwargs) -> None:
    if event == COMPILE_EVENT:
      name = kwargs.get("fun_name", "?")
      self.compiles.append({"t": time.time() - self.t0, "fun_name": name, "seconds": seconds})

  def start(self) -> None:
    self._thread.start()

  def stop(self) -> None:
    self._stop.set()
    self._thread.join()
    self.sample()

  def _run(self) -> None:
    while not self._stop.wait(self.period):
      self.sample()

  def sample(self) -> None:
    self.samples.append(
      {
        "t": time.time() - self.t0,
        "rss_mb": _rss_mb(),
        "disk_mb": _disk_mb(self.workdir),
        "step": _last_step(self.workdir),
      }
    )


def _rss_mb() -> float:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) / 1024
  return float("nan")


def _disk_mb(path: Path) -> float:
  """Bytes allocated under `path` (as `du`), in MB."""
  total = 0
  for root, _, files in os.walk(path):
    for name in files:
      try:
        total += os.lstat(os.path.join(root, name)).st_blocks * 512
      except FileNotFoundError:  # a checkpoint being renamed or deleted
        pass
  return total / 1e6


def _last_step(workdir: Path) -> int:
  try:
    with open(workdir / "metrics.jsonl", "rb") as f:
      f.seek(max(0, os.path.getsize(workdir / "metrics.jsonl") - 4096))
      lines = f.read().splitlines()
    return json.loads(lines[-1])["step"] if lines else 0
  except (OSError, ValueError, KeyError):
    return 0


def _slope_per_hour(ts: np.ndarray, ys: np.ndarray) -> float:
  """Least-squares slope of ys against ts (seconds), per hour; nan with < 3 points."""
  if len(ts) < 3 or np.ptp(ts) == 0:
    return float("nan")
  return float(np.polyfit(ts / 3600, ys, 1)[0])


def config_for(args: argparse.Namespace):
  c = default.get_config()
  # Enough steps never to end before the timer; the warmup (10%) then spans the whole soak,
  # which keeps the learning rate below its peak: this measures the system, not the loss.
  c.train.num_steps = args.num_steps
  c.train.checkpoint_every = args.checkpoint_every
  c.train.eval_every = args.eval_every
  c.train.log_every = 1  # the step clock of the samples (metrics are fetched every step anyway)
  c.train.progress_bar = False
  return c


def run(args: argparse.Namespace) -> dict:
  workdir = Path(args.workdir)
  if workdir.exists():
    shutil.rmtree(workdir)  # a soak starts fresh: resuming would skip the warm-up
  workdir.mkdir(parents=True)
  watcher = Watcher(workdir, args.sample_seconds)
  watcher.start()
  timer = threading.Timer(args.minutes * 60, os.kill, (os.getpid(), signal.SIGTERM))
  timer.start()
  stopped_by = "end of num_steps"
  try:
    trainer.train_and_evaluate(config_for(args), workdir)
  except preemption.Preempted as e:
    stopped_by = f"SIGTERM at {args.minutes} min (saved step {e.step})"
  finally:
    timer.cancel()
    watcher.stop()
  return analyse(watcher, trainer.load_metrics(workdir), stopped_by)


def analyse(w: Watcher, records: list[dict], stopped_by: str) -> dict:
  """The numbers of the results file, from the samples, compilations and metrics."""
  saves = [r["checkpoint_seconds"] for r in records if "checkpoint_seconds" in r]
  evals = [r["eval_seconds"] for r in records if "eval_seconds" in r]
  # Warm-up ends once the first eval and the first checkpoint are logged: every function the
  # loop calls has been compiled by then.
  warm_t = _warm_up_end(w, records)
  after = [s for s in w.samples if s["t"] >= warm_t]
  ts = np.array([s["t"] for s in after])
  late_compiles = [c for c in w.compiles if c["t"] > warm_t]
  steps = np.array([s["step"] for s in after], float)
  return {
    "stopped_by": stopped_by,
    "seconds": w.samples[-1]["t"],
    "steps": max((r["step"] for r in records), default=0),
    "warm_up_seconds": warm_t,
    "rss_mb_start": after[0]["rss_mb"] if after else float("nan"),
    "rss_mb_end": w.samples[-1]["rss_mb"],
    "rss_mb_max": max(s["rss_mb"] for s in w.samples),
    "rss_slope_mb_per_hour": _slope_per_hour(ts, np.array([s["rss_mb"] for s in after])),
    # A leak grows at a constant rate; an allocator's working set levels off. The second half's
    # slope tells them apart.
    "rss_slope_second_half_mb_per_hour": _slope_per_hour(
      ts[len(ts) // 2 :], np.array([s["rss_mb"] for s in after[len(after) // 2 :]])
    ),
    "disk_mb_end": w.samples[-1]["disk_mb"],
    "disk_mb_max": max(s["disk_mb"] for s in w.samples),
    "disk_slope_mb_per_hour": _slope_per_hour(ts, np.array([s["disk_mb"] for s in after])),
    "steps_per_minute": _slope_per_hour(ts, steps) / 60,
    "compilations": len(w.compiles),
    "compilations_after_warm_up": len(late_compiles),
    "late_compiles": late_compiles,
    "saves": saves,
    "evals": evals,
    "samples": w.samples,
    "compiles": w.compiles,
  }


def _warm_up_end(w: Watcher, records: list[dict]) -> float:
  """Seconds from the start until the first sample that sees both an eval and a checkpoint
  logged (sampling granularity; the end of the run if that never happens)."""
  first_eval = min((r["step"] for r in records if "eval_seconds" in r), default=None)
  first_save = min((r["step"] for r in records if "checkpoint_seconds" in r), default=None)
  if first_eval is None or first_save is None:
    return w.samples[-1]["t"]
  done = max(first_eval, first_save)
  return next((s["t"] for s in w.samples if s["step"] > done), w.samples[-1]["t"])


def _stats(values: list[float]) -> str:
  if not values:
    return "none"
  return f"{len(values)}: median {np.median(values):.2f} s, max {max(values):.2f} s"


def write_results(res: dict, args: argparse.Namespace, command: str) -> None:
  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  png = plot(res, out.with_suffix(".png"))
  late = ", ".join(sorted({c["fun_name"] for c in res["late_compiles"]})) or "none"
  label = (
    f"**Short smoke run ({args.minutes:g} min), not the full soak**: it shows the script works "
    "and gives first slopes; a slope over a few minutes is noisy."
    if args.minutes < 45
    else f"Soak of {args.minutes:g} min."
  )
  lines = [
    "# Soak: the default model trained for a wall time",
    "",
    label,
    "",
    f"Command: `{command}`",
    "",
    f"Machine: {platform.platform()}, {os.cpu_count()} CPUs ({jax.default_backend()}, jax "
    f"{jax.__version__}, Python {platform.python_version()}); the CPUs were shared with other "
    "jobs, so times are upper bounds. glibc malloc set as `train.main` sets it (one arena, no "
    f"mmap, no trim; `train/host_memory.py`): {'yes' if res['malloc_as_train_main'] else 'no'}.",
    "",
    "| measure | value |",
    "|---|---|",
    f"| wall time / steps | {res['seconds'] / 60:.1f} min / {res['steps']} steps "
    f"({res['stopped_by']}) |",
    f"| warm-up (first eval and checkpoint done) | {res['warm_up_seconds']:.0f} s |",
    f"| steps per minute after warm-up | {res['steps_per_minute']:.1f} |",
    f"| host RSS after warm-up: start / end / max | {res['rss_mb_start']:.0f} / "
    f"{res['rss_mb_end']:.0f} / {res['rss_mb_max']:.0f} MB |",
    f"| **RSS slope after warm-up** (second half of it) | **{res['rss_slope_mb_per_hour']:+.1f} "
    f"MB/hour** ({res['rss_slope_second_half_mb_per_hour']:+.1f} MB/hour) |",
    f"| XLA compilations: total / **after warm-up** | {res['compilations']} / "
    f"**{res['compilations_after_warm_up']}** ({late}) |",
    f"| checkpoint stalls (loop blocked per save) | {_stats(res['saves'])} |",
    f"| eval stalls (per eval) | {_stats(res['evals'])} |",
    f"| **longest stall** | **{max(res['saves'] + res['evals'], default=0):.2f} s** |",
    f"| workdir disk: end / max / slope after warm-up | {res['disk_mb_end']:.1f} / "
    f"{res['disk_mb_max']:.1f} MB / {res['disk_slope_mb_per_hour']:+.1f} MB/hour |",
    "",
    f"![soak curves]({png.name})",
    "",
    f"Config: `configs/default.py` with num_steps={args.num_steps}, "
    f"checkpoint_every={args.checkpoint_every}, eval_every={args.eval_every}, "
    f"keep_checkpoints=2; samples every {args.sample_seconds:g} s. A checkpoint stall is the "
    "loop's wait for the finiteness check, the previous save and the copy to host memory (the "
    "write runs in the background); the saves include the final one after SIGTERM.",
    "",
  ]
  out.with_suffix(".md").write_text("\n".join(lines))
  out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")


def plot(res: dict, path: Path) -> Path:
  import matplotlib  # noqa: PLC0415

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  t = np.array([s["t"] for s in res["samples"]]) / 60
  fig, axes = plt.subplots(2, 2, figsize=(12, 7.5))
  warm = res["warm_up_seconds"] / 60
  for ax, key, title, slope in (
    (axes[0, 0], "rss_mb", "host RSS (MB)", res["rss_slope_mb_per_hour"]),
    (axes[0, 1], "disk_mb", "workdir disk use (MB)", res["disk_slope_mb_per_hour"]),
  ):
    ys = np.array([s[key] for s in res["samples"]])
    ax.plot(t, ys, ".-", label=key)
    after = t >= warm
    if after.sum() >= 3:
      fit = np.polyfit(t[after], ys[after], 1)
      ax.plot(t[after], np.polyval(fit, t[after]), "--", label=f"fit: {slope:+.1f} MB/hour")
    ax.axvline(warm, color="gray", alpha=0.5, label="end of warm-up")
    ax.set_title(title)
    ax.set_xlabel("minutes")
    ax.legend()
  steps = [s["step"] for s in res["samples"]]
  axes[1, 0].plot(t, steps, ".-")
  axes[1, 0].set_title(f"step ({res['steps_per_minute']:.1f} steps/min after warm-up)")
  axes[1, 0].set_xlabel("minutes")
  compiles = np.array([c["t"] for c in res["compiles"]]) / 60
  axes[1, 0].plot(compiles, np.interp(compiles, t, steps), "rx", label="XLA compilation")
  axes[1, 0].axvline(warm, color="gray", alpha=0.5)
  axes[1, 0].legend()
  ax = axes[1, 1]
  ax.plot(range(1, len(res["saves"]) + 1), res["saves"], "o-", label="checkpoint save")
  ax.plot(range(1, len(res["evals"]) + 1), res["evals"], "s-", label="eval")
  ax.set_title("loop stalls (s)")
  ax.set_xlabel("event number")
  ax.legend()
  for a in axes.flat:
    a.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)
  return path


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--minutes", type=float, default=45.0, help="wall time to train")
  parser.add_argument("--num_steps", type=int, default=10_000, help="schedule length (steps)")
  parser.add_argument("--checkpoint_every", type=int, default=40, help="steps between saves")
  parser.add_argument("--eval_every", type=int, default=80, help="steps between evals")
  parser.add_argument("--sample_seconds", type=float, default=10.0, help="RSS/disk period")
  parser.add_argument("--workdir", default="runs/soak")
  parser.add_argument("--out", default="benchmarks/results/soak", help="<out>.md, <out>.png")
  args = parser.parse_args()
  # glibc malloc as `python -m train.main` sets it (one arena, no mmap, no trim), before the
  # backend starts its threads: the soak measures the process `make train` runs.
  malloc = host_memory.keep_freed_memory()
  from absl import logging  # noqa: PLC0415

  logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
  command = "python benchmarks/soak.py " + shlex.join(sys.argv[1:])
  res = {**run(args), "malloc_as_train_main": malloc}
  write_results(res, args, command)
  print(Path(args.out).with_suffix(".md").read_text())


if __name__ == "__main__":
  main()
