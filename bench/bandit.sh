#!/usr/bin/env bash
# Bandit benchmark.
#   Part 1: regret at 20,000 decisions (the issue's runs) in each standard world, at 10
#           and at 5,000 decisions per second: the defaults, each guardrail or mode a
#           user may choose, and the baselines (`switchyard simulate --requests 20000
#           --seeds 10 --rate R`; common random numbers make ten seeds enough to order
#           strategies; the spread over seeds is printed). Recovery: the share on the
#           new best 4,000–5,000 decisions after the best arm changes.
#   Part 2: the router's throughput with a bandit on (every prediction recorded for
#           feedback, weights republished every second), with the defaults (a Thompson
#           draw per request) and with `mode: weights`, vs the same 3-variant split
#           without one: nginx origin on CPU 0 with wrk, Switchyard (worker_threads: 1)
#           on CPU 1, wrk 32 connections, rounds in rotating order, median of per-round
#           ratios. Target: <= 5% lower. Also the defaults in fleet mode (`fleet:` on a
#           local redis-server, sync every second): every answer's request id sealed
#           with an HMAC. Target (#18): <= 5% below the same bandit without a fleet.
# Over HTTP, beside the simulator: bench/bandit-http.sh (WORLD=conversion|drift).
# Env: SEEDS (10), ROUNDS (9), SECONDS_EACH (3), SKIP_REGRET=1 runs part 2 only.
# Needs: nginx, wrk (Debian). Loopback only.
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-9}
SECONDS_EACH=${SECONDS_EACH:-3}
source bench/common.sh
need nginx wrk redis-server

if [ "${SKIP_REGRET:-0}" != 1 ]; then
  for rate in 10 5000; do
    echo "## Regret at 20,000 decisions, $rate decisions/s (mean of ${SEEDS:-10} seeds)"
    "$BIN" simulate --requests 20000 --rate "$rate" --seeds "${SEEDS:-10}"
  done
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
taskset -c 0 redis-server --port 19399 --bind 127.0.0.1 --save "" --appendonly no > "$WORK/logs/redis.log" 2>&1 &
PIDS+=($!)
port_of() { case $1 in plain) echo 19311 ;; bandit) echo 19321 ;; weights) echo 19331 ;; fleet) echo 19341 ;; esac; }
for mode in plain bandit weights fleet; do
  port=$(port_of $mode)
  {
    echo "listen: 127.0.0.1:$port"
    echo "admin_listen: 127.0.0.1:$((port + 1))"
    echo "worker_threads: 1"
    [ $mode = fleet ] && printf 'fleet:\n  redis: "redis://127.0.0.1:19399"\n  key_prefix: bench\n'
    echo "models:"
    echo "  mnist:"
    [ $mode = bandit ] || [ $mode = fleet ] && echo "    bandit: {objective: conversion, feedback_ttl: 2s}"
    [ $mode = weights ] && echo "    bandit: {objective: conversion, feedback_ttl: 2s, mode: weights}"
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
MODES=(plain bandit weights fleet)
: > "$WORK/ratios"
for round in $(seq 1 "$ROUNDS"); do
  declare -A RPS=()
  for k in 0 1 2 3; do
    mode=${MODES[$(( (round + k) % 4 ))]}
    port=$(port_of "$mode")
    RPS[$mode]=$(taskset -c 0 wrk -t1 -c32 -d"${SECONDS_EACH}s" -s "$WORK/post.lua" "http://127.0.0.1:$port/v1/models/mnist:predict" | awk '/Requests\/sec/ {print $2}')
  done
  awk -v r="$round" -v p="${RPS[plain]}" -v b="${RPS[bandit]}" -v t="${RPS[weights]}" -v f="${RPS[fleet]}" 'BEGIN {
    printf "round %2d  plain %8.0f  defaults %8.0f (%.3f)  weights %8.0f (%.3f)  fleet %8.0f (%.3f of defaults)\n", r, p, b, b / p, t, t / p, f, f / b }'
  echo "${RPS[plain]} ${RPS[bandit]} ${RPS[weights]} ${RPS[fleet]}" >> "$WORK/ratios"
  unset RPS
done
python3 - "$WORK/ratios" <<'PY'
import statistics, sys
rows = [list(map(float, l.split())) for l in open(sys.argv[1]) if l.strip()]
for i, name in ((1, "bandit, defaults (per_request)"), (2, "bandit, mode: weights")):
    r = [row[i] / row[0] for row in rows]
    print(f"{name}: median ratio to the fixed split {statistics.median(r):.3f} over {len(r)} rounds "
          f"(mean {statistics.mean(r):.3f}, min {min(r):.3f}, max {max(r):.3f})")
r = [row[3] / row[1] for row in rows]
print(f"fleet mode (defaults + fleet:): median ratio to the same bandit alone {statistics.median(r):.3f} "
      f"(mean {statistics.mean(r):.3f}, min {min(r):.3f}, max {max(r):.3f})")
print(f"fixed split: median {statistics.median(row[0] for row in rows):.0f} req/s")
PY
for port in 19322 19332 19342; do
  dropped=$(curl -s 127.0.0.1:$port/metrics | awk '/^switchyard_decisions_dropped_total/ {print $2}')
  echo "decisions dropped (log full) on admin $port: ${dropped:-0}"
done

echo
echo "## Feedback to decision: how soon a feedback counts"
# Defaults (per request): after each feedback's 200, is the reward already in the
# bandit's state (what the next request samples)? mode: weights: after the feedback that
# completes update_every (100) rewards, how long until the published weights change?
python3 - "$BODY" <<'PY'
import json, statistics, sys, time, urllib.request
body = sys.argv[1].encode()
def call(method, url, data=None):
    req = urllib.request.Request(url, data=data, method=method, headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as r:
        return dict(r.headers), r.read()
def predict(port):
    h, _ = call("POST", f"http://127.0.0.1:{port}/v1/models/mnist:predict", body)
    return h["x-request-id"], h["x-switchyard-variant"]
def feedback(port, rid):
    call("POST", f"http://127.0.0.1:{port}/v1/feedback", json.dumps({"request_id": rid, "converted": True}).encode())
def state(admin):
    return json.loads(call("GET", f"http://127.0.0.1:{admin}/admin/state")[1])["models"]["mnist"]["variants"]
visible, rtt = 0, []
for _ in range(200):
    rid, v = predict(19321)
    before = state(19322)[v]["rewards"]
    t0 = time.perf_counter(); feedback(19321, rid); rtt.append(time.perf_counter() - t0)
    visible += state(19322)[v]["rewards"] == before + 1
print(f"defaults: {visible} of 200 feedbacks in the posterior at the first read after their 200 "
      f"(feedback round trip median {1000 * statistics.median(rtt):.2f} ms)")
lat = []
for _ in range(5):
    w0 = {k: x["weight"] for k, x in state(19332).items()}
    for i in range(100):
        rid, _ = predict(19331)
        feedback(19331, rid)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < 2:
        if {k: x["weight"] for k, x in state(19332).items()} != w0:
            break
    lat.append(time.perf_counter() - t0)
print(f"mode: weights: weights moved {1000 * statistics.median(lat):.1f} ms (median of 5; max {1000 * max(lat):.1f}) "
      f"after the 100th reward's 200 (update_every 100; update_interval 1 s bounds it)")
PY
