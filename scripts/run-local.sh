#!/usr/bin/env bash
# Runs the main job on one machine: registry-server with its embedded
# defaults, listening on 127.0.0.1:50051 (metrics on 127.0.0.1:9464), plus
# one node-agent with two fake GPUs. Ctrl-C stops both; the agent
# deregisters on the way out.
#
#   scripts/run-local.sh                 # registry + agent "local-gpu-node"
#   AGENT_ARGS="--fake-gpus 8" scripts/run-local.sh
#
# It builds the same release binaries as scripts/build-images.sh and
# `cargo run --release`, so one build serves all three. The compose stack
# publishes the same ports: stop one before starting the other.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --locked --bins -p registry-server -p node-agent -p registry-ctl
target=${CARGO_TARGET_DIR:-target}/release

"$target/registry-server" --listen 127.0.0.1:50051 --metrics-listen 127.0.0.1:9464 &
registry=$!
agent=""
stop() {
  # SIGTERM: the agent deregisters, the registry shuts down gracefully.
  [ -n "$agent" ] && kill -TERM "$agent" 2>/dev/null && wait "$agent" 2>/dev/null || true
  kill -TERM "$registry" 2>/dev/null && wait "$registry" 2>/dev/null || true
}
trap stop EXIT INT TERM

# Start the agent once the registry answers health, so its first line is
# not a connection-refused warning.
for _ in $(seq 1 100); do
  "$target/registry-ctl" --registry http://127.0.0.1:50051 --timeout 1s health >/dev/null 2>&1 && break
  kill -0 "$registry" 2>/dev/null || { echo "run-local: registry-server exited" >&2; exit 1; }
  sleep 0.1
done

# shellcheck disable=SC2086 # AGENT_ARGS is a list of flags
"$target/node-agent" --registry http://127.0.0.1:50051 --node-id local-gpu-node \
  --address http://127.0.0.1:9200 --fake-gpus 2 --pool pool-0 ${AGENT_ARGS:-} &
agent=$!

echo "registry on 127.0.0.1:50051 (metrics on 127.0.0.1:9464), agent pid $agent; try:"
echo "  grpcurl -plaintext 127.0.0.1:50051 registry.v1.NodeRegistry/ListNodes"
wait "$agent"
