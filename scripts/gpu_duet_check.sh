#!/usr/bin/env bash
# Issue 11's GPU check, under 10 minutes on an H200: calibrate the latency model's profile, then serve azure-conv with
# Qwen3-8B dummy weights under aggregated (its best simulated budget) and duet at one rate, and report goodput, TBT p99
# and the latency model's error per step kind. Results go to $OUT (default benchmarks/results/gpu-<date>).
#   bash scripts/gpu_duet_check.sh [rate req/s, default 8] [aggregated budget, default 2048]
set -euo pipefail
RATE=${1:-8}
BUDGET=${2:-2048}
OUT=${OUT:-benchmarks/results/gpu-$(date -u +%Y%m%d)}
mkdir -p "$OUT"
timeout 150 python scripts/calibrate_hw.py --step 16 --out "$OUT/profile.json" | tee "$OUT/calibrate.log"
for policy in aggregated duet; do
  budget=$([ "$policy" = duet ] && echo 8192 || echo "$BUDGET")
  timeout 180 python scripts/bench_serving.py --backend gpu --model qwen3-8b --gpu "$OUT/profile.json" \
    --policy "$policy" --workload azure-conv --rate "$RATE" --num-requests 200 --tbt-slo-ms 50 \
    --max-num-batched-tokens "$budget" --no-progress --out "$OUT/$policy.json" --timeline "$OUT/$policy-timeline.json" \
    | tee "$OUT/$policy.log"
  python scripts/model_error.py "$OUT/$policy-timeline.json" --out "$OUT/$policy-model-error.json"
done
