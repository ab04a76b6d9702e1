# Sourced by the benchmark scripts (after they cd to the repository root): strict mode,
# the `dist` binary (fat LTO: the fastest), a work folder removed on exit with every process started into
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

# SKIP_BUILD=1: the caller brings its own binaries (bench/proxy-ab.sh). The benchmarked
# binary is the release one: `dist` with tract (deploy/Dockerfile builds the same).
[ "${SKIP_BUILD:-0}" = 1 ] || cargo build --profile dist --features tract --quiet
BIN=${BIN:-$PWD/target/dist/switchyard}
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

# wait_port PORT: until something listens on 127.0.0.1:PORT (10 s at most).
wait_port() {
  for _ in $(seq 1 200); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.05
  done
  echo "nothing listens on $1" >&2
  return 1
}

# start_origin LISTEN...: an nginx on CPU 0 that answers every request with PREDICTION on
# each LISTEN ("127.0.0.1:PORT", or "127.0.0.1:PORT http2" for h2c); sets ORIGIN_PID.
start_origin() {
  local l
  mkdir -p "$WORK/origin"
  {
    cat <<CONF
worker_processes 1;
pid $WORK/origin/nginx.pid;
error_log $WORK/logs/origin.err warn;
events { worker_connections 20000; }
http {
  access_log off;
  keepalive_requests 1000000;
  client_body_temp_path $WORK/origin;
CONF
    for l in "$@"; do
      echo "  server { listen $l; location / { default_type application/json; return 200 '$PREDICTION'; } }"
    done
    echo "}"
  } > "$WORK/origin/nginx.conf"
  taskset -c 0 nginx -p "$WORK/origin" -c "$WORK/origin/nginx.conf" -g 'daemon off; user root;' &
  PIDS+=($!); ORIGIN_PID=$!
}

# split_config PORT ADMIN_PORT O1 O2 O3 [EXTRA]: writes $WORK/switchyard.yaml, the
# benches' Switchyard: one worker thread, model `mnist` split 97/2/1 over the origin
# ports O1, O2 and O3 (as the peers are given the same split); EXTRA, top-level lines
# ending in a newline, is added before `models:`.
split_config() {
  cat > "$WORK/switchyard.yaml" <<CONF
listen: 127.0.0.1:$1
admin_listen: 127.0.0.1:$2
worker_threads: 1
${6:-}models:
  mnist:
    variants:
      - {name: a, upstream: "http://127.0.0.1:$3", weight: 97}
      - {name: b, upstream: "http://127.0.0.1:$4", weight: 2}
      - {name: c, upstream: "http://127.0.0.1:$5", weight: 1}
CONF
}

# haproxy_split_config PORT O1 O2 O3 [MAXCONN] [CLIENT_TIMEOUT]: HAProxy as a proxy on
# 127.0.0.1:PORT, one thread, the 97/2/1 split over the three origin ports with server
# connections reused (`http-reuse always`), written to $WORK/haproxy.cfg; clients idle
# up to CLIENT_TIMEOUT (default 30s) are kept, at most MAXCONN (default 8000).
haproxy_split_config() {
  cat > "$WORK/haproxy.cfg" <<CONF
global
  nbthread 1
  maxconn ${5:-8000}
defaults
  mode http
  timeout connect 1s
  timeout client ${6:-30s}
  timeout server 30s
  timeout http-keep-alive ${6:-30s}
  http-reuse always
frontend fe
  bind 127.0.0.1:$1
  default_backend variants
backend variants
  balance random
  server a 127.0.0.1:$2 weight 97
  server b 127.0.0.1:$3 weight 2
  server c 127.0.0.1:$4 weight 1
CONF
}

# nginx_split_config PORT O1 O2 O3: nginx as a proxy on 127.0.0.1:PORT, one worker, the
# 97/2/1 split over the three origin ports with pooled keep-alive upstream connections,
# written to $WORK/nginx/nginx.conf.
nginx_split_config() {
  local port=$1 o1=$2 o2=$3 o3=$4
  mkdir -p "$WORK/nginx"
  cat > "$WORK/nginx/nginx.conf" <<CONF
master_process off;
daemon off;
worker_processes 1;
pid $WORK/nginx/nginx.pid;
error_log $WORK/logs/nginx.err warn;
events { worker_connections 1024; }
http {
  access_log off; keepalive_requests 1000000;
  client_body_temp_path $WORK/nginx; proxy_temp_path $WORK/nginx;
  upstream variants {
    server 127.0.0.1:$o1 weight=97; server 127.0.0.1:$o2 weight=2; server 127.0.0.1:$o3 weight=1;
    keepalive 64;
  }
  server { listen 127.0.0.1:$port;
    location / { proxy_pass http://variants; proxy_http_version 1.1; proxy_set_header Connection ""; } }
}
CONF
}
