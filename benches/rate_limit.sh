#!/usr/bin/env bash
# Rate-limit benchmarks: the layer's per-request cost with 1, 10 000 and
# 1 000 000 distinct keys (criterion), then the proxy's RSS after a million
# distinct clients, capped and uncapped (only 127.0.0.1; a few minutes).
#   bash benches/rate_limit.sh
#   KEYS=200000 bash benches/rate_limit.sh   # shorter RSS run
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
cargo bench --quiet --bench rate_limit
cargo bench --quiet --bench keys_rss
