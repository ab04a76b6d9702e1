#!/usr/bin/env bash
# Faults benchmark: the same outages through Switchyard, nginx and HAProxy, side by side
# in one run.
#
#   bench/faults.sh                         # both scenarios, 12 s each per proxy
#   SECONDS_EACH=20 CONNS=64 bench/faults.sh
#
# Two upstreams (real `switchyard model-server` processes serving the digits MLP, each
# restarted fresh for every proxy) behind each proxy with an even split, under
# `switchyard load -c 32` (closed loop) for SECONDS_EACH seconds:
#   kill: upstream A is killed (SIGKILL) at 1/4 of the run and started again on its port
#         at 2/3;
#   hang: upstream B is stopped (SIGSTOP: it accepts, never answers) at 1/4 and resumed
#         (SIGCONT) at 2/3.
# The proxies, configured as their users would for this (request timeout 500 ms):
#   nginx:   proxy_next_upstream error timeout http_502, max_fails=1 fail_timeout=2s
#   HAProxy: retries 2, option redispatch, retry-on conn-failure empty-response
#            response-timeout, observe layer7 + error-limit 5 on-error mark-down, checks
#   Switchyard: retry on connect, reset, timeout (its breaker and budget defaults), and
#            again with a local fallback (the in-process MLP, weight 0).
# Reported per proxy and scenario: failed requests (non-2xx or errors) of all sent, p99
# and max latency over the whole run (the outage included), the requests the restarted
# (or resumed) upstream served in the last third (recovery), and the throughput kept
# through the outage: what the healthy upstream (and the fallback) answered per second
# during the fault ÷ what both upstreams answered per second in the eighth before it.
# Loopback only; stops by itself.
# Needs: nginx, haproxy (Debian).
cd "$(dirname "$0")/.."
SECONDS_EACH=${SECONDS_EACH:-12}
CONNS=${CONNS:-32}
source bench/common.sh
need nginx haproxy
# The model servers are started in subshells: kill any left behind, however this ends.
trap 'pkill -9 -f "model-server --model builtin:digits_mlp --name digits --listen 127.0.0.1:1930" 2>/dev/null || true; cleanup' EXIT

A=19301 B=19302 A_ADMIN=19303 B_ADMIN=19304
P_SY=19311 P_SY_ADMIN=19312 P_SYF=19313 P_SYF_ADMIN=19314 P_NGINX=19315 P_HAPROXY=19316
PATH_TF=/v1/models/digits:predict
RESULTS="$OUT/faults.tsv"
printf 'scenario\tproxy\tsent\tfailed\tp99_ms\tmax_ms\trecovered\tkept\n' > "$RESULTS"

# upstream PORT ADMIN: a model server; prints its pid.
upstream() {
  "$BIN" model-server --model builtin:digits_mlp --name digits \
    --listen "127.0.0.1:$1" --admin-listen "127.0.0.1:$2" > "$WORK/logs/up-$1.log" 2>&1 &
  echo $!
}

