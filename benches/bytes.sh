#!/usr/bin/env bash
# Byte-aware admission: 16 concurrent 1 MiB uploads with and without
# max_inflight_bytes, and 1 KiB events with and without 1 MiB batches mixed
# in. Only the simulator and the proxy; about a minute.
#   bash benches/bytes.sh
#   RUN_SECONDS=5 bash benches/bytes.sh
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
cargo bench --quiet --bench bytes
