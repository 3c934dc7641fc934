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
PROGRAM_TYPES = ("cgroup_sock_addr", "sched_cls")
MAP_TYPES = ("hash", "array", "percpu_array", "lru_hash", "lpm_trie", "prog_array", "ringbuf")
HELPERS = {
    "cgroup_sock_addr": ("bpf_set_retval", "bpf_get_socket_cookie", "bpf_get_netns_cookie",
                         "bpf_ktime_get_ns", "bpf_get_prandom_u32", "bpf_ringbuf_reserve"),
    "sched_cls": ("bpf_fib_lookup", "bpf_redirect_neigh", "bpf_skb_change_tail",
                  "bpf_csum_diff", "bpf_tail_call", "bpf_ringbuf_reserve"),
}


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
    found: list[str] = []
    missing: list[str] = []
    for name in needed():
        kind, _, rest = name.partition(":")
        if kind == "program":
            have = bool(programs.get(f"have_{rest}_prog_type"))
        elif kind == "map":
            have = bool(maps.get(f"have_{rest}_map_type"))
        else:
            prog, _, helper = rest.partition(":")
            have = helper in helpers.get(f"{prog}_available_helpers", [])
        (found if have and name not in hide else missing).append(name)
    return KernelFeatures(tuple(found), tuple(missing))


def probe(hidden: Iterable[str] = ()) -> KernelFeatures:
    """Probe this kernel (needs root and bpftool)."""
    unknown = set(hidden) - set(needed())
    if unknown:
        raise EnvironmentProblem(
            f"--hide-kernel-feature: unknown feature(s) {', '.join(sorted(unknown))}; "
            f"known: {', '.join(needed())}"
        )
    try:
        res = subprocess.run(["bpftool", "feature", "probe", "kernel", "-j"],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise EnvironmentProblem(f"cannot probe the kernel with bpftool: {err}") from err
    if res.returncode != 0:
        raise EnvironmentProblem(f"bpftool feature probe failed: {res.stderr.strip()}")
    return evaluate(json.loads(res.stdout), hidden)
