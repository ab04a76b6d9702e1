#!/usr/bin/env bash
# The bandit over HTTP at a real request rate: regret of the sidecar's bandit, with its
# defaults, against per-request Thompson sampling fed immediately (`mode: per_request,
# warmup: 0, min_weight: 0`: the reference every default must match), and against an
# earlier binary (BEFORE=path) with its defaults, side by side in one run.
#
#   bench/bandit-http.sh                    # 5 seeds × 10 s at 2,000 req/s per config
#   BEFORE=/tmp/sy-before SEEDS=10 RATE=2000 SECONDS_EACH=10 bench/bandit-http.sh
#
# World: three variants converting at 5.0%, 5.5% and 6.0% (`switchyard load --reward
# a=bernoulli(0.05) …`, feedback posted at once, in batches of at most 256), equal
# starting weights, objective `conversion`. An nginx on CPU 0 answers for every variant:
# only the reward differs. Regret = Σ over variants of requests × (0.060 − its rate),
# in expected conversions lost, per run; the mean and range over seeds are printed, and
# the ratio of means to per-request Thompson. Loopback only; stops by itself.
# Needs: nginx (Debian).
cd "$(dirname "$0")/.."
SEEDS=${SEEDS:-5}
RATE=${RATE:-2000}
SECONDS_EACH=${SECONDS_EACH:-10}
source bench/common.sh
need nginx
ORIGIN=19401 P=19402 P_ADMIN=19403
start_origin "127.0.0.1:$ORIGIN"
RESULTS="$OUT/bandit-http.tsv"
printf 'config\tseed\tregret\ton_best\n' > "$RESULTS"

# run NAME BINARY BANDIT SEED: one sidecar with BANDIT as the model's bandit, one load.
run() {
  local name=$1 bin=$2 bandit=$3 seed=$4
  cat > "$WORK/sy.yaml" <<YAML
listen: 127.0.0.1:$P
admin_listen: 127.0.0.1:$P_ADMIN
worker_threads: 1
seed: $seed
models:
  rec:
    bandit: $bandit
    variants:
      - {name: a, upstream: "http://127.0.0.1:$ORIGIN", weight: 1}
      - {name: b, upstream: "http://127.0.0.1:$ORIGIN", weight: 1}
      - {name: c, upstream: "http://127.0.0.1:$ORIGIN", weight: 1}
YAML
  taskset -c 1 "$bin" serve --config "$WORK/sy.yaml" > "$WORK/logs/sy-$name-$seed.log" 2>&1 &
  local pid=$!
  wait_port "$P"
  "$BIN" load -r "$RATE" -d "${SECONDS_EACH}s" --seed "$seed" --json \
    --reward 'a=bernoulli(0.05)' --reward 'b=bernoulli(0.055)' --reward 'c=bernoulli(0.06)' \
    "http://127.0.0.1:$P/v1/models/rec:predict" > "$WORK/load.json" 2> "$WORK/logs/load.err"
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  python3 - "$WORK/load.json" "$name" "$seed" >> "$RESULTS" <<'PY'
import json, sys
path, name, seed = sys.argv[1:]
r = json.load(open(path))
rate = {"a": 0.05, "b": 0.055, "c": 0.06}
counts = {v: r["variants"].get(v, {}).get("requests", 0) for v in rate}
total = sum(counts.values())
regret = sum(n * (0.06 - rate[v]) for v, n in counts.items())
print(f"{name}\t{seed}\t{regret:.1f}\t{counts['c'] / max(total, 1):.3f}")
PY
}

for seed in $(seq 1 "$SEEDS"); do
  run defaults "$BIN" "{objective: conversion}" "$seed"
  run thompson "$BIN" "{objective: conversion, mode: per_request, warmup: 0, min_weight: 0}" "$seed"
  if [ -n "${BEFORE:-}" ]; then
    run before "$BEFORE" "{objective: conversion}" "$seed"
  fi
done

echo
echo "Bandit over HTTP: $SEEDS seeds × $SECONDS_EACH s at $RATE req/s ($(nproc) cores, $(date -u +%F))"
python3 - "$RESULTS" <<'PY'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
by = {}
for r in rows:
    by.setdefault(r["config"], []).append((float(r["regret"]), float(r["on_best"])))
ref = sum(x for x, _ in by["thompson"]) / len(by["thompson"])
print(f"{'config':<10} {'regret (mean)':>14} {'min':>8} {'max':>8} {'on best':>8} {'÷ thompson':>11}")
for name, xs in by.items():
    reg = [x for x, _ in xs]
    mean = sum(reg) / len(reg)
    best = sum(b for _, b in xs) / len(xs)
    print(f"{name:<10} {mean:>14.1f} {min(reg):>8.1f} {max(reg):>8.1f} {best:>8.3f} {mean / ref:>11.2f}")
PY
