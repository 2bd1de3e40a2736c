#!/usr/bin/env bash
# Runs the main job on one machine: registry-server with its embedded
# defaults, listening on 127.0.0.1:50051 (metrics on 127.0.0.1:9464), plus
# one node-agent with two fake GPUs. Ctrl-C stops both; the agent
# deregisters on the way out. The registry keeps its state (nodes,
# sessions, cordons) in data/<listen address>/registry.redb under the
# repository (git-ignored), so a restart of this script finds it again.
#
#   scripts/run-local.sh                 # registry + agent "local-gpu-node"
#   AGENT_ARGS="--fake-gpus 8" scripts/run-local.sh
#   RUN_LOCAL_LISTEN=127.0.0.1:50061 RUN_LOCAL_METRICS=127.0.0.1:9465 scripts/run-local.sh
#   RUN_LOCAL_PROFILE=debug scripts/run-local.sh   # the debug build `cargo test` made
#   RUN_LOCAL_DATA_DIR=/tmp/registry scripts/run-local.sh  # state elsewhere
#
# It builds the same release binaries as scripts/build-images.sh and
# `cargo run --release`, so one build serves all three. The compose stack
# publishes the same ports: stop one before starting the other.
set -euo pipefail
cd "$(dirname "$0")/.."

listen=${RUN_LOCAL_LISTEN:-127.0.0.1:50051}
metrics=${RUN_LOCAL_METRICS:-127.0.0.1:9464}
profile=${RUN_LOCAL_PROFILE:-release}
# One directory per listen address: two runs side by side never share a
# store file (the second would be refused: the file is locked).
data_dir=${RUN_LOCAL_DATA_DIR:-data/${listen//:/-}}
if [ "$profile" = release ]; then
  cargo build --release --locked --bins -p registry-server -p node-agent -p registry-ctl
else
  cargo build --locked --bins -p registry-server -p node-agent -p registry-ctl
fi
target=${CARGO_TARGET_DIR:-target}/$([ "$profile" = release ] && echo release || echo debug)

"$target/registry-server" --listen "$listen" --metrics-listen "$metrics" \
  --store embedded --data-dir "$data_dir" &
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
  "$target/registry-ctl" --registry "http://$listen" --timeout 1s health >/dev/null 2>&1 && break
  kill -0 "$registry" 2>/dev/null || { echo "run-local: registry-server exited" >&2; exit 1; }
  sleep 0.1
done

# shellcheck disable=SC2086 # AGENT_ARGS is a list of flags
# One pool serving a model (its endpoint is where an engine would listen)
# and one model staged on disk, so FindPools and ListModels have answers.
"$target/node-agent" --registry "http://$listen" --node-id local-gpu-node \
  --address http://127.0.0.1:9200 --fake-gpus 2 --label zone=local \
  --pool pool-0,model=llama-3.1-8b,engine=llamacpp,slots=4,endpoint=http://127.0.0.1:8081 \
  --model-available qwen2.5-7b ${AGENT_ARGS:-} &
agent=$!

echo "registry on $listen (metrics on $metrics), agent pid $agent; try:"
echo "  grpcurl -plaintext $listen registry.v1.NodeRegistry/ListNodes"
wait "$agent"
