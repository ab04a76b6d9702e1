#!/usr/bin/env bash
# Memory per connection: Switchyard against nginx and HAProxy as a proxy, one at a time.
# For each: the proxy's resident memory (VmRSS) at rest, then with N idle keep-alive
# client connections open (each has sent one prediction and had its answer): at once,
# and after HOLD_FOR seconds held idle (Switchyard parks idle connections after 1 s and
# returns freed memory within 5 s more); then 1 s, 10 s and 30 s after they all closed.
#
#   bench/connections.sh              # N=9000
#   N=2000 AFTER="1 5" bench/connections.sh
#
# Each proxy splits 97/2/1 over an nginx origin as in bench/proxy.sh, with one worker
# thread; idle timeouts are raised to 5 minutes so nothing closes the connections while
# they are held (Switchyard: client_header_timeout 5m, max_connections 20000). The client
# is one Python asyncio process. N defaults to 9,000: this machine's hard limit on open
# files is 20,000 per process, and HAProxy counts two per connection (maxconn 9990 is its
# most). Needs: nginx, haproxy (Debian). Loopback only.
cd "$(dirname "$0")/.."
N=${N:-9000}
AFTER=${AFTER:-1 10 30}
HOLD_FOR=${HOLD_FOR:-10}  # seconds the connections are held idle before the second sample
ONLY=${ONLY:-}            # ONLY=switchyard measures one proxy
source bench/common.sh
need nginx haproxy python3

O1=19301 O2=19302 O3=19303
P_NGINX=19311 P_HAPROXY=19312 P_SY=19313 P_SY_ADMIN=19314
start_origin "127.0.0.1:$O1" "127.0.0.1:$O2" "127.0.0.1:$O3"

mkdir -p "$WORK/nginx"
cat > "$WORK/nginx/nginx.conf" <<CONF
worker_processes 1;
worker_rlimit_nofile 20000;
pid $WORK/nginx/nginx.pid;
error_log $WORK/logs/nginx.err warn;
events { worker_connections 19000; }
http {
  access_log off; keepalive_requests 1000000; keepalive_timeout 300s;
  client_body_temp_path $WORK/nginx; proxy_temp_path $WORK/nginx;
  upstream variants {
    server 127.0.0.1:$O1 weight=97; server 127.0.0.1:$O2 weight=2; server 127.0.0.1:$O3 weight=1;
    keepalive 64;
  }
  server { listen 127.0.0.1:$P_NGINX backlog=16384;
    location / { proxy_pass http://variants; proxy_http_version 1.1; proxy_set_header Connection ""; } }
}
CONF
haproxy_split_config "$P_HAPROXY" "$O1" "$O2" "$O3" 9990 300s
split_config "$P_SY" "$P_SY_ADMIN" "$O1" "$O2" "$O3" $'max_connections: 20000\nclient_header_timeout: 5m\n'

# The client: opens N connections, one prediction on each, holds them until told, closes.
cat > "$WORK/hold.py" <<'PY'
import asyncio, sys
port, n, body = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3].encode()
req = (b"POST /v1/models/mnist:predict HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
       b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
async def one(sem):
    async with sem:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(req); await w.drain()
        head = await r.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head[:40]
        length = int([l.split(b":")[1] for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")][0])
        await r.readexactly(length)
        return w
async def main():
    sem = asyncio.Semaphore(500)
    writers = await asyncio.gather(*(one(sem) for _ in range(n)))
    print("held", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    for w in writers: w.close()
    print("closed", flush=True)
asyncio.run(main())
PY

rss_kb() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
# Anonymous (heap, stacks) and file-backed (the binary's pages) parts of RSS, in MiB.
rss_parts() { awk '/^RssAnon/ {a = $2} /^RssFile/ {f = $2} END {printf "anon %.1f + file %.1f", a / 1024, f / 1024}' "/proc/$1/status"; }
mib() { awk -v k="$1" 'BEGIN {printf "%.1f", k / 1024}'; }

run_one() {
  local name=$1 port=$2 pid=$3 before held idle
  wait_port "$port"
  # One request first, so lazily built state (the upstream pool) is in "at rest".
  curl -sf -X POST -d "$BODY" "http://127.0.0.1:$port/v1/models/mnist:predict" > /dev/null
  before=$(rss_kb "$pid")
  local parts_before
  parts_before=$(rss_parts "$pid")
  coproc HOLD { python3 "$WORK/hold.py" "$port" "$N" "$BODY"; }
  read -r line <&"${HOLD[0]}"
  [ "$line" = held ] || { echo "$name: the client failed" >&2; exit 1; }
  held=$(rss_kb "$pid")
  sleep "$HOLD_FOR"
  idle=$(rss_kb "$pid")
  echo >&"${HOLD[1]}"
  read -r line <&"${HOLD[0]}"
  wait "$HOLD_PID" 2>/dev/null || true
  local after=() t prev=0
  for t in $AFTER; do sleep $((t - prev)); prev=$t; after+=("$(mib "$(rss_kb "$pid")")"); done
  printf '%-10s %8s %10s %10s %12s %10s   %s\n' "$name" "$(mib "$before")" "$(mib "$held")" \
    "$(mib "$idle")" \
    "$(awk -v a="$idle" -v b="$before" -v n="$N" 'BEGIN {printf "%.1f", (a - b) / n}')" \
    "${after[-1]}" "${after[*]}"
  PARTS+=("$name: at rest $parts_before; last $(rss_parts "$pid")")
}
PARTS=()

echo "Idle keep-alive connections: N=$N; RSS in MiB; $(nproc) CPUs: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
printf '%-10s %8s %10s %10s %12s %10s   %s\n' proxy "at rest" "N opened" "${HOLD_FOR}s idle" "KiB per conn" "last" "after closing ($AFTER s)"
if [ -z "$ONLY" ] || [ "$ONLY" = nginx ]; then
  taskset -c 1 nginx -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" -g 'daemon off; user root;' &
  PIDS+=($!); sleep 0.5
  # nginx's master forks the worker: measure the worker, which holds the connections.
  NGINX_WORKER=$(pgrep -P $! -f "nginx: worker" | head -1)
  run_one nginx $P_NGINX "$NGINX_WORKER"
fi
if [ -z "$ONLY" ] || [ "$ONLY" = haproxy ]; then
  taskset -c 1 haproxy -f "$WORK/haproxy.cfg" -db > "$WORK/logs/haproxy.log" 2>&1 &
  PIDS+=($!)
  run_one haproxy $P_HAPROXY $!
fi
if [ -z "$ONLY" ] || [ "$ONLY" = switchyard ]; then
  # SY_ENV: extra environment for Switchyard only (allocator experiments), e.g.
  # SY_ENV="MALLOC_ARENA_MAX=1".
  env ${SY_ENV:-} SWITCHYARD_LOG=warn taskset -c 1 "$BIN" serve --config "$WORK/switchyard.yaml" > "$WORK/logs/switchyard.out" 2>&1 &
  PIDS+=($!)
  run_one switchyard $P_SY $!
fi
echo
echo "RSS in parts, MiB (at rest; at the last sample):"
printf '  %s\n' "${PARTS[@]}"
