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
