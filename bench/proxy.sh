#!/usr/bin/env bash
# Proxy benchmark: Switchyard against nginx and HAProxy as a hop in front of a model
# server, in one run, interleaved and repeated.
#
#   bench/proxy.sh                 # 3 rounds, 5 s per measurement
#   ROUNDS=5 SECONDS_EACH=10 RATE=3000 bench/proxy.sh
#   H2C=1 bench/proxy.sh           # adds Switchyard with h2c upstreams (an nginx h2c origin)
#   bench/proxy.sh trace           # where the time goes at one connection, nginx vs
#                                  # Switchyard: system calls per request and the time
#                                  # between them (perf's raw_syscalls tracepoints; root)
#   bench/proxy.sh syscalls        # system calls per request at CONNS connections,
#                                  # nginx, HAProxy and Switchyard (perf tracepoints; root)
#   bench/proxy.sh kernel          # what the kernel does per request at CONNS connections,
#                                  # machine-wide: loopback packets, wake-ups, context
#                                  # switches, IPIs (perf tracepoints; root)
#   bench/proxy.sh profile         # ns per request by function (kernel included) on the
#                                  # proxies' core, where HAProxy and Switchyard differ
#                                  # most (perf record -C 1; root). PROFILE_ARGS adds
#                                  # perf record options (--call-graph dwarf), and
#                                  # PROFILE_KEEP=DIR keeps the recordings there
#   bench/proxy.sh c1              # the p50 at one connection over ROUNDS short rounds,
#                                  # each proxy's difference from nginx's per round
#   bench/proxy.sh conns           # latency at the fixed RATE over CONNS_LIST connection
#                                  # counts (default "1 2 8 32"), direct, nginx and
#                                  # Switchyard interleaved: where an added p50 comes from
#
# Origin: nginx returning a fixed TF Serving prediction on three ports (one per
# variant). Targets: direct to the origin; nginx reverse proxy (upstream keepalive);
# HAProxy (http-reuse always); Switchyard with a 97/2/1 split. The two peers are given
# the same 97/2/1 weighted split over the same three ports, and every proxy gets one
# worker thread pinned to CPU 1, while the origin and the load generators share CPU 0.
#
# Measured per target: throughput at 32 connections (wrk, closed loop); latency
# percentiles at a fixed request rate (oha, with coordinated-omission correction); user
# and system CPU time the proxy used per request; and its resident memory after the run.
# Needs: nginx, haproxy, wrk (Debian) and oha (cargo install --locked oha). Loopback only.
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
SECONDS_EACH=${SECONDS_EACH:-5}
RATE=${RATE:-2000}
CONNS=${CONNS:-32}
H2C=${H2C:-0}
source bench/common.sh
need nginx haproxy wrk "$OHA"

O1=19101 O2=19102 O3=19103       # origin, one port per variant
H1=19111 H2=19112 H3=19113       # the same origin over h2c (prior knowledge)
P_NGINX=19201 P_HAPROXY=19202 P_SY=19203 P_SY_ADMIN=19204 P_SYH2=19205 P_SYH2_ADMIN=19206
PATH_TF=/v1/models/mnist:predict

# --- origin -------------------------------------------------------------------------
start_origin "127.0.0.1:$O1" "127.0.0.1:$O2" "127.0.0.1:$O3" \
  "127.0.0.1:$H1 http2" "127.0.0.1:$H2 http2" "127.0.0.1:$H3 http2"

