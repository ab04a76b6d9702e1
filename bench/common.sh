# Sourced by the benchmark scripts (after they cd to the repository root): strict mode,
# the release binary, a work folder removed on exit with every process started into
# PIDS, the prediction request and answer they all use, and the tools check.
set -euo pipefail
ulimit -n 65536 2>/dev/null || true
OHA=${OHA:-$(command -v oha || echo /tmp/oha/bin/oha)}

# need TOOL...: stops with the install line when one is missing.
need() {
  local tool
  for tool in "$@"; do
    command -v "$tool" >/dev/null || {
      echo "missing $tool: apt-get install nginx-light haproxy wrk; cargo install --locked oha" >&2
      exit 1
    }
  done
}

cargo build --release --quiet
BIN=$PWD/target/release/switchyard
OUT=$PWD/bench/out
WORK=$(mktemp -d /tmp/switchyard-bench.XXXXXX)
mkdir -p "$OUT" "$WORK/logs"
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

# A 10-class TF Serving answer, and a request with the first digit of the test set.
PREDICTION='{"predictions": [[0.01, 0.02, 0.9, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01]]}'
BODY='{"instances": [[0,0,5,13,9,1,0,0,0,0,13,15,10,15,5,0,0,3,15,2,0,11,8,0,0,4,12,0,0,8,8,0,0,5,8,0,0,9,8,0,0,4,11,0,1,12,7,0,0,2,14,5,10,12,0,0,0,0,6,13,10,0,0,0]]}'
echo "$BODY" > "$WORK/body.json"
cat > "$WORK/post.lua" <<LUA
wrk.method = "POST"
wrk.body = '$BODY'
wrk.headers["Content-Type"] = "application/json"
LUA
