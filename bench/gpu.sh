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
#   bench/gpu.sh prepare-ab OLD_RUNTIME_BENCH
#                           # here: the current runtime_bench as `b` beside an older
#                           # build as `a` (no switchyard binary), in .device/gpu-ab
#   bench/gpu.sh ab         # there: a and b interleaved, ROUNDS rounds, both models at
#                           # AB_BATCHES (default 1 64 1024 4096), to see what a change to
#                           # the GPU runtime does on a real GPU (carry .device/gpu-ab)
#
# On the device tool (as run on 2026-12-04, an H200): once, here, fetch Debian's loader
# packages into .gl (git-ignored through .git/info/exclude; the recipe is in the device
# tool's README), then
#   run(command="for f in .gl/*.deb; do dpkg -x $f /; done; ldconfig; bash bench/gpu.sh device",
#       carry=[".device/gpu", ".gl"])
# Headless NVIDIA setup as in ../shared/GPU.md: the Vulkan loader and the libraries
# NVIDIA's driver library needs (glvnd, Xlib) shipped alongside, /dev/nvidia-modeset
# created if missing, XDG_RUNTIME_DIR set. With the loader alone it said "Could not get
# 'vkCreateInstance' via 'vk_icdGetInstanceProcAddr'" (device node present); with the
# packages and libraries above it found the H200 (which one was missing: not isolated).
set -euo pipefail
cd "$(dirname "$0")/.."
BATCHES=${BATCHES:-1024 4096 16384 65536}
SECONDS_EACH=${SECONDS_EACH:-3}
DIR=${DIR:-.device/gpu}
# The libraries beside the binaries: the Vulkan loader, and what NVIDIA's Vulkan driver
# (libGLX_nvidia.so.0) needs even headless (glvnd, Xlib), which a bare image may lack.
ship_libs() {
  cp -L /usr/lib/x86_64-linux-gnu/libvulkan.so.1 "$1/"
  for lib in libGLdispatch.so.0 libGLX.so.0 libX11.so.6 libXext.so.6 libxcb.so.1 \
             libXau.so.6 libXdmcp.so.6 libbsd.so.0 libmd.so.0; do
    cp -L "/usr/lib/x86_64-linux-gnu/$lib" "$1/"
  done
  cp models/digits_mlp.onnx models/digits_cnn.onnx "$1/"
}
# The device side's set-up, as in ../shared/GPU.md; also finds NVIDIA's ICD when the
# image keeps it outside the loader's search path (probing with the binary $1).
gpu_env() {
  [ -e /dev/nvidia-modeset ] || mknod -m 666 /dev/nvidia-modeset c 195 254 2>/dev/null || true
  export LD_LIBRARY_PATH="$PWD/$DIR${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-$(mktemp -d)}"
  export WGPU_BACKEND=vulkan
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "${OUT:-bench/out}/gpu-name.txt"
  echo "host: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)" | tee -a "${OUT:-bench/out}/gpu-name.txt"
  if ! "$1" "$DIR/digits_mlp.onnx" 64 0.2 "$mode" >/dev/null; then
    for f in /usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json /etc/vulkan/icd.d/nvidia_icd.json /usr/share/vulkan/icd.d/nvidia_icd.json; do
      [ -e "$f" ] && { export VK_DRIVER_FILES="$f"; echo "VK_DRIVER_FILES=$f"; break; }
    done
    ls -la /usr/share/vulkan/icd.d /etc/vulkan/icd.d /usr/local/nvidia/share/vulkan/icd.d /dev/nvidia* 2>&1 || true
    for icd in /usr/local/nvidia/lib64/libGLX_nvidia.so.0 /usr/lib/x86_64-linux-gnu/libGLX_nvidia.so.0; do
      [ -e "$icd" ] && ldd "$icd" | grep -i 'not found' || true
    done
  fi
}
mode=$([ "${ALLOW_SOFTWARE:-0}" = 1 ] && echo gpu-any || echo gpu)
adapter=$([ "${ALLOW_SOFTWARE:-0}" = 1 ] && echo any || echo hardware)
mkdir -p "${OUT:-bench/out}"
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
    ship_libs "$DIR"
    ls -la "$DIR" ;;
  prepare-ab)
    old=${2:?usage: bench/gpu.sh prepare-ab OLD_RUNTIME_BENCH}
    cargo build --profile dist --quiet -p switchyard-inference --features gpu,tract --example runtime_bench
    DIR=.device/gpu-ab
    rm -rf "$DIR"; mkdir -p "$DIR"
    cp "$old" "$DIR/runtime_bench.a"
    cp target/dist/examples/runtime_bench "$DIR/runtime_bench.b"
    strip "$DIR/runtime_bench.a" "$DIR/runtime_bench.b"
    ship_libs "$DIR"
    ls -la "$DIR" ;;
  ab)
    DIR=.device/gpu-ab
    gpu_env "$DIR/runtime_bench.a"
    for round in $(seq 1 "${ROUNDS:-3}"); do
      for m in mlp cnn; do
        for b in ${AB_BATCHES:-1 64 1024 4096}; do
          # Order swapped each round.
          for bin in $([ $((round % 2)) = 1 ] && echo "a b" || echo "b a"); do
            printf '{"build": "%s", "round": %s, ' "$bin" "$round"
            "$DIR/runtime_bench.$bin" "$DIR/digits_$m.onnx" "$b" "${SECONDS_EACH:-2}" "$mode" | cut -c2-
          done
        done
      done
    done | tee "${OUT:-bench/out}/gpu-ab.jsonl" ;;
  device)
    OUTFILE="${OUT:-bench/out}/gpu-results.jsonl"
    gpu_env "$DIR/runtime_bench"
    for m in mlp cnn; do
      for b in $BATCHES; do
        "$DIR/runtime_bench" "$DIR/digits_$m.onnx" "$b" "$SECONDS_EACH" "$mode" | tee -a "$OUTFILE"
      done
    done
    # The CPU runtimes on this machine's CPU, one thread, in the same run: the GPU's
    # ratio against a CPU beside it, next to the one against the development machine.
    for m in mlp cnn; do
      for b in $BATCHES; do
        for kernels in auto tract; do
          taskset -c 1 "$DIR/runtime_bench" "$DIR/digits_$m.onnx" "$b" "$SECONDS_EACH" "$kernels" | tee -a "$OUTFILE"
        done
      done
    done
    # Batching over HTTP: the model server with the wgpu runtime, one batch thread.
    port=18601
    for m in mlp cnn; do
      for mb in 1 64; do
        log="${OUT:-bench/out}/model-server-$m-$mb.log"
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
