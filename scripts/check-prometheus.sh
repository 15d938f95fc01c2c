#!/usr/bin/env bash
# Checks the Prometheus alert rules (deploy/prometheus/alerts.yml) and runs
# their unit tests with promtool. Installs Debian's prometheus for promtool.
#   bash scripts/check-prometheus.sh
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v promtool >/dev/null; then
  echo "installing prometheus (Debian package, for promtool)" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null
fi
promtool check rules deploy/prometheus/alerts.yml
promtool test rules deploy/prometheus/alerts_test.yml
# Every dashboard expression and every metric the rules use, against a real
# Prometheus scraping a running proxy.
bash scripts/check-prometheus-live.sh
