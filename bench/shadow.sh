#!/usr/bin/env bash
# Shadow benchmark: the primary's throughput, latency and the proxy's CPU per primary
# request, without shadow traffic and with 100% of it mirrored, in one run, interleaved.
#
#   bench/shadow.sh                       # 3 rounds, 5 s per measurement
#   ROUNDS=5 SECONDS_EACH=10 RATE=2000 bench/shadow.sh
#
# Origin: nginx (CPU 0) answering a TF Serving prediction on the primary's port and a
# slightly different one on the shadow's (so every pair is parsed and compared, not
# matched byte for byte). Two Switchyards (worker_threads: 1, both on CPU 1, only one
# loaded at a time): `off` has the shadow at fraction 0, `on` at fraction 1. Load
# generators on CPU 0.
#
# Per target: throughput at 32 connections (wrk, closed loop) and CPU per request there;
# latency percentiles at a fixed rate (oha, coordinated-omission corrected) and CPU per
# primary request at that rate. Target: p99 on <= 1.10x off; CPU per request <= 1.5x.
# Needs: nginx, wrk (Debian) and oha (cargo install --locked oha). Loopback only.
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
SECONDS_EACH=${SECONDS_EACH:-5}
RATE=${RATE:-2000}
CONNS=${CONNS:-32}
source bench/common.sh
need nginx wrk "$OHA"

PRIMARY=19401 SHADOW=19402
CANDIDATE='{"predictions": [[0.02, 0.02, 0.85, 0.02, 0.01, 0.02, 0.02, 0.02, 0.01, 0.01]]}'
cat > "$WORK/origin.conf" <<CONF
worker_processes 1;
pid $WORK/origin.pid;
error_log $WORK/origin.err warn;
events { worker_connections 20000; }
http {
  access_log off; keepalive_requests 1000000; client_body_temp_path $WORK;
  server { listen 127.0.0.1:$PRIMARY; location / { default_type application/json; return 200 '$PREDICTION'; } }
  server { listen 127.0.0.1:$SHADOW; location / { default_type application/json; return 200 '$CANDIDATE'; } }
}
CONF
taskset -c 0 nginx -p "$WORK" -c "$WORK/origin.conf" -g 'daemon off; user root;' &
PIDS+=($!)

declare -A PORT_OF=([off]=19411 [on]=19421) PID_OF
for mode in off on; do
  port=${PORT_OF[$mode]}
  fraction=$([ $mode = on ] && echo 1.0 || echo 0.0)
  cat > "$WORK/$mode.yaml" <<CONF
listen: 127.0.0.1:$port
admin_listen: 127.0.0.1:$((port + 1))
worker_threads: 1
models:
  mnist:
    variants: [{name: a, upstream: "http://127.0.0.1:$PRIMARY", weight: 1}]
    shadows: [{name: cand, upstream: "http://127.0.0.1:$SHADOW", fraction: $fraction}]
CONF
  SWITCHYARD_LOG=warn taskset -c 1 "$BIN" serve --config "$WORK/$mode.yaml" > "$WORK/$mode.log" 2>&1 &
  PIDS+=($!); PID_OF[$mode]=$!
