"""Attach and remove veer's TC programs on network devices (rtnetlink).

Each device gets a clsact qdisc (created if missing, shared with others) and
one veer filter per direction, identified by a fixed priority and handle so
that a restarted agent *replaces* its filter atomically and `--cleanup`
removes exactly veer's filters, never anyone else's (it also checks the
program name). A filter holds its own reference on the program, so the
per-packet path outlives the agent like the socket path does. The requests
go through agent/datapath/ebpf/rtnl.py (not pyroute2: see there why).
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from ipaddress import ip_address

from agent.datapath.ebpf.rtnl import Filter, NetlinkError, Rtnl
from agent.errors import DatapathError
from agent.model.objects import IPAddress

log = logging.getLogger(__name__)

PARENT_INGRESS = 0xFFFFFFF2
PARENT_EGRESS = 0xFFFFFFF3
VEER_PRIO = 0x7665  # "ve"
VEER_HANDLE = 0x7665


@dataclass(frozen=True)
class TcHook:
    function: str
    parent: int

    @property
    def direction(self) -> str:
        return "ingress" if self.parent == PARENT_INGRESS else "egress"


TC_HOOKS = (
    TcHook("veer_tc_ingress", PARENT_INGRESS),
    TcHook("veer_tc_egress", PARENT_EGRESS),
)


def devices_with(addresses: Iterable[IPAddress]) -> list[str]:
    """Names of this namespace's devices that hold any of `addresses`."""
    wanted = set(addresses)
    out: list[str] = []
    with Rtnl() as rtnl:
        names = rtnl.links()
        for index, address in rtnl.addresses():
            if ip_address(address) in wanted:
                name = names.get(index)
                if name and name not in out:
                    out.append(name)
    return out


def attach(device: str, programs: Sequence[tuple[TcHook, int, str]]) -> None:
    """Attach (fd, name) per hook to `device`, replacing veer's previous filters."""
    try:
        with Rtnl() as rtnl:
            index = rtnl.link_index(device)
            if index is None:
                raise DatapathError(f"device {device!r} does not exist in this network namespace")
            rtnl.add_clsact(index)
            for hook, fd, name in programs:
                rtnl.replace_bpf_filter(index, hook.parent, VEER_PRIO, VEER_HANDLE, fd, name)
    except NetlinkError as err:
        raise DatapathError(f"attaching TC programs to {device}: {err}") from err
    log.info("attached TC ingress/egress programs to %s", device)


def _veer_filters(rtnl: Rtnl, index: int, parent: int) -> list[Filter]:
    try:
        filters = rtnl.filters(index, parent)
    except NetlinkError:
        return []  # no clsact qdisc here
    return [f for f in filters
            if f.kind == "bpf" and f.prio == VEER_PRIO and f.name.startswith("veer_")]


def attached(devices: Iterable[str] | None = None) -> list[tuple[str, str, str]]:
    """(device, direction, program name) of every veer TC filter here."""
    out: list[tuple[str, str, str]] = []
    with Rtnl() as rtnl:
        for index, name in rtnl.links().items():
            if devices is not None and name not in devices:
                continue
            for hook in TC_HOOKS:
                out.extend((name, hook.direction, f.name)
                           for f in _veer_filters(rtnl, index, hook.parent))
    return out


def detach_all() -> list[str]:
    """Remove every veer TC filter in this namespace. Idempotent."""
    removed = []
    with Rtnl() as rtnl:
        for index, name in rtnl.links().items():
            for hook in TC_HOOKS:
                if not _veer_filters(rtnl, index, hook.parent):
                    continue
                try:
                    rtnl.delete_filter(index, hook.parent, VEER_PRIO, VEER_HANDLE)
                    removed.append(f"removed TC {hook.direction} filter from {name}")
                except NetlinkError as err:
                    if err.errno not in (errno.ENOENT, errno.EINVAL):
                        raise DatapathError(f"removing TC filter from {name}: {err}") from err
    return removed
