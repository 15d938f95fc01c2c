#!/usr/bin/env bash
# Soak: 10 minutes of mixed load through sluicegate while the upstream simulator
# fails, hangs, slows and recovers and clients hang up at random. Only 127.0.0.1.
#   bash benches/soak.sh
#   SOAK_SECONDS=120 bash benches/soak.sh
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
cargo bench --quiet --bench soak
