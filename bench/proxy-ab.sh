#!/usr/bin/env bash
# A/B of two Switchyard binaries as a proxy hop: the same nginx origin, each binary with
# one worker pinned to CPU 1, wrk at 32 connections on CPU 0, rounds interleaved and the
# order swapped every round (whichever runs second in a pair tends to read higher).
# For changes smaller than bench/proxy.sh's run-to-run noise.
#
#   bench/proxy-ab.sh OLD_BINARY NEW_BINARY      # e.g. a copy of target/dist/switchyard
#   ROUNDS=10 SECONDS_EACH=4 bench/proxy-ab.sh A B
#
# Prints each round (throughput, and the user and system CPU each binary spent per
# request) and the medians; B/A above 1 means B is faster, a CPU ratio below 1 that B
# is leaner.
# Needs: nginx, wrk (Debian). Loopback only.
cd "$(dirname "$0")/.."
[ $# -eq 2 ] || { echo "usage: bench/proxy-ab.sh BINARY_A BINARY_B" >&2; exit 64; }
A=$(realpath "$1") B=$(realpath "$2")
ROUNDS=${ROUNDS:-6}
SECONDS_EACH=${SECONDS_EACH:-4}
SKIP_BUILD=1 source bench/common.sh
need nginx wrk

ORIGIN=19501 P_A=19511 P_B=19521

start_origin "127.0.0.1:$ORIGIN"

for side in A B; do
  port_var=P_$side; port=${!port_var}; bin=${!side}
  cat > "$WORK/$side.yaml" <<CONF
listen: 127.0.0.1:$port
admin_listen: 127.0.0.1:$((port + 1))
worker_threads: 1
models:
  mnist:
    variants:
      - {name: a, upstream: "http://127.0.0.1:$ORIGIN", weight: 1}
CONF
  SWITCHYARD_LOG=warn taskset -c 1 "$bin" serve --config "$WORK/$side.yaml" > "$WORK/logs/$side.out" 2>&1 &
  PIDS+=($!)
  printf -v "PID_$side" %s "$!"
done
sleep 1
for port in $P_A $P_B; do
  curl -sf -X POST -d "$BODY" "http://127.0.0.1:$port/v1/models/mnist:predict" >/dev/null || { echo "port $port is not answering" >&2; cat "$WORK"/logs/* >&2; exit 1; }
done

HZ=$(getconf CLK_TCK)
# User and system ticks of a process so far.
ticks() { awk '{print $14, $15}' "/proc/$1/stat"; }
# "req/s µs-of-user-CPU-per-request µs-of-system-CPU-per-request" for one side
measure() {
  local u0 s0 u1 s1
  read -r u0 s0 < <(ticks "$2")
  taskset -c 0 wrk -t1 -c32 -d"${SECONDS_EACH}s" -s "$WORK/post.lua" "http://127.0.0.1:$1/v1/models/mnist:predict" > "$WORK/wrk.txt"
  read -r u1 s1 < <(ticks "$2")
  awk -v u=$((u1 - u0)) -v s=$((s1 - s0)) -v hz="$HZ" '/requests in/ {n = $1} /Requests\/sec/ {r = $2} END {printf "%s %.3f %.3f\n", r, u / hz * 1e6 / n, s / hz * 1e6 / n}' "$WORK/wrk.txt"
}
: > "$WORK/ab.tsv"
for round in $(seq 1 "$ROUNDS"); do
  if [ $((round % 2)) = 1 ]; then order="A B"; else order="B A"; fi
  for side in $order; do
    port_var=P_$side pid_var=PID_$side
    read -r rps user sys < <(measure "${!port_var}" "${!pid_var}")
    printf '%s\t%s\t%s\t%s\n' "$side" "$rps" "$user" "$sys" >> "$WORK/ab.tsv"
    echo "round $round  $side: $rps req/s, $user µs user + $sys µs system CPU per request" >&2
  done
done
python3 - "$WORK/ab.tsv" "$A" "$B" <<'PY'
import sys, statistics as st
rows = [l.split() for l in open(sys.argv[1])]
med = {s: st.median(float(r[1]) for r in rows if r[0] == s) for s in "AB"}
cpu = {s: st.median(float(r[2]) for r in rows if r[0] == s) for s in "AB"}
sy = {s: st.median(float(r[3]) for r in rows if r[0] == s) for s in "AB"}
ahead = sum(1 for a, b in zip([r for r in rows if r[0] == "A"], [r for r in rows if r[0] == "B"]) if float(b[1]) > float(a[1]))
print(f"A {sys.argv[2]}: median {med['A']:,.0f} req/s, {cpu['A']:.2f} µs user + {sy['A']:.2f} µs system CPU per request")
print(f"B {sys.argv[3]}: median {med['B']:,.0f} req/s, {cpu['B']:.2f} µs user + {sy['B']:.2f} µs system CPU per request")
print(f"B/A: {med['B'] / med['A']:.3f} throughput (B ahead in {ahead} of {len(rows) // 2} rounds), {cpu['B'] / cpu['A']:.3f} user CPU, {sy['B'] / sy['A']:.3f} system CPU")
PY
