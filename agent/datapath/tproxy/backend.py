"""TproxyDatapath: DesiredState served by nftables tproxy and a proxy in the agent.

Who holds what:
- nftables (table inet veer): which Service addresses and ports are
  intercepted, and every verdict that needs no backend (refusals, drops,
  source ranges, access rules), taken in the kernel at the first packet;
- the proxy (engine.py): the choice of a backend for each new connection or
  UDP flow, and the bytes;
- policy routing (routing.py): local delivery of what nftables marked, and
  Service addresses as local routes.

Writes are batched. `upsert_frontend` and friends update the proxy at once
(it must know a frontend before nftables sends it traffic) and queue their
nftables commands; `finish_pass` (the end of every reconciler pass) applies
them all in one transaction, so a pass's changes appear at once, and a
removed frontend leaves the proxy only after nftables stopped sending to it.
One transaction per frontend would cost a ruleset lookup each: with 10,000
Services, minutes instead of a second. If the batch fails, each frontend's
commands are retried alone, so one bad frontend is named and the rest apply.

State across restarts: the proxy's connections end with the agent (a
difference from eBPF mode, where the kernel keeps serving). A new agent
replaces the table with an empty one and the reconciler's first (full) pass
writes everything again.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.compute.policy import (
    FEATURE_ACCESS,
    FEATURE_AFFINITY,
    FEATURE_ALGORITHM,
    FEATURE_SPLIT,
)
from agent.compute.types import Frontend, L4Addr
from agent.datapath.interface import Datapath, DatapathState, MapUsage, ProgrammedFrontend
from agent.datapath.tproxy import ruleset
from agent.datapath.tproxy.engine import Engine
from agent.datapath.tproxy.layout import LOOPBACK, Locality
from agent.datapath.tproxy.nft import Command, Nft
from agent.datapath.tproxy.routing import Routing
from agent.errors import DatapathError, EnvironmentProblem
from agent.model.objects import IPAddress, IPNetwork, Protocol

log = logging.getLogger(__name__)

_PROTOCOLS = {"tcp": Protocol.TCP, "udp": Protocol.UDP}


@dataclass
class _Change:
    """One queued write: its nftables commands, and how to undo what was
    already done in memory if the kernel refuses them."""

    what: str
    commands: list[Command]
    undo: Callable[[], None] = lambda: None
    after: Callable[[], None] = lambda: None  # once the kernel has them


@dataclass
class _Held:
    frontends: dict[L4Addr, Frontend] = field(default_factory=dict)
    chains: dict[L4Addr, set[str]] = field(default_factory=dict)
    vips: set[IPAddress] = field(default_factory=set)
    cidrs: set[IPNetwork] = field(default_factory=set)


def ipv6_usable() -> bool:
    """Whether this namespace has IPv6 on loopback (the proxy listens on ::1)."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind((LOOPBACK[6], 0))
    except OSError:
        return False
    return True


