set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --target /tmp/site2 .whl2/*.whl >/dev/null 2>&1
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$OUT/install.log" 2>&1
OLMO_LOCAL_TEST_GPU=1 PYTHONPATH=/tmp/site2 timeout 150 python3 -m pytest -q -x tests/test_kernels_layer_tail.py -k cuda 2>&1 | tail -3
(cd scripts && timeout 100 python3 gpu_tail_probe.py 2>&1 | grep -v Warn | tail -9)
