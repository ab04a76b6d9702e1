#!/usr/bin/env bash
# The bandit over HTTP at a real request rate, beside the simulator for the same world:
# regret of the sidecar's bandit with its defaults, against per-request Thompson
# sampling fed at once with nothing else on (`detect_changes: false`: the reference
# every default must match), and against an earlier binary (BEFORE=path) with its own
# defaults, side by side in one run.
#
#   bench/bandit-http.sh                              # conversion world, 5 seeds
#   WORLD=drift SEEDS=10 BEFORE=/tmp/sy-before bench/bandit-http.sh
#   FIRST_SEED=6 SEEDS=10 bench/bandit-http.sh        # seeds 6-15
#   SELDON_ROUTER=~/seldon-core/components/routers/thompson-sampling/ThompsonSampling.py \
#     bench/bandit-http.sh                            # and Seldon's own router beside them
#
# With SELDON_ROUTER (the path of Seldon Core v1's ThompsonSampling.py, from a checkout
# of seldon-core: its code is not in this repository), Seldon's router class runs as one
# more config, behind bench/seldon_router.py (its route() per prediction, send_feedback()
# per feedback, at once), in a venv with numpy made under bench/out/ on first use.
#
# Worlds (three variants, equal starting weights, objective `conversion`, feedback posted
# as soon as each answer is in, by `switchyard load --reward`, in batches of ≤ 256):
#   conversion  5.0 / 5.5 / 6.0% for SECONDS_EACH (default 10) seconds;
#   delayed     the same, each feedback posted 0.2 s after its answer (400 decisions at
#               2,000 req/s; the simulator's delayed world is up to 400 at random);
#   profit      revenue per prediction normal(1.30, 1) / normal(1.10, 1) / normal(1.00, 1),
#               cost_per_1k 400 / 50 / 100 (profit 0.90 / 1.05 / 0.90), objective
#               `profit`; Seldon's router is fed the profit clipped into [0, 1], as its
#               reward must be (it counts int(reward) successes per prediction);
#   orders      the most-converting variant is not the most profitable: conversion
#               10 / 7 / 6%, worth 8.2 / 9.9 / 9.9 each, cost_per_1k 300 / 50 / 50 (profit
#               0.52 / 0.643 / 0.544 per prediction), objective `profit`; Seldon's router
#               fed as above (so it learns the conversion rate);
#   drift       10 / 5 / 5% for 5 s, then 5 / 5 / 10% for 5 s: the starved third variant
#               becomes the best. At 2,000 req/s that is 10,000 decisions each side;
#               "recovery" is the third variant's share 2.0–2.5 s after the change
#               (decisions 4,000–5,000 at 2,000 req/s), as in the issue.
# An nginx on CPU 0 answers for every variant: only the reward differs. Regret = Σ over
# phases and variants of requests × (best rate − its rate), in expected conversions
# lost; mean, range and the ratio of means to the reference are printed, and
# `switchyard simulate`'s regret for the same world and decisions beside them.
# Loopback only; stops by itself. Needs: nginx (Debian).
cd "$(dirname "$0")/.."
SEEDS=${SEEDS:-5}
FIRST_SEED=${FIRST_SEED:-1}
RATE=${RATE:-2000}
SECONDS_EACH=${SECONDS_EACH:-10}
WORLD=${WORLD:-conversion}
source bench/common.sh
need nginx
ORIGIN=19401 P=19402 P_ADMIN=19403
start_origin "127.0.0.1:$ORIGIN"
RESULTS="$OUT/bandit-http-$WORLD.tsv"
printf 'config\tseed\tregret\ton_best\trecovery\n' > "$RESULTS"

