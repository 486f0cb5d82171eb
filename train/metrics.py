"""What a run shows and leaves behind: progress bar, JSONL + TensorBoard metrics, loss plot."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import tqdm


class MetricWriter:
  """Appends metrics to `workdir/metrics.jsonl` and TensorBoard event files in `workdir/tb`."""

  def __init__(self, workdir: str | os.PathLike):
    self.workdir = Path(workdir)
    self._jsonl = open(self.workdir / "metrics.jsonl", "a")  # noqa: SIM115 (closed in close())
    try:
      from tensorboardX import SummaryWriter  # noqa: PLC0415

      self._tb = SummaryWriter(str(self.workdir / "tb"))
    except ImportError:  # TensorBoard output is optional
      self._tb = None

  def write(self, step: int, values: dict) -> None:
    self._jsonl.write(json.dumps({"step": step, **values}) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in values.items():
        self._tb.add_scalar(k, v, step)

  def write_summary(self, summary: dict) -> None:
    with open(self.workdir / "summary.json", "w") as f:
      json.dump(summary, f, indent=2, default=str)

  def write_final(self, final: dict) -> None:
    with open(self.workdir / "final.json", "w") as f:
      json.dump(final, f, indent=2)

  def close(self) -> None:
    self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


class Throughput:
  """Tokens per second of training time: eval, checkpoint saves and compilation excluded.

  * `tokens_per_second`: non-pad input tokens (`tokens[:, :-1] != 0` of every row the step
    read, over all processes) per second: the work that is not padding.
  * `total_tokens_per_second`: every input position (`B x (L - 1)`), pad included.

  The clock runs only between `start()` and `stop()`; the trainer stops it around evals and
  saves. Steps are dispatched one ahead of their metrics, so a rate read mid-run may include
  up to one step's time without its tokens; at the end every step is counted.
  """

  def __init__(self):
    self.train_seconds = 0.0
    self.tokens = 0
    self.total_tokens = 0
    self._since: float | None = None

  def start(self) -> None:
    if self._since is None:
      self._since = time.perf_counter()

  def stop(self) -> None:
    if self._since is not None:
      self.train_seconds += time.perf_counter() - self._since
      self._since = None

  def add(self, tokens: int, total_tokens: int) -> None:
    self.tokens += int(tokens)
    self.total_tokens += int(total_tokens)

  def rates(self) -> dict[str, float]:
    seconds = self.train_seconds
    if self._since is not None:
      seconds += time.perf_counter() - self._since
    seconds = max(seconds, 1e-9)
    return {
      "tokens_per_second": self.tokens / seconds,
      "total_tokens_per_second": self.total_tokens / seconds,
      "train_seconds": seconds,
    }


class Progress:
  """tqdm bar with loss, learning rate, non-pad tokens/s; tqdm supplies the ETA."""

  def __init__(self, total: int, initial: int, enabled: bool = True):
    self._bar = tqdm.tqdm(
      total=total,
      initial=initial,
      disable=not enabled,
      file=sys.stderr,
      dynamic_ncols=True,
      unit="step",
    )
    self._t0 = time.time()
    self._n0 = initial
    self._n = initial

  def update(self, step: int, values: dict, tokens_per_second: float | None = None) -> None:
    self._bar.update(step - self._n)
    self._n = step
    postfix = dict(loss=f"{values['loss']:.3f}", lr=f"{values['learning_rate']:.2e}")
    if tokens_per_second is not None:
      postfix["tok/s"] = f"{tokens_per_second:.0f}"  # non-pad, training time only
    self._bar.set_postfix(**postfix, refresh=False)

  def write(self, message: str) -> None:
    self._bar.write(message)

  def close(self) -> None:
    self._bar.close()


def _fmt_bytes(n: float) -> str:
  return f"{n / 1e6:.2f} MB" if n < 1e9 else f"{n / 1e9:.2f} GB"


def print_start_summary(s: dict) -> None:
  ratio = s["optimizer_state_bytes"] / max(s["adamw_state_bytes"], 1)
  lines = [
    "=" * 72,
    f"model            LLaMA-{s['model']}: {s['params'] / 1e6:.2f}M parameters "
    f"({s['galore_target_params'] / 1e6:.2f}M in attention/MLP kernels)",
    f"optimizer        {s['optimizer']}: state {_fmt_bytes(s['optimizer_state_bytes'])} "
    f"(AdamW would take {_fmt_bytes(s['adamw_state_bytes'])}; {ratio:.1%} of it)",
    f"compiled step    {s['compiled_step_memory']}",
  ]
  if "unigram_perplexity" in s:
    lines.append(
      f"unigram floor    validation perplexity {s['unigram_perplexity']:.1f} "
      "(context-free model; training should go well below it)"
    )
  lines.append("=" * 72)
  print("\n".join(lines), flush=True)


def print_end_summary(final: dict, png: Path | None, workdir: Path) -> None:
  lines = [
    "=" * 72,
    f"done: {final['steps']} steps in {final['wall_seconds']:.0f} s "
    f"({final['train_seconds']:.0f} s training), {final['tokens_per_second']:.0f} non-pad "
    f"tokens/s ({final['total_tokens_per_second']:.0f} tokens/s with padding; eval, "
    "checkpoints and compilation excluded)",
  ]
  if "eval_perplexity" in final:
    floor = final.get("unigram_perplexity")
    extra = f" (unigram floor {floor:.1f})" if floor else ""
    lines.append(
      f"eval loss {final['eval_loss']:.4f}, perplexity {final['eval_perplexity']:.2f}{extra}"
    )
  lines.append(f"metrics {workdir / 'metrics.jsonl'}, TensorBoard {workdir / 'tb'}")
  if png is not None:
    lines.append(f"loss curves {png}")
  lines.append(f"checkpoints {workdir / 'checkpoints'}")
  lines.append("=" * 72)
  print("\n".join(lines), flush=True)


def plot_curves(workdir: str | os.PathLike, out_name: str = "loss.png") -> Path | None:
  """Train and eval loss against step, from metrics.jsonl, as a PNG."""
  workdir = Path(workdir)
  try:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
  except ImportError:
    return None
  with open(workdir / "metrics.jsonl") as f:
    records = [json.loads(line) for line in f if line.strip()]
  train = sorted({r["step"]: r["loss"] for r in records if "loss" in r}.items())
  evals = sorted({r["step"]: r["eval_loss"] for r in records if "eval_loss" in r}.items())
  fig, ax = plt.subplots(figsize=(7, 4.5))
  if train:
    ax.plot(*zip(*train), label="train loss")
  if evals:
    ax.plot(*zip(*evals), "o-", label="eval loss")
  ax.set_xlabel("step")
  ax.set_ylabel("cross-entropy (nats/token)")
  ax.set_title(workdir.name)
  ax.grid(alpha=0.3)
  ax.legend()
  path = workdir / out_name
  fig.savefig(path, dpi=100, bbox_inches="tight")
  plt.close(fig)
  return path
