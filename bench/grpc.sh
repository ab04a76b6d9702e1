#!/usr/bin/env bash
# gRPC vs HTTP/JSON vs HTTP/binary tensors through the sidecar to a local variant: the
# digits MLP served in-process (`switchyard model-server`, the same request path as any
# sidecar with a local variant), driven by `switchyard load` at 32 connections, batch 1
# and batch 32; req/s, p50 and p99, interleaved over rounds (median of rounds).
#
#   bench/grpc.sh                          # 3 rounds, 5 s per measurement
#   ROUNDS=5 SECONDS_EACH=10 bench/grpc.sh
#
# The sidecar on CPU 0 (2 worker threads, 1 batch thread), the generator on CPU 1 (one
# thread). HTTP/JSON: V2 JSON over HTTP/1.1; HTTP/binary: V2 binary tensors
# (Inference-Header-Content-Length) over HTTP/1.1; gRPC: ModelInfer with raw contents
# over HTTP/2. perf_analyzer (Triton's own) is not installable here (PyPI's
# `perf_analyzer` is an empty placeholder; it ships in Triton's SDK container), so our
# generator alone drives all three. Loopback only.
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
SECONDS_EACH=${SECONDS_EACH:-5}
CONNS=${CONNS:-32}
source bench/common.sh
PORT=19601
taskset -c 0 "$BIN" model-server --model builtin:digits_mlp --name digits \
  --listen 127.0.0.1:$PORT --worker-threads 2 --num-batch-threads 1 \
  --max-batch-size 64 > "$WORK/logs/server.log" 2>&1 &
PIDS+=($!)
wait_port $PORT
URL=http://127.0.0.1:$PORT/v2/models/digits/infer

RESULTS=$WORK/results.tsv
: > "$RESULTS"
for round in $(seq 1 "$ROUNDS"); do
  for batch in 1 32; do
    for mode in json binary grpc; do
      flags=()
      [ "$mode" = json ] || flags=(--"$mode")
      taskset -c 1 "$BIN" load --threads 1 -c "$CONNS" -d "${SECONDS_EACH}s" --warmup 1s \
        --batch "$batch" "${flags[@]}" --json "$URL" > "$WORK/out.json" 2> "$WORK/logs/load.err"
      python3 - "$round" "$batch" "$mode" "$WORK/out.json" >> "$RESULTS" <<'PY'
import json, sys
round_, batch, mode, path = sys.argv[1:]
r = json.loads(open(path).read().strip().splitlines()[-1])
ok = r["status"].get("200", 0)
assert ok == r["requests"] and r["errors"] == 0, r
print(f'{round_}\t{batch}\t{mode}\t{r["throughput_rps"]}\t{r["latency_ms"]["p50"]}\t{r["latency_ms"]["p99"]}')
PY
    done
  done
done

echo "gRPC vs HTTP through the sidecar to a local variant (digits MLP), $CONNS connections,"
echo "median of $ROUNDS rounds of ${SECONDS_EACH}s; $(nproc) CPUs: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
python3 - "$RESULTS" <<'PY'
import statistics, sys
rows = [l.split("\t") for l in open(sys.argv[1]).read().split("\n") if l]
print(f'{"batch":>5} {"protocol":<12} {"req/s":>9} {"rows/s":>9} {"p50 ms":>8} {"p99 ms":>8} {"vs JSON":>8}')
for batch in ["1", "32"]:
    med = {}
    for mode in ["json", "binary", "grpc"]:
        sel = [r for r in rows if r[1] == batch and r[2] == mode]
        med[mode] = [statistics.median(float(r[i]) for r in sel) for i in (3, 4, 5)]
    for mode, label in [("json", "HTTP/JSON"), ("binary", "HTTP/binary"), ("grpc", "gRPC")]:
        rps, p50, p99 = med[mode]
        print(f'{batch:>5} {label:<12} {rps:>9.0f} {rps*int(batch):>9.0f} {p50:>8.3f} {p99:>8.3f} {rps/med["json"][0]:>7.2f}x')
PY
