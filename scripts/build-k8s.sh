#!/usr/bin/env bash
# Build the real Kubernetes pieces that veer's end-to-end tests and benchmarks
# run, from Go modules, into a cache outside the repository:
#
#   ${VEER_CACHE:-$HOME/.cache/veer}/k8s-<version>/bin/
#       etcd  kube-apiserver  kube-controller-manager  kube-proxy  kubectl  helm
#
# The versions come from tests/e2e/cluster/go.mod (Kubernetes, etcd) and
# HELM_VERSION below. Idempotent: a binary that is already there, built for the
# same version, is skipped; only the missing ones are compiled. A cold build
# takes tens of minutes on 2 cores; later runs take a second.
#
# Needs Go >= 1.26 (the Go module proxy must be reachable for a cold build).
# Environment:
#   VEER_CACHE          cache root (default: $HOME/.cache/veer)
#   VEER_K8S_FORCE=1    rebuild everything even when present
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MODDIR="$ROOT/tests/e2e/cluster"
HELM_VERSION="v3.22.0"
GO_MIN_MINOR=26

say() { printf 'build-k8s: %s\n' "$*"; }
die() { printf 'build-k8s: error: %s\n' "$*" >&2; exit 1; }

# --- Go ---------------------------------------------------------------------
if ! command -v go >/dev/null 2>&1; then
  for d in /usr/local/go/bin /usr/lib/go/bin "$HOME/go/bin"; do
    [ -x "$d/go" ] && { PATH="$d:$PATH"; break; }
  done
fi
command -v go >/dev/null 2>&1 || die "Go is not installed (or not on PATH): the Kubernetes control plane
  for the end-to-end tests is built from Go modules and needs Go >= 1.$GO_MIN_MINOR.
  Debian 12's golang package is too old; install Go 1.$GO_MIN_MINOR+ into /usr/local/go."
gover="$(go env GOVERSION 2>/dev/null || true)"
[ -n "$gover" ] || gover="$(go version | awk '{print $3}')"
minor="$(sed -nE 's/^go1\.([0-9]+).*/\1/p' <<<"$gover")"
if [ -z "$minor" ] || [ "$minor" -lt "$GO_MIN_MINOR" ]; then
  die "Go ${gover:-?} is too old: need Go >= 1.$GO_MIN_MINOR (kubernetes' go.mod says go 1.$GO_MIN_MINOR).
  Install a newer Go, or with Go >= 1.21 export GOTOOLCHAIN=go1.$GO_MIN_MINOR.0 so the go command
  fetches that toolchain from the Go module proxy."
fi

# --- versions ---------------------------------------------------------------
[ -f "$MODDIR/go.mod" ] || die "missing $MODDIR/go.mod"
modver() {  # version of a module required in tests/e2e/cluster/go.mod
  awk -v m="$1" '$1 == m { print $2; exit } $1 == "require" && $2 == m { print $3; exit }' "$MODDIR/go.mod"
}
K8S_VERSION="$(modver k8s.io/kubernetes)"
ETCD_VERSION="$(modver go.etcd.io/etcd/server/v3)"
[[ "$K8S_VERSION" =~ ^v([0-9]+)\.([0-9]+)\.[0-9]+$ ]] \
  || die "cannot read k8s.io/kubernetes's version from $MODDIR/go.mod (got '${K8S_VERSION}')"
K8S_MAJOR="${BASH_REMATCH[1]}"
K8S_MINOR="${BASH_REMATCH[2]}"
[ -n "$ETCD_VERSION" ] || die "cannot read go.etcd.io/etcd/server/v3's version from $MODDIR/go.mod"

CACHE="${VEER_CACHE:-$HOME/.cache/veer}"
OUT="$CACHE/k8s-$K8S_VERSION"
BIN="$OUT/bin"
mkdir -p "$BIN" || die "cannot create $BIN"

# One build at a time (a test session and a developer may both call this).
exec 9>"$OUT/.lock"
if ! flock -n 9; then
  say "another build-k8s.sh is running on $OUT; waiting for it"
  flock 9
fi

# version each binary must have been built for
declare -A WANT=(
  [kube-apiserver]="$K8S_VERSION"
  [kube-controller-manager]="$K8S_VERSION"
  [kube-proxy]="$K8S_VERSION"
  [kubectl]="$K8S_VERSION"
  [etcd]="$ETCD_VERSION"
  [helm]="$HELM_VERSION"
)
have() {  # binary present, executable, stamped with the wanted version
  [ "${VEER_K8S_FORCE:-0}" != 1 ] && [ -x "$BIN/$1" ] && [ -f "$BIN/.$1.version" ] \
    && [ "$(cat "$BIN/.$1.version")" = "${WANT[$1]}" ]
}
stamp() { printf '%s\n' "${WANT[$1]}" > "$BIN/.$1.version"; }

TMP="$(mktemp -d "$OUT/.build.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT

