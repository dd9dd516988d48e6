#!/usr/bin/env bash
# Builds the real control-plane binaries the tests run (kube-apiserver, kubectl,
# etcd, helm) from the Go module proxy and caches them by version, so only the
# first run on a machine pays for the build (several minutes on 2 cores).
#
# Why wrapper modules: k8s.io/kubernetes requires its staging modules at v0.0.0
# and replaces them with ./staging/src/..., so `go install` of its commands
# fails; a wrapper that requires k8s.io/kubernetes and replaces each staging
# module with its published v0.X.Y builds. etcd's server/v3 has relative
# replaces as well, which a wrapper module ignores.
#
# With --node it also builds what a real node needs (test/env/realnode.ts):
# kubelet, kube-controller-manager, kube-scheduler and kube-proxy (in the same
# wrapper module as kube-apiserver: ~1.5 min more with a warm Go cache) and the
# pause binary (build/pause/linux/pause.c from the same module, `gcc -static`).
#
# Prints the bin directory on stdout when done. Usage: build-k8s.sh [--print-dir] [--node]
set -euo pipefail

K8S_VERSION="${K8S_VERSION:-v1.35.4}"
ETCD_VERSION="${ETCD_VERSION:-v3.6.16}"
HELM_VERSION="${HELM_VERSION:-v3.22.0}"
CACHE="${UNDERSTUDY_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/understudy}"
BIN="$CACHE/k8s-$K8S_VERSION-etcd-$ETCD_VERSION-helm-$HELM_VERSION/bin"

node=no
for a in "$@"; do
  case "$a" in
    --print-dir) echo "$BIN"; exit 0 ;;
    --node) node=yes ;;
    *) echo "usage: build-k8s.sh [--print-dir] [--node]" >&2; exit 2 ;;
  esac
done
NODE_CMDS=(kubelet kube-controller-manager kube-scheduler kube-proxy)

log() { echo "[build-k8s] $*" >&2; }
have_node() {
  [[ $node == no ]] && return 0
  for c in "${NODE_CMDS[@]}" pause; do [[ -x "$BIN/$c" ]] || return 1; done
}
have_all() { [[ -x "$BIN/kube-apiserver" && -x "$BIN/kubectl" && -x "$BIN/etcd" && -x "$BIN/helm" ]] && have_node; }
# cached: no Go toolchain needed at all
if have_all; then echo "$BIN"; exit 0; fi
# etcd v3.6.16 and helm v3.22.0 declare `go 1.26.0`. An older Go (Debian's
# golang-go, say) fetches that toolchain from the module proxy itself.
command -v go >/dev/null || { log "go is not installed (apt-get install golang-go, or Go >= 1.26 from https://go.dev/dl/)"; exit 1; }
gominor="$(GOTOOLCHAIN=local go env GOVERSION | sed -n 's/^go1\.\([0-9]*\).*/\1/p')"
if [[ -n "$gominor" && "$gominor" -ge 26 ]]; then toolchain=local; else toolchain="${UNDERSTUDY_GO_TOOLCHAIN:-go1.26.8}"; log "using Go toolchain $toolchain from the module proxy (local Go is $(GOTOOLCHAIN=local go env GOVERSION))"; fi

mkdir -p "$BIN"
# two test processes starting at once on a fresh machine must not both write the same binaries
exec 9>"$BIN/.build.lock"
flock 9
export CGO_ENABLED=0 GOFLAGS=-mod=mod GOTOOLCHAIN="$toolchain"
work="$(mktemp -d "${TMPDIR:-/tmp}/understudy-k8sbuild.XXXXXX")"
trap 'rm -rf "$work"' EXIT

