#!/usr/bin/env bash
# Control-plane propagation: one weft-control-plane on a real single-node etcd,
# N simulated sidecars (weft-cp-bench, one process) subscribed to a few services
# each while instances churn in etcd at a fixed rate. For each N it reports the
# propagation latency from the etcd write to each subscriber, the control
# plane's CPU and RSS, and the watches etcd holds.
# The control plane is pinned to CPU 0; etcd and the bench process to CPU 1.
#
# CASE=leases: instead, N instances registered through the control plane (one
# Register stream each, held open; lease TTL 10 s) and, over SECONDS, what
# keeping them alive costs: etcd LeaseKeepAlive streams set up per second and
# open, keep-alive requests per second, every gRPC message etcd received per
# second, the CPU of the control plane and of etcd.
#
# CASE=storm: N simulated sidecars, each on its own connection and reconnecting
# as weft-proxy does (jittered backoff), lose the control plane at once (it is
# killed with SIGKILL and started again on the same address): the time until
# every sidecar holds a snapshot at etcd's revision again, the new process's
# peak CPU and RSS, etcd's gRPC messages meanwhile, snapshots going backwards.
#
# CASE=big: a directory of SERVICES=10000 services and INSTANCES=100000
# instances with metadata written straight into etcd (each bound to its own
# lease), then the control plane started on it: etcd's database size, the
# time until the replica's view is ready and its RSS then, the first snapshot
# of a sidecar subscribed to 20 services, and propagation to N sidecars (20
# services each) while CHURN instances per second are written.
#
# CASE=replicas: a 3-member etcd cluster and 3 control-plane replicas on it;
# N sidecars (own connection each, a Subscribe and a Register stream, every
# replica's address, failing over as weft-proxy does) spread over them. One
# replica is killed (time until its sidecars hold a current snapshot from
# another; no registration lost), then the etcd leader (writes go on to the
# others: every sidecar ends at etcd's revision; no registration lost).
#
# Usage: benches/control-plane.sh [SIDECARS="1000 5000 10000"] [CHURN/s=20] [SECONDS=10]
#        CASE=leases benches/control-plane.sh [INSTANCES="10000"] [unused] [SECONDS=30]
#        CASE=storm benches/control-plane.sh [SIDECARS="5000 10000 20000"]
#        CASE=big benches/control-plane.sh [SIDECARS="1000"] [CHURN/s=100] [SECONDS=10]
#        CASE=replicas benches/control-plane.sh [SIDECARS="3000"] [WRITES/s=20]
set -euo pipefail
cd "$(dirname "$0")/.."
CASE=${CASE:-propagation}
if [ "$CASE" = leases ]; then
  SIDECARS=${1:-10000}; SECS=${3:-30}
elif [ "$CASE" = storm ]; then
  SIDECARS=${1:-"5000 10000 20000"}; SECS=${3:-10}
elif [ "$CASE" = big ]; then
  SIDECARS=${1:-1000}; SECS=${3:-10}
elif [ "$CASE" = replicas ]; then
  SIDECARS=${1:-3000}; SECS=${3:-10}
else
  SIDECARS=${1:-"1000 5000 10000"}; SECS=${3:-10}
fi
if [ "$CASE" = big ]; then
  CHURN=${2:-100}; SERVICES=${SERVICES:-10000}; PER=${PER_SIDECAR:-20}; INSTANCES=${INSTANCES:-100000}
else
  CHURN=${2:-20}; SERVICES=${SERVICES:-100}; PER=${PER_SIDECAR:-3}