# wait_free PORT...: until nothing listens on any PORT (the last run's servers are gone).
wait_free() {
  local p
  for p in "$@"; do
    for _ in $(seq 1 200); do
      (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null || break
      sleep 0.05
    done
  done
}

# served PORT: predictions the model server on PORT's admin answered so far.
served() {
  curl -s "http://127.0.0.1:$1/metrics" |
    awk '/^switchyard_requests_total\{class="2xx"/ { s += $2 } END { print s + 0 }'
}

# local_served ADMIN: predictions Switchyard's in-process fallback answered ("-": none).
local_served() {
  [ "$1" = - ] && { echo 0; return; }
  curl -s -m 2 "http://127.0.0.1:$1/metrics" |
    awk '/^switchyard_requests_total\{class="2xx",model="digits",variant="cpu"\}/ { s += $2 } END { print s + 0 }'
}

# now: seconds since the epoch, with nanoseconds.
now() { date +%s.%N; }

# --- the proxies' configs -------------------------------------------------------------
cat > "$WORK/sy.yaml" <<YAML
listen: 127.0.0.1:$P_SY
admin_listen: 127.0.0.1:$P_SY_ADMIN
worker_threads: 1
models:
  digits:
    request_timeout: 500ms
    retry: {on: [connect, reset, timeout]}
    variants:
      - {name: a, upstream: "http://127.0.0.1:$A", weight: 1}
      - {name: b, upstream: "http://127.0.0.1:$B", weight: 1}
YAML
cat > "$WORK/syf.yaml" <<YAML
listen: 127.0.0.1:$P_SYF
admin_listen: 127.0.0.1:$P_SYF_ADMIN
worker_threads: 1
models:
  digits:
    request_timeout: 500ms
    retry: {on: [connect, reset, timeout]}
    fallback: cpu
    variants:
      - {name: a, upstream: "http://127.0.0.1:$A", weight: 1}
      - {name: b, upstream: "http://127.0.0.1:$B", weight: 1}
      - {name: cpu, weight: 0, local: {model: "builtin:digits_mlp", batching: {num_batch_threads: 1}}}
YAML
mkdir -p "$WORK/nginx"
cat > "$WORK/nginx/nginx.conf" <<CONF
worker_processes 1;
pid $WORK/nginx/nginx.pid;
error_log $WORK/logs/nginx.err warn;
events { worker_connections 20000; }
http {
  access_log off;
  client_body_temp_path $WORK/nginx;
  proxy_temp_path $WORK/nginx;
  upstream variants {
    server 127.0.0.1:$A max_fails=1 fail_timeout=2s;
    server 127.0.0.1:$B max_fails=1 fail_timeout=2s;
    keepalive 64;
  }
  server {
    listen 127.0.0.1:$P_NGINX;
    location / {
      proxy_pass http://variants;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_connect_timeout 500ms;
      proxy_read_timeout 500ms;
      proxy_send_timeout 500ms;
      proxy_next_upstream error timeout http_502 http_503;
    }
  }
}
CONF
cat > "$WORK/haproxy.cfg" <<CONF
global
  nbthread 1
  maxconn 4000
defaults
  mode http
  timeout connect 500ms
  timeout client 30s
  timeout server 500ms
  retries 2
  option redispatch
  retry-on conn-failure empty-response response-timeout
  http-reuse always
frontend fe
  bind 127.0.0.1:$P_HAPROXY
  default_backend variants
backend variants
  balance roundrobin
  option httpchk GET /v2/health/ready
  default-server check inter 1s fall 2 rise 2 observe layer7 error-limit 5 on-error mark-down
  server a 127.0.0.1:$A
  server b 127.0.0.1:$B
CONF

# run SCENARIO NAME PORT ADMIN START...: fresh upstreams, the proxy (START... runs it;
# ADMIN is its admin port when it has a local fallback, else -), the load, the fault at
# 1/4 and its end at 2/3; one line of results.
run() {
  local scenario=$1 name=$2 port=$3 admin=$4
  shift 4
  local a_pid b_pid proxy_pid load_pid
  wait_free $A $B $A_ADMIN $B_ADMIN "$port"
  a_pid=$(upstream $A $A_ADMIN)
  b_pid=$(upstream $B $B_ADMIN)
  wait_port $A && wait_port $B
  "$@" > "$WORK/logs/$name-$scenario.log" 2>&1 &
  proxy_pid=$!
  wait_port "$port"
  "$BIN" load -c "$CONNS" -d "${SECONDS_EACH}s" --timeout 5s --json \
    "http://127.0.0.1:$port$PATH_TF" > "$WORK/load.json" 2> "$WORK/logs/load-$name-$scenario.err" &
  load_pid=$!
  # Throughput before the fault: both upstreams, over the eighth before it.
  sleep "$(awk -v s="$SECONDS_EACH" 'BEGIN { print s / 8 }')"
  local t0 b0 t1 b1
  t0=$(now) b0=$(( $(served $A_ADMIN) + $(served $B_ADMIN) ))
  sleep "$(awk -v s="$SECONDS_EACH" 'BEGIN { print s / 8 }')"
  t1=$(now) b1=$(( $(served $A_ADMIN) + $(served $B_ADMIN) ))
  # During it: the healthy upstream, and the fallback if there is one.
  local healthy_admin=$B_ADMIN
  [ "$scenario" = kill ] || healthy_admin=$A_ADMIN
  local t2 h2 t3 h3
  local victim_port victim_admin
  t2=$(now) h2=$(( $(served $healthy_admin) + $(local_served "$admin") ))
  if [ "$scenario" = kill ]; then
    kill -9 "$a_pid"
    wait_free $A $A_ADMIN
    victim_port=$A victim_admin=$A_ADMIN
  else
    kill -STOP "$b_pid"
    victim_port=$B victim_admin=$B_ADMIN
  fi
  sleep "$(awk -v s="$SECONDS_EACH" 'BEGIN { print s * (2 / 3 - 1 / 4) }')"
  t3=$(now) h3=$(( $(served $healthy_admin) + $(local_served "$admin") ))
  local kept
  kept=$(awk -v b=$((b1 - b0)) -v bt="$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')" \
    -v h=$((h3 - h2)) -v ht="$(awk -v a="$t2" -v b="$t3" 'BEGIN { print b - a }')" \
    'BEGIN { printf "%.2f", (h / ht) / (b / bt) }')
  if [ "$scenario" = kill ]; then
    a_pid=$(upstream $A $A_ADMIN)
    wait_port $A
  else
    kill -CONT "$b_pid"
  fi
  local at_end_of_fault
  at_end_of_fault=$(served "$victim_admin")
  wait "$load_pid" || true
  local recovered=$(( $(served "$victim_admin") - at_end_of_fault ))
  kill "$proxy_pid" 2>/dev/null || true
  wait "$proxy_pid" 2>/dev/null || true
  kill -CONT "$b_pid" 2>/dev/null || true
  # Disposable: killed outright, so the next run gets the ports at once.
  kill -9 "$a_pid" "$b_pid" 2>/dev/null || true
  wait_free $A $B $A_ADMIN $B_ADMIN "$port"
  python3 - "$WORK/load.json" "$scenario" "$name" "$recovered" "$kept" >> "$RESULTS" <<'PY'
import json, sys
path, scenario, name, recovered, kept = sys.argv[1:]
r = json.load(open(path))
sent = r["requests"]
failed = r["errors"]  # transport errors and non-2xx answers
p99 = r["latency_ms"]["p99"]
worst = r["latency_ms"]["max"]
print(f"{scenario}\t{name}\t{sent}\t{failed}\t{p99}\t{worst}\t{recovered}\t{kept}")
PY
  sleep 1
}

for scenario in kill hang; do
  run "$scenario" switchyard $P_SY - "$BIN" serve --config "$WORK/sy.yaml"
  run "$scenario" switchyard+fallback $P_SYF $P_SYF_ADMIN "$BIN" serve --config "$WORK/syf.yaml"
  run "$scenario" nginx $P_NGINX - nginx -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" -g 'daemon off; user root;'
  run "$scenario" haproxy $P_HAPROXY - haproxy -f "$WORK/haproxy.cfg" -db
done

echo
echo "Faults, $SECONDS_EACH s per run at $CONNS connections ($(nproc) cores, $(date -u +%F))"
column -t -s $'\t' "$RESULTS"
