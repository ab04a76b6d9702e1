#!/usr/bin/env bash
# User-space instructions per proxied request: nginx, HAProxy and Switchyard, each run
# under valgrind's callgrind, fed the same N requests (oha, 32 connections, the 97/2/1
# split of bench/proxy.sh) after a warm-up, counters zeroed between the two.
#
# Instructions are not time (an atomic or a cache miss costs more than an add), but the
# count is exact: two runs of one build agree to about 0.1%, where bench/proxy.sh's user
# CPU column moves by 10% from run to run on this machine. So a change of 1% to the
# proxy's own work shows here as a number, and the ratio to nginx's count stands beside
# bench/proxy.sh's "user CPU ÷ nginx" as its noise-free companion.
#
#   bench/instructions.sh                       # nginx, HAProxy, the dist build
#   SKIP_BUILD=1 bench/instructions.sh A B      # Switchyard binaries A and B (an A/B)
#   N=20000 ANNOTATE=1 bench/instructions.sh    # also where the instructions go
#                                               # (bench/out/instructions-*.txt, and the
#                                               # callgrind files for callgrind_annotate
#                                               # --tree=caller; use a --release build
#                                               # for its line tables)
#   PEERS=0 ...                                 # Switchyard only
#   CACHE=1 ...                                 # also simulated cache misses per
#                                               # request (callgrind --cache-sim: L1
#                                               # data and last-level, reads and writes)
#   LOCKS=1 ...                                 # also locked instructions (atomic
#                                               # read-modify-writes) per request in
#                                               # each proxy's own binary, and where
#                                               # (bench/locked.py; bench/out/locked-*)
#   CALLGRIND_ARGS=...                          # more callgrind options
#
# Needs: valgrind, nginx, haproxy, oha (cargo install --locked oha). Loopback only.
cd "$(dirname "$0")/.."
[ "${SKIP_BUILD:-0}" = 1 ] || cargo build --profile dist --features tract --quiet
SKIP_BUILD=1
BINS=("$@")
source bench/common.sh
[ ${#BINS[@]} -gt 0 ] || BINS=("$BIN")
need valgrind callgrind_control callgrind_annotate nginx "$OHA"
N=${N:-20000}
WARM=${WARM:-2000}
PEERS=${PEERS:-1}
[ "$PEERS" = 0 ] || need haproxy

O1=19801 O2=19802 O3=19803 P=19811 PA=19812
start_origin "127.0.0.1:$O1" "127.0.0.1:$O2" "127.0.0.1:$O3"

nginx_split_config "$P" "$O1" "$O2" "$O3"
haproxy_split_config "$P" "$O1" "$O2" "$O3"
split_config "$P" "$PA" "$O1" "$O2" "$O3"

# load N: N requests over 32 connections; fails unless every one got a 200.
load() {
  taskset -c 0 "$OHA" --no-tui -n "$1" -c 32 -m POST -d "$BODY" -H 'content-type: application/json' \
    "http://127.0.0.1:$P/v1/models/mnist:predict" > "$WORK/oha.txt"
  grep -q "\[200\] $1 responses" "$WORK/oha.txt" || { echo "not every request got a 200:" >&2; cat "$WORK/oha.txt" >&2; exit 1; }
}

# count NAME COMMAND...: the instructions per request of the proxy COMMAND starts, on $P.
count() {
  local name=$1 pid out
  shift
  rm -f "$WORK/cg.$name".*
  # shellcheck disable=SC2046 # the option, or nothing
  taskset -c 1 valgrind --tool=callgrind $([ "${CACHE:-0}" = 1 ] && echo --cache-sim=yes) $([ "${LOCKS:-0}" = 1 ] && echo --dump-instr=yes) ${CALLGRIND_ARGS:-} --callgrind-out-file="$WORK/cg.$name.%p" "$@" > "$WORK/logs/$name.log" 2>&1 &
  pid=$!
  PIDS+=("$pid")
  # Under valgrind a start takes seconds.
  for _ in $(seq 1 600); do
    curl -sf -o /dev/null -X POST -d "$BODY" "http://127.0.0.1:$P/v1/models/mnist:predict" && break
    sleep 0.1
  done
  load "$WARM"
  callgrind_control -z "$pid" > /dev/null 2>&1
  load "$N"
  callgrind_control -d "$pid" > /dev/null 2>&1
  kill "$pid" 2> /dev/null || true
  wait "$pid" 2> /dev/null || true
  # The dump after the zeroing is the highest-numbered part.
  out=$(ls -v "$WORK/cg.$name".*.* | tail -1)
  awk -v n="$N" -v name="$name" '/^summary:/ {printf "%s\t%.0f\n", name, $2 / n}' "$out" >> "$WORK/counts.tsv"
  # With --cache-sim the events are Ir Dr Dw I1mr D1mr D1mw ILmr DLmr DLmw.
  awk -v n="$N" -v name="$name" '/^events:/ {for (i = 2; i <= NF; i++) col[$i] = i} /^summary:/ && ("D1mr" in col) {printf "%s\t%.1f\t%.1f\t%.1f\t%.1f\t%.1f\n", name, $col["Dr"] / n + $col["Dw"] / n, $col["D1mr"] / n, $col["D1mw"] / n, $col["DLmr"] / n, $col["DLmw"] / n}' "$out" >> "$WORK/cache.tsv"
  if [ "${LOCKS:-0}" = 1 ]; then
    python3 bench/locked.py "$out" "$(command -v "$1")" "$N" 25 > "$OUT/locked-$name.txt"
    printf '%s\t%s\n' "$name" "$(head -1 "$OUT/locked-$name.txt")" >> "$WORK/locks.tsv"
  fi
  if [ "${ANNOTATE:-0}" = 1 ]; then
    callgrind_annotate --inclusive=yes --threshold=99 "$out" > "$OUT/instructions-$name.txt" 2>/dev/null || true
    cp "$out" "$OUT/callgrind-$name.out"
  fi
}

: > "$WORK/counts.tsv"
: > "$WORK/cache.tsv"
: > "$WORK/locks.tsv"
if [ "$PEERS" != 0 ]; then
  count nginx nginx -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" -g 'user root;'
  count haproxy haproxy -f "$WORK/haproxy.cfg" -db
fi
i=0
for bin in "${BINS[@]}"; do
  i=$((i + 1))
  SWITCHYARD_LOG=warn count "switchyard-$i" "$bin" serve --config "$WORK/switchyard.yaml"
done

echo "User-space instructions per request (callgrind), $N requests after $WARM, 32 connections:"
echo
python3 - "$WORK/counts.tsv" "${BINS[@]}" <<'PY'
import sys
rows = [line.split("\t") for line in open(sys.argv[1]).read().split("\n") if line]
counts = {name: int(n) for name, n in rows}
bins = sys.argv[2:]
print("| proxy | instructions per request | ÷ nginx | ÷ HAProxy |")
print("|---|---|---|---|")
for name, n in rows:
    label = name
    if name.startswith("switchyard-"):
        label = "Switchyard " + bins[int(name.split("-")[1]) - 1]
    ng = f"{int(n) / counts['nginx']:.2f}" if "nginx" in counts else "-"
    ha = f"{int(n) / counts['haproxy']:.2f}" if "haproxy" in counts else "-"
    print(f"| {label} | {int(n):,} | {ng} | {ha} |")
if len(bins) == 2:
    a, b = counts["switchyard-1"], counts["switchyard-2"]
    print(f"\nB/A: {b / a:.4f} ({b - a:+,} instructions per request)")
PY
if [ -s "$WORK/cache.tsv" ]; then
  echo
  echo "Simulated cache misses per request (callgrind --cache-sim; valgrind's model of this CPU's caches):"
  echo
  echo "| proxy | data reads and writes | L1 read misses | L1 write misses | last-level read misses | last-level write misses |"
  echo "|---|---|---|---|---|---|"
  awk -F'\t' '{printf "| %s | %s | %s | %s | %s | %s |\n", $1, $2, $3, $4, $5, $6}' "$WORK/cache.tsv"
fi
if [ -s "$WORK/locks.tsv" ]; then
  echo
  echo "Locked instructions per request, in each proxy's own binary (bench/locked.py; where: bench/out/locked-*.txt):"
  echo
  echo "| proxy | locked instructions per request |"
  echo "|---|---|"
  awk -F'\t' '{printf "| %s | %s |\n", $1, $2}' "$WORK/locks.tsv"
fi
