"""Policy routing for TPROXY mode (pyroute2), in the agent's network namespace.

Two rules and two tables, all listed in layout.py:

- `fwmark MARK_LOCAL lookup 8337`, table 8337 `local default dev lo`: a
  packet nftables marked is delivered to a local socket whatever its
  destination. This is what makes TPROXY work at all: the proxy's upstream
  connections carry the client's address, so a backend's replies are
  addressed to the client, and only this mark keeps them on this node, for
  the proxy's socket, instead of forwarding them to the client.
- `lookup 8338` (no selector, before `main`), table 8338 `local <addr> dev
  lo src 127.0.0.1` (::1) for every Service address (ClusterIP, externalIP,
  LB IP) and every `--service-cidr`: the node delivers them locally. A
  process of the node can then connect to a ClusterIP even when no route
  covers it (the output route lookup happens at connect(), before any
  nftables rule could mark the packet); its packets loop through `lo` into
  prerouting, where nftables hands them to the proxy or refuses them. The
  classic alternative, marking the node's own packets in an output chain so
  that they are rerouted to `lo`, needs a route to exist at connect() (on a
  node without a default route it fails with ENETUNREACH) and conntrack.
  Lookups of other addresses find nothing in 8338 and go on to `main`. (A
  rule per address would do the same, but rules are searched one by one; a
  table is a trie.)

`classify()` tells where a backend is (layout.Locality) from a route lookup.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Iterable
from ipaddress import ip_address, ip_network
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from agent.datapath.tproxy.layout import (
    LOOPBACK,
    MARK_LOCAL,
    ROUTE_TABLE_DIVERT,
    ROUTE_TABLE_SERVICES,
    RULE_PREF_DIVERT,
    RULE_PREF_SERVICES,
    Locality,
)
from agent.errors import DatapathError
from agent.model.objects import IPAddress, IPNetwork

log = logging.getLogger(__name__)

_AF = {4: socket.AF_INET, 6: socket.AF_INET6}
_ANY = {4: "0.0.0.0/0", 6: "::/0"}
RTN_LOCAL = 2


def _family(version: int) -> socket.AddressFamily:
    return _AF[version]


class Routing:
    """veer's rules and routes. Not thread-safe: the reconciler's thread only."""

    def __init__(self) -> None:
        self._ipr = IPRoute()
        self._lo = self._lookup_lo()

    def _lookup_lo(self) -> int:
        found = self._ipr.link_lookup(ifname="lo")
        if not found:
            raise DatapathError("this network namespace has no loopback device")
        return int(found[0])

    def close(self) -> None:
        self._ipr.close()

    # ---- rules and the divert table -------------------------------------------

    def setup(self, families: Iterable[int]) -> None:
        """Both rules and table 8337 for each family; table 8338 emptied (the
        reconciler adds every Service address again). Idempotent."""
        families = tuple(families)
        self.setup_rules(families)
        for version in families:
            for dst in self.service_routes(version):
                self._route("del", str(dst), ROUTE_TABLE_SERVICES, _family(version),
                            missing_ok=True)

    def setup_rules(self, families: Iterable[int]) -> None:
        """Both rules and table 8337's default route, for each family; what
        exists already is left alone."""
        for version in families:
            fam = _family(version)
            self._ensure_rule(fam, RULE_PREF_DIVERT, ROUTE_TABLE_DIVERT, fwmark=True)
            self._ensure_rule(fam, RULE_PREF_SERVICES, ROUTE_TABLE_SERVICES, fwmark=False)
            if not self.divert_ok(version):
                self._route("replace", _ANY[version], ROUTE_TABLE_DIVERT, fam)

    def _ensure_rule(self, fam: socket.AddressFamily, pref: int, table: int,
                     fwmark: bool) -> None:
        for rule in self._ipr.get_rules(family=fam):
            if rule.get_attr("FRA_PRIORITY") != pref:
                continue
            if (rule.get_attr("FRA_TABLE") == table
                    and (rule.get_attr("FRA_FWMARK") == MARK_LOCAL) == fwmark):
                return
            raise DatapathError(
                f"routing rule priority {pref} is taken by another rule ({_describe(rule)}); "
                "TPROXY mode needs it"
            )
        kwargs: dict[str, Any] = {"family": fam, "priority": pref, "table": table}
        if fwmark:
            kwargs.update(fwmark=MARK_LOCAL, fwmask=MARK_LOCAL)
        try:
            self._ipr.rule("add", **kwargs)
        except NetlinkError as err:
            if err.code != errno.EEXIST:
                raise DatapathError(f"adding routing rule {pref}: {err}") from err

    def _route(self, op: str, dst: str, table: int, fam: socket.AddressFamily,
               missing_ok: bool = False, prefsrc: str | None = None) -> bool:
        """A `local DST dev lo [src PREFSRC]` route in `table`; True if it
        changed anything."""
        kwargs: dict[str, Any] = {"dst": dst, "type": "local", "table": table,
                                  "oif": self._lo, "family": fam}
        if prefsrc is not None:
            kwargs["prefsrc"] = prefsrc
        if fam == socket.AF_INET:
            kwargs["scope"] = "host"  # IPv4 refuses a local route of another scope
        try:
            self._ipr.route(op, **kwargs)
        except NetlinkError as err:
            if op == "add" and err.code == errno.EEXIST:
                return False
            if op == "del" and missing_ok and err.code in (errno.ESRCH, errno.ENOENT):
                return False
            raise DatapathError(f"route {op} local {dst} table {table}: {err}") from err
        return True

    # ---- Service addresses -----------------------------------------------------

    def add_service_route(self, dst: IPAddress | IPNetwork) -> bool:
        """`local DST dev lo src 127.0.0.1` (::1): the loopback address as the
        source, because the kernel refuses to send from an address no device
        holds (a connect() from the node would fail with ENETUNREACH, its
        reset could not leave). The proxy sees the node's clients as the
        loopback address and connects to backends from the node's own."""
        net = ip_network(dst)
        return self._route("add", str(net), ROUTE_TABLE_SERVICES, _family(net.version),
                           prefsrc=LOOPBACK[net.version])

    def delete_service_route(self, dst: IPAddress | IPNetwork) -> bool:
        net = ip_network(dst)
        return self._route("del", str(net), ROUTE_TABLE_SERVICES, _family(net.version),
                           missing_ok=True)

    def service_routes(self, version: int) -> set[IPNetwork]:
        out: set[IPNetwork] = set()
        for msg in self._ipr.get_routes(family=_family(version), table=ROUTE_TABLE_SERVICES):
            if msg.get_attr("RTA_TABLE") != ROUTE_TABLE_SERVICES:
                continue
            dst = msg.get_attr("RTA_DST") or _ANY[version].split("/")[0]
            out.add(ip_network(f"{dst}/{msg['dst_len']}"))
        return out

    def divert_ok(self, version: int) -> bool:
        """Table 8337 still holds its default route (for dump())."""
        for msg in self._ipr.get_routes(family=_family(version), table=ROUTE_TABLE_DIVERT):
            if msg.get_attr("RTA_TABLE") == ROUTE_TABLE_DIVERT and msg["dst_len"] == 0:
                return True
        return False

    # ---- where backends are ----------------------------------------------------

    def device_indexes(self, names: Iterable[str]) -> set[int]:
        out: set[int] = set()
        for name in names:
            out.update(int(i) for i in self._ipr.link_lookup(ifname=name))
        return out

    def classify(self, address: IPAddress, node_devices: set[int]) -> Locality:
        """HERE (a pod behind a device of this node), NODE (an address of this
        node) or REMOTE (behind one of the node's devices, `node_devices`)."""
        try:
            answer = self._ipr.route("get", dst=str(address))
        except NetlinkError:
            return Locality.REMOTE  # unroutable: the proxy will source-NAT, which is safe
        if not answer:
            return Locality.REMOTE
        msg = answer[0]
        if msg["type"] == RTN_LOCAL:
            return Locality.NODE
        oif = msg.get_attr("RTA_OIF")
        return Locality.REMOTE if oif is None or oif in node_devices else Locality.HERE

    def devices_with(self, addresses: Iterable[IPAddress]) -> list[str]:
        """Names of this namespace's devices that hold any of `addresses`."""
        wanted = set(addresses)
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in self._ipr.get_links()}
        out: list[str] = []
        for msg in self._ipr.get_addr():
            raw = msg.get_attr("IFA_ADDRESS") or msg.get_attr("IFA_LOCAL")
            if raw and ip_address(raw) in wanted:
                name = names.get(msg["index"])
                if name and name not in out:
                    out.append(name)
        return out


