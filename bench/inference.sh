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
# (oha) posting one image each; requests per second, median of ROUNDS. Three runtimes:
# the fused CPU kernels (the default), tract's plan (`--cpu-kernels tract`), and the
# wgpu runtime on Mesa's software Vulkan (`--runtime wgpu --gpu-adapter any`; skipped
# when lavapipe is not installed). bench/gpu.sh measures the same on a real GPU.
# Needs: python3 (venv, pip), oha (cargo install --locked oha). Loopback only.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
SECONDS_EACH=${SECONDS_EACH:-2}
HTTP_SECONDS=${HTTP_SECONDS:-5}
OHA=${OHA:-$(command -v oha || echo /tmp/oha/bin/oha)}
command -v "$OHA" >/dev/null || { echo "missing oha: cargo install --locked oha" >&2; exit 1; }
OUT=$PWD/bench/out
VENV=$OUT/venv
mkdir -p "$OUT"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q -r scripts/requirements-models.txt
fi
cargo build --profile dist --features tract --quiet
cargo build --profile dist --quiet -p switchyard-inference --features tract --example runtime_bench
BENCH=$PWD/target/dist/examples/runtime_bench
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
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-$(mktemp -d /tmp/switchyard-xdg.XXXXXX)}"
HTTP=$(mktemp)
trap 'rm -f "$RESULTS" "$HTTP"; pkill -f "model-server --model .* --listen 127.0.0.1:18501" || true' EXIT
runtime_flags() {
  case "$1" in
    fused) echo "--runtime tract" ;;
    tract-plan) echo "--runtime tract --cpu-kernels tract" ;;
    wgpu-lavapipe) echo "--runtime wgpu --gpu-adapter any" ;;
  esac
}
for round in $(seq 1 "$ROUNDS"); do
  for model in mlp cnn; do
    for runtime in fused tract-plan wgpu-lavapipe; do
      for mode in unbatched batched; do
        if [ "$mode" = unbatched ]; then flags="--max-batch-size 1"; else flags="--max-batch-size 64 --batch-timeout-micros 0"; fi
        log="$OUT/model-server-$model-$runtime-$mode.log"
        # shellcheck disable=SC2046
        ./target/dist/switchyard model-server --model "models/digits_$model.onnx" --listen 127.0.0.1:18501 \
          --admin-listen 127.0.0.1:18502 --num-batch-threads 1 --worker-threads 1 --max-enqueued-batches 1000 \
          $(runtime_flags "$runtime") $flags > "$log" 2>&1 &
        pid=$!
        for _ in $(seq 1 100); do curl -sf 127.0.0.1:18502/readyz >/dev/null && break; sleep 0.1; done
        if [ "$runtime" = wgpu-lavapipe ] && ! grep -q "Model runs on the GPU" "$log"; then
          echo "wgpu-lavapipe: no software Vulkan adapter (apt-get install mesa-vulkan-drivers); skipped" >&2
          kill "$pid"; wait "$pid" 2>/dev/null || true
          continue
        fi
        rps=$("$OHA" -z "${HTTP_SECONDS}s" -c 64 --no-tui --output-format json -m POST -H 'content-type: application/json' \
          -D "$OUT/one-image.json" http://127.0.0.1:18501/v1/models/digits:predict \
          | python3 -c "import json,sys; d=json.load(sys.stdin); assert d['summary']['successRate'] == 1.0, d['summary']; print(round(d['summary']['requestsPerSec']))")
        mean=$(curl -s 127.0.0.1:18502/metrics | awk '/^switchyard_local_batch_size_sum/ {s=$2} /^switchyard_local_batch_size_count/ {c=$2} END {printf "%.1f", s/c}')
        kill "$pid"; wait "$pid" 2>/dev/null || true
        echo "{\"model\": \"$model\", \"runtime\": \"$runtime\", \"mode\": \"$mode\", \"rps\": $rps, \"mean_batch\": $mean}" >> "$HTTP"
      done
    done
  done
  echo "batching round $round done" >&2
done

python3 -c "
import json, sys, statistics as st
rows = [json.loads(l) for l in open(sys.argv[1])]
print('| model | runtime | unbatched req/s | batched req/s | batched ÷ unbatched | batch size (mean) |')
print('|---|---|---|---|---|---|')
for model in ['mlp', 'cnn']:
    for rt in ['fused', 'tract-plan', 'wgpu-lavapipe']:
        pick = lambda mode, k: [r[k] for r in rows if r['model'] == model and r['runtime'] == rt and r['mode'] == mode]
        if not pick('batched', 'rps') or not pick('unbatched', 'rps'):
            continue
        u, b = st.median(pick('unbatched', 'rps')), st.median(pick('batched', 'rps'))
        print(f'| {model} | {rt} | {u:,.0f} | {b:,.0f} | {b/u:.2f} | {st.median(pick(\"unbatched\", \"mean_batch\")):.1f} → {st.median(pick(\"batched\", \"mean_batch\")):.1f} |')
" "$HTTP"
