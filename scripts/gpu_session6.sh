#!/usr/bin/env bash
# One device call: install, the CUDA tests named in $TESTS (default: gemv + decode step), then the
# steps named as arguments: ablate (scripts/gpu_ablate_decode.py), tiled (gpu_tiled_check.py 1b),
# ab (benchab over the variants in $AB, tg128 rows), final (scripts/gpu_final.sh).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --target /tmp/site2 .whl2/*.whl >/dev/null 2>&1
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
nvidia-smi --query-gpu=name --format=csv,noheader
TESTS=${TESTS:-"tests/test_kernels_gemv.py tests/test_decode_step.py"}
if [ "$TESTS" != "none" ]; then
  OLMO_LOCAL_TEST_GPU=1 PYTHONPATH=/tmp/site2 timeout 300 python3 -m pytest -q $TESTS -k cuda > "$OUT/tests.log" 2>&1
  tail -3 "$OUT/tests.log"; grep -E "^FAILED|Error" "$OUT/tests.log" | head -10
fi
for step in "$@"; do
  case $step in
    ablate) timeout 200 python3 scripts/gpu_ablate_decode.py 2>&1 | tail -12 ;;
    tiled) timeout 200 python3 scripts/gpu_tiled_check.py 1b 2>&1 | tail -8 ;;
    ab) for v in ${AB:-default default}; do
          timeout 120 python3 scripts/gpu_bench_variant.py $v --synthetic 7b --format q4 -r 2 --depth none -q > "$OUT/ab_$v.log" 2>&1
          echo "$v: $(grep -E '^\| olmo' "$OUT/ab_$v.log" | grep tg128 | cut -c1-150)"
        done ;;
    final) bash scripts/gpu_final.sh ;;
  esac
done
