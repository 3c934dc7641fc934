"""Attach and remove veer's TC programs on network devices (pyroute2).

Each device gets a clsact qdisc (created if missing, shared with others) and
one veer filter per direction, identified by a fixed priority and handle so
that a restarted agent *replaces* its filter atomically and `--cleanup`
removes exactly veer's filters, never anyone else's (it also checks the
program name). A filter holds its own reference on the program, so the
per-packet path outlives the agent like the socket path does.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from ipaddress import ip_address
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

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
    with IPRoute() as ipr:
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        for msg in ipr.get_addr():
            address = msg.get_attr("IFA_ADDRESS") or msg.get_attr("IFA_LOCAL")
            if address and ip_address(address) in wanted:
                name = names.get(msg["index"])
                if name and name not in out:
                    out.append(name)
    return out


def _index(ipr: Any, device: str) -> int:
    found = ipr.link_lookup(ifname=device)
    if not found:
        raise DatapathError(f"device {device!r} does not exist in this network namespace")
    return int(found[0])


def attach(device: str, programs: Sequence[tuple[TcHook, int, str]]) -> None:
    """Attach (fd, name) per hook to `device`, replacing veer's previous filters."""
    try:
        with IPRoute() as ipr:
            index = _index(ipr, device)
            try:
                ipr.tc("add", "clsact", index)
            except NetlinkError as err:
                if err.code != errno.EEXIST:
                    raise
            for hook, fd, name in programs:
                ipr.tc(
                    "replace-filter", "bpf", index, VEER_HANDLE,
                    fd=fd, name=name, parent=hook.parent, prio=VEER_PRIO,
                    direct_action=True, classid=1,
                )
    except NetlinkError as err:
        raise DatapathError(f"attaching TC programs to {device}: {err}") from err
    log.info("attached TC ingress/egress programs to %s", device)


def _veer_filters(ipr: Any, index: int, parent: int) -> list[Any]:
    try:
        filters = ipr.get_filters(index=index, parent=parent)
    except NetlinkError:
        return []
    out = []
    for f in filters:
        if f.get_attr("TCA_KIND") != "bpf" or f["info"] >> 16 != VEER_PRIO:
            continue
        options = f.get_attr("TCA_OPTIONS")
        name = options.get_attr("TCA_BPF_NAME") if options is not None else ""
        if name and str(name).startswith("veer_"):
            out.append(f)
    return out


def attached(devices: Iterable[str] | None = None) -> list[tuple[str, str, str]]:
    """(device, direction, program name) of every veer TC filter here."""
    out = []
    with IPRoute() as ipr:
        for link in ipr.get_links():
            name = link.get_attr("IFLA_IFNAME")
            if devices is not None and name not in devices:
                continue
            for hook in TC_HOOKS:
                for f in _veer_filters(ipr, link["index"], hook.parent):
                    options = f.get_attr("TCA_OPTIONS")
                    out.append((name, hook.direction, str(options.get_attr("TCA_BPF_NAME"))))
    return out


def detach_all() -> list[str]:
    """Remove every veer TC filter in this namespace. Idempotent."""
    removed = []
    with IPRoute() as ipr:
        for link in ipr.get_links():
            name = link.get_attr("IFLA_IFNAME")
            for hook in TC_HOOKS:
                if not _veer_filters(ipr, link["index"], hook.parent):
                    continue
                try:
                    ipr.tc("del-filter", "bpf", link["index"], VEER_HANDLE,
                           parent=hook.parent, prio=VEER_PRIO)
                    removed.append(f"removed TC {hook.direction} filter from {name}")
                except NetlinkError as err:
                    if err.code not in (errno.ENOENT, errno.EINVAL):
                        raise DatapathError(f"removing TC filter from {name}: {err}") from err
    return removed