EARLY_DEMUX = "/proc/sys/net/ipv4/tcp_early_demux"


def early_demux_off() -> bool:
    """Turn TCP early demux off in this network namespace; True if it was on.

    Early demux looks a received segment's socket up before routing. The
    proxy's upstream sockets carry their clients' addresses, so one of them
    left in TIME_WAIT matches a later connection of that client straight to
    the same backend from the same port: demux attaches the TIME_WAIT socket
    to the backend's answer, which then cannot be forwarded to the client
    (the kernel drops a forwarded packet that has a socket) and the client's
    connect() hangs. Without early demux the answer is routed as any other."""
    try:
        with open(EARLY_DEMUX) as f:
            was_on = f.read().strip() != "0"
        if was_on:
            with open(EARLY_DEMUX, "w") as f:
                f.write("0")
    except OSError as err:
        raise DatapathError(f"cannot turn TCP early demux off ({EARLY_DEMUX}): {err}") from err
    return was_on


def early_demux_on() -> None:
    """Back to the kernel's default (what --cleanup does after TPROXY mode)."""
    try:
        with open(EARLY_DEMUX, "w") as f:
            f.write("1")
    except OSError as err:
        raise DatapathError(f"cannot turn TCP early demux on ({EARLY_DEMUX}): {err}") from err


