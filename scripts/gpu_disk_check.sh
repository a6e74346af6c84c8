#!/usr/bin/env bash
# Quantized checkpoints from disk on the GPU: quantize the demo model (on the GPU) to q4 / q8 / nf4,
# then generate, eval and info from each on cuda; then the CUDA-only chat tests when pytest exists.
set -uo pipefail
D=/tmp/olmo_disk; rm -rf "$D"; mkdir -p "$D"
ol() { python3 -m olmo_local.cli "$@"; }
for f in q4 q8 nf4; do
  echo "== $f"
  ol quantize demo "$D/$f" --format $f --device cuda --tokens 4096 2>&1 | tail -6
  ol generate "$D/$f" "The old house stood" --raw -n 24 --temperature 0 --device cuda 2>&1 | tail -3
  ol info "$D/$f" --device cuda 2>&1 | tail -4
done
echo "== bf16 on cuda, same prompt"
ol generate demo "The old house stood" --raw -n 24 --temperature 0 --device cuda 2>&1 | tail -3
if python3 -c "import pytest, pexpect" 2>/dev/null; then
  python3 -m pytest -q -x tests/test_chat.py -k cuda 2>&1 | tail -5
else
  echo "pytest/pexpect not installed here: CUDA chat tests not run"
fi
