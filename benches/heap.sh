#!/usr/bin/env bash
# Where a sidecar's heap goes under load: one Weft hop (the data-plane bench's
# setup, three backends, round robin) runs under valgrind's massif while
# weft-load holds CONNECTIONS keep-alive connections busy; the heap at its
# peak is grouped by allocation site (the innermost frame of hyper, h2,
# rustls, Tokio or Weft) and divided by the connection count.
#
# Usage: benches/heap.sh [CONNECTIONS=256] [SECONDS=8]
#   NOBUILD=1   use the release binaries already built
# Under valgrind the proxy runs some 50x slower, so the figure is the memory
# that CONNECTIONS open connections with a request in flight hold, not a
# throughput; the RSS at full speed is in benches/data-plane.sh's report.
set -euo pipefail
cd "$(dirname "$0")/.."
CONNS=${1:-256}
SECS=${2:-8}
command -v valgrind >/dev/null || { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind >/dev/null; }
source benches/lib.sh
bench_init
start_backends
write_weft_config
WEFT_LOG=warn valgrind --tool=massif --massif-out-file="$w/massif.out" --depth=40 --threshold=0.2 \
  "$bin/weft-proxy" run --config "$w/weft.toml" --bound-file "$w/bound.json" 2> "$w/valgrind.log" &
proxy=$!
pids+=("$proxy")
for _ in $(seq 600); do [ -s "$w/bound.json" ] && break; sleep 0.1; done
[ -s "$w/bound.json" ] || { echo "weft-proxy did not start:" >&2; cat "$w/valgrind.log" >&2; exit 1; }
addr=$(python3 -c "import json; print(json.load(open('$w/bound.json'))['outbound'])")
taskset -c 1 "$bin/weft-load" --target "$addr" --host bench --connections "$CONNS" --duration "$SECS" --warmup 2 \
  --label heap | tail -1 > "$w/load.json"
kill -INT "$proxy"
wait "$proxy" 2>/dev/null || true
python3 benches/heap.py "$w/massif.out" "$CONNS" "$w/load.json"
