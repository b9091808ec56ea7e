#!/usr/bin/env bash
# Build the lmforge image on a machine that cannot pull from any registry:
#
#   scripts/build_image.sh                      # -> lmforge:dev
#   IMAGE=lmforge:test scripts/build_image.sh --build-arg EXTRAS=deepspeed
#
# 1. a Docker engine: $DOCKER_HOST if it answers, else scripts/docker_engine.sh starts a private one
#    (and this script prints the DOCKER_HOST line to use afterwards);
# 2. a base image, $BASE_IMAGE (default lmforge-base:bookworm): when it is not in the engine and is
#    that default, it is made locally with debootstrap (Debian bookworm minbase + python3, python3-venv,
#    ca-certificates) and `docker import` (~1 min, once: it stays in the engine);
# 3. a build context staged under $STAGE (default: the engine's state folder) with the repository's
#    files the Dockerfile copies and a local torch wheel in wheels/ ($TORCH_WHEEL, else the first
#    torch-2.13.0 cp311 wheel under pip's find-links folders, /opt/wheels or ~/.cache; none: the build
#    downloads torch from PyTorch's CPU index);
# 4. `docker build` with BuildKit (Debian's client), the CA bundle $CA_BUNDLE (default: $PIP_CERT,
#    else /etc/ssl/certs/ca-certificates.crt, when the file exists; CA_BUNDLE= disables it) as the
#    `ca` build secret, OCI labels (version, git revision, date), and any extra arguments given.
# Rebuilds are incremental: the base image, the torch and dependency layers and pip's download cache
# stay in the engine's data root; a code change rebuilds the last layer only.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
IMAGE=${IMAGE:-lmforge:dev}
DEFAULT_BASE=lmforge-base:bookworm
BASE_IMAGE=${BASE_IMAGE:-$DEFAULT_BASE}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
CA_BUNDLE=${CA_BUNDLE-${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}}
DOCKER=${DOCKER:-$([ -x /usr/bin/docker ] && echo /usr/bin/docker || command -v docker)}

log() { echo "build_image.sh: $*" >&2; }

# 1. the engine
if [ -z "${DOCKER_HOST:-}" ] || ! timeout 10 "$DOCKER" version >/dev/null 2>&1; then
  eval "$("$REPO/scripts/docker_engine.sh")"
  log "engine: $DOCKER_HOST (eval \"\$(scripts/docker_engine.sh)\" to use it)"
fi
export DOCKER_HOST
STAGE=${STAGE:-${LMFORGE_DOCKER_STATE:-/var/lib/lmforge-docker}/context}

# 2. the base image
if ! "$DOCKER" image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
  [ "$BASE_IMAGE" = "$DEFAULT_BASE" ] || { log "base image $BASE_IMAGE is not in the engine"; exit 1; }
  if ! command -v debootstrap >/dev/null 2>&1; then
    log "installing debootstrap with apt-get ..."
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap >&2 ||
      { apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap >&2; }
  fi
  rootfs=$(mktemp -d /var/tmp/lmforge-rootfs.XXXXXX)
  trap 'rm -rf "$rootfs"' EXIT
  log "debootstrap bookworm into $rootfs ..."
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates,passwd \
    bookworm "$rootfs" "$DEBIAN_MIRROR" >"$rootfs.log" 2>&1 ||
    { tail -n 20 "$rootfs.log" >&2; exit 1; }
  rm -f "$rootfs.log"
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  tar -C "$rootfs" -c . | "$DOCKER" import -c 'ENV LANG=C.UTF-8' \
    -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' - "$BASE_IMAGE" >/dev/null
  rm -rf "$rootfs"
  trap - EXIT
  log "base image $BASE_IMAGE made"
fi

# 3. the build context
find_wheel() {
  local dirs=() d
  for d in $(pip config get global.find-links 2>/dev/null) ${PIP_FIND_LINKS:-} /opt/wheels \
    "$HOME/.cache/lmforge/wheels" "$HOME/.cache/pip"; do
    [ -d "$d" ] && dirs+=("$d")
  done
  [ ${#dirs[@]} -gt 0 ] || return 0
  find "${dirs[@]}" -maxdepth 4 -name 'torch-2.13.0*-cp311-cp311-*linux*x86_64.whl' 2>/dev/null | head -n 1
}
TORCH_WHEEL=${TORCH_WHEEL-$(find_wheel)}
mkdir -p "$STAGE"
rm -rf "${STAGE:?}"/*
cp -a "$REPO"/{pyproject.toml,README.md,Dockerfile,.dockerignore,model,components,pipelines,serving,lmforge,configs,docker} "$STAGE"/
mkdir -p "$STAGE/wheels"
if [ -n "$TORCH_WHEEL" ]; then
  ln "$TORCH_WHEEL" "$STAGE/wheels/" 2>/dev/null || cp "$TORCH_WHEEL" "$STAGE/wheels/"
  log "torch wheel: $TORCH_WHEEL"
else
  log "no local torch wheel found: torch comes from the index"
fi

# 4. the build
secret=()
if [ -n "$CA_BUNDLE" ] && [ -f "$CA_BUNDLE" ]; then secret=(--secret "id=ca,src=$CA_BUNDLE"); fi
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$REPO/pyproject.toml" | head -n 1)
revision=$(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo unknown)
log "building $IMAGE from $BASE_IMAGE ..."
DOCKER_BUILDKIT=1 "$DOCKER" build --progress=plain \
  --build-arg BASE_IMAGE="$BASE_IMAGE" \
  --build-arg VERSION="$version" --build-arg REVISION="$revision" \
  --build-arg CREATED="$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
  "${secret[@]}" -t "$IMAGE" "$@" "$STAGE"
"$DOCKER" image prune -f >/dev/null  # the previous builds' untagged images (their shared layers stay)
log "built $IMAGE ($("$DOCKER" image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.2f GB", $1/1e9}'))"
