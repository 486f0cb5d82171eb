"""Throughput of the training input pipeline (train/data.py) on the bundled C4 sample.

Times `make_train_iterator` in both modes, with and without grain worker processes, after
warm-up batches, and prints a markdown table: batches/s, tokens/s (all B x L positions) and
non-pad tokens/s. The bundled sample is prepared into --data_dir first if needed.

  python benchmarks/data_throughput.py [--batch_size=512 --seq_len=256 --batches=20
                                        --worker_counts=0,2 --data_dir=data/tfds]

Compare with what training consumes: batch_size x seq_len / step time.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from absl import flags

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # Run from any directory.

from train import data  # noqa: E402


def measure(data_dir: Path, mode: str, workers: int, args: argparse.Namespace) -> dict:
  """Batches/s and tokens/s of the train iterator after 5 warm-up batches."""
  it = data.make_train_iterator(
    data_dir,
    seq_len=args.seq_len,
    batch_size=args.batch_size,
    mode=mode,
    seed=0,
    process_index=0,
    process_count=1,
    worker_count=workers,
  )
  for _ in range(5):  # Includes starting the workers.
    next(it)
  non_pad = 0
  start = time.perf_counter()
  for _ in range(args.batches):
    non_pad += int((next(it)["tokens"] != 0).sum())
  seconds = time.perf_counter() - start
  it.close()
  return {
    "batches/s": args.batches / seconds,
    "tokens/s": args.batches * args.batch_size * args.seq_len / seconds,
    "non-pad tokens/s": non_pad / seconds,
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--data_dir", type=Path, default=data.BUNDLED_DATA_DIR)
  parser.add_argument("--batch_size", type=int, default=512, help="rows per batch (paper: 512)")
  parser.add_argument("--seq_len", type=int, default=256, help="tokens per row (paper: 256)")
  parser.add_argument("--batches", type=int, default=20, help="timed batches per setting")
  parser.add_argument("--worker_counts", default="0,2", help="comma-separated grain workers")
  args = parser.parse_args()
  flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags.
  data.ensure_bundled_prepared(args.data_dir)
  print(f"\n`python {' '.join(sys.argv)}`\n")
  load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
  print(f"{os.cpu_count()} CPUs (load {load}); batch {args.batch_size} x {args.seq_len}; ", end="")
  print(f"{args.batches} timed batches per row.\n")
  print("| mode | workers | batches/s | tokens/s | non-pad tokens/s |")
  print("|---|---|---|---|---|")
  for mode in data.MODES:
    for workers in (int(w) for w in args.worker_counts.split(",")):
      r = measure(args.data_dir, mode, workers, args)
      print(
        f"| {mode} | {workers} | {r['batches/s']:.2f} | {r['tokens/s']:,.0f} "
        f"| {r['non-pad tokens/s']:,.0f} |"
      )


if __name__ == "__main__":
  main()
