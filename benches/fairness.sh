#!/usr/bin/env bash
# Noisy-neighbour benchmark: tenant A at 3200 req/s next to tenant B at
# 160 req/s, through sluicegate with tenant_key, through its one FIFO, and
# through HAProxy. Installs Debian's haproxy.
#   bash benches/fairness.sh                  # 20 s per target, about 1.5 minutes
#   RUN_SECONDS=10 bash benches/fairness.sh
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=benches/lib.sh
source benches/lib.sh
ensure_packages haproxy:haproxy
cargo build --release --quiet
cargo bench --quiet --bench fairness
