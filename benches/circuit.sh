#!/usr/bin/env bash
# Circuit-breaker scenario: 400 req/s open loop through sluicegate to the upstream
# simulator, which fails for 10 s and recovers; once with the circuit breaker,
# once without. About 2.5 minutes; only 127.0.0.1.
#   bash benches/circuit.sh
#   AFTER_SECONDS=20 bash benches/circuit.sh   # shorter tail
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
cargo bench --quiet --bench circuit
