#!/usr/bin/env bash
# The compose `ha` test: brings up docker-compose.yml's profile `ha` (three
# etcd members, three registry replicas on them, two node-agents given all
# three replicas) and checks through the replicas' gRPC API (registry-ctl)
# that
#   1. exactly one replica leads (serves registry.v1.NodeRegistry), every
#      container's HEALTHCHECK turns healthy, and both agents are ONLINE;
#   2. a cordon made on the leader shows on the followers too;
#   3. after `docker kill` (SIGKILL) of the leader's container, one of the
#      two others leads within the lease TTL + 5 s, both agents heartbeat
#      to it (ONLINE and not suspect), and no replica ever lists a node
#      OFFLINE: both survivors are polled every 0.5 s from the kill until a
#      node timeout after the takeover, the end of the takeover grace;
#   4. ha-node-a is still cordoned, ha-node-b is not;
#   5. the killed replica, started again, comes back as a follower.
# The stack is always torn down (down -v), also on failure or Ctrl-C, and a
# failure prints the containers' logs first.
#
# Usage: scripts/compose-test-ha.sh
# Environment:
#   COMPOSE_TEST_SKIP_BUILD=1  use the images already built by
#                              scripts/build-images.sh instead of building
#   IMAGE_PREFIX, IMAGE_TAG    as in scripts/build-images.sh
set -euo pipefail
cd "$(dirname "$0")/.."

# Short timings so the test takes seconds; docker-compose.yml reads them.
lease_ttl_s=3
node_timeout_s=5
export REGISTRY_ETCD_LEASE_TTL=${lease_ttl_s}s REGISTRY_NODE_TIMEOUT=${node_timeout_s}s
export REGISTRY_HEARTBEAT_INTERVAL=1s
export NODE_AGENT_BACKOFF_MAX=1s NODE_AGENT_KEEPALIVE_INTERVAL=2s NODE_AGENT_KEEPALIVE_TIMEOUT=2s
export REGISTRY_HEALTHCHECK_INTERVAL=1s AGENT_HEALTHCHECK_INTERVAL=1s ETCD_HEALTHCHECK_INTERVAL=1s
# Set and empty: free host ports, so a running stack or service on 50061-3
# does not get in the way.
export HA_REGISTRY_1_PORT='' HA_REGISTRY_2_PORT='' HA_REGISTRY_3_PORT=''
prefix=${IMAGE_PREFIX:-node-registry}
tag=${IMAGE_TAG:-local}
export REGISTRY_SERVER_IMAGE="$prefix/registry-server:$tag"
export NODE_AGENT_IMAGE="$prefix/node-agent:$tag"
export ETCD_IMAGE="$prefix/etcd:$tag"

replicas=(registry-1 registry-2 registry-3)
agents=(ha-node-a ha-node-b)
services=(etcd-1 etcd-2 etcd-3 "${replicas[@]}" "${agents[@]}")
# The service only the leader serves (health per service).
leader_service=registry.v1.NodeRegistry

project="registry-compose-ha-test-$$"
# scripts/compose.sh picks `docker compose` (v2) or `docker-compose` (v1).
compose=(scripts/compose.sh -p "$project" -f docker-compose.yml --profile ha)
scripts/compose.sh version >/dev/null || exit 1
ctl=target/docker-dist/registry-ctl
test_name=compose-test-ha
started=$(date +%s)
# shellcheck source=scripts/lib/compose-test.sh
. scripts/lib/compose-test.sh
compose_test_start

# The replicas' published gRPC endpoints, by service name.
declare -A url

# leads REPLICA: REPLICA serves registry.v1.NodeRegistry (it is the leader).
leads() {
  "$ctl" --registry "${url[$1]}" --timeout 1s health --service "$leader_service" >/dev/null 2>&1
}

