#!/usr/bin/env bash
# GPU runtime benchmark: wgpu's throughput at large batches against the CPU runtime's.
# Target (issue #3): at batch >= 1024, wgpu on an NVIDIA GPU >= 10x the CPU runtime on
# the 2-core development machine.
#
# Also (issue #3's batching target, where batching is meant to pay: an accelerator with a
# fixed cost per dispatch): `switchyard model-server --runtime wgpu` unbatched
# (--max-batch-size 1) vs batched (64), one batch thread, 64 clients from `switchyard
# load`, on the GPU machine.
#
#   bench/gpu.sh cpu        # here: the CPU runtime (fused kernels, and tract's plan) at
#                           # batch 1024 to 65536 (one thread)
#   bench/gpu.sh prepare    # here: build the `dist` binaries (runtime_bench and
#                           # switchyard, stripped: the carry limit is 64 MiB), copy them,
#                           # the models and libvulkan.so.1 into .device/gpu (git-ignored)
#   bench/gpu.sh device     # there (no cargo, no network): run both GPU measurements in
#                           # one go (about 2 minutes); with ALLOW_SOFTWARE=1 both parts
#                           # also accept lavapipe (runtime_bench `gpu-any`, model-server
#                           # `--gpu-adapter any`), to rehearse the script on a machine
#                           # without a GPU
#
# On the device tool: run(command="bench/gpu.sh device", carry=[".device/gpu"]).
# Headless NVIDIA setup as in ../shared/GPU.md: the Vulkan loader shipped alongside,
# /dev/nvidia-modeset created if missing, XDG_RUNTIME_DIR set.
set -euo pipefail
cd "$(dirname "$0")/.."
BATCHES=${BATCHES:-1024 4096 16384 65536}
SECONDS_EACH=${SECONDS_EACH:-3}
DIR=.device/gpu
case "${1:-}" in
  cpu)
    cargo build --profile dist --quiet -p switchyard-inference --features gpu,tract --example runtime_bench
    # Both CPU references: what Switchyard runs (the fused kernels) and tract's plan.
    for m in mlp cnn; do
      for b in $BATCHES; do
        for kernels in auto tract; do
          taskset -c 1 target/dist/examples/runtime_bench "models/digits_$m.onnx" "$b" "$SECONDS_EACH" "$kernels"
        done
      done
    done ;;
  prepare)
    cargo build --profile dist --quiet -p switchyard-inference --features gpu,tract --example runtime_bench
    cargo build --profile dist --features tract --quiet
    mkdir -p "$DIR"
    cp target/dist/examples/runtime_bench target/dist/switchyard "$DIR/"
    strip "$DIR/runtime_bench" "$DIR/switchyard"   # the carry limit is 64 MiB
    cp -L /usr/lib/x86_64-linux-gnu/libvulkan.so.1 "$DIR/"
    cp models/digits_mlp.onnx models/digits_cnn.onnx "$DIR/"
    ls -la "$DIR" ;;
  device)
    [ -e /dev/nvidia-modeset ] || mknod -m 666 /dev/nvidia-modeset c 195 254 2>/dev/null || true
    export LD_LIBRARY_PATH="$PWD/$DIR${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-$(mktemp -d)}"
    export WGPU_BACKEND=vulkan
    mode=$([ "${ALLOW_SOFTWARE:-0}" = 1 ] && echo gpu-any || echo gpu)
    adapter=$([ "${ALLOW_SOFTWARE:-0}" = 1 ] && echo any || echo hardware)
    OUTFILE="${OUT:-$PWD}/gpu-results.jsonl"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "${OUT:-$PWD}/gpu-name.txt"
    for m in mlp cnn; do
      for b in $BATCHES; do
        "$DIR/runtime_bench" "$DIR/digits_$m.onnx" "$b" "$SECONDS_EACH" "$mode" | tee -a "$OUTFILE"
      done
    done
    # Batching over HTTP: the model server with the wgpu runtime, one batch thread.
    port=18601
    for m in mlp cnn; do
      for mb in 1 64; do
        log="${OUT:-$PWD}/model-server-$m-$mb.log"
        "$DIR/switchyard" model-server --model "$DIR/digits_$m.onnx" --runtime wgpu --gpu-adapter "$adapter" \
          --listen "127.0.0.1:$port" --max-batch-size "$mb" --num-batch-threads 1 > "$log" 2>&1 &
        server=$!
        for _ in $(seq 1 100); do grep -q 'Switchyard is serving' "$log" && break; sleep 0.1; done
        runtime=$(grep -o 'runtime="[a-z]*"' "$log" | head -1 | cut -d'"' -f2)
        rps=$("$DIR/switchyard" load "http://127.0.0.1:$port/v1/models/digits:predict" -c 64 \
          -d "${HTTP_SECONDS:-10}s" --warmup 1s --json 2>/dev/null | tail -1 | grep -o '"throughput_rps":[0-9.]*' | cut -d: -f2)
        echo "{\"bench\": \"batching\", \"model\": \"$m\", \"max_batch_size\": $mb, \"runtime\": \"${runtime:-unknown}\", \"clients\": 64, \"throughput_rps\": ${rps:-null}}" | tee -a "$OUTFILE"
        kill "$server" 2>/dev/null; wait "$server" 2>/dev/null || true
        port=$((port + 1))
      done
    done ;;
  *) sed -n 2,17p "$0"; exit 2 ;;
esac
