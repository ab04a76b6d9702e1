#!/usr/bin/env bash
# Bandit benchmark.
#   Part 1: regret at 100,000 decisions in each standard world, bandit vs baselines
#           (`switchyard simulate --requests 100000 --seeds 100`, mean of 100 seeded
#           runs: single runs vary by a factor of ten, five seeds were not enough).
#   Part 2: the router's throughput with a bandit on (every prediction recorded for
#           feedback, weights republished every second), in both modes (published
#           weights; a Thompson draw per request), vs the same 3-variant split without
#           one: nginx origin on CPU 0 with wrk, Switchyard (worker_threads: 1) on CPU 1,
#           wrk 32 connections, rounds in rotating order, median of per-round
#           ratios. Target: <= 5% lower.
# Env: SEEDS (100), ROUNDS (9), SECONDS_EACH (3), SKIP_REGRET=1 runs part 2 only.
# Needs: nginx, wrk (Debian). Loopback only.
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-9}
SECONDS_EACH=${SECONDS_EACH:-3}
source bench/common.sh
need nginx wrk

if [ "${SKIP_REGRET:-0}" != 1 ]; then
  echo "## Regret at 100,000 decisions (mean of ${SEEDS:-100} seeds)"
  "$BIN" simulate --requests 100000 --seeds "${SEEDS:-100}"
fi

cat > "$WORK/origin.conf" <<CONF
worker_processes 1;
pid $WORK/origin.pid;
error_log $WORK/logs/origin.err warn;
events { worker_connections 4000; }
http { access_log off; keepalive_requests 1000000; client_body_temp_path $WORK;
  server { listen 127.0.0.1:19301; listen 127.0.0.1:19302; listen 127.0.0.1:19303;
    location / { default_type application/json; return 200 '$PREDICTION'; } } }
CONF
taskset -c 0 nginx -p "$WORK" -c "$WORK/origin.conf" -g 'daemon off; user root;' &
PIDS+=($!)
port_of() { case $1 in plain) echo 19311 ;; bandit) echo 19321 ;; per_request) echo 19331 ;; esac; }
for mode in plain bandit per_request; do
  port=$(port_of $mode)
  {
    echo "listen: 127.0.0.1:$port"
    echo "admin_listen: 127.0.0.1:$((port + 1))"
    echo "worker_threads: 1"
    echo "models:"
    echo "  mnist:"
    [ $mode = bandit ] && echo "    bandit: {objective: conversion, update_interval: 1s, feedback_ttl: 2s}"
    [ $mode = per_request ] && echo "    bandit: {objective: conversion, update_interval: 1s, feedback_ttl: 2s, mode: per_request, warmup: 0}"
    echo "    variants:"
    echo "      - {name: a, upstream: \"http://127.0.0.1:19301\", weight: 97}"
    echo "      - {name: b, upstream: \"http://127.0.0.1:19302\", weight: 2}"
    echo "      - {name: c, upstream: \"http://127.0.0.1:19303\", weight: 1}"
  } > "$WORK/$mode.yaml"
  SWITCHYARD_LOG=warn taskset -c 1 "$BIN" serve --config "$WORK/$mode.yaml" > "$WORK/$mode.log" 2>&1 &
  PIDS+=($!)
done
sleep 1
echo
echo "## Router throughput, bandit on vs fixed split (req/s, wrk 32 connections, ${SECONDS_EACH}s each)"
# The three run back to back in each round, in an order that rotates from round to round
# so that drift on the VM does not favour one; each round gives its own ratios, and the
# median over rounds is the result (the mean is printed too).
MODES=(plain bandit per_request)
: > "$WORK/ratios"
for round in $(seq 1 "$ROUNDS"); do
  declare -A RPS=()
  for k in 0 1 2; do
    mode=${MODES[$(( (round + k) % 3 ))]}
    port=$(port_of "$mode")
    RPS[$mode]=$(taskset -c 0 wrk -t1 -c32 -d"${SECONDS_EACH}s" -s "$WORK/post.lua" "http://127.0.0.1:$port/v1/models/mnist:predict" | awk '/Requests\/sec/ {print $2}')
  done
  awk -v r="$round" -v p="${RPS[plain]}" -v b="${RPS[bandit]}" -v t="${RPS[per_request]}" 'BEGIN {
    printf "round %2d  plain %8.0f  bandit %8.0f (%.3f)  per_request %8.0f (%.3f)\n", r, p, b, b / p, t, t / p }'
  echo "${RPS[plain]} ${RPS[bandit]} ${RPS[per_request]}" >> "$WORK/ratios"
  unset RPS
done
python3 - "$WORK/ratios" <<'PY'
import statistics, sys
rows = [list(map(float, l.split())) for l in open(sys.argv[1]) if l.strip()]
for i, name in ((1, "bandit, weights"), (2, "bandit, per_request")):
    r = [row[i] / row[0] for row in rows]
    print(f"{name}: median ratio to the fixed split {statistics.median(r):.3f} over {len(r)} rounds "
          f"(mean {statistics.mean(r):.3f}, min {min(r):.3f}, max {max(r):.3f})")
print(f"fixed split: median {statistics.median(row[0] for row in rows):.0f} req/s")
PY
for port in 19322 19332; do
  dropped=$(curl -s 127.0.0.1:$port/metrics | awk '/^switchyard_decisions_dropped_total/ {print $2}')
  echo "decisions dropped (log full) on admin $port: ${dropped:-0}"
done
