#!/usr/bin/env bash
# One device call: install, kernel checks at 7B shapes, 7B parity, and the bench. Logs under $OUT.
# Usage (device tool): bash scripts/gpu_check.sh [kernels] [parity] [bench] [benchcmp]
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
steps=${*:-kernels parity bench}
for s in $steps; do
  case $s in
    kernels) timeout 240 python3 scripts/gpu_check_kernels.py 2>&1 | tee "$OUT/kernels.log" | tail -40 ;;
    parity)  timeout 130 python3 scripts/gpu_parity.py --steps ${PARITY_STEPS:-256} 2>&1 | tee "$OUT/parity.log" | tail -12 ;;
    bench)   timeout 200 python3 -m olmo_local.cli bench --synthetic 7b --format q4 -r 2 2>&1 | tee "$OUT/bench.log" | tail -20 ;;
    benchcmp) timeout 200 python3 -m olmo_local.cli bench --synthetic 7b --format q4 -r 1 --compare hf-nf4 -n 16 --depth none 2>&1 | tee "$OUT/benchcmp.log" | tail -20 ;;
    *) python3 -m olmo_local.cli $s 2>&1 | tee -a "$OUT/extra.log" | tail -20 ;;
  esac
done
