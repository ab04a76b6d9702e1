#!/usr/bin/env bash
# GPU runtime benchmark: wgpu's throughput at large batches against the CPU runtime's.
# Target (issue #3): at batch >= 1024, wgpu on an NVIDIA GPU >= 10x the CPU runtime on
# the 2-core development machine.
#
#   bench/gpu.sh cpu        # here: the CPU runtime at batch 1024, 4096, 16384 (one thread)
#   bench/gpu.sh prepare    # here: build the release binary, copy it and libvulkan.so.1
#                           # into .device/gpu (git-ignored) for a GPU machine
#   bench/gpu.sh device     # there (no cargo, no network): run the GPU measurement in
#                           # one go; with ALLOW_SOFTWARE=1 it also accepts lavapipe, to
#                           # rehearse the script on a machine without a GPU
#
# On the device tool: run(command="bench/gpu.sh device", carry=[".device/gpu"]).
# Headless NVIDIA setup as in ../shared/GPU.md: the Vulkan loader shipped alongside,
# /dev/nvidia-modeset created if missing, XDG_RUNTIME_DIR set.
set -euo pipefail
cd "$(dirname "$0")/.."
BATCHES=${BATCHES:-1024 4096 16384}
SECONDS_EACH=${SECONDS_EACH:-3}
DIR=.device/gpu
case "${1:-}" in
  cpu)
    cargo build --release --quiet -p switchyard-inference --features gpu --example runtime_bench
    for m in mlp cnn; do
      for b in $BATCHES; do
        taskset -c 1 target/release/examples/runtime_bench "models/digits_$m.onnx" "$b" "$SECONDS_EACH" auto
      done
    done ;;
  prepare)
    cargo build --release --quiet -p switchyard-inference --features gpu --example runtime_bench
    mkdir -p "$DIR"
    cp target/release/examples/runtime_bench "$DIR/"
    strip "$DIR/runtime_bench"   # the carry limit is 64 MiB
    cp -L /usr/lib/x86_64-linux-gnu/libvulkan.so.1 "$DIR/"
    cp models/digits_mlp.onnx models/digits_cnn.onnx "$DIR/"
    ls -la "$DIR" ;;
  device)
    [ -e /dev/nvidia-modeset ] || mknod -m 666 /dev/nvidia-modeset c 195 254 2>/dev/null || true
    export LD_LIBRARY_PATH="$PWD/$DIR${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-$(mktemp -d)}"
    export WGPU_BACKEND=vulkan
    mode=$([ "${ALLOW_SOFTWARE:-0}" = 1 ] && echo gpu-any || echo gpu)
    OUTFILE="${OUT:-$PWD}/gpu-results.jsonl"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "${OUT:-$PWD}/gpu-name.txt"
    for m in mlp cnn; do
      for b in $BATCHES; do
        "$DIR/runtime_bench" "$DIR/digits_$m.onnx" "$b" "$SECONDS_EACH" "$mode" | tee -a "$OUTFILE"
      done
    done ;;
  *) sed -n 2,17p "$0"; exit 2 ;;
esac
