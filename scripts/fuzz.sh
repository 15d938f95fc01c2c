#!/usr/bin/env bash
# Longer property-test runs (CI runs the same properties with 256 cases each):
# the config parser, header handling, and the framing guard against hyper's
# own HTTP/1 parser. Bounded by the case count.
#   bash scripts/fuzz.sh            # 20 000 cases per property
#   CASES=200000 bash scripts/fuzz.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PROPTEST_CASES="${CASES:-20000}"
cargo test --release --test fuzz
cargo test --release --lib every_head_hyper_parses_is_one_the_guard_saw
