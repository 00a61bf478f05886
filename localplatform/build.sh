#!/usr/bin/env bash
# Builds the local platform's Go binaries from their published modules, once per version.
#
#   localplatform/build.sh [part ...]     parts: kube etcd kwok minio helm vllm traefik gatewayapi kueue kueuecrds
#                                         prometheus
#                                         (default: all)
#
# Binaries land in $RAGTUNE_CACHE/bin/<part>-<version>/ (default ~/.cache/ragtune); Go's
# module and build caches stay in their usual persistent places, so a second run is a no-op
# and a rebuild after a version bump only recompiles what changed. Each part logs to
# $RAGTUNE_CACHE/logs/build-<part>.log; a failure names the part and the log. The `vllm` part is the
# real vLLM's Python virtualenv (localplatform/build_vllm.sh, its own pins, lock and cache entry).
set -euo pipefail

KUBE_VERSION=v1.36.3        # go.mod says go 1.26.0: matches the toolchain here
ETCD_VERSION=v3.6.16
KWOK_VERSION=v0.8.0
HELM_VERSION=v3.22.0
MINIO_VERSION=v0.0.0-20260212201848-7aac2a2c5b7c   # MinIO publishes pseudo-versions only
TRAEFIK_VERSION=v3.6.12     # opt-in gateway part; v3.7.x does not build (deps missing from the proxy)
GATEWAYAPI_VERSION=v1.4.0   # Gateway API CRDs: the version Traefik v3.6.12's go.mod requires
KUEUE_VERSION=v0.17.0       # opt-in queue part (`dev up --with kueue`); ~30 min cold on 2 cores
KUEUECRDS_VERSION=v0.17.0   # Kueue's CRDs and manager ClusterRole, from the same module (keep equal)
PROMETHEUS_VERSION=v0.316.0 # opt-in metrics part (`dev up --with prometheus`): Prometheus 3.x's Go module version

CACHE=${RAGTUNE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ragtune}
BIN=$CACHE/bin
LOGS=$CACHE/logs
mkdir -p "$BIN" "$LOGS"
export GOFLAGS=-buildvcs=false GOTOOLCHAIN=local CGO_ENABLED=0

say() { printf '[build] %s\n' "$*" >&2; }

# One build at a time per cache (two `dev up`s or `make`s on a fresh machine must not race).
exec 9>"$CACHE/build.lock"
if ! flock -n 9; then say "another build is running (lock $CACHE/build.lock); waiting for it ..."; flock 9; fi

# run_part NAME DEST_DIR FUNC: skip when every expected binary exists, else build into a
# temporary dir and move it into place only when complete (never a half-built cache entry).
run_part() {
  local name=$1 dest=$2 fn=$3; shift 3
  local missing=0 b
  for b in "$@"; do  # binaries must be executable; data files (*.yaml) only present
    case $b in *.yaml) [ -f "$dest/$b" ] || missing=1 ;; *) [ -x "$dest/$b" ] || missing=1 ;; esac
  done
  if [ $missing = 0 ]; then say "$name: cached in $dest"; return 0; fi
  local tmp; tmp=$(mktemp -d "$CACHE/tmp-$name-XXXX")
  local log=$LOGS/build-$name.log
  say "$name: building (log: $log) ..."
  local t0=$SECONDS
  if ! ( $fn "$tmp" ) >"$log" 2>&1; then
    say "$name: BUILD FAILED after $((SECONDS - t0))s; last lines of $log:"
    tail -n 20 "$log" >&2
    rm -rf "$tmp"; return 1
  fi
  rm -rf "$dest"; mkdir -p "$(dirname "$dest")"; mv "$tmp/out" "$dest"; rm -rf "$tmp"
  say "$name: built in $((SECONDS - t0))s -> $dest"
}

