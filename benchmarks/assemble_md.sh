#!/usr/bin/env bash
# Rebuilds BENCHMARKS.md from its header and the results files that the benchmark scripts write.
set -euo pipefail
cd "$(dirname "$0")/.."
{
  cat benchmarks/BENCHMARKS_HEADER.md
  for f in benchmarks/results/*.md; do
    printf '\n---\n\n<!-- %s -->\n' "$f"
    sed 's/^### /#### /; t; s/^## /### /; t; s/^# /## /' "$f"
  done
} > BENCHMARKS.md
