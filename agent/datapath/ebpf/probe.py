"""What eBPF mode needs from the kernel, and whether this kernel has it.

The probe asks the kernel itself (`bpftool feature probe kernel`, which loads
a tiny program or map of each kind) for the program types, map types and
helpers veer's programs use. `--mode auto` picks eBPF only when nothing is
missing and says which feature is missing otherwise; `--mode ebpf` on such a
kernel fails at start naming it. `--hide-kernel-feature NAME` makes the probe
report a feature as missing, to test those decisions on a kernel that has
everything.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass

from agent.errors import EnvironmentProblem

# Feature names as `veer status` and the flags spell them: "program:TYPE",
# "map:TYPE", "helper:PROGTYPE:NAME".
PROGRAM_TYPES = ("cgroup_sock_addr", "sched_cls", "cgroup_sock", "sock_ops", "cgroup_sockopt")
MAP_TYPES = ("hash", "array", "percpu_array", "lru_hash", "lpm_trie", "prog_array", "ringbuf")
HELPERS = {
    "cgroup_sock_addr": ("bpf_set_retval", "bpf_get_socket_cookie", "bpf_get_netns_cookie",
                         "bpf_ktime_get_ns", "bpf_get_prandom_u32", "bpf_ringbuf_reserve"),
    "sched_cls": ("bpf_fib_lookup", "bpf_redirect_neigh", "bpf_skb_change_tail",
                  "bpf_csum_diff", "bpf_tail_call", "bpf_ringbuf_reserve",
                  "bpf_skb_adjust_room", "bpf_sk_lookup_tcp", "bpf_sk_lookup_udp",
                  "bpf_sk_release"),
    "cgroup_sock": ("bpf_get_socket_cookie",),
    "sock_ops": ("bpf_get_socket_cookie",),
}

# What sockmap acceleration needs on top (it is optional: without it, every
# connection takes the normal path).
SOCKMAP_NEEDS = ("program:sk_msg", "map:sockhash", "helper:sk_msg:bpf_msg_redirect_hash",
                 "helper:sock_ops:bpf_sock_hash_update")

# Kernel series on which veer's sockmap acceleration has been verified: the
# whole scenario suite runs with it on (tests/datapath/test_scenarios.py,
# mode ebpf-sockmap), besides its own tests. Sockmap's history is one of
# data-loss and ordering fixes (other projects removed their acceleration
# over them), so a kernel not listed here gets no acceleration however good
# its feature probe looks; add a series once the suite has passed on it.
SOCKMAP_SOUND_SERIES = ((6, 18),)


def needed() -> list[str]:
    """Every feature eBPF mode needs, by name."""
    out = [f"program:{p}" for p in PROGRAM_TYPES]
    out += [f"map:{m}" for m in MAP_TYPES]
    out += [f"helper:{prog}:{h}" for prog, helpers in HELPERS.items() for h in helpers]
    return out


@dataclass(frozen=True)
class KernelFeatures:
    found: tuple[str, ...]
    missing: tuple[str, ...]
    sockmap_missing: tuple[str, ...] = ()

    @property
    def ebpf_ready(self) -> bool:
        return not self.missing


def evaluate(report: dict[str, object], hidden: Iterable[str] = ()) -> KernelFeatures:
    """Check bpftool's JSON report against what eBPF mode needs."""
    programs = report.get("program_types", {})
    maps = report.get("map_types", {})
    helpers = report.get("helpers", {})
    assert isinstance(programs, dict) and isinstance(maps, dict) and isinstance(helpers, dict)
    hide = set(hidden)

    def have(name: str) -> bool:
        kind, _, rest = name.partition(":")
        if name in hide:
            return False
        if kind == "program":
            return bool(programs.get(f"have_{rest}_prog_type"))
        if kind == "map":
            return bool(maps.get(f"have_{rest}_map_type"))
        prog, _, helper = rest.partition(":")
        return helper in helpers.get(f"{prog}_available_helpers", [])

    found = tuple(n for n in needed() if have(n))
    missing = tuple(n for n in needed() if not have(n))
    return KernelFeatures(found, missing, tuple(n for n in SOCKMAP_NEEDS if not have(n)))


def kernel_series(release: str) -> tuple[int, int]:
    """(major, minor) of a kernel release string such as 6.18.44-foo."""
    parts = release.split(".")
    try:
        return int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0)
    except (IndexError, ValueError):
        return (0, 0)


def sockmap_verdict(features: KernelFeatures, release: str) -> tuple[bool, str]:
    """Whether sockmap acceleration may be used on this kernel, and why (not)."""
    if features.sockmap_missing:
        return False, f"this kernel lacks {', '.join(features.sockmap_missing)}"
    series = kernel_series(release)
    if series not in SOCKMAP_SOUND_SERIES:
        listed = ", ".join(f"{a}.{b}" for a, b in SOCKMAP_SOUND_SERIES)
        return False, (f"kernel {release} is not on veer's list of kernel series where "
                       f"sockmap acceleration was verified ({listed})")
    return True, f"kernel {release}: features present, series verified"


def probe(hidden: Iterable[str] = ()) -> KernelFeatures:
    """Probe this kernel (needs root and bpftool)."""
    unknown = set(hidden) - set(needed()) - set(SOCKMAP_NEEDS)
    if unknown:
        raise EnvironmentProblem(
            f"--hide-kernel-feature: unknown feature(s) {', '.join(sorted(unknown))}; "
            f"known: {', '.join([*needed(), *SOCKMAP_NEEDS])}"
        )
    try:
        res = subprocess.run(["bpftool", "feature", "probe", "kernel", "-j"],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise EnvironmentProblem(f"cannot probe the kernel with bpftool: {err}") from err
    if res.returncode != 0:
        raise EnvironmentProblem(f"bpftool feature probe failed: {res.stderr.strip()}")
    return evaluate(json.loads(res.stdout), hidden)
