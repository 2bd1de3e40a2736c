#!/usr/bin/env bash
# Runs Docker Compose with whichever form this machine has: the v2 plugin
# (`docker compose`) or the v1 binary (`docker-compose`). Both read the same
# docker-compose.yml; the v1 binary does not know `docker compose`'s syntax
# ("unknown shorthand flag"), so scripts and README call this instead.
#
#   scripts/compose.sh up -d
#   scripts/compose.sh ps
#   scripts/compose.sh down -v
set -euo pipefail
cd "$(dirname "$0")/.."
if docker compose version >/dev/null 2>&1; then
  exec docker compose "$@"
elif command -v docker-compose >/dev/null 2>&1; then
  exec docker-compose "$@"
fi
echo "compose.sh: neither 'docker compose' (v2 plugin) nor 'docker-compose' (v1) is installed" >&2
exit 127
