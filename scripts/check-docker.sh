#!/usr/bin/env bash
# The Docker image, built from the repository's Dockerfile and run in the pod
# shape of deploy/kubernetes: the application (the simulator) owns the network
# namespace, sluicegate joins it (`--network container:app`) and proxies to
# 127.0.0.1:9000 as a sidecar would. Checks that the HEALTHCHECK turns healthy,
# that traffic flows and that overload is shed (503 + Retry-After), and that
# `docker stop` lets an in-flight request finish and the proxy exit 0.
#
# No image registry is reachable from CI, so the base images are local
# stand-ins passed as build arguments: Debian bookworm from debootstrap
# (minbase, as debian:bookworm-slim) for the runtime, and the same plus gcc,
# this machine's Rust toolchain and its crate cache (cargo offline) for the
# builder, in place of rust:1-bookworm. The Dockerfile itself is the users'.
#
# Runs its own dockerd (vfs storage, its own socket and data root) and removes
# everything when it exits. Takes a few minutes: CI calls it on its own.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=benches/lib.sh
source benches/lib.sh
ensure_packages dockerd:docker.io debootstrap:debootstrap wrk:wrk curl:curl

# On disk, not in /tmp: vfs copies each layer whole, so the build needs room
# (8 GB here at its peak, with the Dockerfile's one COPY; 12 GB when it had
# four); say so plainly rather than fail midway.
free_kb=$(df -Pk /var/tmp | awk 'NR==2 {print $4}')
if [ "$free_kb" -lt $((10 * 1024 * 1024)) ]; then
  echo "FAIL: $((free_kb / 1024 / 1024)) GB free in /var/tmp; the vfs image build needs about 10 GB" >&2
  exit 1
fi
work=$(mktemp -d /var/tmp/sluicegate-docker.XXXXXX)
export DOCKER_HOST="unix://$work/docker.sock"
cleanup() {
  docker rm -f sg-proxy sg-app >/dev/null 2>&1 || true
  if [ -f "$work/docker.pid" ]; then
    kill "$(cat "$work/docker.pid")" 2>/dev/null || true
    for _ in $(seq 50); do [ -f "$work/docker.pid" ] || break; sleep 0.2; done
  fi
  rm -rf "$work"
}
trap cleanup EXIT
fail() { echo "FAIL: $*" >&2; docker logs sg-proxy 2>&1 | tail -20 >&2 || true; exit 1; }

echo "-- dockerd (vfs)"
dockerd --storage-driver=vfs --data-root "$work/data" --exec-root "$work/exec" \
  --host "$DOCKER_HOST" --pidfile "$work/docker.pid" >"$work/dockerd.log" 2>&1 &
for _ in $(seq 100); do docker info >/dev/null 2>&1 && break; sleep 0.2; done
docker info >/dev/null 2>&1 || { tail -20 "$work/dockerd.log" >&2; fail "dockerd did not start"; }

echo "-- base images (debootstrap bookworm)"
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
debootstrap --variant=minbase bookworm "$work/runtime" "$mirror" >"$work/runtime.log" 2>&1 &
runtime_pid=$!
debootstrap --variant=minbase --include=gcc,libc6-dev bookworm "$work/builder" "$mirror" \
  >"$work/builder.log" 2>&1 || { tail "$work/builder.log" >&2; fail "debootstrap (builder)"; }
wait "$runtime_pid" || { tail "$work/runtime.log" >&2; fail "debootstrap (runtime)"; }
tar -C "$work/runtime" -c . | docker import - sluicegate-ci/runtime:bookworm >/dev/null
rm -rf "$work/runtime"

# The builder: this machine's toolchain (without its docs) and the crates the
# lock file names, so that `cargo build --locked` needs no network.
cargo fetch --locked >/dev/null
sysroot=$(rustc --print sysroot)
mkdir -p "$work/builder/usr/local/rust" "$work/builder/usr/local/cargo/registry"
cp -a "$sysroot/bin" "$sysroot/lib" "$work/builder/usr/local/rust/"
cp "$(rustup which cargo 2>/dev/null || command -v cargo)" "$work/builder/usr/local/rust/bin/"
cargo_home=${CARGO_HOME:-$HOME/.cargo}
cp -a "$cargo_home/registry/index" "$cargo_home/registry/cache" \
  "$work/builder/usr/local/cargo/registry/"
