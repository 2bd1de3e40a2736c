# Images of registry-server and node-agent, one target each:
#
#   docker build --target registry-server -t node-registry/registry-server:local .
#   docker build --target node-agent      -t node-registry/node-agent:local .
#
# With internet access this compiles the release binaries in RUST_IMAGE and
# copies them into RUNTIME_IMAGE. Without it (no image can be pulled),
# scripts/build-images.sh builds the binaries on the host, makes a local
# base image from the host's own libraries, and builds these same stages
# with PREBUILT=1 and both base images pointing at that local base; see
# docs/containers.md.
#
# Only instructions the legacy builder understands are used (no BuildKit
# mounts or heredocs), because the legacy builder is all some engines have.

ARG RUST_IMAGE=rust:1-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

# ---------------------------------------------------------------------------
# build: the three release binaries in /src/target/docker-dist/, without
# debug line tables (symbols stay, so backtraces still name functions).
FROM ${RUST_IMAGE} AS build
# Lets scripts/build-images.sh remove this stage's untagged image afterwards
# (the legacy builder keeps one per build, shown as <none>).
LABEL io.node-registry.stage=build
# 1: take target/docker-dist/ from the build context as it is (built on a
# host with the same libc as RUNTIME_IMAGE); anything else: compile here.
ARG PREBUILT=0
WORKDIR /src
COPY . .
RUN set -eu; \
    if [ "$PREBUILT" = 1 ]; then \
        for bin in registry-server node-agent registry-ctl; do \
            [ -x "target/docker-dist/$bin" ] || { echo "PREBUILT=1 but target/docker-dist/$bin is missing" >&2; exit 1; }; \
        done; \
        [ -d target/docker-dist/data-dir ] || { echo "PREBUILT=1 but target/docker-dist/data-dir is missing" >&2; exit 1; }; \
    else \
        cargo build --release --locked --bins -p registry-server -p node-agent -p registry-ctl; \
        # data-dir: an empty directory for the runtime image's
        # /var/lib/registry (that image may have no shell to make one).
        mkdir -p target/docker-dist/data-dir; \
        for bin in registry-server node-agent registry-ctl; do \
            strip --strip-debug -o "target/docker-dist/$bin" "target/release/$bin"; \
        done; \
    fi

# ---------------------------------------------------------------------------
# registry-server: gRPC on 50051, Prometheus metrics on 9464.
FROM ${RUNTIME_IMAGE} AS registry-server
COPY --from=build /src/target/docker-dist/registry-server /src/target/docker-dist/registry-ctl /usr/local/bin/
# A fixed unprivileged uid/gid: no passwd entry or shell is needed, so the
# same lines work on any base image.
# The embedded store's directory (--data-dir), owned by the runtime user so
# the registry can write it; a volume, so it outlives the container.
COPY --from=build --chown=10001:10001 /src/target/docker-dist/data-dir/ /var/lib/registry/
USER 10001:10001
ENV REGISTRY_LISTEN=0.0.0.0:50051 \
    REGISTRY_METRICS_LISTEN=0.0.0.0:9464 \
    REGISTRY_STORE=embedded \
    REGISTRY_DATA_DIR=/var/lib/registry
VOLUME ["/var/lib/registry"]
EXPOSE 50051 9464
# grpc.health.v1 Check against this container's REGISTRY_LISTEN port.
HEALTHCHECK --interval=10s --timeout=4s --start-period=5s --retries=3 \
    CMD ["/usr/local/bin/registry-ctl", "--timeout", "3s", "health"]
ENTRYPOINT ["/usr/local/bin/registry-server"]

# ---------------------------------------------------------------------------
# node-agent: configure it with NODE_AGENT_* variables or flags.
FROM ${RUNTIME_IMAGE} AS node-agent
COPY --from=build /src/target/docker-dist/node-agent /src/target/docker-dist/registry-ctl /usr/local/bin/
USER 10001:10001
# Healthy while the registry lists this agent's node ONLINE (the node id
# and registry are resolved from the agent's own flags, environment and
# config file).
HEALTHCHECK --interval=10s --timeout=4s --start-period=10s --retries=3 \
    CMD ["/usr/local/bin/registry-ctl", "--timeout", "3s", "agent-check"]
ENTRYPOINT ["/usr/local/bin/node-agent"]
