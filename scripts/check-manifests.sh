#!/usr/bin/env bash
# Validates the Kubernetes manifests in packaging/kubernetes/ (one registry)
# and packaging/kubernetes-ha/ (replicas on etcd, an overlay of the first)
# without a cluster: every resource is checked against the Kubernetes API
# schemas that the PyPI package kubernetes-validate ships, in strict mode,
# so an unknown or misspelt field fails, and so does a kind the schemas do
# not know. For each directory:
#
#   1. kustomization.yaml lists every manifest in the directory, and each
#      manifest it lists exists (a directory it lists is a base);
#   2. each manifest on its own;
#   3. when kubectl or kustomize is on PATH, the rendered kustomization
#      (namespace, labels, patches and image transforms applied), as one
#      more entry.
#
# One `ok` or `FAIL` line per entry; exit status 1 when any fails.
#
# Usage: scripts/check-manifests.sh
# Environment:
#   K8S_VERSIONS                 Kubernetes versions to validate against [1.34.0 1.37.0]
#   KUBERNETES_VALIDATE_VERSION  the kubernetes-validate release to install
#                                when none fit is on PATH [1.37.0]
#
# A kubernetes-validate on PATH is used when it ships every version asked
# for; otherwise that release is installed with `python3 -m pip --target`
# into target/tools/ (ignored by git, reused by later runs; --target also
# works where the system Python refuses installs, PEP 668).
set -euo pipefail
cd "$(dirname "$0")/.."

dirs=(packaging/kubernetes packaging/kubernetes-ha)
read -r -a versions <<<"${K8S_VERSIONS:-1.34.0 1.37.0}"
tool_version=${KUBERNETES_VALIDATE_VERSION:-1.37.0}
tools=target/tools/kubernetes-validate-$tool_version

log() { printf 'check-manifests: %s\n' "$*" >&2; }

# kubernetes-validate X.Y.Z ships the schemas up to Kubernetes X.Y.
newest=$(printf '%s\n' "${versions[@]}" | sort -V | tail -n 1)
ships_newest() {
  local have
  have=$("$@" --version 2>/dev/null) || return 1
  [ "$(printf '%s\n' "$newest" "$have" | sort -V | head -n 1)" = "$newest" ]
}

validator=()
if command -v kubernetes-validate >/dev/null 2>&1 && ships_newest kubernetes-validate; then
  validator=(kubernetes-validate)
else
  validator=(env PYTHONPATH="$PWD/$tools" python3 -m kubernetes_validate)
  if ! ships_newest "${validator[@]}"; then
    if ! python3 -m pip --version >/dev/null 2>&1; then
      if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        log "installing python3-pip"
        apt-get update -qq && apt-get install -y -qq --no-install-recommends python3-pip >/dev/null
      else
        log "need kubernetes-validate, and python3 has no pip to install it: install python3-pip"
        exit 1
      fi
    fi
    log "installing kubernetes-validate $tool_version into $tools"
    rm -rf "$tools"
    PIP_ROOT_USER_ACTION=ignore python3 -m pip install --quiet --disable-pip-version-check --no-warn-script-location \
      --target "$tools" "kubernetes-validate==$tool_version"
    if ! ships_newest "${validator[@]}"; then
      log "kubernetes-validate $tool_version does not ship Kubernetes $newest; set KUBERNETES_VALIDATE_VERSION"
      exit 1
    fi
  fi
fi
version_args=()
for v in "${versions[@]}"; do version_args+=(-k "$v"); done

failed=0
checked=0
ok() { printf 'ok    %s\n' "$*"; checked=$((checked + 1)); }
fail() { printf 'FAIL  %s\n' "$1"; [ -z "${2:-}" ] || printf '%s\n' "$2" | sed 's/^/      /'; failed=$((failed + 1)); checked=$((checked + 1)); }

# validate NAME FILE: every resource in FILE passes for every version. The
# tool only warns about a kind it has no schema for, so a warning counts as
# a failure here (it is how a misspelt kind or apiVersion shows).
validate() {
  local name=$1 file=$2 out rc=0 passed
  out=$("${validator[@]}" --strict "${version_args[@]}" "$file" 2>&1) || rc=$?
  passed=$(grep -c ' passed for resource ' <<<"$out" || true)
  if [ "$rc" -ne 0 ] || grep -qv ' passed for resource ' <<<"$out" || [ "$passed" -eq 0 ]; then
    fail "$name" "${out:-(no resources found)}"
  else
    ok "$name (resources: $((passed / ${#versions[@]})); Kubernetes ${versions[*]})"
  fi
}

render=()
if command -v kubectl >/dev/null 2>&1; then
  render=(kubectl kustomize)
elif command -v kustomize >/dev/null 2>&1; then
  render=(kustomize build)
fi
rendered=$(mktemp --suffix=.yaml)
trap 'rm -f "$rendered"' EXIT

# check_dir DIR: the three checks above for one kustomization directory.
check_dir() {
  local dir=$1 listed problems file path out

  # 1. The resource list and the directory agree.
  listed=$(awk '
    /^resources:/ { inside = 1; next }
    /^[^[:space:]#]/ { inside = 0 }
    inside && $1 == "-" { print $2 }
  ' "$dir/kustomization.yaml")
  problems=""
  for file in $listed; do
    [ -f "$dir/$file" ] || [ -d "$dir/$file" ] || problems+="listed but missing: $file"$'\n'
  done
  for path in "$dir"/*.yaml; do
    file=${path##*/}
    [ "$file" = kustomization.yaml ] && continue
    grep -qxF "$file" <<<"$listed" || problems+="not listed in resources: $file"$'\n'
  done
  if [ -n "$problems" ]; then
    fail "$dir/kustomization.yaml (resources)" "${problems%$'\n'}"
  else
    ok "$dir/kustomization.yaml (resources: $(wc -w <<<"$listed") entries, every manifest listed)"
  fi

  # 2. Each manifest.
  for path in "$dir"/*.yaml; do
    [ "${path##*/}" = kustomization.yaml ] && continue
    validate "$path" "$path"
  done

  # 3. The kustomization as kubectl apply -k would send it.
  if [ ${#render[@]} -gt 0 ]; then
    if out=$("${render[@]}" "$dir" 2>&1 >"$rendered"); then
      validate "$dir rendered by '${render[*]}'" "$rendered"
    else
      fail "$dir rendered by '${render[*]}'" "$out"
    fi
  else
    log "neither kubectl nor kustomize is here: $dir/kustomization.yaml itself was not rendered"
  fi
}

for dir in "${dirs[@]}"; do
  check_dir "$dir"
done

if [ "$failed" -ne 0 ]; then
  log "$failed of $checked checks failed"
  exit 1
fi
log "all $checked checks passed"
