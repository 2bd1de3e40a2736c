#!/usr/bin/env bash
# Builds the registry-server, node-agent and etcd images on a machine that
# cannot pull any image (no registry access), from what the host has:
#
# 1. release binaries built on the host with cargo, and the host's Debian
#    etcd and etcdctl (/usr/bin; the packages etcd-server and etcd-client
#    are installed first when missing);
# 2. a local base image: `scratch` plus the shared libraries those binaries
#    (and /bin/sh) need as ldd reports them, an unprivileged user 10001 in
#    /etc/passwd, and /tmp, imported with `docker import`;
# 3. the images, from the repository's Dockerfile and
#    packaging/etcd/Dockerfile (the same files a machine with internet
#    builds from), with that base as their base images and PREBUILT=1, so
#    their first stage takes the host's binaries instead of compiling or
#    installing.
#
# Usage: scripts/build-images.sh
# Environment:
#   IMAGE_PREFIX  image name prefix            [node-registry]
#   IMAGE_TAG     tag of the images            [local]
#   BASE_IMAGE    name of the local base image [$IMAGE_PREFIX/base:local]
#
# The images run on the host's libc, so the host must be the same Linux
# distribution family as the images' users expect (here Debian bookworm,
# like the Dockerfile's default bases).
set -euo pipefail
cd "$(dirname "$0")/.."

prefix=${IMAGE_PREFIX:-node-registry}
tag=${IMAGE_TAG:-local}
base=${BASE_IMAGE:-$prefix/base:local}
bins=(registry-server node-agent registry-ctl)
etcd_bins=(/usr/bin/etcd /usr/bin/etcdctl)
dist=target/docker-dist

log() { printf 'build-images: %s\n' "$*" >&2; }

# etcd for the compose profile `ha` comes from Debian's packages on the host.
if [ ! -x /usr/bin/etcd ] || [ ! -x /usr/bin/etcdctl ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    log "installing etcd-server and etcd-client (the etcd image is made from them)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends etcd-server etcd-client >/dev/null
  else
    log "need /usr/bin/etcd and /usr/bin/etcdctl for the etcd image: install the packages etcd-server and etcd-client"
    exit 1
  fi
fi

log "building release binaries on the host"
cargo build --release --locked --bins -p registry-server -p node-agent -p registry-ctl
release_dir="${CARGO_TARGET_DIR:-target}/release"
rm -rf "$dist"
# data-dir: the empty directory the Dockerfile copies to /var/lib/registry
# (the local images have a shell but no mkdir).
mkdir -p "$dist/data-dir"
# Debug line tables off, symbols kept (backtraces still name functions):
# the same as the Dockerfile's own build stage does.
for bin in "${bins[@]}"; do
  if command -v strip >/dev/null 2>&1; then
    strip --strip-debug -o "$dist/$bin" "$release_dir/$bin"
  else
    cp "$release_dir/$bin" "$dist/$bin"
  fi
done
# etcd and etcdctl as Debian ships them (already stripped), and the etcd
# image's data directory, private as etcd wants it.
mkdir -p "$dist/etcd"
cp "${etcd_bins[@]}" "$dist/etcd/"
mkdir -m 0700 "$dist/etcd-data"

rootfs=$(mktemp -d)
trap 'rm -rf "$rootfs"' EXIT

# Every shared library (and the dynamic loader) the binaries, etcd and
# /bin/sh load, at the same path as on the host. /bin/sh is there because
# RUN in the Dockerfiles' first stages needs a shell.
log "collecting shared libraries for the local base image"
shell=$(readlink -f /bin/sh)
mapfile -t libs < <(
  for program in "${bins[@]/#/$dist/}" "${etcd_bins[@]}" "$shell"; do
    ldd "$program" | awk '
      /=> \// { print $3; next }         # libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)
      /^[[:space:]]*\// { print $1 }    # /lib64/ld-linux-x86-64.so.2 (0x...)
    '
  done | sort -u
)
for lib in "${libs[@]}"; do
  mkdir -p "$rootfs$(dirname "$lib")"
  cp -L "$lib" "$rootfs$lib"
done
mkdir -p "$rootfs/bin" "$rootfs/etc" "$rootfs/usr/local/bin"
mkdir -m 1777 "$rootfs/tmp"
cp -L "$shell" "$rootfs/bin/sh"
cat >"$rootfs/etc/passwd" <<'PASSWD'
root:x:0:0:root:/root:/bin/sh
registry:x:10001:10001:registry:/nonexistent:/usr/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin
PASSWD
cat >"$rootfs/etc/group" <<'GROUP'
root:x:0:
registry:x:10001:
nogroup:x:65534:
GROUP
echo 'hosts: files dns' >"$rootfs/etc/nsswitch.conf"

# Each rebuild re-tags the names below; the images they pointed to before
# are removed afterwards, so repeated builds leave no <none> images behind.
image_id() { docker image inspect -f '{{.Id}}' "$1" 2>/dev/null || true; }
replaced=()
remember() { local id; id=$(image_id "$1"); [ -n "$id" ] && replaced+=("$id") || true; }

remember "$base"
log "importing $base (${#libs[@]} libraries)"
tar -C "$rootfs" -c . | docker import \
  --change 'ENV PATH=/usr/local/bin:/usr/bin:/bin' \
  --message "local base image of scripts/build-images.sh" \
  - "$base" >/dev/null

for target in registry-server node-agent; do
  remember "$prefix/$target:$tag"
  log "building $prefix/$target:$tag"
  docker build --quiet \
    --target "$target" \
    --build-arg RUST_IMAGE="$base" \
    --build-arg RUNTIME_IMAGE="$base" \
    --build-arg PREBUILT=1 \
    -t "$prefix/$target:$tag" \
    . >/dev/null
done
remember "$prefix/etcd:$tag"
log "building $prefix/etcd:$tag"
docker build --quiet \
  --file packaging/etcd/Dockerfile \
  --build-arg BASE_IMAGE="$base" \
  --build-arg PREBUILT=1 \
  -t "$prefix/etcd:$tag" \
  . >/dev/null
# Old images that no tag names any more, and the untagged build stages.
current=" $(image_id "$base") $(image_id "$prefix/registry-server:$tag") $(image_id "$prefix/node-agent:$tag") $(image_id "$prefix/etcd:$tag") "
for id in "${replaced[@]}"; do
  [[ "$current" == *" $id "* ]] || docker rmi "$id" >/dev/null 2>&1 || true
done
docker image prune --force --filter "label=io.node-registry.stage=build" >/dev/null
docker images --filter "reference=$prefix/*:$tag" --filter "reference=$base"
