#!/usr/bin/env bash
# Adaptive concurrency scenario: 1200 req/s open loop through sluicegate to the
# upstream simulator, which drops from 16 to 8 workers halfway; adaptive limit
# against static max_inflight = 16. About 2.5 minutes; only 127.0.0.1.
#   bash benches/adaptive.sh
# The adaptive rows of the overload table come from benches/overload.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
cargo bench --quiet --bench adaptive
