# Shared by benches/callgrind.sh, cpu-split.sh and latency-alone.sh (sourced,
# not run): three backends on CPU 1 and one proxy in front of them on CPU 0.
# Call bench_init first.

# Builds the release binaries (unless NOBUILD=1); sets bin, w (a scratch
# directory) and pids, whose processes are killed on exit.
bench_init() {
  [ -n "${NOBUILD:-}" ] || cargo build --release --locked -q -p weft-proxy -p weft-benches
  bin=${CARGO_TARGET_DIR:-target}/release
  w=$(mktemp -d)
  pids=()
  trap bench_cleanup EXIT
}

bench_cleanup() {
  local p
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$w"
}

# Starts weft-bench-backend x3 on CPU 1; sets b1 b2 b3 to their addresses.
start_backends() {
  local i
  for i in 1 2 3; do taskset -c 1 "$bin/weft-bench-backend" > "$w/b$i" & pids+=($!); done
  for i in 1 2 3; do for _ in $(seq 100); do [ -s "$w/b$i" ] && break; sleep 0.05; done; done
  b1=$(cat "$w/b1") b2=$(cat "$w/b2") b3=$(cat "$w/b3")
}

# Writes $w/weft.toml (and the policy it names): service `bench` with the
# three backends, round robin, everything else default.
write_weft_config() {
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
}

# Prints "PID ADDRESS" of a new weft-proxy on CPU 0 with write_weft_config's file.
start_weft() {
  write_weft_config
  rm -f "$w/bound.json"
  WEFT_LOG=warn taskset -c 0 "$bin/weft-proxy" run --config "$w/weft.toml" --bound-file "$w/bound.json" &
  local pid=$!
  for _ in $(seq 600); do [ -s "$w/bound.json" ] && break; sleep 0.05; done
  echo "$pid $(python3 -c "import json; print(json.load(open('$w/bound.json'))['outbound'])")"
}

# Prints "PID ADDRESS" of a new HAProxy (nbthread 1) on CPU 0: round robin over
# the three backends, keep-alive both sides, no logging.
start_haproxy() {
  local port pid
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
  pid=$!
  for _ in $(seq 100); do python3 -c "import socket; socket.create_connection(('127.0.0.1',$port),1)" 2>/dev/null && break; sleep 0.05; done
  echo "$pid 127.0.0.1:$port"
}

# Installs HAProxy from Debian when missing.
need_haproxy() {
  export PATH="$PATH:/usr/sbin"
  command -v haproxy >/dev/null && return
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends haproxy >/dev/null
}
