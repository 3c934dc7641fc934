#!/usr/bin/env bash
# Install veer the way its image runs it: the Dockerfile's only step, and
# what CI runs on the machine (tests/e2e/test_image.py), since no engine
# builds images here. Idempotent: run it again and it converges.
#
#   deploy/image/install.sh PREFIX [SOURCE]
#
#   PREFIX   becomes a virtualenv from Debian's python3 with veer in it:
#            PREFIX/bin/veer (agent, operator and CLI), PREFIX/bin/python
#   SOURCE   a veer checkout (default: the one holding this script)
#
# Steps, each skipped when already done:
#   1. Debian packages the agent needs at run time (BCC, bpftool, iproute2
#      for ss, nftables, util-linux for nsenter), with apt-get, only the
#      missing ones;
#   2. the virtualenv, reaching Debian's `bcc` package and nothing else of
#      dist-packages (as scripts/setup.sh does for development);
#   3. the gRPC code generated from agent/api/veer.proto into a build copy of
#      SOURCE (the checkout is not written to), then veer installed from that
#      copy, not editable; grpcio-tools is removed again.
# The image build sets PIP_NO_CACHE_DIR=1 and removes the apt lists after.
set -euo pipefail

say() { printf 'install: %s\n' "$*"; }
die() { printf 'install: error: %s\n' "$*" >&2; exit 1; }

[ $# -ge 1 ] && [ $# -le 2 ] || die "usage: $0 PREFIX [SOURCE]"
PREFIX="$1"
SOURCE="${2:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}"
case "$PREFIX" in /*) ;; *) PREFIX="$(pwd)/$PREFIX" ;; esac
[ -f "$SOURCE/pyproject.toml" ] && [ -d "$SOURCE/agent" ] \
  || die "$SOURCE is not a veer checkout (no pyproject.toml and agent/)"
[ -r /etc/debian_version ] || die "this script installs Debian packages: run it on Debian 12"

# 1. Run-time Debian packages. BCC compiles against the node's kernel headers,
# which the DaemonSet mounts from the host (/lib/modules, /usr/src).
PACKAGES=(python3 python3-venv python3-bpfcc libbpfcc bpftool iproute2 nftables util-linux
          ca-certificates python3-nftables)
missing=()
for pkg in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
    || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
  [ "$(id -u)" -eq 0 ] || die "Debian packages missing (${missing[*]}): run as root"
  say "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# 2. The virtualenv, from Debian's python3 (the one whose bcc package exists).
if [ ! -x "$PREFIX/bin/python" ]; then
  say "creating virtualenv $PREFIX"
  /usr/bin/python3 -m venv "$PREFIX"
fi
site="$("$PREFIX/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
mkdir -p "$PREFIX/bcc-link"
ln -sfn /usr/lib/python3/dist-packages/bcc "$PREFIX/bcc-link/bcc"
# libnftables' JSON binding, for TPROXY mode (agent/datapath/tproxy/nft.py).
ln -sfn /usr/lib/python3/dist-packages/nftables "$PREFIX/bcc-link/nftables"
echo "$PREFIX/bcc-link" > "$site/veer-bcc.pth"

# 3. veer, from a build copy of the source with the generated gRPC code.
build="$(mktemp -d "${TMPDIR:-/tmp}/veer-install.XXXXXX")"
trap 'rm -rf "$build"' EXIT
mkdir -p "$build/scripts"
cp "$SOURCE/pyproject.toml" "$SOURCE/README.md" "$build/"
cp "$SOURCE/scripts/gen-proto.sh" "$build/scripts/"
tar -C "$SOURCE" --exclude=__pycache__ --exclude='*.pyc' --exclude=agent/api/gen \
  -cf - agent | tar -C "$build" -xf -

log="$build/pip.log"
pip() { "$PREFIX/bin/python" -m pip --disable-pip-version-check "$@" >>"$log" 2>&1 \
          || { tail -30 "$log" >&2; die "pip $* failed"; }; }
say "generating the gRPC code"
pip install -q grpcio-tools
PYTHON="$PREFIX/bin/python" "$build/scripts/gen-proto.sh" >/dev/null
say "installing veer into $PREFIX"
pip uninstall -q -y veer grpcio-tools
pip install -q "$build"

"$PREFIX/bin/python" -c 'import bcc, agent.api.gen.veer_pb2_grpc, agent.cli.main' \
  || die "the installed veer cannot import bcc and its modules"
say "ready: $("$PREFIX/bin/veer" version)"
