#!/usr/bin/env bash
# Load time of a q4 7B checkpoint already in the page cache: random 7B (bf16) -> q4 on the GPU ->
# bench twice (the second load is the page-cache one).
set -uo pipefail
D=/tmp/olmo7b; rm -rf "$D" "$D-q4"
ol() { python3 -m olmo_local.cli "$@"; }
t0=$(date +%s); ol init-random "$D" --preset 7b 2>&1 | tail -2; echo "init-random: $(( $(date +%s) - t0 )) s"
t0=$(date +%s); ol quantize "$D" "$D-q4" --format q4 --device cuda --no-report 2>&1 | tail -3; echo "quantize: $(( $(date +%s) - t0 )) s"
du -sh "$D-q4"
for i in 1 2; do
  ol bench "$D-q4" -p 0 -n 16 --depth none -r 1 -q 2>&1 | tail -5
done
echo "== the quantized checkpoint at a 4K context (512-token prompt) and at 32K with int8 KV"
ol bench "$D-q4" --ctx 4096 --depth none -r 2 -q 2>&1 | grep -E "^\| olmo|load "
ol bench "$D-q4" --ctx 33000 --kv-cache int8 --depth 32768 -p 0 -r 1 -q 2>&1 | grep -E "^\| olmo|load "
