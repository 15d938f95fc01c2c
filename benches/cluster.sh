#!/usr/bin/env bash
# What a shared quota costs per request: wrk through one sluicegate replica
# (one tokio worker) in front of nginx (`return 200`), its route rate-limited
# per API key with scope = "local", "cluster" (a Redis round trip per
# request) and "cluster" with sync_ms = 10 (batches), interleaved in one run;
# Redis (Debian's redis-server) on loopback. The rate is far above what wrk
# sends, so every request is admitted: this measures the cost, not the limit.
# (Accuracy over three replicas is measured by tests/it/cluster.rs; see
# BENCHMARKS.md.)
#
#   bash benches/cluster.sh
#   ROUNDS=5 DURATION=15 CONNS=64 bash benches/cluster.sh
set -euo pipefail

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
CONNS=${CONNS:-32}
BASE_PORT=${BASE_PORT:-18280}
UP=$((BASE_PORT + 1)) REDIS=$((BASE_PORT + 2))

cd "$(dirname "$0")/.."
# shellcheck source=benches/lib.sh
source benches/lib.sh
ensure_packages nginx:nginx wrk:wrk redis-server:redis-server

cargo build --release --quiet
scratch

nginx_upstream_conf "$work/nginx.conf" "$UP"
nginx -c "$work/nginx.conf" -p "$work" & pids+=($!)
redis-server --bind 127.0.0.1 --port "$REDIS" --save "" --appendonly no >/dev/null & pids+=($!)

targets=(local cluster sync10)
port=$((BASE_PORT + 10))
for t in "${targets[@]}"; do
  case $t in
    local) scope='scope = "local"' ;;
    cluster) scope='scope = "cluster"' ;;
    sync10) scope=$'scope = "cluster"\nsync_ms = 10' ;;
  esac
  cat > "$work/$t.toml" <<CONF
[server]
listen = "127.0.0.1:$port"
admin_listen = "127.0.0.1:$((port + 1))"
worker_threads = 1
[cluster]
redis_url = "redis://127.0.0.1:$REDIS/0"
[[route]]
name = "bench"
upstream = "http://127.0.0.1:$UP"
[route.rate_limit]
key = "header:x-api-key"
per_second = 1000000
$scope
CONF
  RUST_LOG=warn ./target/release/sluicegate -c "$work/$t.toml" & pids+=($!)
  eval "port_$t=$port"
  port=$((port + 2))
done
for p in $UP $((BASE_PORT + 10)) $((BASE_PORT + 12)) $((BASE_PORT + 14)); do
  for _ in $(seq 100); do curl -fs -H 'x-api-key: warm' "http://127.0.0.1:$p/" >/dev/null && break; sleep 0.1; done
done
sleep 1 # the cluster's prober sees Redis up

run() { # name port round
  local out="$work/$1.$3.txt"
  redis-cli -p "$REDIS" config resetstat >/dev/null
  wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency -H 'x-api-key: tenant-1' "http://127.0.0.1:$2/" > "$out"
  local rps p50 p99
  read -r rps p50 p99 <<< "$(wrk_figures "$out")"
  non2xx=$(awk '/Non-2xx/ {print $NF}' "$out")
  reqs=$(awk '/requests in/ {print $1}' "$out")
  calls=$(redis-cli -p "$REDIS" info commandstats | awk -F'[=,]' '/cmdstat_eval(sha)?:/ {n+=$2} END {print n+0}')
  per=$(awk -v c="$calls" -v r="$reqs" 'BEGIN {printf "%.4f", c/r}')
  echo "$1 $rps $p50 $p99 ${non2xx:-0} $per" >> "$work/results"
  echo "round $3 $1: $rps req/s, p50 ${p50}us, p99 ${p99}us, non-2xx ${non2xx:-0}, $per script calls per request" >&2
}
for round in $(seq "$ROUNDS"); do
  for t in "${targets[@]}"; do
    p="port_$t"
    run "$t" "${!p}" "$round"
  done
done

echo
echo "$(nproc) cores, $ROUNDS rounds x ${DURATION}s, wrk -t1 -c$CONNS, one key, medians"
echo
echo "| scope | req/s | × local | p50 (us) | p99 (us) | non-2xx | script calls / request |"
echo "|---|---:|---:|---:|---:|---:|---:|"
base=$(stat local 2)
for t in "${targets[@]}"; do
  rps=$(stat "$t" 2)
  echo "| $t | $rps | $(awk -v a="$rps" -v b="$base" 'BEGIN {printf "%.2f", a/b}') | $(stat "$t" 3) | $(stat "$t" 4) | $(stat "$t" 5) | $(stat "$t" 6) |"
done
