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
case "$PROXY" in weft | haproxy) ;; *) echo "unknown proxy $PROXY (weft or haproxy)" >&2; exit 2 ;; esac
source benches/lib.sh
[ "$PROXY" != haproxy ] || need_haproxy
bench_init

start_backends
read -r pid addr < <("start_$PROXY")
pids+=("$pid")

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
