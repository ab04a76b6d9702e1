#!/usr/bin/env bash
# Fleet mode's memory (#18): at 10,000 predictions a second with a 10-minute
# feedback_ttl, 6,000,000 decisions are waiting for feedback at any time.
#   1. This replica's decision log holding them (router/examples/decision_log_memory.rs):
#      resident memory, time per record, per lookup, and a full expiry sweep.
#   2. Redis: in fleet mode decisions travel in the request ids, so Redis holds only
#      the claims of feedback taken (SET NX PX, kept TTL + 2 min). Bytes per claim,
#      measured by writing N of them into a fresh redis-server (INFO memory, before and
#      after).
#   3. What a prediction pays in fleet mode (sealing its decision: an HMAC and hex) and a
#      feedback (opening one): fleet/examples/seal.rs.
# Fleet mode's cost on the request path is in bench/bandit.sh (part 2).
# Env: DECISIONS (6000000), CLAIMS (1000000). Needs: redis-server, redis-cli. Loopback only.
cd "$(dirname "$0")/.."
SKIP_BUILD=1 source bench/common.sh
need redis-server redis-cli
DECISIONS=${DECISIONS:-6000000}
CLAIMS=${CLAIMS:-1000000}

echo "## The decision log, $DECISIONS decisions (10,000/s × 10 min)"
cargo run --quiet --release -p switchyard-router --example decision_log_memory "$DECISIONS"

echo
echo "## Sealing a decision into its request id, and opening one (no Redis)"
cargo run --quiet --release -p switchyard-fleet --example seal

echo
echo "## Redis, $CLAIMS feedback claims"
redis-server --port 19398 --bind 127.0.0.1 --save "" --appendonly no > "$WORK/logs/redis.log" 2>&1 &
PIDS+=($!)
wait_port 19398
used() { redis-cli -p 19398 info memory | awk -F: '/^used_memory:/ {print $2+0}'; }
before=$(used)
python3 - "$CLAIMS" > "$WORK/claims.resp" <<'PY'
import os, sys
out = sys.stdout.buffer
for i in range(int(sys.argv[1])):
    key = b"switchyard:claim:" + os.urandom(16).hex().encode()
    args = [b"SET", key, b"1", b"NX", b"PX", b"720000"]
    out.write(b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args))
PY
redis-cli -p 19398 --pipe < "$WORK/claims.resp" | tail -1
after=$(used)
awk -v b="$before" -v a="$after" -v n="$CLAIMS" 'BEGIN {
  per = (a - b) / n
  printf "Redis used_memory: %.1f MB for %d claims: %.0f bytes per claim\n", (a - b) / 1e6, n, per
  printf "at 10,000 predictions/s, feedback for every one, claims kept 12 min: %.0f MB; decisions in Redis: none\n", per * 7.2e6 / 1e6 }'
