# sluicegate as a standalone proxy or a sidecar.
#
#   docker build -t sluicegate .
#   docker run --rm -p 8080:8080 -p 9901:9901 sluicegate
#   docker run --rm -v $PWD/my.toml:/etc/sluicegate/config.toml:ro sluicegate
#
# The image's config is the repository's config.toml with both listeners on
# 0.0.0.0, so that traffic and probes from outside the container reach them; the
# upstream stays http://127.0.0.1:9000, which is the application in a sidecar's pod.
#
# The base images are build arguments so that a machine without a registry can
# build from local stand-ins (scripts/check-docker.sh does, in CI).

ARG BUILDER_IMAGE=rust:1-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

FROM ${BUILDER_IMAGE} AS build
# One COPY (what .dockerignore leaves): every build step is a layer, and a
# storage driver without overlays (vfs) stores each one whole.
COPY . /src
WORKDIR /src
RUN cargo build --release --locked --bin sluicegate \
 && sed -e 's/^listen = "127.0.0.1:8080"/listen = "0.0.0.0:8080"/' \
        -e 's/^admin_listen = "127.0.0.1:9901"/admin_listen = "0.0.0.0:9901"/' \
        config.toml > config.container.toml \
 && ./target/release/sluicegate check-config config.container.toml

FROM ${RUNTIME_IMAGE}
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin sluicegate
COPY --from=build /src/target/release/sluicegate /usr/local/bin/sluicegate
COPY --from=build /src/config.container.toml /etc/sluicegate/config.toml
USER 10001
EXPOSE 8080 9901
STOPSIGNAL SIGTERM
# No curl in the slim image: bash's /dev/tcp speaks enough HTTP for /healthz.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/9901 && printf 'GET /healthz HTTP/1.0\\r\\n\\r\\n' >&3 && head -n1 <&3 | grep -q ' 200 '"]
ENTRYPOINT ["sluicegate"]
CMD ["--config", "/etc/sluicegate/config.toml"]