def _describe(rule: Any) -> str:
    return (f"table {rule.get_attr('FRA_TABLE')}, fwmark {rule.get_attr('FRA_FWMARK')}")


def remove_all() -> list[str]:
    """What `veer agent --cleanup` does for routing: veer's two rules (only if
    they are veer's: same priority and table) and both tables. Idempotent."""
    removed: list[str] = []
    with IPRoute() as ipr:
        for fam, name in ((socket.AF_INET, "IPv4"), (socket.AF_INET6, "IPv6")):
            for rule in ipr.get_rules(family=fam):
                pref, table = rule.get_attr("FRA_PRIORITY"), rule.get_attr("FRA_TABLE")
                if (pref, table) in ((RULE_PREF_DIVERT, ROUTE_TABLE_DIVERT),
                                     (RULE_PREF_SERVICES, ROUTE_TABLE_SERVICES)):
                    try:
                        ipr.rule("del", family=fam, priority=pref, table=table)
                        removed.append(f"removed {name} routing rule {pref} (table {table})")
                    except NetlinkError as err:
                        if err.code not in (errno.ENOENT, errno.ESRCH):
                            raise DatapathError(f"removing routing rule {pref}: {err}") from err
            for table in (ROUTE_TABLE_DIVERT, ROUTE_TABLE_SERVICES):
                count = 0
                for msg in ipr.get_routes(family=fam, table=table):
                    if msg.get_attr("RTA_TABLE") != table:
                        continue
                    try:
                        ipr.route("del", family=fam, table=table, dst_len=msg["dst_len"],
                                  dst=msg.get_attr("RTA_DST"), type=msg["type"],
                                  scope=msg["scope"], oif=msg.get_attr("RTA_OIF"))
                        count += 1
                    except NetlinkError as err:
                        if err.code not in (errno.ENOENT, errno.ESRCH):
                            raise DatapathError(f"flushing routing table {table}: {err}") \
                                from err
                if count:
                    removed.append(f"removed {count} {name} route(s) from table {table}")
    return removed
