#!/usr/bin/env bash
# The runs behind docs/benchmarks.md, "Serving to a latency target" (issue 36), with
# bench/open_loop.py: every cell's JSON lands in $OUT.
#   1. open loop at 0.5x-4x the measured capacity: digits_cnn (target 20 ms) and
#      resnet_bench (100 ms), REST binary and gRPC; FoldServe as before (no target, its
#      clients sending no deadline) against FoldServe with the target (clients sending it);
#   2. resnet_bench REST at 0.8x and 1x capacity over the fixed batching grid (no target),
#      and the target's adaptive batcher at the same rates;
#   3. peers: resnet_bench REST JSON at 0.5x-2x FoldServe's capacity (as before): FoldServe
#      before and with the target, the naive server, KServe and MLServer (no deadline sent
#      to those without a target: they read none).
# Usage: bash bench/latency_target.sh [OUT] [SECONDS] [STAGES]   (from the checkout's root;
# STAGES: "open grid peers", the default, or some of them; grid needs open's resnet_bench
# capacity)
set -euo pipefail
OUT=${1:-/tmp/latency-target}
SECONDS_PER_CELL=${2:-4}
STAGES=${3:-open grid peers}
PY=.venv/bin/python
mkdir -p "$OUT"
cell() { "$PY" bench/open_loop.py --start fold --duration "$SECONDS_PER_CELL" --warmup 1 --drain 3 "$@"; }

capacity_of() { "$PY" -c "import json, sys; print(round(json.load(open(sys.argv[1]))['capacity']))" "$1"; }

if [[ $STAGES == *open* ]]; then
for spec in digits_cnn:20 resnet_bench:100; do
  model=${spec%%:*} target=${spec##*:}
  for protocol in rest grpc; do
    # The server as before measures the capacity (a closed loop of 64 in flight) first.
    cell --model "$model" --protocol "$protocol" --capacity-multiples 0.5,1,1.5,2,4 \
      --target-ms "$target" --no-deadline --json "$OUT/open-$model-$protocol-before.json" --markdown
    cell --model "$model" --protocol "$protocol" \
      --capacity "$(capacity_of "$OUT/open-$model-$protocol-before.json")" \
      --capacity-multiples 0.5,1,1.5,2,4 --target-ms "$target" \
      --env "FOLDSERVE_LATENCY_TARGET_MS=$target" \
      --json "$OUT/open-$model-$protocol-target.json" --markdown
  done
done
fi

if [[ $STAGES == *peers* ]]; then
  json=(--model resnet_bench --encoding json --target-ms 100)
  cell "${json[@]}" --capacity-multiples 0.5,1,1.5,2 --no-deadline \
    --json "$OUT/peers-fold-before.json" | tail -5
  capacity=$(capacity_of "$OUT/peers-fold-before.json")
  cell "${json[@]}" --capacity "$capacity" --capacity-multiples 0.5,1,1.5,2 \
    --env FOLDSERVE_LATENCY_TARGET_MS=100 --json "$OUT/peers-fold-target.json" | tail -4
  for peer in naive kserve mlserver; do
    cell "${json[@]}" --start "$peer" --capacity "$capacity" --capacity-multiples 0.5,1,1.5,2 \
      --no-deadline --json "$OUT/peers-$peer.json" | tail -4
  done
fi

[[ $STAGES == *grid* ]] || exit 0
capacity=$(capacity_of "$OUT/open-resnet_bench-rest-before.json")
for multiple in 0.8 1; do
  rate=$("$PY" -c "print(round($capacity * $multiple))")
  for size in 1 4 8 16 32 64; do
    for delay in 0 100 500 2000; do
      cell --model resnet_bench --protocol rest --rates "$rate" --target-ms 100 --no-deadline \
        --env "FOLDSERVE_MAX_BATCH_SIZE=$size" --env "FOLDSERVE_MAX_QUEUE_DELAY_US=$delay" \
        --json "$OUT/grid-$multiple-$size-$delay.json" | tail -1
    done
  done
  cell --model resnet_bench --protocol rest --rates "$rate" --target-ms 100 \
    --env FOLDSERVE_LATENCY_TARGET_MS=100 --env FOLDSERVE_MAX_BATCH_SIZE=64 \
    --env FOLDSERVE_MAX_QUEUE_DELAY_US=2000 --json "$OUT/grid-$multiple-adaptive.json" | tail -1
done