class TproxyDatapath(Datapath):
    name = "tproxy"
    # The proxy picks backends as the eBPF programs do; nftables holds the
    # access rules. Redirects to a node-local proxy are not done in this mode.
    policy_features = frozenset({FEATURE_ALGORITHM, FEATURE_AFFINITY, FEATURE_SPLIT,
                                 FEATURE_ACCESS})

    def __init__(self, devices: tuple[str, ...] = ()) -> None:
        if os.geteuid() != 0:
            raise EnvironmentProblem("TPROXY mode needs root (nftables, policy routing, "
                                     "IP_TRANSPARENT)")
        self._families = (4, 6) if ipv6_usable() else (4,)
        if 6 not in self._families:
            log.warning("IPv6 is off in this network namespace: IPv6 Services are not served")
        self._nft = Nft()
        self._routing = Routing()
        self.engine = Engine(self._families)
        self._held = _Held()
        self._queue: list[_Change] = []
        self._explicit_devices = tuple(devices)
        self._devices: tuple[str, ...] = ()
        self._node_addresses: tuple[IPAddress, ...] = ()
        self._resolved_for: tuple[IPAddress, ...] | None = None
        self._resolved: tuple[str, ...] = ()
        self._cluster: frozenset[IPNetwork] = frozenset()
        try:
            self.engine.start()
            self._routing.setup(self._families)
            self._nft.run(ruleset.skeleton(), "creating table inet veer")
        except BaseException:
            self.close()
            raise
        log.info("TPROXY datapath: table inet veer, proxy listening on %s",
                 ", ".join(f"{LOOPBACK[f]}:{p} ({proto.value}, {role.value})"
                           for (f, proto, role), p in sorted(
                               self.engine.ports.items(),
                               key=lambda kv: (kv[0][0], kv[0][1].value, kv[0][2].value))))

    # ---- frontends ---------------------------------------------------------------

    def upsert_frontend(self, frontend: Frontend) -> bool:
        key = frontend.key
        if key.address.version not in self._families:
            raise DatapathError(f"frontend {key}: IPv6 is off in this network namespace")
        if key.protocol not in (Protocol.TCP, Protocol.UDP):
            raise DatapathError(f"frontend {key}: TPROXY mode serves TCP and UDP only")
        held = self._held
        old = held.frontends.get(key)
        if old == frontend:
            return False
        self._classify([*frontend.backends, *frontend.external_backends])
        # The proxy first: nftables must never hand it a connection it cannot place.
        self.engine.update(frontend)
        chains = ruleset.render_frontend(frontend, self.engine.ports)
        old_chains = held.chains.get(key, set())
        held.frontends[key] = frontend
        held.chains[key] = set(chains)

        def undo() -> None:
            if old is None:
                held.frontends.pop(key, None)
                held.chains.pop(key, None)
                self.engine.remove(key)
            else:
                held.frontends[key] = old
                held.chains[key] = old_chains
                self.engine.update(old)

        self._queue.append(_Change(f"frontend {key} ({frontend.service})",
                                   ruleset.upsert_commands(key, chains, old_chains), undo))
        return True

    def delete_frontend(self, key: L4Addr) -> bool:
        held = self._held
        if key not in held.frontends and key not in held.chains:
            return False
        old = held.frontends.pop(key, None)
        chains = held.chains.pop(key, set())

        def undo() -> None:
            if old is not None:
                held.frontends[key] = old
            held.chains[key] = chains

        self._queue.append(_Change(f"removing frontend {key}",
                                   ruleset.delete_commands(key, chains), undo,
                                   after=lambda: self.engine.remove(key)))
        return True

    def _classify(self, backends: list[L4Addr]) -> None:
        """Where each new backend address is (for keeping client addresses)."""
        known = self.engine.locality
        fresh = {str(b.address): b.address for b in backends}
        missing = [(text, addr) for text, addr in fresh.items() if text not in known]
        if not missing:
            return
        devices = self._routing.device_indexes(self._devices)
        for text, addr in missing:
            known[text] = self._routing.classify(addr, devices)

    # ---- Service addresses, CIDRs, node and cluster --------------------------------

    def upsert_vip(self, address: IPAddress) -> bool:
        if address in self._held.vips:
            return False
        self._routing.add_service_route(address)
        self._held.vips.add(address)
        self._queue.append(_Change(
            f"Service address {address}",
            ruleset.element_commands("add", f"vips{address.version}", [str(address)]),
            lambda: self._held.vips.discard(address)))
        return True

    def delete_vip(self, address: IPAddress) -> bool:
        if address not in self._held.vips:
            return False
        self._held.vips.discard(address)
        self._routing.delete_service_route(address)
        self._queue.append(_Change(
            f"removing Service address {address}",
            ruleset.element_commands("delete", f"vips{address.version}", [str(address)]),
            lambda: self._held.vips.add(address)))
        return True

    def upsert_service_cidr(self, cidr: IPNetwork) -> bool:
        if cidr in self._held.cidrs:
            return False
        self._routing.add_service_route(cidr)
        self._held.cidrs.add(cidr)
        self._queue.append(_Change(
            f"Service CIDR {cidr}",
            ruleset.element_commands("add", f"cidrs{cidr.version}",
                                     ruleset.set_elements([cidr])),
            lambda: self._held.cidrs.discard(cidr)))
        return True

    def delete_service_cidr(self, cidr: IPNetwork) -> bool:
        if cidr not in self._held.cidrs:
            return False
        self._held.cidrs.discard(cidr)
        self._routing.delete_service_route(cidr)
        self._queue.append(_Change(
            f"removing Service CIDR {cidr}",
            ruleset.element_commands("delete", f"cidrs{cidr.version}",
                                     ruleset.set_elements([cidr])),
            lambda: self._held.cidrs.add(cidr)))
        return True

    def set_node_addresses(self, addresses: tuple[IPAddress, ...]) -> bool:
        """The node's devices (where "outside" is) follow from its addresses,
        unless --devices named them. Called at the start of every pass, so the
        devices are known before the first frontend is written."""
        self._node_addresses = addresses
        return self._set_devices(self._resolve(self._explicit_devices, addresses))

    def serve_devices(self, devices: list[str], node_addresses: tuple[IPAddress, ...]) -> None:
        if self._set_devices(self._resolve(tuple(devices), node_addresses)):
            self.finish_pass()

    def _resolve(self, devices: tuple[str, ...],
                 addresses: tuple[IPAddress, ...]) -> tuple[str, ...]:
        """`devices` if given, else those holding the node's addresses (looked
        up again only when the addresses change, as the eBPF path does)."""
        if devices:
            return devices
        if addresses != self._resolved_for:
            self._resolved = tuple(self._routing.devices_with(addresses))
            self._resolved_for = addresses
        return self._resolved

    def _set_devices(self, devices: tuple[str, ...]) -> bool:
        if devices == self._devices:
            return False
        log.info("TPROXY: traffic arriving on %s is from outside the node",
                 ", ".join(devices) or "no device")
        self._devices = devices
        self._queue.append(_Change(
            "the node's devices",
            [{"flush": {"set": {**_table(), "name": "ext_devices"}}},
             *ruleset.element_commands("add", "ext_devices", list(devices))]))
        # Which backends lie behind those devices may have changed.
        backends = [L4Addr(ipaddress.ip_address(a), 0, Protocol.TCP)
                    for a in self.engine.locality]
        self.engine.locality = {}
        self._classify(backends)
        return True

    def set_cluster_cidrs(self, cidrs: frozenset[IPNetwork]) -> bool:
        if cidrs == self._cluster:
            return False
        self._cluster = cidrs
        cmds: list[Command] = []
        for version in (4, 6):
            name = f"cluster{version}"
            cmds.append({"flush": {"set": {**_table(), "name": name}}})
            cmds += ruleset.element_commands(
                "add", name, ruleset.set_elements(c for c in cidrs if c.version == version))
        self._queue.append(_Change("cluster CIDRs", cmds))
        return True

    # ---- applying ------------------------------------------------------------------

    def finish_pass(self) -> list[str]:
        """Apply every queued change: one transaction, or, if the kernel refuses
        it, one per change so that only the bad ones are left out."""
        queue, self._queue = self._queue, []
        if not queue:
            return []
        try:
            self._nft.run([c for change in queue for c in change.commands],
                          f"{len(queue)} change(s)")
        except DatapathError as batch_error:
            log.warning("TPROXY: %s; applying the changes one by one", batch_error)
            failed: list[str] = []
            for change in queue:
                try:
                    self._nft.run(change.commands, change.what)
                except DatapathError as err:
                    change.undo()
                    failed.append(str(err))
                    continue
                change.after()
            if failed:
                raise DatapathError("; ".join(failed[:5]) + (
                    f" (and {len(failed) - 5} more)" if len(failed) > 5 else "")) from None
            return []
        for change in queue:
            change.after()
        return []

    # ---- reading back --------------------------------------------------------------

    def dump(self) -> DatapathState:
        """What the kernel holds: the frontends in nftables' maps (as the proxy
        serves them), the Service addresses and CIDRs in its sets. Repairs what
        can be repaired without the reconciler (rules, routes, a lost table)."""
        self.finish_pass()
        held = self._held
        if not self._nft.query(ruleset.list_command("set", "ext_devices")):
            log.warning("TPROXY: table inet veer is gone; creating it again")
            self._recreate()
        self._routing.setup_rules(self._families)
        in_maps: set[L4Addr] = set()
        for version in self._families:
            for obj in self._nft.query(ruleset.list_command("map", ruleset.map_name(version))):
                for elem in obj.get("map", {}).get("elem", []):
                    key = _key_of(elem[0])
                    if key is not None:
                        in_maps.add(key)
        state = DatapathState()
        for key in in_maps:
            fe = held.frontends.get(key)
            state.frontends[key] = ProgrammedFrontend.of(fe) if fe is not None \
                else ProgrammedFrontend(backends=())  # not ours: the reconciler removes it
            if fe is None and key not in held.chains:
                held.chains[key] = self._chains_of(key)
        for key in [k for k in held.frontends if k not in in_maps]:
            del held.frontends[key]  # lost: the reconciler will write it again
            held.chains.pop(key, None)
        state.vips = self._set_addresses("vips")
        state.service_cidrs = self._set_networks("cidrs")
        held.vips = set(state.vips)
        held.cidrs = set(state.service_cidrs)
        for version in self._families:
            routed = self._routing.service_routes(version)
            for dst in [*state.vips, *state.service_cidrs]:
                if dst.version == version and ipaddress.ip_network(dst) not in routed:
                    self._routing.add_service_route(dst)
        return state

    def _recreate(self) -> None:
        self._nft.run(ruleset.skeleton(), "creating table inet veer")
        self._held = _Held()
        for key in list(self.engine.tables):
            self.engine.tables[key].clear()
        devices, self._devices = self._devices, ()
        self._set_devices(devices)
        cluster, self._cluster = self._cluster, frozenset()
        self.set_cluster_cidrs(cluster)
        self.finish_pass()

    def _chains_of(self, key: L4Addr) -> set[str]:
        entry = ruleset.chain_name(key)
        names = {entry + s for s in ("", "_in", "_out", "_outok")}
        found = self._nft.query({"list": {"chains": {"family": "inet"}}})
        return {c["chain"]["name"] for c in found
                if "chain" in c and c["chain"].get("table") == "veer"
                and c["chain"]["name"] in names}

    def _set_addresses(self, prefix: str) -> set[IPAddress]:
        out: set[IPAddress] = set()
        for version in self._families:
            for obj in self._nft.query(ruleset.list_command("set", f"{prefix}{version}")):
                for elem in obj.get("set", {}).get("elem", []):
                    if isinstance(elem, str):
                        out.add(ipaddress.ip_address(elem))
        return out

    def _set_networks(self, prefix: str) -> set[IPNetwork]:
        out: set[IPNetwork] = set()
        for version in self._families:
            for obj in self._nft.query(ruleset.list_command("set", f"{prefix}{version}")):
                for elem in obj.get("set", {}).get("elem", []):
                    out.update(_networks_of(elem))
        return out

    # ---- introspection -------------------------------------------------------------

    def usage(self) -> list[MapUsage]:
        return []

    def counters(self) -> Mapping[str, int]:
        out = dict(self.engine.counters())
        for obj in self._nft.query({"list": {"counters": {"family": "inet",
                                                          "table": "veer"}}}):
            counter = obj.get("counter")
            if counter and counter.get("table") == "veer":
                out[counter["name"]] = int(counter.get("packets", 0))
        return out

    def close(self) -> None:
        """Stop the proxy (its connections end). nftables and routing stay, as
        eBPF mode leaves its programs: a restarted agent replaces them."""
        self.engine.close()
        self._routing.close()


def _table() -> dict[str, str]:
    return {"family": "inet", "table": "veer"}


def _key_of(raw: Any) -> L4Addr | None:
    """A frontend from a map element key ({"concat": [addr, proto, port]})."""
    try:
        addr, proto, port = raw["concat"]
        protocol = _PROTOCOLS.get(str(proto))
        if protocol is None:
            return None
        return L4Addr(ipaddress.ip_address(addr), int(port), protocol)
    except (KeyError, TypeError, ValueError):
        return None


def _networks_of(elem: Any) -> list[IPNetwork]:
    if isinstance(elem, str):
        return [ipaddress.ip_network(elem)]
    if isinstance(elem, dict):
        if "prefix" in elem:
            p = elem["prefix"]
            return [ipaddress.ip_network(f"{p['addr']}/{p['len']}")]
        if "range" in elem:
            first, last = (ipaddress.ip_address(a) for a in elem["range"])
            return list(ipaddress.summarize_address_range(first, last))
        if "elem" in elem:
            return _networks_of(elem["elem"].get("val"))
    return []


__all__ = ["Locality", "TproxyDatapath"]
