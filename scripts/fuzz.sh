#!/usr/bin/env bash
# Longer property-test run for the config parser and header handling (the CI
# runs the same tests with 256 cases each). Bounded by the case count.
#   bash scripts/fuzz.sh            # 20 000 cases per property
#   CASES=200000 bash scripts/fuzz.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PROPTEST_CASES="${CASES:-20000}" cargo test --release --test fuzz