# --- nginx as the proxy -------------------------------------------------------------
mkdir -p "$WORK/nginx"
cat > "$WORK/nginx/nginx.conf" <<CONF
worker_processes 1;
pid $WORK/nginx/nginx.pid;
error_log $WORK/logs/nginx.err warn;
events { worker_connections 20000; }
http {
  access_log off;
  keepalive_requests 1000000;
  client_body_temp_path $WORK/nginx;
  proxy_temp_path $WORK/nginx;
  upstream variants {
    server 127.0.0.1:$O1 weight=97;
    server 127.0.0.1:$O2 weight=2;
    server 127.0.0.1:$O3 weight=1;
    keepalive 64;
  }
  server {
    listen 127.0.0.1:$P_NGINX;
    location / {
      proxy_pass http://variants;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
  }
}
CONF
taskset -c 1 nginx -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" -g 'daemon off; user root;' &
PIDS+=($!); NGINX_PID=$!

# --- HAProxy ------------------------------------------------------------------------
haproxy_split_config "$P_HAPROXY" "$O1" "$O2" "$O3"
taskset -c 1 haproxy -f "$WORK/haproxy.cfg" -db > "$WORK/logs/haproxy.log" 2>&1 &
PIDS+=($!); HAPROXY_PID=$!

# --- Switchyard ---------------------------------------------------------------------
split_config "$P_SY" "$P_SY_ADMIN" "$O1" "$O2" "$O3"
SWITCHYARD_LOG=warn taskset -c 1 "$BIN" serve --config "$WORK/switchyard.yaml" > "$WORK/logs/switchyard.out" 2>&1 &
PIDS+=($!); SY_PID=$!

TARGETS=(direct nginx haproxy switchyard)
declare -A PID_OF=([direct]=$ORIGIN_PID [nginx]=$NGINX_PID [haproxy]=$HAPROXY_PID [switchyard]=$SY_PID)
declare -A PORT_OF=([direct]=$O1 [nginx]=$P_NGINX [haproxy]=$P_HAPROXY [switchyard]=$P_SY)
if [ "$H2C" = 1 ]; then
  # Multiplexed upstream connections: one write can carry several requests.
  sed -e "s/$P_SY_ADMIN/$P_SYH2_ADMIN/; s/$P_SY/$P_SYH2/" \
    -e "s/$O1\"/$H1\", protocol: h2c/; s/$O2\"/$H2\", protocol: h2c/; s/$O3\"/$H3\", protocol: h2c/" \
    "$WORK/switchyard.yaml" > "$WORK/switchyard-h2c.yaml"
  SWITCHYARD_LOG=warn taskset -c 1 "$BIN" serve --config "$WORK/switchyard-h2c.yaml" > "$WORK/logs/switchyard-h2c.out" 2>&1 &
  PIDS+=($!); SYH2_PID=$!
  TARGETS+=(switchyard-h2c)
  PID_OF[switchyard-h2c]=$SYH2_PID
  PORT_OF[switchyard-h2c]=$P_SYH2
fi

sleep 1
for t in "${TARGETS[@]}"; do
  port=${PORT_OF[$t]}
  curl -sf -X POST -d "$BODY" "http://127.0.0.1:$port$PATH_TF" >/dev/null || { echo "port $port is not answering" >&2; cat "$WORK"/logs/* >&2; exit 1; }
done

# under_load T CMD...: wrk at CONNS connections against target T for 6 s, and CMD run
# 1.5 s in (it measures for 3 s); sets RPS to wrk's rate.
under_load() {
  local t=$1 load
  shift
  taskset -c 0 wrk -t1 -c"$CONNS" -d6s -s "$WORK/post.lua" "http://127.0.0.1:${PORT_OF[$t]}$PATH_TF" > "$WORK/wrk.$t" &
  load=$!
  sleep 1.5
  "$@" > /dev/null 2>&1
  wait "$load"
  RPS=$(awk '/Requests\/sec/ {print $2}' "$WORK/wrk.$t")
}

if [ "${1:-}" = c1 ]; then
  # The p50 at one connection (wrk, one request at a time), over ROUNDS short interleaved
  # rounds (SECONDS_EACH each), and each proxy's difference from nginx's within a round:
  # the main run's single measurement per round moves by more than the ±5 µs the target
  # asks about, because nearly all of this latency is the virtual CPUs waking each
  # other (BENCHMARKS.md), not the proxies' work.
  : > "$WORK/c1.tsv"
  for round in $(seq 1 "$ROUNDS"); do
    for t in direct nginx haproxy switchyard; do
      v=$(taskset -c 0 wrk -t1 -c1 -d"${SECONDS_EACH}s" --latency -s "$WORK/post.lua" "http://127.0.0.1:${PORT_OF[$t]}$PATH_TF" |
        awk '$1 == "50%" { v = $2; if (v ~ /us$/) { sub(/us$/, "", v) } else if (v ~ /ms$/) { sub(/ms$/, "", v); v *= 1000 } else if (v ~ /s$/) { sub(/s$/, "", v); v *= 1e6 }; print v }')
      printf '%s\t%s\t%s\n' "$round" "$t" "$v" >> "$WORK/c1.tsv"
      echo "round $round $t: p50 $v µs at one connection" >&2
    done
  done
  python3 - "$WORK/c1.tsv" <<'PY'
import collections, statistics as st, sys
v = collections.defaultdict(dict)
for line in open(sys.argv[1]):
    r, t, us = line.split("\t")
    v[t][r] = float(us)
print("| p50 at one connection, µs | median of rounds | minus nginx's, median of the rounds' differences | rounds within +5 µs of nginx |")
print("|---|---|---|---|")
for t in ["direct", "nginx", "haproxy", "switchyard"]:
    d = [v[t][r] - v["nginx"][r] for r in v[t]]
    within = sum(x <= 5 for x in d)
    print(f"| {t} | {st.median(v[t].values()):.0f} | {st.median(d):+.1f} | {within} of {len(d)} |")
PY
  exit 0
fi

if [ "${1:-}" = trace ]; then
  need perf
  for t in nginx switchyard; do
    case $t in
      nginx) port=$P_NGINX; pid=$(pgrep -P "$NGINX_PID") ;;
      switchyard) port=$P_SY; pid=$SY_PID ;;
    esac
    taskset -c 0 wrk -t1 -c1 -d6s -s "$WORK/post.lua" "http://127.0.0.1:$port$PATH_TF" > /dev/null &
    load=$!
    sleep 1
    timeout -s INT 3 perf record -q -e 'raw_syscalls:sys_enter,raw_syscalls:sys_exit' -p "$pid" -o "$WORK/trace.$t" > /dev/null 2>&1 || true
    wait "$load"
    perf script -i "$WORK/trace.$t" 2>/dev/null > "$WORK/trace.$t.txt"
  done
  python3 - "$WORK/trace.nginx.txt" "$WORK/trace.switchyard.txt" <<'PY'
import re, statistics as st, sys
NAMES = {0: "read", 1: "write", 20: "writev", 44: "sendto", 45: "recvfrom", 232: "epoll_wait", 55: "getsockopt"}
WRITES = (1, 20, 44)  # a message goes out by write, writev or sendto
def calls(path):
    out, pending = [], None
    for line in open(path):
        m = re.search(r"\] (\d+\.\d+):\s+raw_syscalls:sys_(enter|exit): NR (\d+) (.*)", line)
        if not m:
            continue
        t, kind, nr, rest = float(m.group(1)) * 1e6, m.group(2), int(m.group(3)), m.group(4)
        if kind == "enter":
            pending = (t, nr)
        elif pending and pending[1] == nr:
            ret = rest.split("=")[-1].strip()
            out.append((pending[0], t, nr, int(ret) if ret.lstrip("-").isdigit() else -1))
            pending = None
    return out
def summary(path):
    cs = calls(path)
    # The request is the larger read (279 bytes), the upstream's answer the smaller.
    sizes = sorted({c[3] for c in cs if c[2] == 45 and c[3] > 100})
    req_size, resp_size = sizes[-1], sizes[0]
    leg_in, leg_out, wv, cycle, last = [], [], [], [], None
    for i, (t0, t1, nr, ret) in enumerate(cs):
        if nr != 45 or ret not in (req_size, resp_size):
            continue
        nxt = next((c for c in cs[i + 1:i + 8] if c[2] in WRITES), None)
        if nxt is None:
            continue
        (leg_in if ret == req_size else leg_out).append(nxt[0] - t1)
        wv.append(nxt[1] - nxt[0])
        if ret == req_size:
            if last is not None:
                cycle.append(t1 - last)
            last = t1
    n = len(leg_in)
    counts = {}
    for c in cs:
        counts[NAMES.get(c[2], str(c[2]))] = counts.get(NAMES.get(c[2], str(c[2])), 0) + 1
    calls_per = ", ".join(f"{v / n:.1f} {k}" for k, v in sorted(counts.items()) if v / n >= 0.05)
    return n, calls_per, st.median(leg_in), st.median(leg_out), st.median(wv), st.median(cycle)
rows = [("nginx", summary(sys.argv[1])), ("switchyard", summary(sys.argv[2]))]
print("| per request (medians, µs) | " + " | ".join(r[0] for r in rows) + " |")
print("|---|---|---|")
labels = ["requests traced", "system calls", "user: request read → upstream write",
          "user: response read → client write", "each write", "whole cycle"]
for i, label in enumerate(labels):
    print(f"| {label} | " + " | ".join(str(round(r[1][i], 1)) if isinstance(r[1][i], float) else str(r[1][i]) for r in rows) + " |")
PY
  exit 0
fi

# stat_per_request SCOPE EVENTS TITLE: perf stat's counts of EVENTS per request while
# each proxy is under load (CONNS connections, wrk), 3 s of a 6 s run, over ROUNDS
# interleaved rounds; the medians as a table. SCOPE "process": the proxy's own (nginx's
# worker's); "machine": every CPU's. Requests in the window are from wrk's steady rate.
stat_per_request() {
  local scope=$1 events=$2 title=$3 round t pid
  need perf
  : > "$WORK/counts.tsv"
  for round in $(seq 1 "$ROUNDS"); do
    for t in nginx haproxy switchyard; do
      if [ "$scope" = process ]; then
        pid=${PID_OF[$t]}
        [ "$t" != nginx ] || pid=$(pgrep -P "$NGINX_PID")
        under_load "$t" perf stat -x, -e "$events" -p "$pid" -o "$WORK/perf.$t" -- sleep 3
      else
        under_load "$t" perf stat -a -x, -e "$events" -o "$WORK/perf.$t" -- sleep 3
      fi
      # A counter by its event's name ("syscalls:sys_enter_recvfrom" is "recvfrom", and
      # "raw_syscalls:sys_enter", every system call, is "all").
      awk -F, -v t="$t" -v r="$round" -v rps="$RPS" 'NF > 3 && $1 ~ /^[0-9]/ {n=$3; sub(/.*:/, "", n); sub(/^sys_enter_?/, "", n); if (n == "") n = "all"; printf "%s\t%s\t%s\t%.3f\n", r, t, n, $1 / (rps * 3)}' "$WORK/perf.$t" >> "$WORK/counts.tsv"
      echo "round $round $t: $RPS req/s" >&2
    done
  done
  python3 - "$WORK/counts.tsv" "$title" <<'PY'
import collections, statistics as st, sys
v = collections.defaultdict(list)
for line in open(sys.argv[1]):
    r, t, n, x = line.split("\t")
    v[(t, n)].append(float(x))
ts = ["nginx", "haproxy", "switchyard"]
med = {k: st.median(x) for k, x in v.items()}
names = sorted({n for (_, n) in v}, key=lambda n: (n != "all", n))
print(f"| {sys.argv[2]} (median of rounds) | " + " | ".join(ts) + " |")
print("|---|" + "---|" * len(ts))
for n in names:
    if all(med[(t, n)] < 0.005 for t in ts if (t, n) in med):
        continue
    print(f"| {n} | " + " | ".join(f"{med[(t, n)]:.3f}" if (t, n) in med else "" for t in ts) + " |")
if names and names[0] == "all":
    # Whatever is not named above (perf counts only the tracepoints it was given).
    other = {t: med[(t, "all")] - sum(med.get((t, n), 0) for n in names[1:]) for t in ts}
    print("| others | " + " | ".join(f"{other[t]:.3f}" for t in ts) + " |")
PY
}

if [ "${1:-}" = syscalls ]; then
  # System calls per request, each proxy's own.
  EVENTS=raw_syscalls:sys_enter
  for sc in recvfrom read readv sendto write writev sendmsg epoll_wait epoll_ctl; do
    EVENTS="$EVENTS,syscalls:sys_enter_$sc"
  done
  stat_per_request process "$EVENTS" "system calls per request"
  exit 0
fi

if [ "${1:-}" = kernel ]; then
  # What the kernel does per request, machine-wide: packets on loopback (four carry the
  # request and its answer; the rest are bare ACKs), wake-ups, context switches and
  # inter-processor interrupts (a wake-up of a task on the other, idle CPU; each is a VM
  # exit in a guest).
  stat_per_request machine net:net_dev_xmit,sched:sched_wakeup,sched:sched_switch,ipi:ipi_send_cpu,sched:sched_wake_idle_without_ipi,irq_vectors:call_function_single_entry,irq_vectors:reschedule_entry,tcp:tcp_retransmit_skb \
    "per request, machine-wide"
  exit 0
fi

if [ "${1:-}" = profile ]; then
  # Where CPU 1 (the proxies' core) spends each request, by function, kernel included:
  # perf samples CPU 1 at 2,999 Hz over 3 s of a 6 s wrk run at CONNS connections, each
  # sample worth 1/2,999 s; divided by the requests in the window it is ns per request.
  # One round per proxy, interleaved; the TOP functions where HAProxy and Switchyard
  # differ most, then each one's total. Needs root and perf.
  need perf
  TOP=${TOP:-25}
  for round in $(seq 1 "$ROUNDS"); do
    for t in nginx haproxy switchyard; do
      # shellcheck disable=SC2086 # PROFILE_ARGS is options, split on purpose
      under_load "$t" perf record -q -F 2999 -C 1 ${PROFILE_ARGS:-} -o "$WORK/prof.$t.$round" -- sleep 3
      rps=$RPS
      perf report -i "$WORK/prof.$t.$round" -n --no-children -g none --sort sym --stdio 2>/dev/null |
        awk -v t="$t" -v r="$round" -v rps="$rps" '$1 ~ /%$/ && $2 ~ /^[0-9]+$/ {s=$0; sub(/.*\] /, "", s); printf "%s\t%s\t%s\t%.1f\n", r, t, s, $2 / 2999 / (rps * 3) * 1e9}' >> "$WORK/profile.tsv"
      perf report -i "$WORK/prof.$t.$round" -n --no-children -g none --sort dso --stdio 2>/dev/null |
        awk -v t="$t" -v r="$round" -v rps="$rps" '$1 ~ /%$/ && $2 ~ /^[0-9]+$/ {d=$3; if (d ~ /kernel/) d="the kernel"; else if (d ~ /^libc/) d="libc"; else next; printf "%s\t%s\t(%s)\t%.1f\n", r, t, d, $2 / 2999 / (rps * 3) * 1e9}' >> "$WORK/profile.tsv"
      echo "round $round $t: $rps req/s" >&2
    done
  done
  [ -z "${PROFILE_KEEP:-}" ] || cp "$WORK"/prof.* "$PROFILE_KEEP"/
  python3 - "$WORK/profile.tsv" "$TOP" <<'PY'
import collections, statistics as st, sys
v = collections.defaultdict(dict)
for line in open(sys.argv[1]):
    r, t, name, ns = line.rstrip("\n").split("\t")
    v[(t, name)][r] = float(ns)
rounds = sorted({r for d in v.values() for r in d})
ts = ["nginx", "haproxy", "switchyard"]
def med(t, n):
    d = v.get((t, n), {})
    return st.median([d.get(r, 0.0) for r in rounds])
# Functions, and "(the kernel)" and "(libc)": the sums of their functions.
parts = sorted({n for (_, n) in v if n.startswith("(")})
names = {n for (_, n) in v if not n.startswith("(")}
diff = sorted(names, key=lambda n: -abs(med("switchyard", n) - med("haproxy", n)))
print("| ns per request on the proxies' core (median of rounds) | " + " | ".join(ts) + " | Switchyard − HAProxy |")
print("|---|" + "---|" * (len(ts) + 1))
for n in diff[:int(sys.argv[2])]:
    print(f"| `{n[:60]}` | " + " | ".join(f"{med(t, n):.0f}" for t in ts) + f" | {med('switchyard', n) - med('haproxy', n):+.0f} |")
tot = {t: st.median([sum(v[(t, n)].get(r, 0.0) for n in names if (t, n) in v) for r in rounds]) for t in ts}
for n in parts:
    print(f"| {n} | " + " | ".join(f"{med(t, n):.0f}" for t in ts) + f" | {med('switchyard', n) - med('haproxy', n):+.0f} |")
# What is neither: the proxy's own code, with the odd other library.
rest = {t: tot[t] - sum(med(t, n) for n in parts) for t in ts}
print("| (the rest: the proxy's own code) | " + " | ".join(f"{rest[t]:.0f}" for t in ts) + f" | {rest['switchyard'] - rest['haproxy']:+.0f} |")
print("| all | " + " | ".join(f"{tot[t]:.0f}" for t in ts) + f" | {tot['switchyard'] - tot['haproxy']:+.0f} |")
PY
  exit 0
fi

if [ "${1:-}" = conns ]; then
  CONNS_LIST=${CONNS_LIST:-1 2 8 32}
  : > "$WORK/conns.tsv"
  for round in $(seq 1 "$ROUNDS"); do
    for c in $CONNS_LIST; do
      for t in direct nginx switchyard; do
        json=$(taskset -c 0 "$OHA" -z "${SECONDS_EACH}s" -c "$c" -q "$RATE" --latency-correction --no-tui --output-format json \
          -m POST -H 'content-type: application/json' -D "$WORK/body.json" "http://127.0.0.1:${PORT_OF[$t]}$PATH_TF")
        python3 -c '
import json, sys
d = json.loads(sys.argv[4]); p = d["latencyPercentiles"]
print("\t".join([sys.argv[1], sys.argv[2], sys.argv[3], "%.1f" % (p["p50"] * 1e6), "%.1f" % (p["p90"] * 1e6)]))' \
          "$round" "$c" "$t" "$json" | tee -a "$WORK/conns.tsv" >&2
      done
    done
  done
  python3 - "$WORK/conns.tsv" "$RATE" "$ROUNDS" "$SECONDS_EACH" <<'PY'
import sys, statistics as st
path, rate, rounds, secs = sys.argv[1:]
rows = [l.split("\t") for l in open(path)]
med = lambda c, t, i: st.median(float(r[i]) for r in rows if r[1] == c and r[2] == t)
print(f"oha at a fixed {rate} req/s, coordinated-omission corrected; medians of {rounds} interleaved rounds of {secs} s; µs.\n")
print("| connections | direct p50 | nginx p50 | switchyard p50 | added p50, nginx | added p50, switchyard | switchyard − nginx | nginx p90 | switchyard p90 |")
print("|---|---|---|---|---|---|---|---|---|")
for c in dict.fromkeys(r[1] for r in rows):
    d, n, s = med(c, "direct", 3), med(c, "nginx", 3), med(c, "switchyard", 3)
    print(f"| {c} | {d:.0f} | {n:.0f} | {s:.0f} | {n - d:+.0f} | {s - d:+.0f} | {s - n:+.0f} | {med(c, 'nginx', 4):.0f} | {med(c, 'switchyard', 4):.0f} |")
PY
  exit 0
fi

# CPU ticks of a process and its children, user and system ("U S"); nginx's master has
# one worker child, whose ticks we add.
ticks() {
  local user=0 sys=0 p
  for p in "$1" $(pgrep -P "$1" || true); do
    read -r u s < <(awk '{print $14, $15}' "/proc/$p/stat")
    user=$((user + u)); sys=$((sys + s))
  done
  echo "$user $sys"
}
rss_kib() {
  local total=0 p
  for p in "$1" $(pgrep -P "$1" || true); do
    total=$((total + $(awk '/VmRSS/ {print $2}' "/proc/$p/status")))
  done
  echo "$total"
}
HZ=$(getconf CLK_TCK)

RESULTS=$WORK/results.tsv
: > "$RESULTS"

for round in $(seq 1 "$ROUNDS"); do
  for t in "${TARGETS[@]}"; do
    url="http://127.0.0.1:${PORT_OF[$t]}$PATH_TF"
    before=$(ticks "${PID_OF[$t]}")
    rps=$(taskset -c 0 wrk -t1 -c"$CONNS" -d"${SECONDS_EACH}s" -s "$WORK/post.lua" "$url" | awk '/Requests\/sec/ {print $2}')
    after=$(ticks "${PID_OF[$t]}")
    reqs=$(awk -v r="$rps" -v s="$SECONDS_EACH" 'BEGIN {print r * s}')
    # Microseconds of user and of system time per request.
    read -r cpu_user cpu_sys < <(awk -v b="$before" -v a="$after" -v hz="$HZ" -v n="$reqs" \
      'BEGIN {split(b, x, " "); split(a, y, " "); printf "%.2f %.2f\n", (y[1] - x[1]) / hz / n * 1e6, (y[2] - x[2]) / hz / n * 1e6}')
    json=$(taskset -c 0 "$OHA" -z "${SECONDS_EACH}s" -c "$CONNS" -q "$RATE" --latency-correction --no-tui --output-format json \
      -m POST -H 'content-type: application/json' -D "$WORK/body.json" "$url")
    # Unloaded latency: one connection, one request at a time (wrk's own percentiles).
    c1=$(taskset -c 0 wrk -t1 -c1 -d"${SECONDS_EACH}s" --latency -s "$WORK/post.lua" "$url" \
      | awk '$1 == "50%" { v = $2; if (v ~ /us$/) { sub(/us$/, "", v); v /= 1000 } else if (v ~ /ms$/) { sub(/ms$/, "", v) } else if (v ~ /s$/) { sub(/s$/, "", v); v *= 1000 }; printf "%.3f", v }')
    read -r p50 p90 p99 p999 ok <<<"$(python3 -c '
import json, sys
d = json.loads(sys.argv[1]); p = d["latencyPercentiles"]
ms = lambda k: "%.3f" % (p[k] * 1e3)
print(ms("p50"), ms("p90"), ms("p99"), ms("p99.9"), "%.4f" % d["summary"]["successRate"])' "$json")"
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$t" "$rps" "$cpu_user" "$p50" "$p90" "$p99" "$p999" "$ok" "$c1" "$cpu_sys" >> "$RESULTS"
    echo "round $round  $t: ${rps} req/s, CPU ${cpu_user} µs user + ${cpu_sys} µs system per request, p50 ${p50} ms, p99 ${p99} ms (rate $RATE/s, success $ok), p50 at 1 conn ${c1} ms" >&2
  done
done

STAMP=$(date -u +%Y-%m-%dT%H:%MZ)
REPORT=$OUT/proxy-$STAMP.md
python3 - "$RESULTS" "$RATE" "$CONNS" "$ROUNDS" "$SECONDS_EACH" \
  "$(rss_kib "$NGINX_PID")" "$(rss_kib "$HAPROXY_PID")" "$(rss_kib "$SY_PID")" \
  "$(if [ "$H2C" = 1 ]; then rss_kib "$SYH2_PID"; fi)" > "$REPORT" <<'PY'
import sys, statistics as st
path, rate, conns, rounds, secs, rss_nginx, rss_haproxy, rss_sy, rss_syh2 = sys.argv[1:]
rows = [l.rstrip("\n").split("\t") for l in open(path)]
targets = ["direct", "nginx", "haproxy", "switchyard"] + (["switchyard-h2c"] if rss_syh2 else [])
med = lambda t, i: st.median(float(r[i]) for r in rows if r[1] == t)
rss = {"direct": None, "nginx": rss_nginx, "haproxy": rss_haproxy, "switchyard": rss_sy,
       "switchyard-h2c": rss_syh2}
direct_p50 = med("direct", 4)
direct_c1 = med("direct", 9)
print(f"Medians of {rounds} interleaved rounds, {secs} s per measurement. Throughput: wrk, 1 thread, {conns} connections.")
print(f"Latency: oha at a fixed {rate} req/s, {conns} connections, coordinated-omission corrected;")
print("and wrk with 1 connection (one request at a time, unloaded).\n")
print("| target | req/s at 32 conns | × nginx | CPU µs per req, user + system | p50 ms | added p50 ms | p90 ms | p99 ms | p99.9 ms | p50 ms at 1 conn | added p50 at 1 conn | RSS MiB |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
for t in targets:
    r = rss[t]
    print(f"| {t} | {med(t,2):,.0f} | {med(t,2)/med('nginx',2):.2f} | {med(t,3):.1f} + {med(t,10):.1f} | {med(t,4):.3f} | "
          f"{med(t,4)-direct_p50:+.3f} | {med(t,5):.3f} | {med(t,6):.3f} | {med(t,7):.3f} | "
          f"{med(t,9):.3f} | {med(t,9)-direct_c1:+.3f} | "
          f"{'-' if r is None else f'{int(r)/1024:.1f}'} |")
print("\nPer round (req/s): " + "; ".join(
    f"{t}: " + ", ".join(f"{float(r[2]):,.0f}" for r in rows if r[1] == t) for t in targets))
PY
cat "$REPORT"
echo "report written to $REPORT" >&2