# --- kube-apiserver + kubectl (+ the node's commands with --node) ---
cmds=()
[[ -x "$BIN/kube-apiserver" ]] || cmds+=(kube-apiserver)
[[ -x "$BIN/kubectl" ]] || cmds+=(kubectl)
if [[ $node == yes ]]; then for c in "${NODE_CMDS[@]}"; do [[ -x "$BIN/$c" ]] || cmds+=("$c"); done; fi
if ((${#cmds[@]})); then
  log "building ${cmds[*]} $K8S_VERSION (first time only)"
  minor="$(echo "$K8S_VERSION" | cut -d. -f2)"
  staging_version="v0.${K8S_VERSION#v1.}"
  gomod="$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')"
  [[ -f "$gomod" ]] || { log "could not download k8s.io/kubernetes@$K8S_VERSION from the module proxy"; exit 1; }
  mkdir -p "$work/kbin" && cd "$work/kbin"
  {
    echo "module local/kbin"
    echo "go 1.25"
    grep -E '^godebug ' "$gomod" || true
    echo "require k8s.io/kubernetes $K8S_VERSION"
    echo "replace ("
    grep -E '^\s*k8s.io/[a-z0-9-]+ => ./staging/' "$gomod" | awk -v v="$staging_version" '{print "\t" $1 " => " $1 " " v}'
    echo ")"
  } > go.mod
  cat > tools.go <<'GO'
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-proxy"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubectl"
	_ "k8s.io/kubernetes/cmd/kubelet"
)
GO
  go mod tidy >&2
  X="-s -w -X k8s.io/component-base/version.gitVersion=$K8S_VERSION -X k8s.io/component-base/version.gitMajor=1"
  X="$X -X k8s.io/component-base/version.gitMinor=$minor -X k8s.io/client-go/pkg/version.gitVersion=$K8S_VERSION"
  X="$X -X k8s.io/client-go/pkg/version.gitMajor=1 -X k8s.io/client-go/pkg/version.gitMinor=$minor"
  go build -trimpath -ldflags "$X" -o "$BIN/" "${cmds[@]/#/k8s.io/kubernetes/cmd/}" >&2
fi

# --- pause (the pod sandbox's process; test/env/realnode.ts makes it an image) ---
if [[ $node == yes && ! -x "$BIN/pause" ]]; then
  log "building pause $K8S_VERSION"
  src="$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')/build/pause/linux/pause.c"
  [[ -f "$src" ]] || { log "no $src in the module cache"; exit 1; }
  command -v gcc >/dev/null || { log "gcc is not installed (apt-get install gcc libc6-dev)"; exit 1; }
  gcc -Os -Wall -Werror -static -DVERSION="$K8S_VERSION" -o "$work/pause" "$src" >&2
  strip "$work/pause"
  mv "$work/pause" "$BIN/pause"
fi

# --- etcd ---
if [[ ! -x "$BIN/etcd" ]]; then
  log "building etcd $ETCD_VERSION (first time only)"
  mkdir -p "$work/etcdw" && cd "$work/etcdw"
  printf 'module local/etcdw\ngo 1.25\nrequire go.etcd.io/etcd/server/v3 %s\n' "$ETCD_VERSION" > go.mod
  printf '//go:build tools\n\npackage tools\n\nimport _ "go.etcd.io/etcd/server/v3"\n' > tools.go
  go mod tidy >&2
  go build -trimpath -ldflags "-s -w" -o "$BIN/etcd" go.etcd.io/etcd/server/v3 >&2
fi

# --- helm ---
# helm's go.mod has no replace directives, so a plain `go install` works. Helm's
# own release builds also stamp the Kubernetes version that `helm template` and
# `helm lint` assume without a cluster (else it is v1.20); stamp the one we run.
if [[ ! -x "$BIN/helm" ]]; then
  log "building helm $HELM_VERSION (first time only)"
  minor="$(echo "$K8S_VERSION" | cut -d. -f2)"
  X="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
  for p in helm.sh/helm/v3/pkg/chartutil helm.sh/helm/v3/pkg/lint/rules; do
    X="$X -X $p.k8sVersionMajor=1 -X $p.k8sVersionMinor=$minor"
  done
  GOBIN="$BIN" go install -trimpath -ldflags "$X" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION" >&2
fi

log "binaries ready in $BIN"
echo "$BIN"
