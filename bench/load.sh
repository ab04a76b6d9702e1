#!/usr/bin/env bash
# Load generator benchmark: switchyard load vs oha vs wrk against the same nginx, in one
# run, interleaved: the highest request rate each drives at 32, 256 and 10,000
# connections, and the CPU each generator spends per request.
#
#   bench/load.sh                          # 3 rounds, 5 s per measurement
#   ROUNDS=5 SECONDS_EACH=10 bench/load.sh
#
# nginx (1 worker, a fixed 10-class prediction) on CPU 0; every generator on CPU 1 with
# one thread (wrk -t1, switchyard load --threads 1; oha has no thread option and runs
# its runtime on the one CPU it is given). Closed loop, POST with the same JSON body.
# CPU: user + system seconds of the generator process (bash `time`).
# Needs: nginx, wrk (Debian), oha (cargo install --locked oha). Loopback only.
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
SECONDS_EACH=${SECONDS_EACH:-5}
LEVELS=${LEVELS:-32 256 10000}
source bench/common.sh
need nginx wrk "$OHA"
PORT=19501
URL=http://127.0.0.1:$PORT/v1/models/mnist:predict
cat > "$WORK/nginx.conf" <<CONF
worker_processes 1;
worker_rlimit_nofile 65536;
pid $WORK/nginx.pid;
error_log $WORK/nginx.err crit;
events { worker_connections 30000; }
http {
  access_log off; keepalive_requests 10000000; keepalive_timeout 120s; client_body_temp_path $WORK;
  server { listen 127.0.0.1:$PORT backlog=16384;
    location / { default_type application/json; return 200 '$PREDICTION'; } }
}
CONF
taskset -c 0 nginx -p "$WORK" -c "$WORK/nginx.conf" -g 'daemon off; user root;' &
PIDS+=($!)
sleep 1
curl -sf -X POST -d "$BODY" "$URL" >/dev/null || { echo "nginx is not answering" >&2; cat "$WORK/nginx.err" >&2; exit 1; }

# Runs "$@" on CPU 1; prints "<req/s> <cpu seconds>", parsing the tool's own rate line.
measure() {
  local tool=$1 conns=$2 out="$WORK/out.txt" t="$WORK/time.txt"
  case $tool in
    wrk) { TIMEFORMAT='%U %S'; time taskset -c 1 wrk -t1 -c"$conns" -d"${SECONDS_EACH}s" -s "$WORK/post.lua" "$URL" > "$out" 2>&1; } 2> "$t"
         rps=$(awk '/Requests\/sec/ {print $2}' "$out") ;;
    oha) { TIMEFORMAT='%U %S'; time taskset -c 1 "$OHA" -z "${SECONDS_EACH}s" -c "$conns" --no-tui -m POST -H 'content-type: application/json' -D "$WORK/body.json" "$URL" > "$out" 2>&1; } 2> "$t"
         rps=$(awk '/Requests\/sec/ {print $2}' "$out") ;;
    switchyard) { TIMEFORMAT='%U %S'; time taskset -c 1 "$BIN" load --threads 1 -c "$conns" -d "${SECONDS_EACH}s" --json "$URL" > "$out" 2>&1; } 2> "$t"
         rps=$(tail -1 "$out" | python3 -c 'import json,sys; print(json.load(sys.stdin)["throughput_rps"])') ;;
  esac
  cpu=$(awk '{print $1 + $2}' "$t")
  echo "${rps:-0} $cpu"
}

RESULTS=$WORK/results.tsv
: > "$RESULTS"
for round in $(seq 1 "$ROUNDS"); do
  for conns in $LEVELS; do
    for tool in switchyard oha wrk; do
      read -r rps cpu <<<"$(measure "$tool" "$conns")"
      printf '%s\t%s\t%s\t%s\t%s\n' "$round" "$conns" "$tool" "$rps" "$cpu" >> "$RESULTS"
      echo "round $round  $conns conns  $tool: $rps req/s, $cpu CPU-s" >&2
      sleep 1
    done
  done
done
STAMP=$(date -u +%Y-%m-%dT%H:%MZ)
REPORT=$OUT/load-$STAMP.md
python3 - "$RESULTS" "$ROUNDS" "$SECONDS_EACH" > "$REPORT" <<'PY'
import sys, statistics as st
path, rounds, secs = sys.argv[1:]
rows = [l.rstrip("\n").split("\t") for l in open(path)]
levels = sorted({int(r[1]) for r in rows})
med = lambda c, t, i: st.median(float(r[i]) for r in rows if int(r[1]) == c and r[2] == t)
print(f"Medians of {rounds} interleaved rounds, {secs} s each; generators on one CPU, nginx on the other.\n")
print("| connections | switchyard load req/s | oha req/s | wrk req/s | × oha | × wrk | CPU µs/req: switchyard | oha | wrk |")
print("|---|---|---|---|---|---|---|---|---|")
for c in levels:
    s, o, w = (med(c, t, 3) for t in ("switchyard", "oha", "wrk"))
    cpu = {t: med(c, t, 4) / max(med(c, t, 3) * float(secs), 1) * 1e6 for t in ("switchyard", "oha", "wrk")}
    print(f"| {c:,} | {s:,.0f} | {o:,.0f} | {w:,.0f} | {s/o:.2f} | {s/w:.2f} | {cpu['switchyard']:.2f} | {cpu['oha']:.2f} | {cpu['wrk']:.2f} |")
PY
cat "$REPORT"
echo "report written to $REPORT" >&2
