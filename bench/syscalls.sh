#!/usr/bin/env bash
# System calls per proxied request under load: nginx vs Switchyard, the split of
# bench/proxy.sh (97/2/1 over an nginx origin, one worker pinned to CPU 1), wrk at 32
# connections on CPU 0; `perf stat` counts each proxy's calls for 3 s in the middle of a
# 7 s run, divided by the requests wrk saw in those 3 s (its rate × 3).
#
#   bench/syscalls.sh            # needs perf with syscall tracepoints (root), nginx, wrk
#
# Loopback only. Prints one line per proxy: calls per request by kind, and the rate.
cd "$(dirname "$0")/.."
source bench/common.sh
need nginx wrk perf

O1=19701 O2=19702 O3=19703 P_NGINX=19711 P_SY=19713 P_SY_ADMIN=19714
start_origin "127.0.0.1:$O1" "127.0.0.1:$O2" "127.0.0.1:$O3"
nginx_split_config "$P_NGINX" "$O1" "$O2" "$O3"
split_config "$P_SY" "$P_SY_ADMIN" "$O1" "$O2" "$O3"
taskset -c 1 nginx -c "$WORK/nginx/nginx.conf" > /dev/null 2>&1 &
PIDS+=($!)
NGINX_PID=$!
taskset -c 1 "$BIN" serve --config "$WORK/switchyard.yaml" > "$WORK/logs/switchyard.log" 2>&1 &
PIDS+=($!)
SY_PID=$!
wait_port "$P_NGINX"
wait_port "$P_SY"

KINDS=(recvfrom writev epoll_wait read write sendto futex)
events=$(printf 'syscalls:sys_enter_%s,' "${KINDS[@]}")
for target in "nginx:$P_NGINX:$NGINX_PID" "switchyard:$P_SY:$SY_PID"; do
  IFS=: read -r name port pid <<<"$target"
  taskset -c 0 wrk -t1 -c32 -d7s -s "$WORK/post.lua" "http://127.0.0.1:$port/v1/models/mnist:predict" > "$WORK/wrk.$name" 2>&1 &
  wrk_pid=$!
  sleep 2
  perf stat -x, -e "${events%,}" -p "$pid" -- sleep 3 2> "$WORK/perf.$name" > /dev/null
  wait "$wrk_pid"
  rate=$(awk '/Requests\/sec/ {print $2}' "$WORK/wrk.$name")
  awk -F, -v name="$name" -v rate="$rate" '
    { sub("syscalls:sys_enter_", "", $3); if ($1 + 0 > 0) line = line sprintf(" %s %.2f", $3, $1 / (rate * 3)) }
    END { printf "%-11s %8.0f req/s; calls per request:%s\n", name, rate, line }' "$WORK/perf.$name"
done