# one_leader REPLICA...: exactly one of the REPLICAs leads; prints it.
one_leader() {
  local replica found=()
  for replica in "$@"; do
    if leads "$replica"; then found+=("$replica"); fi
  done
  [ ${#found[@]} -eq 1 ] || {
    echo "leaders among $*: ${found[*]:-none}"
    return 1
  }
  echo "${found[0]}"
}

# follows REPLICA: REPLICA is alive (overall health SERVING) and does not
# lead.
follows() {
  "$ctl" --registry "${url[$1]}" --timeout 2s health >/dev/null || {
    echo "$1 is not SERVING"
    return 1
  }
  if leads "$1"; then
    echo "$1 leads"
    return 1
  fi
}

# nodes REPLICA: one line per node REPLICA lists, `NODE STATUS SUSPECT
# CORDONED` (online|offline, suspect|-, cordoned|-); fails with the error
# when REPLICA cannot answer. Reads are served by followers too.
nodes() {
  local json rc=0
  # stderr apart: a follower's answer comes with a staleness warning there.
  # list exits 1 when no node matches: an empty table, not an error.
  json=$("$ctl" --registry "${url[$1]}" --timeout 2s -o json list 2>/dev/null) || rc=$?
  [ "$rc" -le 1 ] || {
    echo "$1 cannot list nodes (exit $rc): $("$ctl" --registry "${url[$1]}" --timeout 2s list 2>&1 >/dev/null)"
    return 1
  }
  [ -n "$json" ] || return 0
  jq -r '[.nodeId,
          (.status | sub("^NODE_STATUS_"; "") | ascii_downcase),
          (if .suspect then "suspect" else "-" end),
          (if .admin.cordoned then "cordoned" else "-" end)] | @tsv' <<<"$json"
}

# serving_agents REPLICA: REPLICA lists every agent ONLINE and not suspect,
# that is, heartbeating to the leader since the leader's takeover.
serving_agents() {
  local table agent
  table=$(nodes "$1") || {
    echo "$table"
    return 1
  }
  for agent in "${agents[@]}"; do
    awk -v node="$agent" '$1 == node && $2 == "online" && $3 == "-" { found = 1 } END { exit !found }' \
      <<<"$table" || {
      echo "$1 lists:"
      printf '%s\n' "${table:-(no nodes)}"
      return 1
    }
  done
}

# cordon_is REPLICA NODE WANT: REPLICA lists NODE with cordon state WANT
# (cordoned or -).
cordon_is() {
  local table
  table=$(nodes "$1") || {
    echo "$table"
    return 1
  }
  awk -v node="$2" -v want="$3" '$1 == node && $4 == want { found = 1 } END { exit !found }' \
    <<<"$table" || {
    echo "$1 lists, wanting $2 $3:"
    printf '%s\n' "${table:-(no nodes)}"
    return 1
  }
}

if [ "${COMPOSE_TEST_SKIP_BUILD:-0}" != 1 ]; then
  log "building the images (scripts/build-images.sh)"
  scripts/build-images.sh >/dev/null
fi
[ -x "$ctl" ] || fail "$ctl is missing; run scripts/build-images.sh"
# jq reads registry-ctl's JSON (suspect and cordon are not in its table).
if ! command -v jq >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    log "installing jq"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends jq >/dev/null
  else
    fail "jq is missing (it reads registry-ctl's JSON); install the package jq"
  fi
fi

log "starting project $project (profile ha)"
# `up` returns once every etcd member and replica is healthy and the agents
# are started (depends_on: service_healthy).
"${compose[@]}" up -d --no-build "${services[@]}" ||
  fail "the stack did not come up (a container exited or stayed unhealthy; logs below)"
for replica in "${replicas[@]}"; do
  url[$replica]=$("${compose[@]}" port "$replica" 50051)
  log "$replica published on ${url[$replica]}"
done

# 1. One leader, healthy containers, both agents ONLINE.
wait_for "exactly one replica leads" 30 one_leader "${replicas[@]}"
leader=$(one_leader "${replicas[@]}") || fail "the leader changed meanwhile: $leader"
log "leader: $leader"
followers=()
for replica in "${replicas[@]}"; do
  [ "$replica" = "$leader" ] || followers+=("$replica")
