"""Who is calling: the network namespaces of the processes the socket hooks
serve, with their addresses, in veer_netns_addrs.

A cgroup socket hook runs at connect() and sendmsg(), before the kernel has
chosen a source address, so the programs cannot see "the client's address"
that access rules and Maglev's flow hash need. What they can see is the
caller's network namespace (its cookie). A pod is one namespace with one
address per family, so the agent records, per namespace cookie, the
namespace's first global IPv4 and IPv6 address; the host namespace gets the
node's own.

Which namespaces: those of the processes in the cgroup the hooks are
attached to (cgroup.procs, recursively), which are exactly the processes
whose sockets the hooks see. Each new namespace is entered by a short-lived
thread (setns affects only the calling thread) that asks for its cookie
(SO_NETNS_COOKIE, Linux 5.14+) and its addresses (rtnetlink).

When: every REFRESH_SECONDS while some frontend needs client addresses, and
at once when the kernel reports a connection refused for lack of one (a pod
that connects within its first moments); entries of namespaces whose
processes are all gone are removed.
"""

from __future__ import annotations

import ctypes
import ipaddress
import logging
import os
import socket
import threading
from collections.abc import Iterator

from agent.datapath.ebpf.maps import PinnedMap
from agent.datapath.ebpf.rtnl import Rtnl
from agent.datapath.ebpf.structs import CookieKey, NodeValue, addr_bytes
from agent.errors import DatapathError
from agent.model.objects import IPAddress

log = logging.getLogger(__name__)

SO_NETNS_COOKIE = 71  # <asm-generic/socket.h>
CLONE_NEWNET = 0x40000000
REFRESH_SECONDS = 1.0

_libc = ctypes.CDLL(None, use_errno=True)


def cgroup_pids(cgroup: str) -> Iterator[int]:
    """Every process in `cgroup` and the cgroups below it."""
    for directory, _dirs, files in os.walk(cgroup):
        if "cgroup.procs" not in files:
            continue
        try:
            with open(os.path.join(directory, "cgroup.procs")) as f:
                text = f.read()
        except OSError:
            continue  # the cgroup went away while we walked
        for line in text.split():
            yield int(line)


def _global(address: IPAddress) -> bool:
    return not (address.is_loopback or address.is_link_local or address.is_multicast)


def _namespace_facts(pid: int) -> tuple[int, list[IPAddress]]:
    """(cookie, addresses) of the network namespace of `pid`, read from a
    thread that joins it (the caller's own namespace is untouched)."""
    out: dict[str, object] = {}

    def inside() -> None:
        try:
            fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns")
            finally:
                os.close(fd)
            with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
                cookie = int.from_bytes(
                    s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8), "little")
            with Rtnl() as rtnl:
                addresses = [ipaddress.ip_address(a) for _, a in rtnl.addresses()]
            out["result"] = (cookie, addresses)
        except Exception as err:  # reported below; the thread must not die silently
            out["error"] = err

    thread = threading.Thread(target=inside, name=f"netns-{pid}", daemon=True)
    thread.start()
    thread.join(timeout=5)
    if "result" not in out:
        raise DatapathError(f"reading the network namespace of pid {pid}: "
                            f"{out.get('error', 'timed out')}")
    return out["result"]  # type: ignore[return-value]


def namespace_value(addresses: list[IPAddress]) -> NodeValue:
    value = NodeValue()
    v4 = next((a for a in addresses if a.version == 4 and _global(a)), None)
    v6 = next((a for a in addresses if a.version == 6 and _global(a)), None)
    if v4 is not None:
        value.addr4 = addr_bytes(v4)
    if v6 is not None:
        value.addr6 = addr_bytes(v6)
    return value


class ClientNamespaces:
    """Keeps veer_netns_addrs equal to the namespaces of the served processes."""

    def __init__(self, table: PinnedMap[CookieKey, NodeValue], cgroup: str) -> None:
        self.table = table
        self.cgroup = cgroup
        self._known: dict[int, int] = {}  # namespace inode -> cookie
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.wanted = False  # some frontend needs client addresses

    def refresh(self) -> int:
        """Record new namespaces, forget gone ones. Returns how many changed."""
        with self._lock:
            seen: dict[int, int] = {}  # inode -> a pid in it
            for pid in cgroup_pids(self.cgroup):
                try:
                    seen.setdefault(os.stat(f"/proc/{pid}/ns/net").st_ino, pid)
                except OSError:
                    continue  # exited
            changed = 0
            for inode, pid in seen.items():
                if inode in self._known:
                    continue
                try:
                    cookie, addresses = _namespace_facts(pid)
                except DatapathError as err:
                    log.debug("%s", err)
                    continue
                self.table.put(CookieKey(cookie), namespace_value(addresses))
                self._known[inode] = cookie
                changed += 1
            for inode in set(self._known) - set(seen):
                self.table.delete(CookieKey(self._known.pop(inode)))
                changed += 1
            return changed

    def wake(self) -> None:
        """Look again now (a client was refused for lack of an address)."""
        self._wake.set()

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="client-namespaces",
                                            daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(REFRESH_SECONDS)
            self._wake.clear()
            if not self.wanted:
                continue
            try:
                changed = self.refresh()
            except (OSError, DatapathError) as err:
                log.warning("client namespaces: %s", err)
                continue
            if changed:
                log.debug("client namespaces: %d change(s)", changed)

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
