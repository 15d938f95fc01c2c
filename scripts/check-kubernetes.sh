#!/usr/bin/env bash
# Validates deploy/kubernetes against the Kubernetes 1.33 schemas with
# kubernetes-validate (PyPI, in a virtualenv under target/), strictly
# (unknown fields are errors); checks what the schemas cannot: the CRDs'
# references (the KEDA ScaledObject scales a Deployment that exists on a
# metric the proxy exports, the PodMonitor selects pods with an "admin"
# port), the native-sidecar shape and the drain budget; and runs
# `sluicegate check-config` on every config in a ConfigMap.
#   bash scripts/check-kubernetes.sh
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${CARGO_TARGET_DIR:-target}/kubernetes-validate
if [ ! -x "$venv/bin/kubernetes-validate" ]; then
  python3 -m venv "$venv" 2>/dev/null || {
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
    python3 -m venv "$venv"
  }
  "$venv/bin/pip" install -q kubernetes-validate
fi
core=$(grep -L "^apiVersion: \(keda.sh\|monitoring.coreos.com\)" deploy/kubernetes/*.yaml)
# shellcheck disable=SC2086
"$venv/bin/kubernetes-validate" -k 1.33.0 --strict --quiet $core
cargo build --quiet --bin sluicegate
"$venv/bin/python" scripts/kubernetes-references.py "${CARGO_TARGET_DIR:-target}/debug/sluicegate" deploy/kubernetes