fi
source scripts/setup
[ -n "${NOBUILD:-}" ] || cargo build --release --locked -q -p weft-control-plane -p weft-benches
bin=target/release
work=$(mktemp -d)
pids=()
# Every simulated sidecar of the storm case holds its own connection: as many
# open files as the hard limit allows (the control plane holds one per
# sidecar too; the bench splits its sidecars over processes, see below).
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
echo "open-file limit per process: $(ulimit -n)" >&2
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
pin() { if command -v taskset >/dev/null; then exec taskset -c "$1" "${@:2}"; else exec "${@:2}"; fi; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
etcd_bin=$(command -v etcd || echo /usr/bin/etcd)

# CASE=replicas: 3 etcd members and 3 replicas, each on its own ports and
# data directory under $work (all stopped on exit).
replicas_case() {
  local n=$1 i members="" cluster="" cps="" clients=() peers=()
  for i in 0 1 2; do clients+=("$(free_port)"); peers+=("$(free_port)"); done
  for i in 0 1 2; do
    cluster+="${cluster:+,}m$i=http://127.0.0.1:${peers[$i]}"
    members+="${members:+,}http://127.0.0.1:${clients[$i]}"
  done
  : > "$work/etcd.pids"
  for i in 0 1 2; do
    rm -rf "$work/etcd$i"
    pin 1 "$etcd_bin" --name "m$i" --data-dir "$work/etcd$i" \
      --listen-client-urls "http://127.0.0.1:${clients[$i]}" --advertise-client-urls "http://127.0.0.1:${clients[$i]}" \
      --listen-peer-urls "http://127.0.0.1:${peers[$i]}" --initial-advertise-peer-urls "http://127.0.0.1:${peers[$i]}" \
      --initial-cluster "$cluster" --initial-cluster-state new --initial-cluster-token "bench-$$" \
      --heartbeat-interval=50 --election-timeout=500 > "$work/etcd$i.log" 2>&1 &
    pids+=("$!"); echo "$!" >> "$work/etcd.pids"
  done
  for _ in $(seq 400); do
    python3 -c "import urllib.request,sys; sys.exit(0 if b'true' in urllib.request.urlopen('http://127.0.0.1:${clients[0]}/health', timeout=1).read() else 1)" 2>/dev/null && break
    sleep 0.05
  done
  printf 'bench-token-0123456789abcdef\n' > "$work/tokens"
  : > "$work/cp.pids"
  for i in 0 1 2; do
    rm -f "$work/bound$i.json"
    WEFT_LOG=warn pin 0 "$bin/weft-control-plane" --etcd "$members" \
      --listen 127.0.0.1:0 --admin 127.0.0.1:0 --token-file "$work/tokens" \
      --max-connections $((n + 1000)) --bound-file "$work/bound$i.json" >> "$work/cp$i.log" 2>&1 &
    pids+=("$!"); echo "$!" >> "$work/cp.pids"
  done
  for i in 0 1 2; do
    for _ in $(seq 600); do [ -s "$work/bound$i.json" ] && break; sleep 0.05; done
    [ -s "$work/bound$i.json" ] || { cat "$work/cp$i.log" >&2; exit 1; }
    cps+="${cps:+,}http://$(python3 -c "import json; print(json.load(open('$work/bound$i.json'))['listen'])")"
  done
  pin 1 "$bin/weft-cp-bench" --replicas --control-plane "$cps" --etcd "$members" \
    --cp-pid-file "$work/cp.pids" --etcd-pids-file "$work/etcd.pids" --services "$SERVICES" \
    --sidecars "$n" --per-sidecar "$PER" --churn "$CHURN" > "$work/out" &
  wait $! || { cat "$work/out" >&2; tail -n 5 "$work"/cp*.log "$work"/etcd*.log >&2
    [ -z "${KEEP_LOGS:-}" ] || cp "$work"/cp*.log "$work"/etcd*.log "$KEEP_LOGS"/; exit 1; }
  tee -a "$work/human.txt" < "$work/out"; tail -1 "$work/out" >> "$work/results.jsonl"
  for p in $(cat "$work/cp.pids" "$work/etcd.pids"); do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}

for n in $SIDECARS; do
  if [ "$CASE" = replicas ]; then replicas_case "$n"; continue; fi
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
  printf 'bench-token-0123456789abcdef\n' > "$work/tokens"
  # The storm case restarts the control plane on the same address.
  if [ "$CASE" = storm ]; then listen=127.0.0.1:$(free_port); else listen=127.0.0.1:0; fi
  start_cp() {
    rm -f "$work/bound.json"
    WEFT_LOG=warn pin 0 "$bin/weft-control-plane" --etcd "http://127.0.0.1:$client" \
      --listen "$listen" --admin 127.0.0.1:0 --token-file "$work/tokens" \
      --max-connections $((n + 1000)) --bound-file "$work/bound.json" >> "$work/cp.log" 2>&1 &
    cp_pid=$!; pids+=("$cp_pid"); echo "$cp_pid" > "$work/cp.pid"
  }
  wait_cp() {
    for _ in $(seq 600); do [ -s "$work/bound.json" ] && return; sleep 0.05; done
    cat "$work/cp.log" "$work/etcd.log" >&2; exit 1
  }
  if [ "$CASE" = big ]; then
    # The directory is written first; the control plane starts on it.
    rm -f "$work/ready" "$work/bound.json"
    pin 1 "$bin/weft-cp-bench" --big --etcd "http://127.0.0.1:$client" --etcd-pid "$etcd_pid" \
      --services "$SERVICES" --instances "$INSTANCES" --sidecars "$n" --per-sidecar "$PER" \
      --churn "$CHURN" --duration "$SECS" --ready-file "$work/ready" --bound-file "$work/bound.json" \
      --cp-start-file "$work/cp.start" --cp-pid-file "$work/cp.pid" > "$work/out" &
    bench_pid=$!
    while [ ! -s "$work/ready" ] && kill -0 "$bench_pid" 2>/dev/null; do sleep 0.05; done
    if [ -s "$work/ready" ]; then date +%s.%N > "$work/cp.start"; start_cp; fi
    wait "$bench_pid" || { cat "$work/out" "$work/cp.log" >&2; exit 1; }
    tee -a "$work/human.txt" < "$work/out"; tail -1 "$work/out" >> "$work/results.jsonl"
    kill "$cp_pid" "$etcd_pid"; wait "$cp_pid" "$etcd_pid" 2>/dev/null || true
    continue
  fi
  start_cp; wait_cp
  grpc=$(python3 -c "import json; print(json.load(open('$work/bound.json'))['listen'])")
  case $CASE in
    leases) case_args=(--registrations "$n" --etcd-pid "$etcd_pid") ;;
    storm) rm -f "$work/ready"
      # One simulating process per 10,000 sidecars (their sockets), under
      # the open-file limit.
      case_args=(--storm --sidecars "$n" --shards "${SHARDS:-$(((n + 9999) / 10000))}" --per-sidecar "$PER" \
        --ready-file "$work/ready" --cp-pid-file "$work/cp.pid") ;;
    *) case_args=(--sidecars "$n" --per-sidecar "$PER" --churn "$CHURN") ;;
  esac
  pin 1 "$bin/weft-cp-bench" --control-plane "http://$grpc" --etcd "http://127.0.0.1:$client" \
    --cp-pid "$cp_pid" --services "$SERVICES" --duration "$SECS" "${case_args[@]}" \
    > "$work/out" &
  bench_pid=$!
  if [ "$CASE" = storm ]; then
    while [ ! -s "$work/ready" ] && kill -0 "$bench_pid" 2>/dev/null; do sleep 0.05; done
    if [ -s "$work/ready" ]; then
      # A crash: every sidecar's stream breaks at once; then the same replica again.
      kill -9 "$cp_pid"; wait "$cp_pid" 2>/dev/null || true
      start_cp; wait_cp
    fi
  fi
  wait "$bench_pid" || { cat "$work/out"; exit 1; }
  tee -a "$work/human.txt" < "$work/out"; tail -1 "$work/out" >> "$work/results.jsonl"
  kill "$cp_pid" "$etcd_pid"; wait "$cp_pid" "$etcd_pid" 2>/dev/null || true
