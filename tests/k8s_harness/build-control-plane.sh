#!/usr/bin/env bash
# Build (or reuse) the Kubernetes v1.20.2 control plane this harness runs: kube-apiserver, kube-controller-manager and
# kube-scheduler from Debian bookworm's `kubernetes` source package (the full upstream tree with vendor/), compiled
# offline with Debian's Go. etcd comes from Debian's etcd-server. Nothing is written into the repository: the
# binaries live under $TAPPER_K8S_CACHE (default ~/.cache/tapper-k8s/v1.20.2/bin).
#
#   build-control-plane.sh            build if missing (needs apt; ~5 min on 2 idle cores, longer when shared)
#   build-control-plane.sh --check    exit 0 if cached binaries are present, 1 otherwise (builds nothing)
#   build-control-plane.sh --deps     install only the runtime apt packages (etcd-server, postgresql)
#   build-control-plane.sh --fetch    install the runtime and build packages and fetch the sha256-checked source
#                                     tarball, without compiling: exit 0 if the build can go ahead on this machine
set -euo pipefail

VERSION=1.20.2
DEB_VERSION=1.20.5+really1.20.2-1.1+deb12u1
ORIG=kubernetes_1.20.5+really1.20.2.orig.tar.gz
ORIG_SHA256=b83c0780efb182d928dc63d46488a847f161f04e40a94b96bf5247dd671ecdfc
CACHE="${TAPPER_K8S_CACHE:-$HOME/.cache/tapper-k8s}"
BIN="$CACHE/v$VERSION/bin"
BINARIES=(kube-apiserver kube-controller-manager kube-scheduler)

have_binaries() {
  for b in "${BINARIES[@]}"; do
    [ -x "$BIN/$b" ] || return 1
  done
  "$BIN/kube-apiserver" --version 2>/dev/null | grep -q "v$VERSION"
}

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

apt_install() {
  local missing=()
  for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  echo "build-control-plane: apt-get install ${missing[*]}" >&2
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# Runtime packages the harness needs whether or not it builds: etcd (the API server's store) and PostgreSQL
# (MLflow's backend store, as in k8s/mlflow).
runtime_deps() { apt_install etcd-server postgresql; }

enable_deb_src() {
  # Add `deb-src` to the machine's existing Debian source entries (deb822 or one-line format): no host is written here.
  if apt-cache showsrc kubernetes 2>/dev/null | grep -q "^Version: $DEB_VERSION"; then return 0; fi
  local f
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    grep -q '^Types: deb$' "$f" && as_root sed -i 's/^Types: deb$/Types: deb deb-src/' "$f"
  done
  if [ -f /etc/apt/sources.list ] && grep -q '^deb ' /etc/apt/sources.list && ! grep -q '^deb-src ' /etc/apt/sources.list; then
    as_root sed -i -e 'p' -e 's/^deb /deb-src /' /etc/apt/sources.list  # each deb line, then its deb-src twin
  fi
  as_root apt-get update -qq
}

fetch_source() {  # the build packages and the pinned source tarball in $CACHE/src
  apt_install golang-go rsync dpkg-dev
  enable_deb_src
  mkdir -p "$CACHE/src"
  cd "$CACHE/src"
  if [ ! -f "$ORIG" ] || ! echo "$ORIG_SHA256  $ORIG" | sha256sum -c --quiet - 2>/dev/null; then
    rm -f "$ORIG"
    apt-get source --download-only "kubernetes=$DEB_VERSION" >&2
  fi
  echo "$ORIG_SHA256  $ORIG" | sha256sum -c --quiet - || { echo "build-control-plane: $ORIG sha256 mismatch" >&2; exit 1; }
}

case "${1:-}" in
  --check) have_binaries; exit $? ;;
  --deps) runtime_deps; exit 0 ;;
  --fetch) runtime_deps; fetch_source; echo "build-control-plane: build packages and $ORIG ready" >&2; exit 0 ;;
esac

runtime_deps
if have_binaries; then
  echo "build-control-plane: cached v$VERSION binaries in $BIN" >&2
  exit 0
fi

start=$(date +%s)
fetch_source
work="$CACHE/src"
mkdir -p "$BIN"
cd "$work"
rm -rf "kubernetes-$VERSION"
tar xzf "$ORIG"
cd "kubernetes-$VERSION"
# Debian's Go 1.19 builds the v1.20 tree offline from vendor/; GOFLAGS keeps it off the network.
export GOFLAGS=-mod=vendor GOPROXY=off GOTOOLCHAIN=local GOCACHE="$CACHE/gocache"
KUBE_GIT_VERSION=v$VERSION KUBE_GIT_MAJOR=1 KUBE_GIT_MINOR=20 KUBE_GIT_TREE_STATE=clean \
  make WHAT="cmd/kube-apiserver cmd/kube-controller-manager cmd/kube-scheduler" >&2
for b in "${BINARIES[@]}"; do install -m 0755 "_output/bin/$b" "$BIN/$b"; done
cd "$work" && rm -rf "kubernetes-$VERSION" "$CACHE/gocache"
have_binaries
echo "build-control-plane: built v$VERSION in $(( $(date +%s) - start )) s -> $BIN" >&2
