"""Destroy sockets on this node that are connected to a removed UDP backend.

The socket hooks rewrite a connected UDP socket's peer once, at connect();
if that backend goes away the socket would keep sending into the void.
Like Cilium, veer destroys such sockets (sock_diag SOCK_DESTROY, through
`ss -K`), so the application sees an error and connects again, through the
Service, to a live backend.

The served sockets live in the network namespaces of the processes in the
served cgroup (pods), not in the agent's own: each namespace is entered once
through one of its processes (nsenter). Only UDP sockets whose peer is the
removed backend's address and port are touched.
"""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Iterable, Iterator

from agent.compute.types import L4Addr

log = logging.getLogger(__name__)


def _cgroup_pids(cgroup: str) -> Iterator[int]:
    for root, _dirs, files in os.walk(cgroup):
        if "cgroup.procs" not in files:
            continue
        try:
            with open(os.path.join(root, "cgroup.procs")) as f:
                yield from (int(p) for p in f.read().split())
        except OSError:
            continue


def _namespaces(cgroup: str) -> dict[int, int]:
    """netns inode -> one pid living in it, for the processes in `cgroup`."""
    out: dict[int, int] = {}
    own = os.stat("/proc/self/ns/net").st_ino
    for pid in _cgroup_pids(cgroup):
        try:
            inode = os.stat(f"/proc/{pid}/ns/net").st_ino
        except OSError:
            continue  # exited meanwhile
        out.setdefault(inode, pid)
    out.setdefault(own, os.getpid())
    return out


def destroy_udp_sockets(cgroup: str, backends: Iterable[L4Addr]) -> list[str]:
    """Destroy connected UDP sockets whose peer is one of `backends`."""
    targets = list(backends)
    if not targets:
        return []
    destroyed = 0
    for pid in _namespaces(cgroup).values():
        for backend in targets:
            argv = ["nsenter", "-t", str(pid), "-n", "ss", "-K", "-u", "-n", "-H",
                    "dst", str(backend.address), "dport", "=", f":{backend.port}"]
            try:
                res = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            except (OSError, subprocess.TimeoutExpired) as err:
                log.warning("destroying UDP sockets to %s failed: %s", backend, err)
                continue
            if res.returncode != 0:
                log.warning("ss -K for %s failed: %s", backend, res.stderr.strip())
                continue
            destroyed += sum(1 for line in res.stdout.splitlines() if line.strip())
    if not destroyed:
        return []
    return [f"destroyed {destroyed} UDP socket(s) connected to removed backends"]
