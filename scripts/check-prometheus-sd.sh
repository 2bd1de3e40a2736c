#!/usr/bin/env bash
# Checks the registry's Prometheus HTTP service discovery against a real
# Prometheus, on loopback, in about 20 s:
#
#   1. a registry (debug build) on 127.0.0.1 with its metrics port, and two
#      node-agents with fake GPUs, each serving --metrics-listen
#   2. a Prometheus whose only scrape job for agents is `http_sd_configs`
#      against the registry's /sd/nodes (refresh 1s, scrape 1s)
#   3. both agents' targets are discovered and scraped (health "up"), with
#      the node_id label the registry gave them
#   4. Prometheus scraped the registry's per-RPC metrics too
#   5. one agent stopped with SIGTERM (it deregisters): its target disappears
#
# Every port is free when picked (a socket bound to port 0, then released);
# none is guessed. One `ok` or `FAIL` line per check, then `N passed,
# N failed`; exit status 1 when any failed. Everything started is stopped
# and the scratch directory removed on any exit.
#
# Usage: scripts/check-prometheus-sd.sh
# Environment:
#   SD_CHECK_TIMEOUT  seconds each wait may take [30]
#   SKIP_BUILD=1      use target/debug/{registry-server,node-agent} as built
#
# The prometheus binary: the one on PATH, else the Debian package
# `prometheus` is downloaded with `apt-get download` and only unpacked into
# target/tools/prometheus-deb (shared with scripts/check-monitoring.sh,
# which takes promtool from it). Nothing is installed system-wide.
set -euo pipefail
cd "$(dirname "$0")/.."

wait_s=${SD_CHECK_TIMEOUT:-30}

log() { printf 'check-prometheus-sd: %s\n' "$*" >&2; }

passed=0
failed=0
ok() { printf 'ok    %s\n' "$*"; passed=$((passed + 1)); }
fail() { printf 'FAIL  %s\n' "$1"; [ -z "${2:-}" ] || printf '%s\n' "$2" | sed 's/^/      /'; failed=$((failed + 1)); }
summary() { printf '%d passed, %d failed\n' "$passed" "$failed"; }

scratch=$(mktemp -d)
pids=()
cleanup() {
  local pid
  for pid in "${pids[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  for pid in "${pids[@]}"; do
    # Bounded: a process that ignores SIGTERM gets SIGKILL after 5 s.
    for _ in $(seq 50); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  rm -rf "$scratch"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- prometheus --------------------------------------------------------------
# shellcheck source=scripts/lib/prometheus-deb.sh
. scripts/lib/prometheus-deb.sh
find_prometheus() {
  prometheus=$(prometheus_program prometheus)
}

if ! find_prometheus; then
  fail "prometheus: not found and could not be fetched"
  summary
  exit 1
fi
log "using $("$prometheus" --version 2>&1 | head -n 1) ($prometheus)"

# ---- binaries ----------------------------------------------------------------
if [ "${SKIP_BUILD:-}" != 1 ]; then
  log "cargo build -p registry-server -p node-agent"
  cargo build -q -p registry-server -p node-agent >&2
fi
registry_bin=target/debug/registry-server
agent_bin=target/debug/node-agent
for bin in "$registry_bin" "$agent_bin"; do
  if [ ! -x "$bin" ]; then
    fail "$bin: not built"
    summary
    exit 1
  fi
done

# A port free now: bound to 0 by the kernel, read back, released.
free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

# wait_for WHAT COMMAND...: retries COMMAND every 0.5 s for $wait_s seconds.
wait_for() {
  local what=$1 deadline=$((SECONDS + wait_s))
  shift
  until "$@" >/dev/null 2>&1; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      return 1
    fi
    sleep 0.5
  done
}

# http_get URL: the body, failing on a connection error or a non-2xx status.
http_get() {
  python3 - "$1" <<'EOF'
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=5) as response:
    sys.stdout.write(response.read().decode())
EOF
}

# targets_check PORT JOB EXPECT...: Prometheus' active targets of JOB are
# exactly the node_ids EXPECT (all "up"); "none" expects no target at all.
targets_check() {
  local port=$1 job=$2
  shift 2
  http_get "http://127.0.0.1:$port/api/v1/targets?state=active" >"$scratch/targets.json" || return 1
  python3 - "$scratch/targets.json" "$job" "$@" <<'EOF'
import json, sys
path, job, *expect = sys.argv[1:]
expect = [] if expect == ["none"] else sorted(expect)
targets = [t for t in json.load(open(path))["data"]["activeTargets"]
           if t["labels"].get("job") == job]
found = sorted(t["labels"].get("node_id", "?") for t in targets)
healthy = all(t["health"] == "up" for t in targets)
sys.exit(0 if found == expect and healthy else 1)
EOF
}

