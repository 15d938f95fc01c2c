#!/usr/bin/env bash
# Store and forward: spooled requests per second with fsync "always" and
# "batch", the replay rate against the simulator's capacity, and live
# traffic's goodput beside a replaying backlog. Only the simulator and the
# proxy; a few minutes.
#   bash benches/spool.sh
#   RUN_SECONDS=5 bash benches/spool.sh
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
cargo bench --quiet --bench spool
