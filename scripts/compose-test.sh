#!/usr/bin/env bash
# The compose test: brings docker-compose.yml up (registry-server and two
# node-agents with fake GPUs), and checks through the registry's gRPC API
# (registry-ctl) that
#   1. both agents are ONLINE with their GPUs and pools, and every
#      container's HEALTHCHECK turns healthy;
#   2. node-a cut off the network (docker network disconnect) goes OFFLINE
#      after the node timeout while node-b stays ONLINE;
#   3. node-a reconnected is ONLINE again, by itself;
#   4. node-b stopped (SIGTERM) is deregistered at once and exits 0.
# The stack is always torn down (down -v), also on failure or Ctrl-C, and a
# failure prints the containers' logs first.
#
# Usage: scripts/compose-test.sh
# Environment:
#   COMPOSE_TEST_SKIP_BUILD=1  use the images already built by
#                              scripts/build-images.sh instead of building
#   IMAGE_PREFIX, IMAGE_TAG    as in scripts/build-images.sh
set -euo pipefail
cd "$(dirname "$0")/.."

# Short timings so the test takes seconds; docker-compose.yml reads them.
export REGISTRY_NODE_TIMEOUT=3s REGISTRY_HEARTBEAT_INTERVAL=1s
export NODE_AGENT_BACKOFF_MAX=2s NODE_AGENT_KEEPALIVE_INTERVAL=2s NODE_AGENT_KEEPALIVE_TIMEOUT=2s
export REGISTRY_HEALTHCHECK_INTERVAL=1s AGENT_HEALTHCHECK_INTERVAL=1s
# Set and empty: free host ports, so a running stack or service on 50051
# and 9464 does not get in the way.
export REGISTRY_PORT='' REGISTRY_METRICS_PORT=''
prefix=${IMAGE_PREFIX:-node-registry}
tag=${IMAGE_TAG:-local}
export REGISTRY_SERVER_IMAGE="$prefix/registry-server:$tag"
export NODE_AGENT_IMAGE="$prefix/node-agent:$tag"
node_timeout_s=3

project="registry-compose-test-$$"
# scripts/compose.sh picks `docker compose` (v2) or `docker-compose` (v1).
compose=(scripts/compose.sh -p "$project" -f docker-compose.yml)
scripts/compose.sh version >/dev/null || exit 1
ctl=target/docker-dist/registry-ctl
test_name=compose-test
started=$(date +%s)
# shellcheck source=scripts/lib/compose-test.sh
. scripts/lib/compose-test.sh
compose_test_start

# node_is NODE WANT: the registry reports NODE as WANT (online, offline,
# absent).
node_is() {
  local got
  got=$("$ctl" --registry "$registry" --timeout 2s status "$1") || return 1
  [ "$got" = "$2" ] || {
    echo "$1 is $got, want $2"
    return 1
  }
}

# listed NODE GPUS POOL: `registry-ctl list` shows NODE online with GPUS
# GPUs and POOL.
listed() {
  local table
  table=$("$ctl" --registry "$registry" --timeout 2s list) || return 1
  awk -v node="$1" -v gpus="$2" -v pool="$3" '
    $1 == node && $2 == "online" && $3 == gpus && $4 == pool { found = 1 }
    END { exit !found }' <<<"$table" || {
    printf '%s\n' "$table"
    return 1
  }
}

if [ "${COMPOSE_TEST_SKIP_BUILD:-0}" != 1 ]; then
  log "building the images (scripts/build-images.sh)"
  scripts/build-images.sh >/dev/null
fi
[ -x "$ctl" ] || fail "$ctl is missing; run scripts/build-images.sh"

log "starting project $project"
# `up` returns once the registry is healthy and the agents are started
# (depends_on: service_healthy).
"${compose[@]}" up -d --no-build
registry=$("${compose[@]}" port registry 50051)
log "registry published on $registry"

wait_for "node-a is ONLINE" 30 node_is node-a online
wait_for "node-b is ONLINE" 30 node_is node-b online
wait_for "node-a has 2 GPUs and pool-a" 10 listed node-a 2 pool-a
wait_for "node-b has 4 GPUs and pool-b" 10 listed node-b 4 pool-b
for service in registry node-a node-b; do
  wait_for "$service's HEALTHCHECK is healthy" 30 healthy "$service"
done

network="${project}_default"
node_a=$("${compose[@]}" ps -q node-a)
docker network disconnect "$network" "$node_a"
log "node-a disconnected from $network"
wait_for "node-a cut off is OFFLINE" $((node_timeout_s + 10)) node_is node-a offline
node_is node-b online >/dev/null || fail "node-b is not ONLINE while node-a is cut off: $(node_is node-b online)"
pass "node-b stays ONLINE meanwhile"

docker network connect --alias node-a "$network" "$node_a"
log "node-a reconnected"
wait_for "node-a reconnected is ONLINE again" 30 node_is node-a online

"${compose[@]}" stop --timeout 10 node-b >/dev/null 2>&1
wait_for "node-b stopped is deregistered" 5 node_is node-b absent
exit_code=$(docker inspect -f '{{.State.ExitCode}}' "$("${compose[@]}" ps -q node-b)")
[ "$exit_code" = 0 ] || fail "node-b exited with $exit_code after SIGTERM"
pass "node-b exited 0"
node_is node-a online >/dev/null || fail "node-a is not ONLINE after node-b left: $(node_is node-a online)"
pass "node-a is untouched"

compose_test_passed