done
sleep 1
for mode in off on; do
  curl -sf -X POST -d "$BODY" "http://127.0.0.1:${PORT_OF[$mode]}/v1/models/mnist:predict" >/dev/null \
    || { echo "$mode is not answering" >&2; cat "$WORK"/*.log >&2; exit 1; }
done
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
# Requests mirrored so far by the shadow of switchyard `$1`.
mirrored() {
  curl -s "127.0.0.1:$((PORT_OF[$1] + 1))/admin/shadow/mnist" \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["shadows"][0]["mirrored"])'
}
HZ=$(getconf CLK_TCK)
RESULTS=$WORK/results.tsv
: > "$RESULTS"
for round in $(seq 1 "$ROUNDS"); do
  for mode in off on; do
    url="http://127.0.0.1:${PORT_OF[$mode]}/v1/models/mnist:predict"
    m0=$(mirrored "$mode")
    before=$(ticks "${PID_OF[$mode]}")
    rps=$(taskset -c 0 wrk -t1 -c"$CONNS" -d"${SECONDS_EACH}s" -s "$WORK/post.lua" "$url" | awk '/Requests\/sec/ {print $2}')
    after=$(ticks "${PID_OF[$mode]}")
    cpu_max=$(awk -v t=$((after - before)) -v hz="$HZ" -v r="$rps" -v s="$SECONDS_EACH" 'BEGIN {printf "%.2f", t / hz / (r * s) * 1e6}')
    sleep 1   # let queued mirrors finish before the next measurement
    m1=$(mirrored "$mode")
    before=$(ticks "${PID_OF[$mode]}")
    json=$(taskset -c 0 "$OHA" -z "${SECONDS_EACH}s" -c "$CONNS" -q "$RATE" --latency-correction --no-tui --output-format json \
      -m POST -H 'content-type: application/json' -D "$WORK/body.json" "$url")
    sleep 1
    after=$(ticks "${PID_OF[$mode]}")
    read -r p50 p99 p999 ok n <<<"$(python3 -c '
import json, sys
d = json.loads(sys.argv[1]); p = d["latencyPercentiles"]
ms = lambda k: "%.3f" % (p[k] * 1e3)
n = sum(d["statusCodeDistribution"].values())
print(ms("p50"), ms("p99"), ms("p99.9"), "%.4f" % d["summary"]["successRate"], n)' "$json")"
    cpu_rate=$(awk -v t=$((after - before)) -v hz="$HZ" -v n="$n" 'BEGIN {printf "%.2f", t / hz / n * 1e6}')
    m2=$(mirrored "$mode")
    # Share of the primary requests that were actually mirrored, in each phase.
    share_max=$(awk -v m=$((m1 - m0)) -v r="$rps" -v s="$SECONDS_EACH" 'BEGIN {printf "%.3f", m / (r * s)}')
    share_rate=$(awk -v m=$((m2 - m1)) -v n="$n" 'BEGIN {printf "%.3f", m / n}')
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$mode" "$rps" "$cpu_max" "$p50" "$p99" "$p999" "$cpu_rate" "$ok" "$share_max" "$share_rate" >> "$RESULTS"
    echo "round $round  shadow $mode: ${rps} req/s (${cpu_max} CPU-us/req, mirrored $share_max); at $RATE/s: p50 ${p50} ms, p99 ${p99} ms, ${cpu_rate} CPU-us/req, mirrored $share_rate, success $ok" >&2
  done
done
report=$(curl -s "127.0.0.1:$((PORT_OF[on] + 1))/admin/shadow/mnist")
STAMP=$(date -u +%Y-%m-%dT%H:%MZ)
REPORT=$OUT/shadow-$STAMP.md
python3 - "$RESULTS" "$RATE" "$CONNS" "$ROUNDS" "$SECONDS_EACH" "$report" > "$REPORT" <<'PY'
import sys, json, statistics as st
path, rate, conns, rounds, secs, report = sys.argv[1:]
rows = [l.rstrip("\n").split("\t") for l in open(path)]
med = lambda t, i: st.median(float(r[i]) for r in rows if r[1] == t)
print(f"Medians of {rounds} interleaved rounds, {secs} s each. Throughput: wrk, {conns} connections;")
print(f"latency: oha at a fixed {rate} req/s, {conns} connections, coordinated-omission corrected.\n")
print("| shadow | req/s at 32 conns | CPU µs/req there | mirrored there | p50 ms | p99 ms | p99.9 ms | CPU µs/req at fixed rate | mirrored there |")
print("|---|---|---|---|---|---|---|---|---|")
for t in ["off", "on"]:
    print(f"| {t} | {med(t,2):,.0f} | {med(t,3):.1f} | {med(t,9):.1%} | {med(t,4):.3f} | {med(t,5):.3f} | {med(t,6):.3f} | {med(t,7):.1f} | {med(t,10):.1%} |")
print(f"\nRatios on/off: throughput {med('on',2)/med('off',2):.3f}, p99 {med('on',5)/med('off',5):.3f} "
      f"(target <= 1.10), CPU per primary request {med('on',7)/med('off',7):.3f} at fixed rate (target <= 1.5), "
      f"{med('on',3)/med('off',3):.3f} at 32 connections.")
s = json.loads(report)["shadows"][0]
print(f"\nShadow `on` after the run: mirrored {s['mirrored']}, dropped {s['dropped']} {s['dropped_by_reason']}, "
      f"errors {s['errors']}, compared {s['compared']}, agreement {s['agreement']}.")
PY
cat "$REPORT"
echo "report written to $REPORT" >&2
