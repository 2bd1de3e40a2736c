# shellcheck shell=bash
# Sourced by scripts/check-monitoring.sh and scripts/check-prometheus-sd.sh:
# a Prometheus program (promtool or prometheus) from PATH, or from Debian's
# `prometheus` package unpacked (not installed: installing would enable and
# start a Prometheus service) into target/tools/prometheus-deb.
#
#   prometheus_program promtool   # prints the path, or returns 1
#
# Expects a `log` function of the caller's.

prometheus_deb_dir=target/tools/prometheus-deb

prometheus_program() {
  local name=$1
  if command -v "$name" >/dev/null 2>&1; then
    command -v "$name"
    return 0
  fi
  local program=$prometheus_deb_dir/usr/bin/$name
  if [ ! -x "$program" ]; then
    if ! command -v apt-get >/dev/null 2>&1; then
      log "no $name on PATH and no apt-get to fetch Debian's prometheus package"
      return 1
    fi
    # A machine whose package lists were never fetched has no candidate.
    # (Output captured first: `| grep -q` would exit early and fail the
    # pipeline with SIGPIPE under pipefail.)
    local policy
    policy=$(apt-cache policy prometheus 2>/dev/null || true)
    if ! grep -q 'Candidate: [0-9]' <<<"$policy"; then
      if [ "$(id -u)" != 0 ]; then
        log "apt knows no 'prometheus' package and only root can run apt-get update"
        return 1
      fi
      log "apt-get update (no candidate for the prometheus package yet)"
      apt-get update -qq >&2
    fi
    log "fetching Debian's prometheus package into $prometheus_deb_dir (unpacked only, not installed)"
    local deb_dir
    deb_dir=$(mktemp -d)
    # apt's sandbox user must be able to write where the .deb lands.
    chmod 0777 "$deb_dir"
    (cd "$deb_dir" && apt-get download -qq prometheus) >&2
    rm -rf "$prometheus_deb_dir"
    mkdir -p "$prometheus_deb_dir"
    dpkg-deb -x "$deb_dir"/prometheus_*.deb "$prometheus_deb_dir"
    rm -rf "$deb_dir"
  fi
  [ -x "$program" ] && printf '%s\n' "$program"
}