done
wait_for "both agents are ONLINE on the leader" 30 serving_agents "$leader"
for service in "${services[@]}"; do
  wait_for "$service's HEALTHCHECK is healthy" 30 healthy "$service"
done

# 2. A cordon on the leader reaches the followers' copies.
"$ctl" --registry "${url[$leader]}" --timeout 3s cordon ha-node-a --reason "compose-test-ha" >/dev/null ||
  fail "cordon ha-node-a on the leader $leader failed"
pass "ha-node-a cordoned on the leader"
for replica in "${followers[@]}"; do
  wait_for "$replica (follower) shows ha-node-a cordoned" 10 cordon_is "$replica" ha-node-a cordoned
done

# 3. Kill the leader; watch both survivors until the takeover grace is over.
docker kill "$("${compose[@]}" ps -q "$leader")" >/dev/null
killed_ms=$(now_ms)
log "$leader (the leader) killed"
leader_deadline_ms=$((killed_ms + (lease_ttl_s + 5) * 1000))
new_leader=""
takeover_ms=0
agents_back=0
polls=0
while true; do
  polls=$((polls + 1))
  since_kill=$(($(now_ms) - killed_ms))
  for replica in "${followers[@]}"; do
    table=$(nodes "$replica") || fail "reads failed during the failover, ${since_kill} ms after the kill: $table"
    offline=$(awk '$2 != "online" { print $1 " " $2 }' <<<"$table")
    [ -z "$offline" ] || fail "$replica lists $offline, ${since_kill} ms after the kill (poll $polls)"
    for agent in "${agents[@]}"; do
      awk -v node="$agent" '$1 == node { found = 1 } END { exit !found }' <<<"$table" ||
        fail "$replica does not list $agent, ${since_kill} ms after the kill (poll $polls)"
    done
  done
  if [ -z "$new_leader" ]; then
    if found=$(one_leader "${followers[@]}"); then
      new_leader=$found
      takeover_ms=$(now_ms)
      pass "$new_leader leads $((takeover_ms - killed_ms)) ms after the kill (lease TTL ${lease_ttl_s}s)"
    elif [ "$(now_ms)" -ge "$leader_deadline_ms" ]; then
      fail "no single new leader $((lease_ttl_s + 5))s after the kill: $found"
    fi
  else
    found=$(one_leader "${followers[@]}") || fail "after the takeover: $found"
    [ "$found" = "$new_leader" ] || fail "the leader moved from $new_leader to $found"
    if [ "$agents_back" = 0 ] && serving_agents "$new_leader" >/dev/null; then
      agents_back=1
      pass "both agents heartbeat to $new_leader $(($(now_ms) - takeover_ms)) ms after its takeover"
    fi
    since_takeover=$(($(now_ms) - takeover_ms))
    if [ "$since_takeover" -ge $(((node_timeout_s + 2) * 1000)) ]; then
      [ "$agents_back" = 1 ] ||
        fail "the agents did not come back to $new_leader within the takeover grace: $(serving_agents "$new_leader")"
      break
    fi
  fi
  sleep 0.5
done
pass "no replica listed a node OFFLINE in $polls polls over $(($(now_ms) - killed_ms)) ms"

# 4. The cordon outlived the leader.
cordon_is "$new_leader" ha-node-a cordoned >/dev/null ||
  fail "ha-node-a lost its cordon: $(cordon_is "$new_leader" ha-node-a cordoned)"
cordon_is "$new_leader" ha-node-b - >/dev/null ||
  fail "ha-node-b is cordoned: $(cordon_is "$new_leader" ha-node-b -)"
pass "ha-node-a is still cordoned on $new_leader, ha-node-b is not"

# 5. The old leader rejoins as a follower.
"${compose[@]}" start "$leader" >/dev/null 2>&1
url[$leader]=$("${compose[@]}" port "$leader" 50051)
wait_for "$leader, started again, follows" 30 follows "$leader"
found=$(one_leader "${replicas[@]}") || fail "with $leader back: $found"
[ "$found" = "$new_leader" ] || fail "with $leader back the leader is $found, not $new_leader"
pass "$new_leader still leads"

compose_test_passed
