#!/usr/bin/env bash
# The figures of record, one device call: full bench (-r 3), pp2048, memory at 4K and 32K (int8 KV).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
timeout 200 python3 -m olmo_local.cli bench --synthetic 7b --format q4 -r 3 -q > "$OUT/bench.log" 2>&1; grep -E "^\| olmo|^load|^roofline" "$OUT/bench.log" | cut -c1-160
timeout 100 python3 -m olmo_local.cli bench --synthetic 7b --format q4 -r 2 -p 2048 -n 0 --depth none -q > "$OUT/pp2048.log" 2>&1; grep -E "pp2048" "$OUT/pp2048.log" | cut -c1-160
bash scripts/gpu_check.sh mem 2>&1 | grep -E "^load|peak|tg128" | cut -c1-160
