#!/usr/bin/env bash
# Inference benchmark: our CPU runtime against onnxruntime on the bundled models, and
# dynamic batching against unbatched serving over HTTP.
#
#   bench/inference.sh                       # 3 rounds
#   ROUNDS=5 SECONDS_EACH=3 bench/inference.sh
#
# Part 1, runtimes: one thread each, pinned to CPU 1, batch 1 and 64, interleaved
# rounds; median time per batch. "tract" is tract's own optimised plan, "fused" is what
# Switchyard runs by default (inference/src/fused.rs), "onnxruntime" is the pinned wheel
# from scripts/requirements-models.txt with intra- and inter-op threads set to 1.
# Part 2, batching: `switchyard model-server` with one HTTP thread and one batch thread,
# unbatched (max_batch_size 1) vs batched (max_batch_size 64), 64 concurrent clients
# (oha) posting one image each; requests per second.
# Needs: python3 (venv, pip), oha (cargo install oha). Loopback only.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
SECONDS_EACH=${SECONDS_EACH:-2}
HTTP_SECONDS=${HTTP_SECONDS:-5}
OHA=${OHA:-$(command -v oha || echo /tmp/oha/bin/oha)}
command -v "$OHA" >/dev/null || { echo "missing oha: cargo install oha" >&2; exit 1; }
OUT=$PWD/bench/out
VENV=$OUT/venv
mkdir -p "$OUT"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q -r scripts/requirements-models.txt
fi
cargo build --release --quiet
cargo build --release --quiet -p switchyard-inference --example runtime_bench
BENCH=$PWD/target/release/examples/runtime_bench
RESULTS=$(mktemp)
trap 'rm -f "$RESULTS"; pkill -f "model-server --model .* --listen 127.0.0.1:18501" || true' EXIT

for round in $(seq 1 "$ROUNDS"); do
  for model in mlp cnn; do
    for batch in 1 64; do
      f=models/digits_$model.onnx
      taskset -c 1 "$BENCH" "$f" "$batch" "$SECONDS_EACH" tract 2>/dev/null >> "$RESULTS"
      taskset -c 1 "$BENCH" "$f" "$batch" "$SECONDS_EACH" auto 2>/dev/null >> "$RESULTS"
      taskset -c 1 "$VENV/bin/python" scripts/bench_onnxruntime.py "$f" "$batch" "$SECONDS_EACH" >> "$RESULTS"
    done
  done
  echo "round $round done" >&2
done

python3 -c "
import json, sys, statistics as st
import itertools
rows = [json.loads(l) for l in open(sys.argv[1])]
print('| model | batch | tract plan µs | fused (ours) µs | onnxruntime µs | ours ÷ onnxruntime |')
print('|---|---|---|---|---|---|')
for model in ['mlp', 'cnn']:
    for batch in [1, 64]:
        med = lambda rt: st.median(r['median_us'] for r in rows if r['model'].endswith(model + '.onnx') and r['batch'] == batch and r['runtime'] == rt)
        print(f'| {model} | {batch} | {med(\"tract\"):.2f} | {med(\"fused\"):.2f} | {med(\"onnxruntime\"):.2f} | {med(\"fused\")/med(\"onnxruntime\"):.2f} |')
" "$RESULTS"

echo
python3 -c "import json;d=json.load(open('models/digits_test_vectors.json'));print(json.dumps({'instances':[d['inputs'][0]]}))" > "$OUT/one-image.json"
echo '| model | unbatched req/s | batched req/s | batched ÷ unbatched | batch size (mean) |'
echo '|---|---|---|---|---|'
for model in mlp cnn; do
  declare -A RPS=() MEAN=()
  for mode in unbatched batched; do
    if [ "$mode" = unbatched ]; then flags="--max-batch-size 1"; else flags="--max-batch-size 64 --batch-timeout-micros 0"; fi
    ./target/release/switchyard model-server --model "models/digits_$model.onnx" --listen 127.0.0.1:18501 \
      --admin-listen 127.0.0.1:18502 --num-batch-threads 1 --worker-threads 1 --max-enqueued-batches 1000 $flags \
      > "$OUT/model-server.log" 2>&1 &
    pid=$!
    sleep 0.5
    RPS[$mode]=$("$OHA" -z "${HTTP_SECONDS}s" -c 64 --no-tui --output-format json -m POST -H 'content-type: application/json' \
      -D "$OUT/one-image.json" http://127.0.0.1:18501/v1/models/digits:predict \
      | python3 -c "import json,sys; d=json.load(sys.stdin); assert d['summary']['successRate'] == 1.0, d['summary']; print(round(d['summary']['requestsPerSec']))")
    MEAN[$mode]=$(curl -s 127.0.0.1:18502/metrics | awk '/^switchyard_local_batch_size_sum/ {s=$2} /^switchyard_local_batch_size_count/ {c=$2} END {printf "%.1f", s/c}')
    kill "$pid"; wait "$pid" 2>/dev/null || true
  done
  python3 -c "import sys; u,b=int(sys.argv[1]),int(sys.argv[2]); print(f'| $model | {u:,} | {b:,} | {b/u:.2f} | ${MEAN[unbatched]} → ${MEAN[batched]} |')" "${RPS[unbatched]}" "${RPS[batched]}"
done
