#!/usr/bin/env bash
# Runs GPU tests and benchmarks on a lent GPU machine; logs and JSON go to $RAW and come back
# as one archive, $OUT/gpu_results.tgz (default $OUT: ./gpu_out). Each step is capped so one
# hang cannot eat the whole call.
#   tools/gpu_run.sh tests            every test under tests/gpu (2 GPUs for the NCCL ones)
#   tools/gpu_run.sh quick            smoke runs of the four benchmarks (--quick)
#   tools/gpu_run.sh kernels|handoff|engine|e2e|e2e_lw   one full benchmark (e2e_lw: the
#                                     trace replay with the layer-wise hand-off)
# Steps can be combined: tools/gpu_run.sh tests quick
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
RAW=${RAW:-/tmp/gpu_raw}
mkdir -p "$OUT" "$RAW"
source tools/gpu_env.sh > "$RAW/env.log" 2>&1 || { cat "$RAW/env.log"; exit 1; }
MODEL=${PD_SERVE_GPU_MODEL:-/tmp/llama-3-8b-random}
[[ -d "$MODEL" ]] || python tools/make_random_model.py --preset llama-3-8b --out "$MODEL" --seed 0
TRACE=${PD_SERVE_GPU_TRACE:-.data/traces/mooncake/conversation_trace.jsonl}

step() {  # step NAME SECONDS CMD...: runs CMD with a cap, log in $RAW/NAME.log
  local name=$1 cap=$2; shift 2
  local t0=$(date +%s)
  timeout "$cap" "$@" > "$RAW/$name.log" 2>&1
  echo "step $name: exit $? after $(( $(date +%s) - t0 )) s"
  tail -n 4 "$RAW/$name.log"
}

for what in "$@"; do
  case $what in
    tests) step gpu_tests 420 python -m pytest -q -p no:cacheprovider -m gpu tests/gpu -rfs ;;
    quick)
      step kernels_quick 150 python tools/bench_gpu_kernels.py --quick --out "$RAW/kernels_quick.json"
      step handoff_quick 150 python tools/bench_gpu_handoff.py --quick --out "$RAW/handoff_quick.json"
      step engine_quick 200 python tools/bench_gpu_engine.py --quick --out "$RAW/engine_quick.json" ;;
    kernels) step kernels 540 python tools/bench_gpu_kernels.py --out "$RAW/bench_gpu_kernels.json" ;;
    handoff) step handoff 540 python tools/bench_gpu_handoff.py --out "$RAW/bench_gpu_handoff.json" ;;
    engine) step engine 540 python tools/bench_gpu_engine.py --out "$RAW/bench_gpu_engine.json" ;;
    e2e) step e2e 580 python tools/bench_gpu_e2e.py --model-dir "$MODEL" --trace "$TRACE" \
           --modes pd,agg --out "$RAW/bench_gpu_e2e.json" --work /tmp/bench_gpu_e2e ;;
    e2e_lw) step e2e_lw 400 python tools/bench_gpu_e2e.py --model-dir "$MODEL" --trace "$TRACE" \
           --modes pdlw --out "$RAW/bench_gpu_e2e_lw.json" --work /tmp/bench_gpu_e2e_lw ;;
    *) echo "unknown step $what"; exit 2 ;;
  esac
done
cp build_gpu.log "$RAW/" 2>/dev/null
tar -czf "$OUT/gpu_results.tgz" -C "$RAW" .