build_kube() {
  local work=$1 minor=${KUBE_VERSION#v1.}; minor=${minor%%.*}
  local staging_version=v0.${KUBE_VERSION#v1.}
  mkdir -p "$work/mod" "$work/out"; cd "$work/mod"
  # k8s.io/kubernetes replaces its staging modules with ./staging paths; a wrapper module
  # must replace each with the published v0.X.Y instead. List taken from the release go.mod.
  {
    echo "module ragtune.dev/localplatform/kube"
    echo "go 1.26.0"
    echo "require k8s.io/kubernetes $KUBE_VERSION"
    echo "replace ("
    for m in api apiextensions-apiserver apimachinery apiserver cli-runtime client-go \
             cloud-provider cluster-bootstrap code-generator component-base component-helpers \
             controller-manager cri-api cri-client cri-streaming csi-translation-lib \
             dynamic-resource-allocation endpointslice externaljwt kms kube-aggregator \
             kube-controller-manager kube-proxy kube-scheduler kubectl kubelet metrics \
             mount-utils pod-security-admission sample-apiserver sample-controller streaming; do
      echo "  k8s.io/$m => k8s.io/$m $staging_version"
    done
    echo ")"
  } > go.mod
  cat > tools.go <<'GO'
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubectl"
)
GO
  go mod tidy
  local v="-X k8s.io/component-base/version.gitVersion=$KUBE_VERSION -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor -X k8s.io/component-base/version.gitTreeState=clean"
  v="$v -X k8s.io/client-go/pkg/version.gitVersion=$KUBE_VERSION -X k8s.io/client-go/pkg/version.gitMajor=1 -X k8s.io/client-go/pkg/version.gitMinor=$minor -X k8s.io/client-go/pkg/version.gitTreeState=clean"
  go build -trimpath -ldflags "-s -w $v" -o "$work/out/" \
    k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
    k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubectl
}

build_etcd() {
  local work=$1
  mkdir -p "$work/mod" "$work/out"; cd "$work/mod"
  printf 'module ragtune.dev/localplatform/etcd\ngo 1.26.0\nrequire go.etcd.io/etcd/server/v3 %s\n' "$ETCD_VERSION" > go.mod
  cat > main.go <<'GO'
// etcd's own main is one call into etcdmain; this wrapper lets us build it from the server module.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
GO
  go mod tidy
  go build -trimpath -ldflags "-s -w" -o "$work/out/etcd" .
}

build_kwok() {
  GOBIN=$1/out go install -trimpath -ldflags "-s -w" "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION"
}

build_helm() {
  GOBIN=$1/out go install -trimpath \
    -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" \
    "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
}

build_minio() {
  GOBIN=$1/out go install -trimpath -ldflags "-s -w" "github.com/minio/minio@$MINIO_VERSION"
}

# Traefik's go.mod has replace directives, so `go install ...@version` refuses it: build it
# from a copy of its module directory instead (its web UI is embedded from webui/static).
build_traefik() {
  local work=$1 dir
  dir=$(go mod download -json "github.com/traefik/traefik/v3@$TRAEFIK_VERSION" | sed -n 's/^\t"Dir": "\(.*\)",$/\1/p')
  [ -n "$dir" ] && [ -d "$dir" ] || { echo "go mod download gave no module dir for traefik $TRAEFIK_VERSION"; return 1; }
  mkdir -p "$work/out"; cp -r "$dir" "$work/mod"; chmod -R u+w "$work/mod"; cd "$work/mod"
  go build -trimpath -ldflags "-s -w -X github.com/traefik/traefik/v3/pkg/version.Version=$TRAEFIK_VERSION" \
    -o "$work/out/traefik" ./cmd/traefik
}

# Gateway API's standard-channel CRDs, taken from the published Go module (config/crd/standard).
build_gatewayapi() {
  local work=$1 dir
  dir=$(go mod download -json "sigs.k8s.io/gateway-api@$GATEWAYAPI_VERSION" | sed -n 's/^\t"Dir": "\(.*\)",$/\1/p')
  [ -n "$dir" ] && [ -d "$dir/config/crd/standard" ] || { echo "no config/crd/standard in gateway-api $GATEWAYAPI_VERSION"; return 1; }
  mkdir -p "$work/out"
  local f; for f in "$dir"/config/crd/standard/*.yaml; do echo "---"; cat "$f"; done > "$work/out/standard-crds.yaml"
  ls "$dir"/config/crd/standard/ > "$work/out/SOURCES"
}

# Kueue: like Traefik, built from a copy of its module directory (its go.mod has replace directives).
build_kueue() {
  local work=$1 dir
  dir=$(go mod download -json "sigs.k8s.io/kueue@$KUEUE_VERSION" | sed -n 's/^\t"Dir": "\(.*\)",$/\1/p')
  [ -n "$dir" ] && [ -d "$dir" ] || { echo "go mod download gave no module dir for kueue $KUEUE_VERSION"; return 1; }
  mkdir -p "$work/out"; cp -r "$dir" "$work/mod"; chmod -R u+w "$work/mod"; cd "$work/mod"
  go build -trimpath -ldflags "-s -w" -o "$work/out/kueue" ./cmd/kueue
}

# Kueue's CRDs (config/components/crd/bases, without the conversion-webhook patches: everyone here
# reads and writes v1beta2, the storage version, as Kueue does) and its manager's (Cluster)Roles.
build_kueuecrds() {
  local work=$1 dir
  dir=$(go mod download -json "sigs.k8s.io/kueue@$KUEUECRDS_VERSION" | sed -n 's/^\t"Dir": "\(.*\)",$/\1/p')
  [ -n "$dir" ] && [ -d "$dir/config/components/crd/bases" ] || { echo "no CRDs in kueue $KUEUECRDS_VERSION"; return 1; }
  mkdir -p "$work/out"
  local f; for f in "$dir"/config/components/crd/bases/*.yaml; do echo "---"; cat "$f"; done > "$work/out/crds.yaml"
  cp "$dir/config/components/rbac/role.yaml" "$work/out/manager-role.yaml"
  cp "$dir/config/components/rbac/manager_secrets_role.yaml" "$work/out/manager-secrets-role.yaml"
}

# Prometheus: from a copy of its module directory without its go.work (which names modules the
# published zip leaves out); the web UI's assets are not embedded (no `builtinassets` tag): its API serves.
build_prometheus() {
  local work=$1 dir
  dir=$(go mod download -json "github.com/prometheus/prometheus@$PROMETHEUS_VERSION" | sed -n 's/^\t"Dir": "\(.*\)",$/\1/p')
  [ -n "$dir" ] && [ -d "$dir" ] || { echo "go mod download gave no module dir for prometheus $PROMETHEUS_VERSION"; return 1; }
  mkdir -p "$work/out"; cp -r "$dir" "$work/mod"; chmod -R u+w "$work/mod"; cd "$work/mod"; rm -f go.work go.work.sum
  GOWORK=off go build -trimpath -ldflags "-s -w" -o "$work/out/prometheus" ./cmd/prometheus
}

parts=("$@"); [ ${#parts[@]} -gt 0 ] || parts=(kube etcd kwok minio helm vllm traefik gatewayapi kueue kueuecrds prometheus)
status=0
for p in "${parts[@]}"; do
  case $p in
    kube)  run_part kube  "$BIN/kube-$KUBE_VERSION" build_kube kube-apiserver kube-controller-manager kube-scheduler kubectl || status=1 ;;
    etcd)  run_part etcd  "$BIN/etcd-$ETCD_VERSION" build_etcd etcd || status=1 ;;
    kwok)  run_part kwok  "$BIN/kwok-$KWOK_VERSION" build_kwok kwok || status=1 ;;
    helm)  run_part helm  "$BIN/helm-$HELM_VERSION" build_helm helm || status=1 ;;
    minio) run_part minio "$BIN/minio-$MINIO_VERSION" build_minio minio || status=1 ;;
    traefik)    run_part traefik    "$BIN/traefik-$TRAEFIK_VERSION" build_traefik traefik || status=1 ;;
    gatewayapi) run_part gatewayapi "$BIN/gatewayapi-$GATEWAYAPI_VERSION" build_gatewayapi standard-crds.yaml || status=1 ;;
    kueue)      run_part kueue      "$BIN/kueue-$KUEUE_VERSION" build_kueue kueue || status=1 ;;
    kueuecrds)  run_part kueuecrds  "$BIN/kueuecrds-$KUEUECRDS_VERSION" build_kueuecrds crds.yaml manager-role.yaml manager-secrets-role.yaml || status=1 ;;
    prometheus) run_part prometheus "$BIN/prometheus-$PROMETHEUS_VERSION" build_prometheus prometheus || status=1 ;;
    vllm)  bash "$(dirname "${BASH_SOURCE[0]}")/build_vllm.sh" || status=1 ;;
    *) say "unknown part '$p' (parts: kube etcd kwok minio helm vllm traefik gatewayapi kueue kueuecrds prometheus)"; exit 2 ;;
  esac
done
exit $status