# query_at_least PORT EXPR MIN: the PromQL EXPR's first value is >= MIN.
query_at_least() {
  local port=$1 expr=$2 min=$3
  python3 - "http://127.0.0.1:$port/api/v1/query" "$expr" "$min" <<'EOF'
import json, sys, urllib.parse, urllib.request
url, expr, minimum = sys.argv[1], sys.argv[2], float(sys.argv[3])
with urllib.request.urlopen(url + "?" + urllib.parse.urlencode({"query": expr}), timeout=5) as r:
    result = json.load(r)["data"]["result"]
sys.exit(0 if result and float(result[0]["value"][1]) >= minimum else 1)
EOF
}

# ---- 1. registry and agents ----------------------------------------------------
grpc_port=$(free_port)
metrics_port=$(free_port)
"$registry_bin" --listen "127.0.0.1:$grpc_port" --metrics-listen "127.0.0.1:$metrics_port" --store memory \
  --node-timeout 3s >"$scratch/registry.log" 2>&1 &
pids+=("$!")
if wait_for "the registry's metrics port" http_get "http://127.0.0.1:$metrics_port/sd/nodes"; then
  ok "registry-server serves /sd/nodes on 127.0.0.1:$metrics_port (gRPC 127.0.0.1:$grpc_port)"
else
  fail "registry-server did not serve /sd/nodes" "$(tail -n 20 "$scratch/registry.log")"
  summary
  exit 1
fi

start_agent() {
  local node_id=$1 port
  port=$(free_port)
  "$agent_bin" --registry "http://127.0.0.1:$grpc_port" --node-id "$node_id" \
    --machine-id "machine-$node_id" --address "http://127.0.0.1:9200" \
    --fake-gpus 2 --pool "pool-0,engine=llamacpp,model=m" --label rack=r1 \
    --heartbeat-interval 1s --metrics-listen "127.0.0.1:$port" \
    >"$scratch/$node_id.log" 2>&1 &
  agent_pid=$!
  pids+=("$agent_pid")
}
start_agent sd-agent-a
agent_a_pid=$agent_pid
start_agent sd-agent-b

sd_lists_both() {
  http_get "http://127.0.0.1:$metrics_port/sd/nodes" | python3 -c '
import json, sys
groups = json.load(sys.stdin)
ids = sorted(g["labels"]["node_id"] for g in groups)
sys.exit(0 if ids == ["sd-agent-a", "sd-agent-b"] else 1)'
}
if wait_for "both agents in /sd/nodes" sd_lists_both; then
  ok "/sd/nodes lists both agents"
else
  fail "/sd/nodes does not list both agents" "$(http_get "http://127.0.0.1:$metrics_port/sd/nodes" 2>&1 || true)"
fi

# ---- 2. prometheus -----------------------------------------------------------
prom_port=$(free_port)
cat >"$scratch/prometheus.yml" <<EOF
global:
  scrape_interval: 1s
  scrape_timeout: 1s
scrape_configs:
  - job_name: registry
    static_configs:
      - targets: ["127.0.0.1:$metrics_port"]
  - job_name: node-agents
    http_sd_configs:
      - url: http://127.0.0.1:$metrics_port/sd/nodes
        refresh_interval: 1s
EOF
"$prometheus" --config.file="$scratch/prometheus.yml" --storage.tsdb.path="$scratch/tsdb" \
  --web.listen-address="127.0.0.1:$prom_port" >"$scratch/prometheus.log" 2>&1 &
pids+=("$!")
if wait_for "Prometheus ready" http_get "http://127.0.0.1:$prom_port/-/ready"; then
  ok "prometheus ready on 127.0.0.1:$prom_port"
else
  fail "prometheus did not become ready" "$(tail -n 20 "$scratch/prometheus.log")"
  summary
  exit 1
fi

# ---- 3. both agents discovered and up ------------------------------------------
if wait_for "both agent targets up" targets_check "$prom_port" node-agents sd-agent-a sd-agent-b; then
  ok "prometheus discovered both agents through /sd/nodes and scrapes them (health up)"
else
  fail "prometheus does not scrape both agents" "$(cat "$scratch/targets.json" 2>/dev/null || true)"
fi
if wait_for "agent acks in Prometheus" query_at_least "$prom_port" \
  'count(node_agent_heartbeat_acks_total{job="node-agents",label_rack="r1"} >= 1)' 2; then
  ok "both agents' node_agent_heartbeat_acks_total scraped, with the registry's labels"
else
  fail "no heartbeat acks of both agents in Prometheus"
fi

# ---- 4. the registry's own metrics -------------------------------------------
if wait_for "registry gRPC metrics" query_at_least "$prom_port" \
  'sum(grpc_server_handled_total{job="registry",grpc_method="Register",grpc_code="OK"})' 2; then
  ok "the registry's grpc_server_handled_total counts the two registrations"
else
  fail "grpc_server_handled_total of Register not scraped"
fi

# ---- 5. a stopped agent disappears -------------------------------------------
kill -TERM "$agent_a_pid"
if wait_for "sd-agent-a gone" targets_check "$prom_port" node-agents sd-agent-b; then
  ok "after SIGTERM (deregistered) sd-agent-a's target disappeared; sd-agent-b stays up"
else
  fail "sd-agent-a's target did not disappear" "$(cat "$scratch/targets.json" 2>/dev/null || true)"
fi

summary
[ "$failed" -eq 0 ]
