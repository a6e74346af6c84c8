#!/usr/bin/env bash
# Train the packaged demo model on one CUDA GPU, end to end, and copy the result into $OUT/demo.
#
#   scripts/train_demo_gpu.sh [extra train_demo.py train options]
#
# Environment: OUT (where the result goes; default runs/), CORPUS (folder of the corpus *.txt files;
# default: the first of runs/corpus, corpus, ../shared/data/corpus that exists), BUDGET (wall-clock
# seconds for the whole training command, default 400), PYTHON (default python3).
# Needs torch with CUDA, tokenizers, safetensors, numpy; no network, no pip install (the tool imports
# olmo_local straight from this checkout).
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-runs}
PY=${PYTHON:-python3}
BUDGET=${BUDGET:-400}
if [ -z "${CORPUS:-}" ]; then
  for c in runs/corpus corpus ../shared/data/corpus; do
    if [ -d "$c" ]; then CORPUS=$c; break; fi
  done
fi
if [ -z "${CORPUS:-}" ] || [ ! -d "$CORPUS" ]; then
  echo "no corpus folder: set CORPUS=DIR (the *.txt files of shared/data/corpus)" >&2
  exit 2
fi

export PYTHONUNBUFFERED=1
mkdir -p "$OUT" runs
work=runs/demo
start=$(date +%s)
"$PY" tools/train_demo.py train --corpus "$CORPUS" --out "$work" --device cuda \
  --time-budget-s "$BUDGET" "$@" 2>&1 | tee "$OUT/train_demo.log"
if [ "$(cd "$OUT" && pwd)" != "$(pwd)/runs" ]; then
  rm -rf "$OUT/demo"
  cp -r "$work" "$OUT/demo"
fi
echo "done in $(( $(date +%s) - start ))s: $OUT/demo"
ls -l "$OUT/demo"
