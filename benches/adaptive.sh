#!/usr/bin/env bash
# Adaptive concurrency scenarios (see benches/adaptive.rs): calm loads (0.5x and
# 0.8x for 150 s each) and a halving of the simulator's workers at 1.5x; adaptive
# limit against static max_inflight = 16. About 12 minutes; only 127.0.0.1.
#   bash benches/adaptive.sh            (SCENARIO=calm or SCENARIO=halving for one)
# The adaptive rows of the overload table come from benches/overload.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
cargo bench --quiet --bench adaptive
