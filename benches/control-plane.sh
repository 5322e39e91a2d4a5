#!/usr/bin/env bash
# Control-plane propagation: one weft-control-plane on a real single-node etcd,
# N simulated sidecars (weft-cp-bench, one process) subscribed to a few services
# each while instances churn in etcd at a fixed rate. For each N it reports the
# propagation latency from the etcd write to each subscriber, the control
# plane's CPU and RSS, and the watches etcd holds.
# The control plane is pinned to CPU 0; etcd and the bench process to CPU 1.
#
# Usage: benches/control-plane.sh [SIDECARS="1000 5000 10000"] [CHURN/s=20] [SECONDS=10]
set -euo pipefail
cd "$(dirname "$0")/.."
SIDECARS=${1:-"1000 5000 10000"}
CHURN=${2:-20}
SECS=${3:-10}
SERVICES=${SERVICES:-100}
PER=${PER_SIDECAR:-3}
source scripts/setup
cargo build --release --locked -q -p weft-control-plane -p weft-benches
bin=target/release
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
pin() { if command -v taskset >/dev/null; then exec taskset -c "$1" "${@:2}"; else exec "${@:2}"; fi; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
etcd_bin=$(command -v etcd || echo /usr/bin/etcd)

for n in $SIDECARS; do
  client=$(free_port); peer=$(free_port)
  rm -rf "$work/etcd"
  pin 1 "$etcd_bin" --name n0 --data-dir "$work/etcd" \
    --listen-client-urls "http://127.0.0.1:$client" --advertise-client-urls "http://127.0.0.1:$client" \
    --listen-peer-urls "http://127.0.0.1:$peer" --initial-advertise-peer-urls "http://127.0.0.1:$peer" \
    --initial-cluster "n0=http://127.0.0.1:$peer" --initial-cluster-state new \
    --heartbeat-interval=10 --election-timeout=100 > "$work/etcd.log" 2>&1 &
  etcd_pid=$!; pids+=("$etcd_pid")
  for _ in $(seq 200); do
    python3 -c "import socket; socket.create_connection(('127.0.0.1', $client), 0.2)" 2>/dev/null && break
    sleep 0.05
  done
  rm -f "$work/bound.json"
  printf 'bench-token-0123456789abcdef\n' > "$work/tokens"
  WEFT_LOG=warn pin 0 "$bin/weft-control-plane" --etcd "http://127.0.0.1:$client" \
    --listen 127.0.0.1:0 --admin 127.0.0.1:0 --token-file "$work/tokens" \
    --bound-file "$work/bound.json" > "$work/cp.log" 2>&1 &
  cp_pid=$!; pids+=("$cp_pid")
  for _ in $(seq 200); do [ -s "$work/bound.json" ] && break; sleep 0.05; done
  [ -s "$work/bound.json" ] || { cat "$work/cp.log" "$work/etcd.log" >&2; exit 1; }
  grpc=$(python3 -c "import json; print(json.load(open('$work/bound.json'))['listen'])")
  ulimit -n 65536 2>/dev/null || true
  pin 1 "$bin/weft-cp-bench" --control-plane "http://$grpc" --etcd "http://127.0.0.1:$client" \
    --cp-pid "$cp_pid" --sidecars "$n" --services "$SERVICES" --per-sidecar "$PER" \
    --churn "$CHURN" --duration "$SECS" | tee -a "$work/human.txt" | tail -1 >> "$work/results.jsonl"
  kill "$cp_pid" "$etcd_pid"; wait "$cp_pid" "$etcd_pid" 2>/dev/null || true
done
echo
python3 - "$work/results.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print("| sidecars | propagation p50 / p90 / p99 / max ms | deliveries | CP CPU % (per 1,000 sidecars) | CP RSS MiB (per 1,000 sidecars) | etcd watchers |")
print("|---|---|---|---|---|---|")
for r in rows:
    k = r["sidecars"] / 1000
    cpu = 100 * r["cp_cpu_seconds"] / r["cp_window_seconds"] if r["cp_cpu_seconds"] is not None else float("nan")
    rss = r["cp_rss_bytes"] / 1048576 if r["cp_rss_bytes"] is not None else float("nan")
    print(f"| {r['sidecars']:,} | {r['p50_ms']:.1f} / {r['p90_ms']:.1f} / {r['p99_ms']:.1f} / {r['max_ms']:.1f} | {r['deliveries']} of {r['expected']} | {cpu:.1f} ({cpu/k:.2f}) | {rss:.1f} ({rss/k:.2f}) | {r['etcd_watchers']:.0f} |")
print()
print("JSON:")
for r in rows: print(json.dumps(r))
PY