case "$WORLD" in
  # Phases: SECONDS RATE_A RATE_B RATE_C [measured], one line each.
  conversion) PHASES="$SECONDS_EACH 0.05 0.055 0.06 -" ;;
  delayed) PHASES="$SECONDS_EACH 0.05 0.055 0.06 -"; DELAY=0.2s ;;
  # Phases give each variant's expected payoff; REWARDS, when set, what load draws.
  profit) PHASES="$SECONDS_EACH 0.90 1.05 0.90 -"; OBJECTIVE=profit; SIM_SCALE=1
    REWARDS="a=normal(1.3,1) b=normal(1.1,1) c=normal(1.0,1)"; COSTS=(400 50 100) ;;
  orders) PHASES="$SECONDS_EACH 0.52 0.643 0.544 -"; OBJECTIVE=profit; SIM_SCALE=1
    REWARDS="a=bernoulli(0.10)*8.2 b=bernoulli(0.07)*9.9 c=bernoulli(0.06)*9.9"; COSTS=(300 50 50) ;;
  drift) PHASES="5 0.10 0.05 0.05 -
2 0.05 0.05 0.10 -
0.5 0.05 0.05 0.10 recovery
2.5 0.05 0.05 0.10 -" ;;
  *) echo "WORLD must be conversion, delayed, profit, orders or drift" >&2; exit 64 ;;
esac
OBJECTIVE=${OBJECTIVE:-conversion}
SIM_SCALE=${SIM_SCALE:-20}
[ -n "${COSTS+x}" ] || COSTS=(0 0 0)

# run NAME BINARY BANDIT SEED: one sidecar with BANDIT as the model's bandit, one load
# per phase (the sidecar, and what its bandit learned, carry across phases).
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
      - {name: a, upstream: "http://127.0.0.1:$ORIGIN", weight: 1, cost_per_1k: ${COSTS[0]}}
      - {name: b, upstream: "http://127.0.0.1:$ORIGIN", weight: 1, cost_per_1k: ${COSTS[1]}}
      - {name: c, upstream: "http://127.0.0.1:$ORIGIN", weight: 1, cost_per_1k: ${COSTS[2]}}
YAML
  if [ "$name" = seldon ]; then
    taskset -c 1 "$SELDON_PY" bench/seldon_router.py --router "$SELDON_ROUTER" --port "$P" \
      --seed "$seed" --costs "a=${COSTS[0]},b=${COSTS[1]},c=${COSTS[2]}" \
      > "$WORK/logs/seldon-$seed.log" 2>&1 &
  else
    taskset -c 1 "$bin" serve --config "$WORK/sy.yaml" > "$WORK/logs/sy-$name-$seed.log" 2>&1 &
  fi
  local pid=$!
  wait_port "$P"
  : > "$WORK/phases.tsv"
  local i=0
  while read -r secs ra rb rc tag; do
    i=$((i + 1))
    local rewards=(--reward "a=bernoulli($ra)" --reward "b=bernoulli($rb)" --reward "c=bernoulli($rc)")
    if [ -n "${REWARDS:-}" ]; then
      rewards=()
      for r in $REWARDS; do rewards+=(--reward "$r"); done
    fi
    "$BIN" load -r "$RATE" -d "${secs}s" --seed "$((seed * 100 + i))" --json \
      --feedback-delay "${DELAY:-0s}" "${rewards[@]}" \
      "http://127.0.0.1:$P/v1/models/rec:predict" > "$WORK/load.json" 2> "$WORK/logs/load.err"
    python3 - "$WORK/load.json" "$ra" "$rb" "$rc" "$tag" >> "$WORK/phases.tsv" <<'PY'
import json, sys
path, ra, rb, rc, tag = sys.argv[1:]
rate = {"a": float(ra), "b": float(rb), "c": float(rc)}
r = json.load(open(path))
counts = {v: r["variants"].get(v, {}).get("requests", 0) for v in rate}
best = max(rate, key=rate.get)
regret = sum(n * (rate[best] - rate[v]) for v, n in counts.items())
print(f"{regret}\t{counts[best]}\t{sum(counts.values())}\t{tag}")
PY
  done <<< "$PHASES"
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  python3 - "$WORK/phases.tsv" "$name" "$seed" >> "$RESULTS" <<'PY'
import sys
path, name, seed = sys.argv[1:]
rows = [l.split("\t") for l in open(path).read().splitlines()]
regret = sum(float(r[0]) for r in rows)
on_best = sum(int(r[1]) for r in rows) / max(sum(int(r[2]) for r in rows), 1)
rec = [int(r[1]) / max(int(r[2]), 1) for r in rows if r[3] == "recovery"]
print(f"{name}\t{seed}\t{regret:.1f}\t{on_best:.3f}\t{rec[0] if rec else '-'}")
PY
}