# --- Kubernetes binaries and etcd (one go build, one module) -----------------
declare -A PKG=(
  [kube-apiserver]="k8s.io/kubernetes/cmd/kube-apiserver"
  [kube-controller-manager]="k8s.io/kubernetes/cmd/kube-controller-manager"
  [kube-proxy]="k8s.io/kubernetes/cmd/kube-proxy"
  [kubectl]="k8s.io/kubernetes/cmd/kubectl"
  [etcd]="./etcd"
)
todo=()
for name in kube-apiserver kube-controller-manager kube-proxy kubectl etcd; do
  if have "$name"; then
    say "$name ${WANT[$name]}: already built, skipping ($BIN/$name)"
  else
    todo+=("$name")
  fi
done

if [ "${#todo[@]}" -gt 0 ]; then
  # As kubernetes' hack/lib/golang.sh builds release binaries: static, trimmed,
  # with the version stamped where `kubectl version`, /version and helm read it.
  ldflags="-s -w"
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=$K8S_MAJOR -X $pkg.gitMinor=$K8S_MINOR"
    ldflags+=" -X $pkg.gitTreeState=clean"
  done
  pkgs=()
  for name in "${todo[@]}"; do pkgs+=("${PKG[$name]}"); done
  # The committed go.sum is complete; fall back to -mod=mod only if the go
  # command refuses it (e.g. a Go release that wants more go.sum lines).
  modflag=""
  if ! (cd "$MODDIR" && go list -deps "${pkgs[@]}" >/dev/null 2>"$TMP/list.err"); then
    if grep -q "missing go.sum entry\|updates to go.mod needed" "$TMP/list.err"; then
      say "go.sum is incomplete for this Go; building with GOFLAGS=-mod=mod"
      modflag="-mod=mod"
    else
      cat "$TMP/list.err" >&2
      die "cannot resolve the Go packages in $MODDIR (is the Go module proxy reachable? GOPROXY=$(go env GOPROXY))"
    fi
  fi
  say "building ${todo[*]} (Kubernetes $K8S_VERSION, etcd $ETCD_VERSION) into $BIN"
  say "this compiles Kubernetes from source: tens of minutes on 2 cores the first time"
  start=$SECONDS
  (
    cd "$MODDIR"
    export CGO_ENABLED=0
    [ -n "$modflag" ] && export GOFLAGS="${GOFLAGS:+$GOFLAGS }$modflag"
    nice -n 19 go build -trimpath -tags selinux,notest,grpcnotrace -ldflags "$ldflags" \
      -o "$TMP/" "${pkgs[@]}"
  ) || die "go build failed for: ${todo[*]} (see the compiler output above)"
  for name in "${todo[@]}"; do
    [ -x "$TMP/$name" ] || die "go build produced no $name"
    mv -f "$TMP/$name" "$BIN/$name"
    stamp "$name"
  done
  say "built ${todo[*]} in $((SECONDS - start))s"
fi

# --- helm (its own module, no replace directives) ----------------------------
if have helm; then
  say "helm $HELM_VERSION: already built, skipping ($BIN/helm)"
else
  say "building helm $HELM_VERSION into $BIN"
  start=$SECONDS
  # Helm's Makefile stamps its version and the Kubernetes version that
  # `helm template` and `helm lint` assume when no cluster is asked.
  hl="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
  for pkg in helm.sh/helm/v3/pkg/chartutil helm.sh/helm/v3/pkg/lint/rules; do
    hl+=" -X $pkg.k8sVersionMajor=$K8S_MAJOR -X $pkg.k8sVersionMinor=$K8S_MINOR"
  done
  (
    cd "$TMP"  # outside any module: `go install pkg@version` uses helm's own go.mod
    export CGO_ENABLED=0 GOBIN="$TMP" GOFLAGS="${GOFLAGS:-}"
    GOFLAGS="$(sed -E 's/(^| )-mod=[a-z]+//g' <<<"$GOFLAGS")"
    nice -n 19 go install -trimpath -ldflags "$hl" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
  ) || die "go install helm.sh/helm/v3/cmd/helm@$HELM_VERSION failed (see above)"
  mv -f "$TMP/helm" "$BIN/helm"
  stamp helm
  say "built helm in $((SECONDS - start))s"
fi

# --- check and stamp ---------------------------------------------------------
"$BIN/kube-apiserver" --version | grep -qx "Kubernetes $K8S_VERSION" \
  || die "$BIN/kube-apiserver reports '$("$BIN/kube-apiserver" --version)', not Kubernetes $K8S_VERSION"
"$BIN/etcd" --version >/dev/null || die "$BIN/etcd does not run"
"$BIN/helm" version --short >/dev/null || die "$BIN/helm does not run"
"$BIN/kubectl" version --client >/dev/null || die "$BIN/kubectl does not run"
{
  echo "kubernetes=$K8S_VERSION"
  echo "etcd=$ETCD_VERSION"
  echo "helm=$HELM_VERSION"
  echo "go=$gover"
  echo "module=tests/e2e/cluster"
} > "$OUT/VERSION.tmp"
mv -f "$OUT/VERSION.tmp" "$OUT/VERSION"
say "ready: $BIN ($(du -sh "$BIN" | cut -f1))"
