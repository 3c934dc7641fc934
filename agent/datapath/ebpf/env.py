"""Where the kernel's filesystems are, and whether the machine can run eBPF mode."""

from __future__ import annotations

import os

from agent.errors import EnvironmentProblem


def mounts() -> list[tuple[str, str]]:
    """(mount point, filesystem type) for every mount of this mount namespace."""
    out = []
    with open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3:
                out.append((parts[1].replace("\\040", " "), parts[2]))
    return out


def cgroup2_root() -> str:
    """The mount point of the cgroup2 hierarchy (unified or hybrid layout)."""
    for point, fstype in mounts():
        if fstype == "cgroup2":
            return point
    raise EnvironmentProblem(
        "no cgroup2 filesystem is mounted; mount one (mount -t cgroup2 none /run/veer/cgroup) "
        "or pass --cgroup"
    )


def check_bpffs(path: str) -> None:
    """`path` must lie on a bpffs mount, or pins would be plain files or fail."""
    best = ""
    fstype = ""
    real = os.path.realpath(path if os.path.exists(path) else os.path.dirname(path))
    for point, kind in mounts():
        if (real == point or real.startswith(point.rstrip("/") + "/")) and len(point) > len(best):
            best, fstype = point, kind
    if fstype != "bpf":
        raise EnvironmentProblem(
            f"{path} is not on a bpf filesystem; mount one (mount -t bpf bpf "
            f"{os.path.dirname(path) or path}) or pass --bpffs"
        )


def check_root() -> None:
    if os.geteuid() != 0:
        raise EnvironmentProblem("veer agent must run as root (it loads eBPF programs)")
