#!/usr/bin/env bash
# Instructions per proxied request, counted by valgrind's callgrind: repeatable
# for the same binaries and inputs whatever else the machine is doing, where
# wall-clock figures on a shared 2-core machine are not.
#
# Each proxy runs under callgrind twice, in front of nginx (one worker,
# `return 200`), once for a run of SMALL requests and once for LARGE
# (`h2load --h1 -c 4`); (total(LARGE) - total(SMALL)) / (LARGE - SMALL) is the
# cost of one request, start-up, config parsing and shutdown cancelling out.
# Targets, all on one thread:
#   haproxy      Debian's HAProxy, nbthread 1, keep-alive, http-reuse always
#   bare-hyper   examples/bare_proxy.rs: hyper's server + hyper-util's client
#   sluicegate   one route, no protections
#   protected    one route with admission, circuit breaker and rate limit
# Prints a table with ratios against HAProxy, then the functions whose
# inclusive cost per request is largest, for each sluicegate target.
#
# Installs what it needs (Debian's nginx, haproxy, nghttp2-client, valgrind).
# Everything listens on 127.0.0.1; each h2load run is bounded by -n.
#   bash benches/instructions.sh
#   SMALL=1000 LARGE=6000 TOP=30 TARGETS="sluicegate protected" bash benches/instructions.sh
set -euo pipefail

SMALL=${SMALL:-2000}
LARGE=${LARGE:-12000}
TOP=${TOP:-25}
TARGETS=${TARGETS:-"haproxy bare-hyper sluicegate protected"}
BASE_PORT=${BASE_PORT:-18180}
UP=$((BASE_PORT + 1)) PX=$((BASE_PORT + 2)) ADMIN=$((BASE_PORT + 3))

cd "$(dirname "$0")/.."
# shellcheck source=benches/lib.sh
source benches/lib.sh
ensure_packages nginx:nginx haproxy:haproxy h2load:nghttp2-client valgrind:valgrind curl:curl

cargo build --release --quiet --bin sluicegate --example bare_proxy
bin=${CARGO_TARGET_DIR:-target}/release
scratch

nginx_upstream_conf "$work/nginx.conf" "$UP"
haproxy_conf "$work/haproxy.cfg" 1024 "127.0.0.1:$PX" "$UP"
sluicegate_config() { # extra route lines
  cat <<CONF
[server]
listen = "127.0.0.1:$PX"
admin_listen = "127.0.0.1:$ADMIN"
worker_threads = 1
[[route]]
name = "bench"
upstream = "http://127.0.0.1:$UP"
$1
CONF
}
sluicegate_config "" > "$work/sluicegate.toml"
# Every protection on, none of them refusing: the cost of deciding, not of
# answering 503 (that path is cheaper).
sluicegate_config '[route.admission]
max_inflight = 64
queue_capacity = 64
queue_timeout_ms = 1000
[route.circuit]
failure_threshold = 5
[route.rate_limit]
key = "ip"
per_second = 1000000
burst = 1000000' > "$work/protected.toml"

nginx -c "$work/nginx.conf" -p "$work" & pids+=($!)
for _ in $(seq 100); do curl -fs "http://127.0.0.1:$UP/" >/dev/null && break; sleep 0.1; done

command_of() {
  case "$1" in
    haproxy) echo "haproxy -f $work/haproxy.cfg -db" ;;
    bare-hyper) echo "$bin/examples/bare_proxy 127.0.0.1:$PX 127.0.0.1:$UP" ;;
    sluicegate) echo "$bin/sluicegate -c $work/sluicegate.toml" ;;
    protected) echo "$bin/sluicegate -c $work/protected.toml" ;;
  esac
}

# Runs target $1 under callgrind for $2 requests; prints the total.
measure() { # target n
  callgrind_run "$1" "http://127.0.0.1:$PX/" "$2" "$(command_of "$1")"
}

# The functions of target $1 by cost per request, largest first: inclusive
# ($2 = yes; the frames that hold the whole run, main and the runtime's loop,
# are left out) or self ($2 = no).
top_functions() {
  for n in "$SMALL" "$LARGE"; do
    callgrind_annotate --auto=no --inclusive="$2" --threshold=100 "$work/$1.$n.cg" 2>/dev/null \
      | sed -n "s/^ *\([0-9,][0-9,]*\) *( *[0-9.]*%) *\(.*\)$/$n\t\1\t\2/p"
  done | python3 -c '
import re, sys
small, large, top, total = (int(a) for a in sys.argv[1:5])
cost = {}
for line in sys.stdin:
    n, c, name = line.rstrip("\n").split("\t", 2)
    name = re.sub(r" \[[^]]*\]$", "", name)            # the object file
    name = re.sub(r" \(\d[\d ,]*x\)$", "", name)      # call counts
    name = name.split(":", 1)[1] if re.match(r"^[^<(]*\.(rs|c|S):", name) else name
    per = cost.setdefault(name, {})
    per[int(n)] = per.get(int(n), 0) + int(c.replace(",", ""))
rows = [((v.get(large, 0) - v.get(small, 0)) / (large - small), k) for k, v in cost.items()]
rows = [r for r in rows if r[0] < 0.9 * total and r[1] not in ("PROGRAM TOTALS", "events annotated")]
rows.sort(reverse=True)
for d, k in rows[:top]:
    k = k if len(k) <= 100 else k[:97] + "..."
    k = k.replace("|", "\\|")
    print(f"| `{k}` | {d:,.0f} |".replace(",", " "))
' "$SMALL" "$LARGE" "$TOP" "${per_request[$1]}"
}

declare -A per_request
for t in $TARGETS; do
  a=$(measure "$t" "$SMALL")
  b=$(measure "$t" "$LARGE")
  per_request[$t]=$(( (b - a) / (LARGE - SMALL) ))
  echo "$t: $a at $SMALL, $b at $LARGE: ${per_request[$t]} per request" >&2
done

echo
echo "$(nproc) cores; callgrind, (N=$LARGE - N=$SMALL) / $((LARGE - SMALL)); h2load --h1 -c 4; nginx return 200; one thread each"
echo
echo "| target | instructions / request | × HAProxy | × bare hyper |"
echo "|---|---:|---:|---:|"
for t in $TARGETS; do
  v=${per_request[$t]}
  h=${per_request[haproxy]:-}
  b=${per_request[bare-hyper]:-}
  rh=$( [ -n "$h" ] && awk -v v="$v" -v h="$h" 'BEGIN {printf "%.2f", v/h}' || echo -)
  rb=$( [ -n "$b" ] && awk -v v="$v" -v b="$b" 'BEGIN {printf "%.2f", v/b}' || echo -)
  echo "| $t | $v | $rh | $rb |"
done
for t in $TARGETS; do
  case "$t" in sluicegate|protected) ;; *) continue ;; esac
  for kind in yes no; do
    echo
    if [ $kind = yes ]; then echo "Top functions by inclusive cost, $t:"; else echo "Top functions by self cost, $t:"; fi
    echo
    echo "| function | instructions / request |"
    echo "|---|---:|"
    top_functions "$t" $kind
  done
done
if [ -n "${KEEP:-}" ]; then mkdir -p "$KEEP" && cp "$work"/*.cg "$KEEP"/; fi
