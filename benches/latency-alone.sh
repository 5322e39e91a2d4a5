#!/usr/bin/env bash
# Open-loop latency through one proxy alone, without the rest of the
# data-plane bench around it: a check on its tail at a fixed rate.
#
# Usage: benches/latency-alone.sh weft|haproxy [RUNS=3] [RATE=1000] [SECONDS=8]
#   NOBUILD=1   use the release binaries already built
#
# The proxy (a fresh process) on CPU 0, three backends and weft-load on CPU 1;
# RUNS runs at RATE over 64 connections, then a 5 s closed-loop burst, then RUNS
# runs again. Prints p50/p90/p99/p99.9 per run (latency from each request's
# scheduled send time).
set -euo pipefail
cd "$(dirname "$0")/.."
PROXY=${1:?usage: benches/latency-alone.sh weft|haproxy [RUNS] [RATE] [SECONDS]}
RUNS=${2:-3}
RATE=${3:-1000}
SECS=${4:-8}
export PATH="$PATH:/usr/sbin"
if [ "$PROXY" = haproxy ] && ! command -v haproxy >/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends haproxy >/dev/null
fi
[ -n "${NOBUILD:-}" ] || cargo build --release --locked -q -p weft-proxy -p weft-benches
bin=${CARGO_TARGET_DIR:-target}/release
w=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$w"; }
trap cleanup EXIT

for i in 1 2 3; do taskset -c 1 "$bin/weft-bench-backend" > "$w/b$i" & pids+=($!); done
for i in 1 2 3; do for _ in $(seq 100); do [ -s "$w/b$i" ] && break; sleep 0.05; done; done
b1=$(cat "$w/b1") b2=$(cat "$w/b2") b3=$(cat "$w/b3")

case "$PROXY" in
  weft)
    printf 'service = "bench"\n[outbound]\nload_balancer = "round-robin"\n' > "$w/bench.toml"
    cat > "$w/weft.toml" <<T
[listen]
outbound = "127.0.0.1:0"
inbound = "127.0.0.1:0"
admin = "127.0.0.1:0"
[[directory.services]]
name = "bench"
policy = "bench.toml"
endpoints = [ { address = "$b1" }, { address = "$b2" }, { address = "$b3" } ]
T
    WEFT_LOG=warn taskset -c 0 "$bin/weft-proxy" run --config "$w/weft.toml" --bound-file "$w/bound.json" &
    pids+=($!)
    for _ in $(seq 600); do [ -s "$w/bound.json" ] && break; sleep 0.05; done
    addr=$(python3 -c "import json; print(json.load(open('$w/bound.json'))['outbound'])")
    ;;
  haproxy)
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    cat > "$w/haproxy.cfg" <<T
global
  nbthread 1
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
frontend f
  bind 127.0.0.1:$port
  default_backend b
backend b
  balance roundrobin
  server s1 $b1
  server s2 $b2
  server s3 $b3
T
    taskset -c 0 haproxy -f "$w/haproxy.cfg" -db &
    pids+=($!)
    for _ in $(seq 100); do python3 -c "import socket; socket.create_connection(('127.0.0.1',$port),1)" 2>/dev/null && break; sleep 0.05; done
    addr=127.0.0.1:$port
    ;;
  *) echo "unknown proxy $PROXY (weft or haproxy)" >&2; exit 2 ;;
esac

run() {
  taskset -c 1 "$bin/weft-load" --target "$addr" --connections 64 --rate "$RATE" --duration "$SECS" --warmup 1 --label "$1" |
    tail -1 | python3 -c "
import json, sys
d = json.load(sys.stdin)
print(f\"$PROXY $1: p50 {d['p50_ms']:.3f} p90 {d['p90_ms']:.3f} p99 {d['p99_ms']:.3f} p99.9 {d['p999_ms']:.3f} ms, errors {d.get('errors', 0)}\")"
}
for i in $(seq "$RUNS"); do run "fresh-$i"; done
taskset -c 1 "$bin/weft-load" --target "$addr" --connections 32 --duration 5 --warmup 0 --label burst > /dev/null
for i in $(seq "$RUNS"); do run "after-burst-$i"; done
