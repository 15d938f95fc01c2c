# Shared by the shell benchmarks: source it from the repository root.

# Installs the Debian packages whose commands are missing. Arguments are
# `command:package` pairs; commands are also looked for in /usr/sbin.
ensure_packages() {
  local need=() pair cmd pkg
  for pair in "$@"; do
    cmd=${pair%%:*} pkg=${pair#*:}
    command -v "$cmd" >/dev/null || [ -x "/usr/sbin/$cmd" ] || need+=("$pkg")
  done
  if [ ${#need[@]} -gt 0 ]; then
    echo "installing ${need[*]} (Debian packages)" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  fi
  export PATH="$PATH:/usr/sbin"
}

# Writes an nginx config to $1 for the fast static upstream: one worker,
# `return 200 "ok\n"` on 127.0.0.1:$2, keep-alive without a request cap,
# its pid and error log in the folder of $1.
nginx_upstream_conf() {
  local dir
  dir=$(dirname "$1")
  cat > "$1" <<CONF
worker_processes 1;
daemon off;
pid $dir/nginx.pid;
error_log $dir/nginx-error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  server {
    listen 127.0.0.1:$2 reuseport;
    location / { return 200 "ok\\n"; }
  }
}
CONF
}

# Writes to $1 HAProxy's config for the like-for-like comparisons: one
# thread, keep-alive both sides, `http-reuse always`, `maxconn` $2, the
# frontend bound as "$3" (an address, and `ssl crt ...` for TLS), the one
# backend server 127.0.0.1:$4.
haproxy_conf() {
  cat > "$1" <<CONF
global
  nbthread 1
  maxconn $2
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
  option http-keep-alive
  http-reuse always
frontend fe
  bind $3
  default_backend be
backend be
  server up 127.0.0.1:$4
CONF
}

# Runs target $1 (a name for the files in $work) under callgrind, started by
# command $4 (word-split), until $2 (a URL, https allowed) answers, then
# `h2load --h1 -c 4` sends it $3 requests, all of which must succeed; stops it
# (HAProxy's soft stop is SIGUSR1, the others drain on SIGTERM) and prints the
# instructions counted.
callgrind_run() {
  local out="$work/$1.$3.cg" pid up=""
  # shellcheck disable=SC2086
  RUST_LOG=warn valgrind --tool=callgrind --callgrind-out-file="$out" \
    --dump-instr=no --compress-strings=no $4 2>"$work/$1.$3.log" &
  pid=$!
  for _ in $(seq 300); do
    if curl -kfs "$2" >/dev/null 2>&1; then up=1; break; fi
    sleep 0.1
  done
  [ -n "$up" ] || { echo "$1 did not start:" >&2; cat "$work/$1.$3.log" >&2; exit 1; }
  h2load --h1 -n "$3" -c 4 "$2" > "$work/$1.$3.h2load"
  grep -q " 0 failed, 0 errored" "$work/$1.$3.h2load" || { cat "$work/$1.$3.h2load" >&2; exit 1; }
  case "$1" in haproxy) kill -USR1 "$pid" ;; *) kill -TERM "$pid" ;; esac
  wait "$pid" || true
  awk '/^summary:/ {print $2}' "$out"
}

# wrk's --latency figures in microseconds ("123.00us", "1.20ms", "2s").
to_us() { awk '{v=$1; if (v ~ /us$/) {sub(/us/,"",v); print v} else if (v ~ /ms$/) {sub(/ms/,"",v); print v*1000} else if (v ~ /s$/) {sub(/s/,"",v); print v*1000000} else print v}'; }

# "req/s p50 p99" (microseconds) of a `wrk --latency` report in $1.
wrk_figures() {
  echo "$(awk '/Requests\/sec/ {print $2}' "$1")" \
    "$(awk '$1=="50%" {print $2}' "$1" | to_us)" \
    "$(awk '$1=="99%" {print $2}' "$1" | to_us)"
}

# The median of the numbers on stdin, one a line.
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }

# The median of column $2 of the rows of $work/results named $1.
stat() { awk -v n="$1" -v c="$2" '$1==n {print $c}' "$work/results" | median; }

# A scratch folder ($work) and the background processes to stop ($pids,
# append with `pids+=($!)`), both cleaned up when the script exits.
scratch() {
  work=$(mktemp -d)
  pids=()
  trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"' EXIT
}
