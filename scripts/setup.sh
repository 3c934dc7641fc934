#!/usr/bin/env bash
# Set up everything veer's sandbox and tests need on a Debian machine.
# Idempotent: each step checks first and does nothing when already done.
#
#   Debian packages   BCC, clang/llvm, bpftool, kernel headers, nftables,
#                     iproute2, nginx-light, haproxy, wrk, ...
#   kernel headers    BCC compiles at run time against /lib/modules/$(uname -r)/build;
#                     kernels without their own headers get Debian's linked there
#   filesystems       bpffs at /sys/fs/bpf and /run/veer/bpf, cgroup2 at /run/veer/cgroup
#                     (`ip netns exec` remounts /sys, so tests use the /run/veer ones)
#   virtualenv        .venv from Debian's python3, reaching Debian's `bcc` and
#                     `nftables` packages (and nothing else of dist-packages), with
#                     veer installed editable
#   gRPC code         agent/api/gen/ from agent/api/veer.proto (scripts/gen-proto.sh)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
say() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

[ "$(uname -s)" = Linux ] || die "veer needs Linux (this is $(uname -s))"
[ "$(id -u)" -eq 0 ] || die "run as root (sudo $0): it installs packages, mounts bpffs and loads eBPF programs"
[ -r /etc/debian_version ] || die "this script knows Debian (12+) only; install the packages listed in it by hand elsewhere"
[ -e /sys/kernel/btf/vmlinux ] || [ -e /proc/sys/net/core/bpf_jit_enable ] \
  || die "this kernel ($(uname -r)) shows no BPF support (/proc/sys/net/core/bpf_jit_enable is missing)"

PACKAGES=(
  python3 python3-venv python3-bpfcc libbpfcc bpfcc-tools clang llvm bpftool
  linux-headers-amd64 nftables python3-nftables iproute2 nginx-light haproxy wrk iperf3 sockperf
  conntrack tcpdump gcc libc6-dev linux-libc-dev procps iptables python3-matplotlib
)
missing=()
for pkg in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
  say "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Debian starts nginx/haproxy as services on some machines; veer's tests run
# their own instances and need nothing of the system ones.

modules="/lib/modules/$(uname -r)"
if [ ! -e "$modules/build" ]; then
  headers="$(ls -d /lib/modules/*-amd64 2>/dev/null | while read -r d; do [ -e "$d/build" ] && echo "$d"; done | sort -V | tail -1)"
  [ -n "$headers" ] || die "no kernel headers with a build directory under /lib/modules (install linux-headers-amd64)"
  if [ -e "$modules" ]; then
    say "linking $modules/build -> $headers/build"
    ln -sfn "$headers/build" "$modules/build"
  else
    say "linking $modules -> $headers (this kernel ships no headers; BCC's socket and TC programs need only uapi)"
    ln -sfn "$headers" "$modules"
  fi
fi

is_mounted() { awk -v p="$1" -v t="$2" '$2 == p && $3 == t { found = 1 } END { exit !found }' /proc/self/mounts; }
mkdir -p /sys/fs/bpf /run/veer/bpf /run/veer/cgroup
is_mounted /sys/fs/bpf bpf || { say "mounting bpffs at /sys/fs/bpf"; mount -t bpf bpf /sys/fs/bpf; }
is_mounted /run/veer/bpf bpf || { say "mounting bpffs at /run/veer/bpf"; mount -t bpf bpf /run/veer/bpf; }
is_mounted /run/veer/cgroup cgroup2 || { say "mounting cgroup2 at /run/veer/cgroup"; mount -t cgroup2 none /run/veer/cgroup; }

features="$(bpftool feature probe kernel 2>/dev/null || true)"
if ! grep -q "program_type cgroup_sock_addr is available" <<<"$features"; then
  die "this kernel cannot load cgroup sock_addr programs, which veer's eBPF mode needs"
fi

if [ ! -x "$VENV/bin/python" ]; then
  say "creating virtualenv $VENV"
  /usr/bin/python3 -m venv "$VENV"
fi
site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
mkdir -p "$VENV/bcc-link"
ln -sfn /usr/lib/python3/dist-packages/bcc "$VENV/bcc-link/bcc"
# libnftables' JSON binding, for TPROXY mode (agent/datapath/tproxy/nft.py).
ln -sfn /usr/lib/python3/dist-packages/nftables "$VENV/bcc-link/nftables"
echo "$VENV/bcc-link" > "$site/veer-bcc.pth"

stamp="$VENV/.veer-installed"
want="$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  say "installing veer and its Python dependencies into $VENV"
  log="$VENV/pip-install.log"
  { "$VENV/bin/pip" install --upgrade pip && "$VENV/bin/pip" install -e "$ROOT[dev]"; } >"$log" 2>&1 \
    || { tail -30 "$log" >&2; die "pip install failed (full log: $log)"; }
  echo "$want" > "$stamp"
fi
PYTHON="$VENV/bin/python" "$ROOT/scripts/gen-proto.sh" || die "generating the gRPC code from agent/api/veer.proto failed"
"$VENV/bin/python" -c "import bcc, nftables, agent" || die "the virtualenv cannot import bcc, nftables and veer"
say "ready (virtualenv: $VENV)"
