#!/usr/bin/env bash
# Throughput and latency of a fast static upstream (nginx `return 200`) hit
# directly, through HAProxy and through sluicegate, interleaved in one run so
# that the machine's noise hits all three alike; measured with wrk and with
# oha (users load-test with both: wrk's fixed connections, oha's tokio/hyper
# client).
#
# Installs what it needs: Debian's nginx, haproxy and wrk (apt-get, as root),
# oha from crates.io (`cargo install oha`, into target/oha; once).
# Everything listens on 127.0.0.1 only; each wrk run is bounded by -d.
#
#   bash benches/load.sh            # 3 rounds x 10 s per target
#   ROUNDS=5 DURATION=15 CONNS=64 bash benches/load.sh
#
# Like for like: nginx has one worker, HAProxy one thread (nbthread 1),
# sluicegate one tokio worker thread (worker_threads = 1); wrk runs one thread.
# Prints a markdown table of medians and the ratios sluicegate/HAProxy.
set -euo pipefail

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
CONNS=${CONNS:-32}
BASE_PORT=${BASE_PORT:-18080}
UP=$((BASE_PORT + 1)) HA=$((BASE_PORT + 2)) SG=$((BASE_PORT + 3)) SG_ADMIN=$((BASE_PORT + 4))

cd "$(dirname "$0")/.."
# shellcheck source=benches/lib.sh
source benches/lib.sh
ensure_packages nginx:nginx haproxy:haproxy wrk:wrk python3:python3
oha=${OHA:-$(command -v oha || echo "${CARGO_TARGET_DIR:-target}/oha/bin/oha")}
if [ ! -x "$oha" ]; then
  echo "installing oha (cargo install, a few minutes once)" >&2
  cargo install --quiet oha --root "${CARGO_TARGET_DIR:-target}/oha"
  oha=${CARGO_TARGET_DIR:-target}/oha/bin/oha
fi

cargo build --release --quiet
scratch

nginx_upstream_conf "$work/nginx.conf" "$UP"
haproxy_conf "$work/haproxy.cfg" 4096 "127.0.0.1:$HA" "$UP"
cat > "$work/sluicegate.toml" <<CONF
[server]
listen = "127.0.0.1:$SG"
admin_listen = "127.0.0.1:$SG_ADMIN"
worker_threads = 1
[[route]]
name = "bench"
upstream = "http://127.0.0.1:$UP"
CONF

nginx -c "$work/nginx.conf" -p "$work" & pids+=($!)
haproxy -f "$work/haproxy.cfg" -db & pids+=($!)
RUST_LOG=warn ./target/release/sluicegate -c "$work/sluicegate.toml" & pids+=($!)
for port in $UP $HA $SG; do
  for _ in $(seq 100); do curl -fs "http://127.0.0.1:$port/" >/dev/null && break; sleep 0.1; done
done

run() { # name port round
  local out="$work/$1.$3.txt"
  wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency "http://127.0.0.1:$2/" > "$out"
  local rps p50 p99
  read -r rps p50 p99 <<< "$(wrk_figures "$out")"
  echo "$1 $rps $p50 $p99" >> "$work/results"
  echo "round $3 $1: $rps req/s, p50 ${p50}us, p99 ${p99}us" >&2
}
run_oha() { # name port round
  local out="$work/$1.$3.oha.json"
  "$oha" --no-tui -z "${DURATION}s" -c "$CONNS" --output-format json "http://127.0.0.1:$2/" > "$out"
  local line
  line=$(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); s=d["summary"]; p=d["latencyPercentiles"]; print("%.0f %.0f %.0f %.4f" % (s["requestsPerSec"], p["p50"]*1e6, p["p99"]*1e6, 1-s["successRate"]))' "$out")
  echo "oha-$1 $line" >> "$work/results"
  echo "round $3 oha $1: $line (req/s p50us p99us failed-share)" >&2
}
for round in $(seq "$ROUNDS"); do
  run direct $UP "$round"
  run haproxy $HA "$round"
  run sluicegate $SG "$round"
  run_oha direct $UP "$round"
  run_oha haproxy $HA "$round"
  run_oha sluicegate $SG "$round"
done

echo
echo "$(nproc) cores, $ROUNDS rounds x ${DURATION}s, wrk -t1 -c$CONNS, medians"
echo
echo "| target | tool | req/s | p50 (us) | p99 (us) |"
echo "|---|---|---:|---:|---:|"
for t in direct haproxy sluicegate; do
  echo "| $t | wrk | $(stat $t 2) | $(stat $t 3) | $(stat $t 4) |"
done
for t in direct haproxy sluicegate; do
  echo "| $t | oha | $(stat oha-$t 2) | $(stat oha-$t 3) | $(stat oha-$t 4) |"
done
awk -v sr="$(stat sluicegate 2)" -v hr="$(stat haproxy 2)" -v s99="$(stat sluicegate 4)" -v h99="$(stat haproxy 4)" \
  -v s50="$(stat sluicegate 3)" -v h50="$(stat haproxy 3)" 'BEGIN {
  printf "\nsluicegate / HAProxy: req/s %.2fx, p50 %.2fx, p99 %.2fx\n", sr/hr, s50/h50, s99/h99 }'
awk -v sr="$(stat oha-sluicegate 2)" -v hr="$(stat oha-haproxy 2)" -v s99="$(stat oha-sluicegate 4)" -v h99="$(stat oha-haproxy 4)" 'BEGIN {
  printf "oha: sluicegate / HAProxy: req/s %.2fx, p99 %.2fx\n", sr/hr, s99/h99 }'