tar -C "$work/builder" -c . | docker import \
  --change 'ENV PATH=/usr/local/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV CARGO_HOME=/usr/local/cargo' \
  --change 'ENV CARGO_NET_OFFLINE=true' \
  - sluicegate-ci/builder:bookworm >/dev/null
rm -rf "$work/builder"

echo "-- docker build"
start=$(date +%s)
docker build -q -t sluicegate-ci/sluicegate \
  --build-arg BUILDER_IMAGE=sluicegate-ci/builder:bookworm \
  --build-arg RUNTIME_IMAGE=sluicegate-ci/runtime:bookworm . >"$work/build.log" 2>&1 \
  || { tail -30 "$work/build.log" >&2; fail "docker build"; }
echo "built in $(( $(date +%s) - start )) s"

echo "-- the pod: app (simulator) + sluicegate in its network namespace"
proxy_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
admin_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
# The app owns the namespace, so the pod's ports are published on it.
docker run -d --name sg-app -p "127.0.0.1:$proxy_port:8080" -p "127.0.0.1:$admin_port:9901" \
  sluicegate-ci/sluicegate sim --listen 127.0.0.1:9000 --workers 4 --service-ms 50 >/dev/null
docker run -d --name sg-proxy --network container:sg-app sluicegate-ci/sluicegate >/dev/null

proxy="http://127.0.0.1:$proxy_port"
admin="http://127.0.0.1:$admin_port"
status=""
for _ in $(seq 60); do
  status=$(docker inspect --format '{{.State.Health.Status}}' sg-proxy)
  [ "$status" = healthy ] && break
  [ "$status" = unhealthy ] && fail "HEALTHCHECK says unhealthy"
  sleep 1
done
[ "$status" = healthy ] || fail "HEALTHCHECK still '$status' after 60 s"
echo "HEALTHCHECK: healthy"

code=$(curl -s -o /dev/null -w '%{http_code}' "$proxy/ingest")
[ "$code" = 200 ] || fail "a request through the sidecar got $code"
curl -sf "$admin/readyz" | grep -q ready || fail "/readyz"

# Four workers at 50 ms serve 80 req/s; 128 connections for 3 s are far more.
wrk -t2 -c128 -d3s --timeout 5s "$proxy/ingest" >"$work/wrk.txt" &
load=$!
refusal=""
for _ in $(seq 100); do
  curl -s -D "$work/head" -o /dev/null "$proxy/ingest"
  if head -1 "$work/head" | grep -q ' 503'; then refusal=$(grep -i '^retry-after:' "$work/head" || true); break; fi
  sleep 0.02
done
wait "$load"
[ -n "$refusal" ] || fail "no 503 with Retry-After under overload"
metrics=$(curl -sf "$admin/metrics")
ok=$(echo "$metrics" | awk '/^sluicegate_requests_total\{.*outcome="2xx"/ {s+=$2} END {print s+0}')
shed=$(echo "$metrics" | awk '/^sluicegate_shed_total\{/ {s+=$2} END {print s+0}')
echo "under overload: $ok answered 2xx, $shed shed; a refusal said: ${refusal%$'\r'}"
[ "${ok%.*}" -gt 50 ] || fail "too little traffic flowed ($ok)"
[ "${shed%.*}" -gt 0 ] || fail "nothing was shed under overload"

echo "-- docker stop during a request"
curl -sf -X POST -H 'content-type: application/json' -d '{"service_ms": 3000}' \
  "$proxy/_sim/config" >/dev/null || fail "cannot slow the simulator down"
sleep 1 # the overload's queue has drained
curl -s -o "$work/slow.body" -w '%{http_code}' "$proxy/ingest" >"$work/slow.code" &
slow=$!
sleep 0.5
stop_start=$(date +%s)
docker stop -t 20 sg-proxy >/dev/null
wait "$slow" || true
code=$(cat "$work/slow.code")
exit_code=$(docker inspect --format '{{.State.ExitCode}}' sg-proxy)
echo "in-flight request: $code; sluicegate exited $exit_code after $(( $(date +%s) - stop_start )) s"
[ "$code" = 200 ] || fail "the in-flight request got $code, not 200"
[ "$exit_code" = 0 ] || fail "sluicegate exited $exit_code"
docker logs sg-proxy 2>&1 | grep -q drained || fail "no 'drained' in the log"
echo "docker: ok"
