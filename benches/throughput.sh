#!/usr/bin/env bash
# Closed-loop throughput and latency: direct to a backend vs through one weft-proxy
# hop, measured in alternating rounds (A B A B ...) so machine drift hits both alike.
# The proxy is pinned to CPU 0, the backend and load generator to CPU 1.
#
# Usage: benches/throughput.sh [ROUNDS] [SECONDS] [CONNECTIONS]
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
SECS=${2:-5}
CONNS=${3:-16}
cargo build --release --locked -q -p weft-proxy -p weft-benches
bin=target/release
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

pin() { if command -v taskset >/dev/null; then exec taskset -c "$1" "${@:2}"; else exec "${@:2}"; fi; }

pin 1 "$bin/weft-bench-backend" > "$work/backend.addr" &
pids+=($!)
for _ in $(seq 100); do [ -s "$work/backend.addr" ] && break; sleep 0.05; done
backend=$(cat "$work/backend.addr")

cat > "$work/weft.toml" <<TOML
[listen]
outbound = "127.0.0.1:0"
inbound = "127.0.0.1:0"
admin = "127.0.0.1:0"
[[directory.services]]
name = "bench"
endpoints = [ { address = "$backend" } ]
TOML
WEFT_LOG=warn pin 0 "$bin/weft-proxy" run --config "$work/weft.toml" --bound-file "$work/bound.json" &
pids+=($!)
for _ in $(seq 100); do [ -s "$work/bound.json" ] && break; sleep 0.05; done
outbound=$(python3 -c "import json,sys; print(json.load(open('$work/bound.json'))['outbound'])")

echo "backend $backend, proxy outbound $outbound, $ROUNDS rounds x ${SECS}s, $CONNS connections"
for r in $(seq "$ROUNDS"); do
  pin 1 "$bin/weft-load" --target "$backend" --connections "$CONNS" --duration "$SECS" --label "direct" | tail -1 >> "$work/results.jsonl"
  pin 1 "$bin/weft-load" --target "$outbound" --host bench --connections "$CONNS" --duration "$SECS" --label "weft" | tail -1 >> "$work/results.jsonl"
done
python3 - "$work/results.jsonl" <<'PY'
import json, sys, statistics
rows = [json.loads(l) for l in open(sys.argv[1])]
by = {}
for r in rows: by.setdefault(r["label"], []).append(r)
print("| path | req/s median (min-max) | p50 ms | p99 ms | p99.9 ms | errors |")
print("|---|---|---|---|---|---|")
med = {}
for label, rs in by.items():
    rps = [r["rps"] for r in rs]
    med[label] = statistics.median(rps)
    m = lambda k: statistics.median(r[k] for r in rs)
    print(f"| {label} | {med[label]:.0f} ({min(rps):.0f}-{max(rps):.0f}) | {m('p50_ms'):.3f} | {m('p99_ms'):.3f} | {m('p999_ms'):.3f} | {sum(r['errors'] for r in rs)} |")
if "direct" in med and "weft" in med:
    print(f"\nweft / direct throughput: {med['weft']/med['direct']:.2f}")
PY
