#!/usr/bin/env bash
# One device call for the one-launch layer tail: CUDA tests, state check, same-card A/B of the decode
# step with and without it. Logs under $OUT; a short table last.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --target /tmp/site2 .whl2/*.whl >/dev/null 2>&1
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
nvidia-smi --query-gpu=name --format=csv,noheader
OLMO_LOCAL_TEST_GPU=1 PYTHONPATH=/tmp/site2 timeout 150 python3 -m pytest -q -x tests/test_kernels_layer_tail.py \
  -k "cuda" 2>&1 | tee "$OUT/tests_tail.log" | tail -15
[ "${PIPESTATUS[0]}" = 0 ] || { echo "layer tail CUDA tests failed or hung: stop"; exit 1; }
OLMO_LOCAL_TEST_GPU=1 PYTHONPATH=/tmp/site2 timeout 200 python3 -m pytest -q tests/test_decode_step.py \
  tests/test_chat.py -k "cuda" 2>&1 | tee "$OUT/tests.log" | tail -4
(cd scripts && timeout 120 python3 gpu_tail_probe.py 2>&1 | tee "$OUT/tailprobe.log" | grep -v Warn | tail -5)
timeout 200 python3 scripts/gpu_tiled_check.py 1b --tail 2>&1 | tee "$OUT/tiledchk.log" | tail -6
timeout 120 python3 scripts/gpu_state_check.py 2>&1 | tee "$OUT/state.log" | tail -4
for v in ${BENCHAB:-default default-tail default default-tail}; do
  timeout 150 python3 scripts/gpu_bench_variant.py $v --synthetic 7b --format q4 -r 2 --depth none -q 2>&1 \
    | tee "$OUT/benchab_$v.log" | grep -E "tg128|ttft|Error|error" | sed "s/^/$v /" | cut -c1-150
done
