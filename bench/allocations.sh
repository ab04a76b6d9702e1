#!/usr/bin/env bash
# Heap allocations per proxied request: Switchyard against nginx and HAProxy, each run
# under heaptrack (LD_PRELOAD; every malloc, calloc, realloc and aligned allocation
# counted) as a proxy for the 97/2/1 split of bench/proxy.sh.
#
#   bench/allocations.sh                  # W=2000 warm-up requests, N=20000 measured
#   N=5000 bench/allocations.sh
#
# Each proxy runs twice: once for W requests, once for W + N; allocations per request
# are the difference between the two runs' totals divided by N, so start-up, warm-up
# (pools, lazily built state) and shutdown cancel out. Requests are sequential on one
# keep-alive connection (`switchyard load -c 1`), a POST of the bench's 64-pixel body.
# Also prints Switchyard's call sites that allocate at least once per request (from the
# longer run). Needs: heaptrack, nginx, haproxy (Debian). Loopback only.
cd "$(dirname "$0")/.."
W=${W:-2000}
N=${N:-20000}
source bench/common.sh
need nginx haproxy heaptrack heaptrack_print

O1=19401 O2=19402 O3=19403
P_NGINX=19411 P_HAPROXY=19412 P_SY=19413 P_SY_ADMIN=19414
start_origin "127.0.0.1:$O1" "127.0.0.1:$O2" "127.0.0.1:$O3"

nginx_split_config "$P_NGINX" "$O1" "$O2" "$O3"
haproxy_split_config "$P_HAPROXY" "$O1" "$O2" "$O3"
split_config "$P_SY" "$P_SY_ADMIN" "$O1" "$O2" "$O3"

# calls NAME PORT REQUESTS CMD...: runs CMD under heaptrack, sends REQUESTS predictions,
# stops it, and prints the number of allocation calls it made in all.
calls() {
  local name=$1 port=$2 requests=$3 pid out
  shift 3
  out="$WORK/ht.$name.$requests"
  heaptrack -o "$out" "$@" > "$WORK/logs/$name.$requests.log" 2>&1 &
  pid=$!
  wait_port "$port"
  "$BIN" load -c 1 -n "$requests" --body-file "$WORK/body.json" \
    "http://127.0.0.1:$port/v1/models/mnist:predict" > "$WORK/logs/load.$name.$requests" 2>&1
  # Stop the proxy (the process listening on PORT, not heaptrack's own helpers), and
  # heaptrack finishes its file.
  kill -TERM "$(ss -Hltnp "sport = :$port" | grep -o 'pid=[0-9]*' | head -1 | cut -d= -f2)"
  wait "$pid" 2>/dev/null || true
  heaptrack_print -f "$out".* 2>/dev/null | awk '/^calls to allocation functions:/ {print $5}'
}

echo "Allocations per proxied request: W=$W warm-up, N=$N measured, one connection"
printf '%-10s %14s %14s %12s\n' proxy "calls (W)" "calls (W+N)" "per request"
row() {
  local name=$1 port=$2 a b
  shift 2
  a=$(calls "$name" "$port" "$W" "$@")
  b=$(calls "$name" "$port" "$((W + N))" "$@")
  printf '%-10s %14s %14s %12s\n' "$name" "$a" "$b" \
    "$(awk -v a="$a" -v b="$b" -v n="$N" 'BEGIN {printf "%.2f", (b - a) / n}')"
}
row nginx "$P_NGINX" "$(command -v nginx)" -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" -g 'user root;'
row haproxy "$P_HAPROXY" "$(command -v haproxy)" -f "$WORK/haproxy.cfg" -db
# Not through env(1): heaptrack would trace env, not what it execs.
export SWITCHYARD_LOG=warn
row switchyard "$P_SY" "$BIN" serve --config "$WORK/switchyard.yaml"

# Where Switchyard's allocations come from: backtraces with at least N/2 calls in the
# longer run, i.e. about one per request or more, each shown by its first three frames
# outside the allocator and the standard library. Names need symbols: BIN built with
# `--release` (the `dist` binary is stripped and shows addresses).
echo
echo "Switchyard: backtraces allocating about once per request or more (W+N run)"
heaptrack_print -f "$WORK/ht.switchyard.$((W + N))".* --print-allocators 1 \
  --print-peaks 0 --print-leaks 0 --print-temporary 0 --peak-limit 100 --sub-peak-limit 100 \
  2>/dev/null | awk -v min=$((N / 2)) '
    function flush() { if (keep && out != "") printf "%8d  %s\n", calls, out; keep = 0 }
    /^[0-9]+ calls to allocation functions/ { flush(); next }
    /^[0-9]+ calls with/ { flush(); calls = $1; keep = calls >= min; n = 0; out = ""; next }
    keep && /^    [^ ]/ {
      fn = substr($0, 5)
      if (fn !~ /^(<?(alloc|core|std)::|__rust|__libc|malloc|realloc|calloc|posix_memalign|0x)/ && n < 3) {
        out = out (n ? "  <  " : "") fn; n++
      }
    }
    END { flush() }'
