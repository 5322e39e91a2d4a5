#!/usr/bin/env bash
# User-space instructions per proxied request, one sidecar hop, under callgrind:
# a count that other work on the machine does not skew (wall-clock benches are).
# weft-proxy (release build) runs under valgrind in front of three backends;
# weft-load sends closed-loop requests on 4 connections; counters are zeroed
# after a 3 s warm-up and dumped after SECONDS.
#
# Usage: benches/callgrind.sh [SECONDS=15] [OUT=benches/results/callgrind.out]
# Then: callgrind_annotate --inclusive=yes OUT.1 | less
# NOBUILD=1 profiles the release binaries already built.
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-15}
OUT=${2:-benches/results/callgrind.out}
command -v valgrind >/dev/null || { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind >/dev/null; }
[ -n "${NOBUILD:-}" ] || cargo build --release --locked -q -p weft-proxy -p weft-benches
bin=${CARGO_TARGET_DIR:-target}/release
w=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$w"; }
trap cleanup EXIT
for i in 1 2 3; do "$bin/weft-bench-backend" > "$w/b$i" & pids+=($!); done
for i in 1 2 3; do for _ in $(seq 100); do [ -s "$w/b$i" ] && break; sleep 0.05; done; done
cat > "$w/bench.toml" <<T
service = "bench"
[outbound]
load_balancer = "round-robin"
T
cat > "$w/weft.toml" <<T
[listen]
outbound = "127.0.0.1:0"
inbound = "127.0.0.1:0"
admin = "127.0.0.1:0"
[[directory.services]]
name = "bench"
policy = "bench.toml"
endpoints = [ { address = "$(cat "$w/b1")" }, { address = "$(cat "$w/b2")" }, { address = "$(cat "$w/b3")" } ]
T
rm -f "$OUT" "$OUT".*
WEFT_LOG=warn valgrind --tool=callgrind --callgrind-out-file="$OUT" --dump-instr=no \
  "$bin/weft-proxy" run --config "$w/weft.toml" --bound-file "$w/bound.json" 2> "$w/valgrind.log" &
pids+=($!)
for _ in $(seq 600); do [ -s "$w/bound.json" ] && break; sleep 0.1; done
out=$(python3 -c "import json; print(json.load(open('$w/bound.json'))['outbound'])")
"$bin/weft-load" --target "$out" --connections 4 --duration 3 --warmup 0 --label warm-up > /dev/null
callgrind_control -z > /dev/null 2>&1
n=$("$bin/weft-load" --target "$out" --connections 4 --duration "$SECS" --warmup 0 --label prof | tail -1 |
  python3 -c "import json,sys; print(json.load(sys.stdin)['finished_all'])")
callgrind_control -d > /dev/null 2>&1
sleep 1
ir=$(grep '^summary:' "$OUT".1 | awk '{print $2}')
echo "$n requests, $ir instructions: $((ir / n)) user-space instructions per request (profile: $OUT.1)"
