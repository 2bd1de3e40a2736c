# shellcheck shell=bash
# Sourced by scripts/compose-test.sh and scripts/compose-test-ha.sh: their
# bookkeeping (ok/FAILED lines and the closing "N passed, N failed" line),
# the teardown that always runs, polling against a deadline, and the
# questions both ask the stack.
#
# Expects, before compose_test_start:
#   test_name   the prefix of every line ("compose-test")
#   compose     an array: the compose command with project and file flags
#   project     the project name, for the teardown's warning

passed=0

log() { printf '%s: %s\n' "$test_name" "$*"; }
pass() {
  passed=$((passed + 1))
  log "ok $passed - $*"
}
fail() {
  log "FAILED - $*"
  exit 1
}

# The stack is always torn down (down -v), also on failure or Ctrl-C; a
# failure prints the containers' logs first.
compose_teardown() {
  local status=$?
  trap - EXIT INT TERM
  if [ "$status" -ne 0 ]; then
    log "containers' logs:"
    "${compose[@]}" logs --no-color --tail "${COMPOSE_TEST_LOG_LINES:-60}" 2>&1 || true
    echo "$test_name: $passed passed, 1 failed"
  fi
  log "tearing the stack down"
  "${compose[@]}" down -v --remove-orphans --timeout 5 >/dev/null 2>&1 ||
    log "warning: 'down' failed; remove project $project by hand"
  exit "$status"
}

# Installs the teardown; call before anything is started.
compose_test_start() {
  trap compose_teardown EXIT
  trap 'exit 130' INT TERM
}

# The closing line of a run that passed.
compose_test_passed() {
  log "all checks passed in $(($(date +%s) - started)) s"
  echo "$test_name: $passed passed, 0 failed"
}

now_ms() { date +%s%3N; }

# wait_for WHAT SECONDS COMMAND...: polls COMMAND every 200 ms until it
# succeeds; fails the test with COMMAND's last output after SECONDS.
wait_for() {
  local what=$1 seconds=$2
  shift 2
  local start deadline last
  start=$(now_ms)
  deadline=$((start + seconds * 1000))
  while true; do
    if last=$("$@" 2>&1); then
      pass "$what ($(($(now_ms) - start)) ms)"
      return 0
    fi
    if [ "$(now_ms)" -ge "$deadline" ]; then
      fail "$what: not true after ${seconds}s; last seen: $last"
    fi
    sleep 0.2
  done
}

# healthy SERVICE: docker reports the container's HEALTHCHECK healthy.
healthy() {
  local id health
  id=$("${compose[@]}" ps -q "$1")
  health=$(docker inspect -f '{{.State.Health.Status}}' "$id")
  [ "$health" = healthy ] || {
    echo "$1 is $health"
    return 1
  }
}