if [ -n "${SELDON_ROUTER:-}" ]; then
  SELDON_PY=$PWD/bench/out/venv-seldon/bin/python
  if [ ! -x "$SELDON_PY" ]; then
    python3 -m venv bench/out/venv-seldon
    bench/out/venv-seldon/bin/pip -q install 'numpy==2.4.6'
  fi
fi

for seed in $(seq "$FIRST_SEED" "$((FIRST_SEED + SEEDS - 1))"); do
  if [ -n "${SELDON_ROUTER:-}" ]; then
    run seldon - - "$seed"
  fi
  run defaults "$BIN" "{objective: $OBJECTIVE}" "$seed"
  run thompson "$BIN" "{objective: $OBJECTIVE, detect_changes: false}" "$seed"
  if [ -n "${BEFORE:-}" ]; then
    run before "$BEFORE" "{objective: $OBJECTIVE}" "$seed"
  fi
done

# The simulator, same world, same decisions (its conversion worlds pay 20 per
# conversion where these pay 1, so their regret is divided by SIM_SCALE, 20).
DECISIONS=$(python3 -c "print(int(sum(float(l.split()[0]) for l in '''$PHASES'''.splitlines()) * $RATE))")
"$BIN" simulate --requests "$DECISIONS" --rate "$RATE" --seeds 10 --json > "$WORK/sim.json"

echo
echo "Bandit over HTTP, world $WORLD: $SEEDS seeds × $DECISIONS decisions at $RATE req/s ($(nproc) cores, $(date -u +%F))"
python3 - "$RESULTS" "$WORK/sim.json" "$WORLD" "$SIM_SCALE" <<'PY'
import csv, json, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
by = {}
for r in rows:
    by.setdefault(r["config"], []).append(r)
mean = lambda xs: sum(xs) / len(xs)
ref = mean([float(r["regret"]) for r in by["thompson"]])
print(f"{'config':<10} {'regret (mean)':>14} {'min':>8} {'max':>8} {'on best':>8} {'recovery':>9} {'÷ thompson':>11}")
for name, rs in by.items():
    reg = [float(r["regret"]) for r in rs]
    best = mean([float(r["on_best"]) for r in rs])
    rec = [float(r["recovery"]) for r in rs if r["recovery"] != "-"]
    rec = f"{100 * mean(rec):.1f}%" if rec else "-"
    print(f"{name:<10} {mean(reg):>14.1f} {min(reg):>8.1f} {max(reg):>8.1f} {best:>8.3f} {rec:>9} {mean(reg) / ref:>11.2f}")
sim = json.load(open(sys.argv[2]))
key = {"conversion": "conversion 5.0/5.5/6.0%", "delayed": "conversion, feedback delayed",
       "profit": "profit: revenue 1.30", "orders": "profit, heavy-tailed",
       "drift": "the starved 5% arm"}[sys.argv[3]]
scale = float(sys.argv[4])
for w in sim["worlds"]:
    if w["name"].startswith(key) or key in w["name"]:
        res = {r["strategy"]: r for r in w["results"]}
        ours, th = w["results"][0], res["thompson-per-request"]
        print(f"simulator, same world and decisions, 10 seeds: defaults {ours['regret'] / scale:.1f}, "
              f"reference {th['regret'] / scale:.1f} ({ours['regret'] / th['regret']:.2f}×)"
              + (f", recovery {100 * ours['share_after_switch']:.1f}%" if ours.get("share_after_switch") is not None else ""))
        break
PY
