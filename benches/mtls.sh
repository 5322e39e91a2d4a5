#!/usr/bin/env bash
# The cost of mTLS on the mesh path: weft-load -> caller sidecar -> callee sidecar
# -> backend, with plaintext between the sidecars ("plain": HTTP/1.1, the app's
# protocol) vs mTLS ("mtls": TLS 1.3, one multiplexed HTTP/2 connection), in
# alternating rounds (A B A B ...) so machine drift hits both alike.
# Both sidecars of a path are pinned to CPU 0; the backend and the load generator
# to CPU 1. Certificates come from `weftctl certs` (development CA).
#
# Per path and round: a closed-loop run on 1 connection (latency without queueing)
# and one on CONNECTIONS (throughput, latency under load, and the CPU time both
# sidecars spent per request: process_cpu_seconds_total of the two, divided by the
# requests the callee's sidecar counted over the same window).
#
# Usage: benches/mtls.sh [ROUNDS] [SECONDS] [CONNECTIONS]
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
SECS=${2:-5}
CONNS=${3:-16}
cargo build --release --locked -q -p weft-proxy -p weft-benches -p weft-control-plane
bin=${CARGO_TARGET_DIR:-target}/release
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

pin() { if command -v taskset >/dev/null; then exec taskset -c "$1" "${@:2}"; else exec "${@:2}"; fi; }
field() { python3 -c "import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])" "$1" "$2"; }

# Starts the sidecar $1 (config $work/$1.toml) on CPU 0 and waits for its bound file.
start_proxy() {
  WEFT_LOG=warn pin 0 "$bin/weft-proxy" run --config "$work/$1.toml" --bound-file "$work/$1.json" 2>"$work/$1.log" &
  pids+=($!)
  for _ in $(seq 200); do [ -s "$work/$1.json" ] && return; sleep 0.05; done
  echo "$1 did not start:"; cat "$work/$1.log"; exit 1
}

"$bin/weftctl" certs ca --out "$work/certs" >/dev/null
for id in bench load; do "$bin/weftctl" certs issue "$id" --ca "$work/certs" --out "$work/certs" >/dev/null; done

pin 1 "$bin/weft-bench-backend" > "$work/backend.addr" &
pids+=($!)
for _ in $(seq 100); do [ -s "$work/backend.addr" ] && break; sleep 0.05; done
backend=$(cat "$work/backend.addr")

listen='[listen]
outbound = "127.0.0.1:0"
inbound = "127.0.0.1:0"
admin = "127.0.0.1:0"'
for path in plain mtls; do
  tls_callee=""; tls_caller=""; mode=""
  if [ "$path" = mtls ]; then
    tls_callee=$'[tls]\nca = "certs/ca.pem"\ncert = "certs/bench.pem"\nkey = "certs/bench-key.pem"'
    tls_caller=$'[tls]\nca = "certs/ca.pem"\ncert = "certs/load.pem"\nkey = "certs/load-key.pem"'
    mode='tls = "mesh"'
  fi
  cat > "$work/$path-callee.toml" <<TOML
[service]
name = "bench"
app = "$backend"
$listen
$tls_callee
TOML
  start_proxy "$path-callee"
  cat > "$work/$path-caller.toml" <<TOML
$listen
$tls_caller
[[directory.services]]
name = "bench"
$mode
endpoints = [ { address = "$(field "$work/$path-callee.json" inbound)" } ]
TOML
  start_proxy "$path-caller"
done

# CPU seconds of both sidecars of a path, and the requests its callee counted.
snapshot() {
  python3 - "$(field "$work/$1-caller.json" admin)" "$(field "$work/$1-callee.json" admin)" <<'PY'
import sys, urllib.request
cpu = requests = 0.0
for i, admin in enumerate(sys.argv[1:]):
    text = urllib.request.urlopen(f"http://{admin}/metrics").read().decode()
    for line in text.splitlines():
        if line.startswith("process_cpu_seconds_total "):
            cpu += float(line.split()[-1])
        if i == 1 and line.startswith("weft_requests_total{") and 'direction="inbound"' in line:
            requests += float(line.split()[-1])
print(cpu, requests)
PY
}

echo "backend $backend; $ROUNDS rounds x ${SECS}s; 1 and $CONNS connections; sidecars on CPU 0"
for r in $(seq "$ROUNDS"); do
  for path in plain mtls; do
    target=$(field "$work/$path-caller.json" outbound)
    pin 1 "$bin/weft-load" --target "$target" --host bench --connections 1 --duration "$SECS" --label "$path-c1" | tail -1 >> "$work/results.jsonl"
    read -r cpu0 req0 < <(snapshot "$path")
    line=$(pin 1 "$bin/weft-load" --target "$target" --host bench --connections "$CONNS" --duration "$SECS" --label "$path-c$CONNS" | tail -1)
    read -r cpu1 req1 < <(snapshot "$path")
    python3 -c "import json,sys; d=json.loads(sys.argv[1]); d['cpu_us_per_req']=(float(sys.argv[3])-float(sys.argv[2]))/max(1.0,float(sys.argv[5])-float(sys.argv[4]))*1e6; print(json.dumps(d))" \
      "$line" "$cpu0" "$cpu1" "$req0" "$req1" >> "$work/results.jsonl"
  done
done
python3 - "$work/results.jsonl" "$CONNS" <<'PY'
import json, sys, statistics
rows = [json.loads(l) for l in open(sys.argv[1])]
conns = sys.argv[2]
by = {}
for r in rows: by.setdefault(r["label"], []).append(r)
med = lambda label, k: statistics.median(r[k] for r in by[label])
print(f"| path | c=1 p50 ms | c=1 p99 ms | c={conns} req/s | c={conns} p50 ms | c={conns} p99 ms | sidecar CPU µs/req (both) | errors |")
print("|---|---|---|---|---|---|---|---|")
for path in ["plain", "mtls"]:
    one, many = f"{path}-c1", f"{path}-c{conns}"
    errors = sum(r["errors"] for r in by[one] + by[many])
    print(f"| {path} | {med(one,'p50_ms'):.3f} | {med(one,'p99_ms'):.3f} | {med(many,'rps'):.0f} | "
          f"{med(many,'p50_ms'):.3f} | {med(many,'p99_ms'):.3f} | {med(many,'cpu_us_per_req'):.1f} | {errors} |")
p, m = "plain-c" + conns, "mtls-c" + conns
print(f"\nmtls / plain: c=1 p50 {med('mtls-c1','p50_ms')/med('plain-c1','p50_ms'):.2f}, "
      f"throughput {med(m,'rps')/med(p,'rps'):.2f}, CPU per request {med(m,'cpu_us_per_req')/med(p,'cpu_us_per_req'):.2f}")
PY
