#!/usr/bin/env bash
# Cold-start bench: time from exec to the first proxied response of a Weft
# sidecar (static directory; live control plane; snapshot cache with the
# control plane down), HAProxy and nginx, each started the same way.
#
# Usage: benches/cold-start.sh [ROUNDS=20]
#   CASES=weft-static,haproxy benches/cold-start.sh 10    only some cases
#
# Installs nginx and HAProxy from Debian when missing (as root), builds the
# release binaries, and writes benches/results/cold-start.{json,md}.
# See benches/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-20}

need=()
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || need+=(haproxy)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing ${need[*]} from Debian" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
export PATH="$PATH:/usr/sbin"

cargo build --release --locked -q -p weft-proxy -p weft-benches -p weft-control-plane
bin=${CARGO_TARGET_DIR:-target}/release
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg) (other work on the machine skews the figures)" >&2
exec python3 benches/harness.py --bin "$bin" --out benches/results cold-start \
  --rounds "$ROUNDS" --cases "${CASES:-}"
