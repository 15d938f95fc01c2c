#!/usr/bin/env bash
# A real Prometheus (Debian's package) scraping a running sluicegate under
# load: every expression of deploy/grafana/sluicegate.json and every metric
# the alert rules use must return data. The proxy runs every protection (an
# admission queue, a circuit, a cluster rate limit whose Redis is down so the
# fallback decides, a spool), in front of the simulator; curl loops load it.
# Everything on 127.0.0.1; about 40 seconds.
#   bash scripts/check-prometheus-live.sh
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=benches/lib.sh
source benches/lib.sh
ensure_packages prometheus:prometheus curl:curl python3:python3

BASE_PORT=${BASE_PORT:-18380}
SIM=$BASE_PORT PX=$((BASE_PORT + 1)) ADMIN=$((BASE_PORT + 2)) PROM=$((BASE_PORT + 3)) NO_REDIS=$((BASE_PORT + 4))
cargo build --quiet --bin sluicegate
bin=${CARGO_TARGET_DIR:-target}/debug/sluicegate
scratch

cat > "$work/sluicegate.toml" <<CONF
[server]
listen = "127.0.0.1:$PX"
admin_listen = "127.0.0.1:$ADMIN"
[cluster]
redis_url = "redis://127.0.0.1:$NO_REDIS/0"
[[route]]
name = "ingest"
upstream = "http://127.0.0.1:$SIM"
[route.admission]
max_inflight = 2
queue_capacity = 4
queue_timeout_ms = 100
[route.circuit]
failure_threshold = 5
[route.rate_limit]
per_second = 1000
scope = "cluster"
[route.spool]
dir = "$work/spool"
max_bytes = 10485760
CONF
cat > "$work/prometheus.yml" <<CONF
global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files:
  - $(pwd)/deploy/prometheus/alerts.yml
scrape_configs:
  - job_name: sluicegate
    static_configs:
      - targets: ["127.0.0.1:$ADMIN"]
CONF

"$bin" sim --listen "127.0.0.1:$SIM" --workers 2 --service-ms 20 >/dev/null 2>&1 & pids+=($!)
RUST_LOG=warn "$bin" -c "$work/sluicegate.toml" >/dev/null 2>&1 & pids+=($!)
prometheus --config.file="$work/prometheus.yml" --storage.tsdb.path="$work/data" \
  --web.listen-address="127.0.0.1:$PROM" >"$work/prometheus.log" 2>&1 & pids+=($!)
for url in "http://127.0.0.1:$ADMIN/healthz" "http://127.0.0.1:$PROM/-/ready"; do
  for _ in $(seq 100); do curl -fs "$url" >/dev/null && break; sleep 0.2; done
done

# Load: more than two workers take, so requests queue, shed and spool.
end=$((SECONDS + 25))
for _ in $(seq 8); do
  (while [ $SECONDS -lt $end ]; do
     curl -s -o /dev/null -X POST -d '{"e":1}' "http://127.0.0.1:$PX/ingest" || true
   done) & pids+=($!)
done
sleep 25
python3 scripts/prometheus-queries.py "http://127.0.0.1:$PROM" \
  deploy/grafana/sluicegate.json deploy/prometheus/alerts.yml
