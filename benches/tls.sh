#!/usr/bin/env bash
# TLS on the listener against HAProxy with TLS (`bind ... ssl crt`), the same
# certificate (EC P-256, made here with openssl), in one run, in front of the
# same nginx (one worker, `return 200`, plain HTTP):
#   - keep-alive requests per second over HTTPS (wrk, and oha);
#   - new connections per second, one request each (oha --disable-keepalive:
#     a TCP connection and a TLS handshake per request; oha's rustls client
#     resumes sessions where the server offers it, and both servers do);
#   - instructions per request over HTTPS keep-alive (callgrind, as
#     benches/instructions.sh: (N=LARGE - N=SMALL) / (LARGE - SMALL)).
# One thread each: HAProxy nbthread 1, sluicegate worker_threads = 1.
#
# Installs what it needs (Debian's nginx, haproxy, wrk, nghttp2-client,
# valgrind, openssl; oha via cargo install into target/oha, once).
# Everything listens on 127.0.0.1; every run is bounded by -d, -z or -n.
#   bash benches/tls.sh
#   ROUNDS=5 DURATION=10 SMALL=1000 LARGE=6000 bash benches/tls.sh
set -euo pipefail

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
CONNS=${CONNS:-32}
SMALL=${SMALL:-2000}
LARGE=${LARGE:-10000}
BASE_PORT=${BASE_PORT:-18280}
UP=$((BASE_PORT + 1)) HA=$((BASE_PORT + 2)) SG=$((BASE_PORT + 3)) SG_ADMIN=$((BASE_PORT + 4))

cd "$(dirname "$0")/.."
# shellcheck source=benches/lib.sh
source benches/lib.sh
ensure_packages nginx:nginx haproxy:haproxy wrk:wrk h2load:nghttp2-client \
  valgrind:valgrind openssl:openssl curl:curl python3:python3
oha=${OHA:-$(command -v oha || echo "${CARGO_TARGET_DIR:-target}/oha/bin/oha")}
if [ ! -x "$oha" ]; then
  echo "installing oha (cargo install, a few minutes once)" >&2
  cargo install --quiet oha --root "${CARGO_TARGET_DIR:-target}/oha"
  oha=${CARGO_TARGET_DIR:-target}/oha/bin/oha
fi
cargo build --release --quiet --bin sluicegate
bin=${CARGO_TARGET_DIR:-target}/release
scratch

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
  -subj /CN=localhost -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
  -keyout "$work/key.pem" -out "$work/cert.pem" 2>/dev/null
cat "$work/cert.pem" "$work/key.pem" > "$work/haproxy.pem"

nginx_upstream_conf "$work/nginx.conf" "$UP"
haproxy_conf "$work/haproxy.cfg" 4096 "127.0.0.1:$HA ssl crt $work/haproxy.pem alpn h2,http/1.1" "$UP"
cat > "$work/sluicegate.toml" <<CONF
[server]
listen = "127.0.0.1:$SG"
admin_listen = "127.0.0.1:$SG_ADMIN"
worker_threads = 1
[server.tls]
cert_file = "$work/cert.pem"
key_file = "$work/key.pem"
[[route]]
name = "bench"
upstream = "http://127.0.0.1:$UP"
CONF

nginx -c "$work/nginx.conf" -p "$work" & pids+=($!)
for _ in $(seq 100); do curl -fs "http://127.0.0.1:$UP/" >/dev/null && break; sleep 0.1; done

command_of() {
  case "$1" in
    haproxy) echo "haproxy -f $work/haproxy.cfg -db" ;;
    sluicegate) echo "$bin/sluicegate -c $work/sluicegate.toml" ;;
  esac
}
port_of() { case "$1" in haproxy) echo "$HA" ;; sluicegate) echo "$SG" ;; esac; }
wait_up() { # port
  for _ in $(seq 300); do curl -kfs "https://127.0.0.1:$1/" >/dev/null 2>&1 && return 0; sleep 0.1; done
  return 1
}

# Wall-clock rounds: both servers up side by side, interleaved.
# shellcheck disable=SC2046
haproxy -f "$work/haproxy.cfg" -db & pids+=($!)
RUST_LOG=warn "$bin/sluicegate" -c "$work/sluicegate.toml" & pids+=($!)
wait_up "$HA" && wait_up "$SG" || { echo "a server did not start" >&2; exit 1; }
oha_rps() { # json file -> "req/s p99us failed-share"
  python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); s=d["summary"]; p=d["latencyPercentiles"]; print("%.0f %.0f %.4f" % (s["requestsPerSec"], p["p99"]*1e6, 1-s["successRate"]))' "$1"
}
for round in $(seq "$ROUNDS"); do
  for t in haproxy sluicegate; do
    port=$(port_of $t)
    wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency "https://127.0.0.1:$port/" > "$work/$t.$round.wrk"
    read -r rps p50 p99 <<< "$(wrk_figures "$work/$t.$round.wrk")"
    echo "keepalive-$t $rps $p50 $p99" >> "$work/results"
    "$oha" --no-tui --insecure -z "${DURATION}s" -c "$CONNS" --output-format json \
      "https://127.0.0.1:$port/" > "$work/$t.$round.oha.json"
    echo "oha-keepalive-$t $(oha_rps "$work/$t.$round.oha.json")" >> "$work/results"
    "$oha" --no-tui --insecure --disable-keepalive -z "${DURATION}s" -c "$CONNS" --output-format json \
      "https://127.0.0.1:$port/" > "$work/$t.$round.new.json"
    echo "handshake-$t $(oha_rps "$work/$t.$round.new.json")" >> "$work/results"
    echo "round $round $t: keep-alive $rps req/s (wrk); $(tail -1 "$work/results")" >&2
  done
done
kill "${pids[@]:1}" 2>/dev/null || true
wait "${pids[@]:1}" 2>/dev/null || true
pids=("${pids[0]}")

# Instructions: each server alone under callgrind, SMALL then LARGE requests.
measure() { # target n
  callgrind_run "$1" "https://127.0.0.1:$(port_of "$1")/" "$2" "$(command_of "$1")"
}
declare -A per_request
for t in haproxy sluicegate; do
  a=$(measure "$t" "$SMALL")
  b=$(measure "$t" "$LARGE")
  per_request[$t]=$(( (b - a) / (LARGE - SMALL) ))
  echo "$t: ${per_request[$t]} instructions per HTTPS request" >&2
done

echo
echo "$(nproc) cores, one thread per server, $ROUNDS rounds x ${DURATION}s, $CONNS connections, medians; EC P-256 certificate"
echo
echo "| figure | HAProxy | sluicegate | sluicegate / HAProxy |"
echo "|---|---:|---:|---:|"
row() { # label key column
  local h s
  h=$(stat "$2-haproxy" "$3") s=$(stat "$2-sluicegate" "$3")
  echo "| $1 | $h | $s | $(awk -v s="$s" -v h="$h" 'BEGIN {printf "%.2f", s/h}') |"
}
row "keep-alive HTTPS req/s (wrk)" keepalive 2
row "keep-alive HTTPS p99 us (wrk)" keepalive 4
row "keep-alive HTTPS req/s (oha)" oha-keepalive 2
row "new TLS connections/s, one request each (oha)" handshake 2
row "new-connection p99 us (oha)" handshake 3
h=${per_request[haproxy]} s=${per_request[sluicegate]}
echo "| instructions / HTTPS request (callgrind, h2load --h1 -c 4) | $h | $s | $(awk -v s="$s" -v h="$h" 'BEGIN {printf "%.2f", s/h}') |"
