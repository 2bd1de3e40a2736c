#!/usr/bin/env bash
# Runs the main job on one machine: registry-server with its embedded
# defaults on 127.0.0.1:50051 plus one node-agent with two fake GPUs.
# Ctrl-C stops both; the agent deregisters on the way out.
#
#   scripts/run-local.sh                 # registry + agent "local-gpu-node"
#   AGENT_ARGS="--fake-gpus 8" scripts/run-local.sh
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --bins -p registry-server -p node-agent
target=${CARGO_TARGET_DIR:-target}/debug

"$target/registry-server" --listen 127.0.0.1:50051 --metrics-listen 127.0.0.1:9464 &
registry=$!
agent=""
stop() {
  # SIGTERM: the agent deregisters, the registry shuts down gracefully.
  [ -n "$agent" ] && kill -TERM "$agent" 2>/dev/null && wait "$agent" 2>/dev/null || true
  kill -TERM "$registry" 2>/dev/null && wait "$registry" 2>/dev/null || true
}
trap stop EXIT INT TERM

# shellcheck disable=SC2086 # AGENT_ARGS is a list of flags
"$target/node-agent" --registry http://127.0.0.1:50051 --node-id local-gpu-node \
  --address http://127.0.0.1:9200 --fake-gpus 2 --pool pool-0 ${AGENT_ARGS:-} &
agent=$!

echo "registry on 127.0.0.1:50051 (metrics on :9464), agent pid $agent; try:"
echo "  grpcurl -plaintext 127.0.0.1:50051 registry.v1.NodeRegistry/ListNodes"
wait "$agent"
