#!/usr/bin/env bash
# Why is the first bench process on a fresh machine slow and erratic in prefill / ttft? Two processes
# with an empty Triton cache (everything JIT-compiled in the first), then the same cache warm, each
# printing every timed sample; SM clocks sampled every 100 ms meanwhile. Logs under $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export TRITON_CACHE_DIR=/tmp/fresh_triton_cache; rm -rf "$TRITON_CACHE_DIR"
nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,utilization.gpu --format=csv -lms 100 > "$OUT/clocks.csv" 2>&1 &
SMI=$!
for run in cold warm; do
  /usr/bin/time -f "$run wall %e s" timeout 200 python3 -m olmo_local.cli bench --synthetic 7b --format q4 -n 0 --depth none \
    -r 6 -o json 2>"$OUT/ttft_$run.err" > "$OUT/ttft_$run.json"
  tail -1 "$OUT/ttft_$run.err"
  python3 - "$OUT/ttft_$run.json" "$run" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
rows = d["rows"]
for r in (rows if isinstance(rows, list) else []):
    name = r.get("test") or r.get("name")
    s = r.get("samples") or r.get("values")
    print(sys.argv[2], name, [round(x, 1) for x in (s or [])])
PY
done
kill $SMI
python3 - "$OUT/clocks.csv" <<'PY'
import sys
rows = [l.strip().split(", ") for l in open(sys.argv[1]) if l[0].isdigit()]
sm = [int(r[1].split()[0]) for r in rows if len(r) > 2 and r[1].split()[0].isdigit()]
if sm:
    print(f"SM clock samples {len(sm)}: min {min(sm)} max {max(sm)} MHz; below 1500 MHz: {sum(s < 1500 for s in sm)}")
PY