done
echo
python3 - "$work/results.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
if rows and rows[0].get("case") == "replicas":
    print("| sidecars (per replica) | replicas' CPU to serve and register each sidecar (ms) | replica killed: its sidecars current on another after | the two left: CPU until then (s) / in the TTL after the kill; cores busy until then (CPU 0: replicas / CPU 1: etcd, bench) | slowest's attempts | registrations after TTL (fewest seen) | etcd leader killed: writes (failed) | every sidecar holds etcd's instances, after the last write | registrations after TTL (fewest seen) | at the end, holding etcd's instances | backwards |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        n = r["sidecars"]
        start_cpu = r.get("start_cpu_seconds")
        start_cpu = f"{start_cpu * 1000 / n:.2f}" if start_cpu is not None else "-"
        kill_cpu = (f"{r['failover_cpu_seconds']:.2f} / {r['after_kill_cpu_seconds']:.2f} ({r['after_kill_seconds']:.0f} s)"
                    if "failover_cpu_seconds" in r else "-")
        busy = r.get("failover_cpu_busy_percent") or []
        if busy:
            kill_cpu += "; cores busy " + " / ".join(f"{b:.0f}%" for b in busy)
        print(f"| {n:,} ({'/'.join(str(x) for x in r['per_replica'])}) | {start_cpu} | {r['failover_seconds']:.2f} s ({r['orphans']} sidecars; half {r.get('failover_p50_seconds', 0):.2f} s, 90% {r.get('failover_p90_seconds', 0):.2f} s; SYNs dropped {r.get('failover_listen_overflows')}) | {kill_cpu} | {r['failover_max_attempts']} | {r['registered_after_replica']} of {n} ({r['registered_fewest_after_replica']}) | {r['writes']} ({r['write_errors']}) | {r['caught_up_seconds']:.2f} s | {r['registered_after_member']} of {n} ({r['registered_fewest_after_member']}) | {r['at_end_revision']} of {n} | {r['backwards']} |")
    print()
    print("JSON:")
    for r in rows: print(json.dumps(r))
    sys.exit(0)
if rows and rows[0].get("case") == "big":
    print("| services / instances | etcd dbSize (in use) MiB | etcd RSS MiB | replica start to view ready s | replica RSS at ready MiB | first snapshot, 20 services | sidecars | churn/s | propagation p50 / p99 / max ms | deliveries | replica CPU % / RSS MiB under churn |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        mib = lambda v: "?" if v is None else f"{v / 1048576:.1f}"
        print(f"| {r['services']:,} / {r['instances']:,} | {mib(r['etcd_db_size_bytes'])} ({mib(r['etcd_db_size_in_use_bytes'])}) | {mib(r['etcd_rss_bytes'])} | {r['view_ready_seconds']:.2f} | {mib(r['cp_rss_bytes_at_ready'])} | {r['snapshot_bytes']:,} bytes, {r['snapshot_instances']} instances | {r['sidecars']:,} | {r['churn_per_second']:.0f} | {r['p50_ms']:.1f} / {r['p99_ms']:.1f} / {r['max_ms']:.1f} | {r['deliveries']} of {r['expected']} | {r['cp_cpu_percent'] or 0:.1f} / {mib(r['cp_rss_bytes'])} |")
    print()
    print("JSON:")
    for r in rows: print(json.dumps(r))
    sys.exit(0)
if rows and rows[0].get("case") == "storm":
    print("| sidecars | all current again after (s) | slowest sidecar's attempts | new CP peak CPU % (100 ms) | new CP peak RSS MiB | new CP CPU s until all current | etcd gRPC messages | snapshots backwards | SYNs dropped (listen queue full) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['sidecars']:,} | {r['all_current_seconds']:.2f} | {r['max_attempts']} | {r['cp_peak_cpu_percent']:.0f} | {r['cp_peak_rss_bytes'] / 1048576:.1f} | {r['cp_cpu_seconds']:.2f} | {r['etcd_messages']:.0f} | {r['backwards']} | {r.get('listen_overflows')} |")
    print()
    print("JSON:")
    for r in rows: print(json.dumps(r))
    sys.exit(0)
if rows and rows[0].get("case") == "leases":
    print("| instances | etcd LeaseKeepAlive streams started/s | open | keep-alive requests/s | etcd gRPC messages/s | CP CPU % | etcd CPU % | CP RSS MiB | instance keys in etcd, start / end |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        f = lambda v: "?" if v is None else f"{v:.1f}"
        rss = None if r["cp_rss_bytes"] is None else r["cp_rss_bytes"] / 1048576
        print(f"| {r['registrations']:,} | {r['keepalive_streams_started_per_second']:.1f} | {r['keepalive_streams_open']:.0f} | {r['keepalive_requests_per_second']:.1f} | {r['etcd_messages_received_per_second']:.1f} | {f(r['cp_cpu_percent'])} | {f(r['etcd_cpu_percent'])} | {f(rss)} | {r['instance_keys_start']:,} / {r['instance_keys']:,} |")
    print()
    print("JSON:")
    for r in rows: print(json.dumps(r))
    sys.exit(0)
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
