#!/usr/bin/env bash
# Where the proxy's CPU goes: Switchyard (one worker pinned to CPU 1) under wrk at 32
# connections (CPU 0) against the 97/2/1 split of bench/proxy.sh, profiled with
# `perf record --call-graph dwarf`; prints the top symbols and who calls memcpy/memmove
# (the copies of large async futures), grouped.
#
#   bench/profile.sh                         # builds --release (line tables for names)
#   SKIP_BUILD=1 BIN=path/to/switchyard bench/profile.sh
#
# Needs: perf (root or perf_event_paranoid ≤ 1), nginx, wrk, python3. Loopback only.
cd "$(dirname "$0")/.."
[ "${SKIP_BUILD:-0}" = 1 ] || cargo build --release --quiet
BIN=${BIN:-$PWD/target/release/switchyard}
SKIP_BUILD=1
source bench/common.sh
need perf nginx wrk python3
SECONDS_EACH=${SECONDS_EACH:-5}

O1=19601 O2=19602 O3=19603 P=19613 PA=19614
start_origin "127.0.0.1:$O1" "127.0.0.1:$O2" "127.0.0.1:$O3"
split_config "$P" "$PA" "$O1" "$O2" "$O3"
SWITCHYARD_LOG=warn taskset -c 1 "$BIN" serve --config "$WORK/switchyard.yaml" > "$WORK/logs/switchyard.out" 2>&1 &
SY=$!
PIDS+=($SY)
wait_port $P
taskset -c 0 wrk -t1 -c32 -d$((SECONDS_EACH + 5))s -s "$WORK/post.lua" "http://127.0.0.1:$P/v1/models/mnist:predict" > "$WORK/wrk.out" &
WRK=$!
sleep 2
perf record -q --call-graph dwarf,16384 -F 999 -p "$SY" -o "$WORK/perf.data" -- sleep "$SECONDS_EACH" > /dev/null 2>&1
wait "$WRK"
echo "Switchyard under wrk -c32: $(awk '/Requests\/sec/ {print $2}' "$WORK/wrk.out") req/s while profiled"
echo
echo "Top symbols (self time, share of the proxy's samples):"
perf report -i "$WORK/perf.data" --no-children --sort dso,symbol --percent-limit 1 --stdio -g none 2>/dev/null |
  grep -v '^#' | grep -v '^$' | cut -c1-130
perf script -i "$WORK/perf.data" 2>/dev/null > "$WORK/stacks.txt"
python3 - "$WORK/stacks.txt" <<'PY'
import collections, re, sys
samples = user = copies = 0
by_group, by_caller = collections.Counter(), collections.Counter()
for block in open(sys.argv[1]).read().split("\n\n"):
    lines = [l.strip() for l in block.strip().split("\n") if l.strip()]
    if len(lines) < 2:
        continue
    samples += 1
    frames = [re.sub(r"^[0-9a-f]+ ", "", l) for l in lines[1:]]
    if "kernel" not in frames[0]:
        user += 1
    if not re.search("memcpy|memmove", frames[0]) or "kernel" in frames[0]:
        continue
    copies += 1
    caller = re.sub(r"\+0x[0-9a-f]+ \(.*\)$", "", frames[1]) if len(frames) > 1 else "?"
    by_caller[caller[:110]] += 1
    if "hyper_util::client::legacy" in caller or "upstream::Connector" in caller or "either::Either" in caller:
        group = "hyper-util's legacy client"
    elif "tokio::sync" in caller or "hyper::client::dispatch" in caller or "Envelope" in caller or "poll_msg" in caller:
        group = "hyper's client dispatch channels"
    elif "switchyard" in caller or "tower::" in caller:
        group = "ours (switchyard, tower)"
    elif "hyper" in caller:
        group = "hyper's HTTP/1.1 server and client"
    else:
        group = "other"
    by_group[group] += 1
print(f"\nmemcpy/memmove: {copies} of {samples} samples ({100 * copies / max(samples, 1):.1f}%), "
      f"{100 * copies / max(user, 1):.1f}% of the user-space ones. By caller's owner:")
for g, n in by_group.most_common():
    print(f"  {n:5d}  {100 * n / samples:4.1f}%  {g}")
print("Callers:")
for c, n in by_caller.most_common(12):
    print(f"  {n:5d}  {c}")

# User-space self time by owner: the crate of the innermost frame that names one (a
# libc or allocator frame goes to the first crate above it), so "what would a codec of
# our own replace" and "what is ours" read off one table.
owners = collections.Counter()
clock = 0
for block in open(sys.argv[1]).read().split("\n\n"):
    lines = [l.strip() for l in block.strip().split("\n") if l.strip()]
    if len(lines) < 2:
        continue
    frames = [re.sub(r"^[0-9a-f]+ ", "", l) for l in lines[1:]]
    if "kernel" in frames[0]:
        continue
    if "clock_gettime" in frames[0]:
        clock += 1
    owner = "unnamed (libc, allocator, vdso without a caller)"
    for f in frames:
        m = re.match(r"<?(?:&|<)*([a-z_][a-z0-9_]*)::", f)
        if m and m.group(1) not in ("core", "alloc", "std"):
            owner = m.group(1)
            break
    owners[owner] += 1
print(f"\nUser-space samples by owner ({user} in all; clock reads: {clock}):")
for o, n in owners.most_common(14):
    print(f"  {n:5d}  {100 * n / max(user, 1):4.1f}%  {o}")
PY
cp "$WORK/stacks.txt" "$OUT/profile-stacks.txt" 2>/dev/null || true
