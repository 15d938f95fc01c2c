#!/usr/bin/env bash
# Overload benchmark: straight to the upstream simulator, through sluicegate and
# through HAProxy, open loop at 0.5x..4x capacity. Installs Debian's haproxy.
#   bash benches/overload.sh              # 15 s per step, about 3 minutes
#   STEP_SECONDS=5 bash benches/overload.sh
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v haproxy >/dev/null && [ ! -x /usr/sbin/haproxy ]; then
  echo "installing haproxy (Debian package)" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy >/dev/null
fi
cargo build --release --quiet
cargo bench --quiet --bench overload
