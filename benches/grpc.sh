#!/usr/bin/env bash
# gRPC through sluicegate vs direct (benches/grpc.rs). Installs h2load from
# Debian's nghttp2-client.
#   bash benches/grpc.sh
#   ROUNDS=5 CALLS=100000 CLIENTS=4 STREAMS=16 bash benches/grpc.sh
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=benches/lib.sh
source benches/lib.sh
ensure_packages h2load:nghttp2-client
cargo bench --bench grpc --quiet
