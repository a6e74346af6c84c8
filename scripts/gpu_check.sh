#!/usr/bin/env bash
# One device call: install, kernel checks at 7B shapes, 7B parity, and the bench. Logs under $OUT.
# Usage (device tool): bash scripts/gpu_check.sh [kernels] [parity] [bench] [benchcmp] [sweep] [issue3] [mem] [profile] [disk] [load7b]
#   [cudatests] [ablate] [benchab] [benchabd] [benchabi8] [final] ... (see the case list; BENCHAB / TESTS pick variants / test files)
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
    paritydemo) # the trained demo model on held-out prompts, ours and transformers (fp32, bf16) vs our fp32
             timeout 400 python3 scripts/gpu_parity.py --model demo --steps ${PARITY_STEPS:-256} --prompts ${PARITY_PROMPTS:-16} --hf 2>&1 | tee "$OUT/paritydemo.log" | grep -v "^\[transformers\]" | tail -12 ;;
    parityhf) # the 7B shape (random weights): transformers fp32 / bf16 on the GPU beside our paths
             timeout 400 python3 scripts/gpu_parity.py --steps ${PARITY_STEPS:-128} --hf --no-q4 2>&1 | tee "$OUT/parityhf.log" | grep -v "^\[transformers\]" | tail -12 ;;
    turndepth) # a 40-token chat turn deep in the context: prefill graphs (attention_cached) vs eager, bf16 and int8 KV
             for kv in bf16 int8; do timeout 200 python3 scripts/gpu_turn_depth.py --kv-cache $kv 2>&1 | tee "$OUT/turndepth_$kv.log" | tail -8; done ;;
    bench)   timeout 200 python3 -m olmo_local.cli bench --synthetic 7b --format q4 -r 2 2>&1 | tee "$OUT/bench.log" | tail -20 ;;
    benchcmp) timeout 200 python3 -m olmo_local.cli bench --synthetic 7b --format q4 -r 1 --compare hf-nf4 -n 16 --depth none 2>&1 | tee "$OUT/benchcmp.log" | tail -20 ;;
    q4prev)  Q4_MODULE=olmo_local.kernels._gemv_q4_prev timeout 120 python3 scripts/gpu_check_kernels.py --only q4 2>&1 | tee "$OUT/q4prev.log" | tail -12 ;;
    sweepq4) timeout 200 python3 scripts/gpu_check_kernels.py --sweep --only "sweep q4" 2>&1 | tee "$OUT/sweepq4.log" | tail -60 ;;
    ncu)     timeout 300 /usr/local/cuda/bin/ncu --target-processes all -k regex:"_q4_gemv_kernel|_q8_gemv_kernel" -c 12 \
               --section SpeedOfLight --section Occupancy --section WarpStateStats --section SchedulerStats --section MemoryWorkloadAnalysis \
               python3 scripts/gpu_ncu_q4.py 2>&1 | tee "$OUT/ncu.log" | grep -E "==PROF==|_kernel|Duration|DRAM Throughput|Memory Throughput|Achieved Occupancy|Theoretical Occupancy|Registers|Issue Slots Busy|No Eligible|Active Warps Per|Eligible Warps|Warp Cycles Per Issued|Stall|Block Size|Grid Size|ERR|error|stalled|spends" | cut -c1-220 | head -150 ;;
    layouts) timeout 240 python3 scripts/gpu_check_kernels.py --layouts --only "lay " > "$OUT/layouts.log" 2>&1; grep -E "^lay |FAIL|Error" "$OUT/layouts.log" | cut -c1-100 ;;
    benchab) # decode A/B in one process each: standard layout vs tiled (hand prefetch) vs tiled + pipelined loop
             for v in ${BENCHAB:-stdquad tiledquad tiled tiledpf2}; do
               timeout 110 python3 scripts/gpu_bench_variant.py $v --synthetic 7b --format q4 -r 2 --depth none -q 2>&1 | tee "$OUT/benchab_$v.log" | grep -E "tg128|pp512|ttft" | sed "s/^/$v /" | cut -c1-150
             done ;;
    benchabd) # decode A/B at one depth (ABDEPTH, default 8192; no prefill tests), variants as benchab
             for v in ${BENCHAB:-default}; do
               timeout 150 python3 scripts/gpu_bench_variant.py $v --synthetic 7b --format q4 -r 2 -p 0 --depth ${ABDEPTH:-8192} -q 2>&1 | tee "$OUT/benchabd_$v.log" | grep -E "tg" | sed "s/^/$v /" | cut -c1-150
             done ;;
    benchabi8) # decode A/B at depth ABDEPTH (default 32768) with int8 KV and a 33K cache (the long-context launch)
             for v in ${BENCHAB:-default}; do
               timeout 150 python3 scripts/gpu_bench_variant.py $v --synthetic 7b --format q4 -r 1 -p 0 --ctx 33000 --kv-cache int8 --depth ${ABDEPTH:-32768} -q 2>&1 | tee "$OUT/benchabi8_$v.log" | grep -E "tg128@" | sed "s/^/$v /" | cut -c1-150
             done ;;
    cudatests) # the CUDA-only tests of $TESTS (default: all), pytest from the wheels in .whl2 (carry it)
             python3 -m pip install -q --no-index --no-deps --target /tmp/site2 .whl2/*.whl >/dev/null 2>&1
             OLMO_LOCAL_TEST_GPU=1 PYTHONPATH=/tmp/site2${PYTHONPATH:+:$PYTHONPATH} timeout 300 python3 -m pytest -q ${TESTS:-tests/} -k cuda > "$OUT/tests.log" 2>&1
             tail -3 "$OUT/tests.log"; grep -E "^FAILED|Error" "$OUT/tests.log" | head -10 ;;
    ablate)  timeout 200 python3 scripts/gpu_ablate_decode.py ${ABLATE:+--variants $ABLATE} 2>&1 | tee "$OUT/ablate.log" | tail -10 ;;
    final)   bash scripts/gpu_final.sh ;;
    prefhost) timeout 240 python3 scripts/gpu_prefill_host.py > "$OUT/prefhost.log" 2>&1
              grep -E "^prefill|^graph|^peak|^turn|us per call|^host|Error" "$OUT/prefhost.log" | head -40 ;;
    ttft)    timeout 200 python3 scripts/gpu_ttft_probe.py 2>&1 | tee "$OUT/ttft.log" | grep -v Warn | tail -10 ;;
    hostgap) timeout 200 python3 scripts/gpu_host_gap.py 2>&1 | tee "$OUT/hostgap.log" | grep -v Warn | tail -8 ;;
    memprobe) timeout 240 python3 scripts/gpu_mem_probe.py 2>&1 | tee "$OUT/memprobe.log" | grep -v Warn | tail -8 ;;
    profdec) timeout 200 python3 scripts/gpu_profile_decode.py --json "$OUT/profdec.json" 2>&1 | tee "$OUT/profdec.log" | tail -30 ;;
    tiledchk) timeout 200 python3 scripts/gpu_tiled_check.py ${TILED_PRESET:-1b} 2>&1 | tee "$OUT/tiledchk.log" | tail -8 ;;
    blocks)  timeout 120 python3 scripts/gpu_prefill_blocks_check.py 2>&1 | tee "$OUT/blocks.log" | tail -3 ;;
    nf4ab)   # nf4 decode: the fused nf4 GEMV against NF4Linear's dequantize + matmul (needs .whl: bitsandbytes)
             for v in ${NF4AB:-default default-nonf4}; do
               timeout 200 python3 scripts/gpu_bench_variant.py $v --synthetic 7b --format nf4 -r 1 -n 64 --depth none -q 2>&1 | tee "$OUT/nf4ab_$v.log" | grep -E "tg64|pp512|ttft|^load" | sed "s/^/$v /" | cut -c1-170
             done ;;
    nf4probe) timeout 200 python3 scripts/gpu_nf4_probe.py 2>&1 | tee "$OUT/nf4probe.log" | tail -24 ;;
    head)    timeout 200 python3 scripts/gpu_head_probe.py 2>&1 | tee "$OUT/head.log" | tail -9 ;;
    gps)     timeout 200 python3 scripts/gpu_gps_probe.py 2>&1 | tee "$OUT/gps.log" | tail -12 ;;
    probe)   timeout 240 python3 scripts/gpu_stream_probe.py 2>&1 | tee "$OUT/probe.log" | tail -60 ;;
    attnpre) timeout 120 python3 scripts/gpu_check_attn_prefill.py 2>&1 | tee "$OUT/attnpre.log" | tail -6 ;;
    sweepattn) timeout 200 python3 scripts/gpu_check_kernels.py --sweep --only "sweep attn" > "$OUT/sweepattn.log" 2>&1; python3 scripts/gpu_sweep_summary.py | cut -c1-110 ;;
    sweep)   timeout 240 python3 scripts/gpu_check_kernels.py --sweep --only sweep 2>&1 | tee "$OUT/sweep.log" | tail -60 ;;
    issue3)  timeout 320 python3 -m olmo_local.cli bench --synthetic 7b --format q4 --compare hf-nf4 -r 1 2>&1 | tee "$OUT/issue3.log" | tail -16 ;;
    mem)     timeout 120 python3 -m olmo_local.cli bench --synthetic 7b --format q4 --ctx 4096 --depth none -r 1 -q 2>&1 | tee "$OUT/mem4k.log" | tail -8
             timeout 160 python3 -m olmo_local.cli bench --synthetic 7b --format q4 --ctx 33000 --kv-cache int8 --depth 32768 -p 0 -r 1 -q 2>&1 | tee "$OUT/mem32k.log" | tail -8 ;;
    profile) timeout 200 python3 scripts/gpu_profile_prefill.py --tokens 512 2048 2>&1 | tee "$OUT/profile.log" | grep -v USDT | tail -70 ;;
    disk)    timeout 240 bash scripts/gpu_disk_check.sh 2>&1 | tee "$OUT/disk.log" | tail -40 ;;
    load7b)  timeout 420 bash scripts/gpu_load7b.sh 2>&1 | tee "$OUT/load7b.log" | tail -20 ;;
    *) python3 -m olmo_local.cli $s 2>&1 | tee -a "$OUT/extra.log" | tail -20 ;;
  esac
done
