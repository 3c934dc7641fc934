"""TproxyDatapath: DesiredState served by nftables tproxy and a proxy in the agent.

Who holds what:
- nftables (table inet veer): which Service addresses and ports are
  intercepted (a map element per frontend, pointing at shared verdict chains,
  ruleset.Verdicts), and every verdict that needs no backend (refusals,
  drops, source ranges, access rules), taken in the kernel at the first packet;
  tables ip veer and ip6 veer copy the node's own "host unreachable" to the
  proxy (ruleset.copy_tables; optional: a kernel without nftables' `dup`
  serves without them);
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
Services, minutes instead of a second. If the batch fails, each change is
retried alone, so the bad ones are named and the rest apply; then what is
held in memory is read back from the kernel (`_reload`), so the reconciler's
next (full) pass rewrites exactly what is missing.

State across restarts: the proxy's connections end with the agent (a
difference from eBPF mode, where the kernel keeps serving). A new agent
replaces the tables with empty ones and the reconciler's first (full) pass
writes everything again.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
from collections import Counter
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
from agent.datapath.tproxy import routing, ruleset
from agent.datapath.tproxy.engine import Engine
from agent.datapath.tproxy.layout import LOOPBACK, NFT_FAMILY, NFT_TABLE
from agent.datapath.tproxy.nft import Command, Nft
from agent.datapath.tproxy.routing import Routing
from agent.errors import DatapathError, EnvironmentProblem
from agent.model.objects import IPAddress, IPNetwork, Protocol

log = logging.getLogger(__name__)

_PROTOCOLS = {"tcp": Protocol.TCP, "udp": Protocol.UDP}
_TABLE = {"family": NFT_FAMILY, "table": NFT_TABLE}


@dataclass
class _Change:
    """One queued write: its nftables commands, and what to do once the kernel
    has them."""

    what: str
    commands: list[Command]
    after: Callable[[], None] = lambda: None


@dataclass
class _Held:
    """What the kernel holds, as far as this agent wrote it."""

    frontends: dict[L4Addr, Frontend] = field(default_factory=dict)
    target: dict[L4Addr, str] = field(default_factory=dict)  # map element -> verdicts
    verdicts: dict[str, list[str]] = field(default_factory=dict)  # verdicts -> its chains
    refs: Counter[str] = field(default_factory=Counter)  # verdicts -> elements on it
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


def make_copy_tables(nft: Nft, versions: tuple[int, ...]) -> bool:
    """Make tables ip veer / ip6 veer (ruleset.copy_tables); whether they are
    there. Without them TPROXY mode still serves, so a kernel whose nftables
    lacks `dup` (CONFIG_NFT_DUP_IPV4/IPV6) gets a warning, not a failure."""
    try:
        nft.run(ruleset.copy_tables(versions), "creating tables ip veer and ip6 veer")
    except DatapathError as err:
        log.warning("TPROXY: %s; this node's own \"host unreachable\" will not reach the "
                    "proxy, so a connect() to a pod of this node that does not answer ARP "
                    "or neighbour solicitation retries for about two minutes", err)
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
        self._routes: set[IPNetwork] = set()  # table 8338, as written (emptied at start)
        self._routes_dirty = False
        self._explicit_devices = tuple(devices)
        self._devices: tuple[str, ...] = ()
        self._resolved_for: tuple[IPAddress, ...] | None = None
        self._resolved: tuple[str, ...] = ()
        self._cluster: frozenset[IPNetwork] = frozenset()
        self._copies = False  # tables ip/ip6 veer made (make_copy_tables)
        try:
            self.engine.start()
            self._routing.setup(self._families)
            self._early_demux()
            self._nft.run(ruleset.skeleton(), "creating table inet veer")
            self._copies = make_copy_tables(self._nft, self._families)
        except BaseException:
            self.close()
            raise
        log.info("TPROXY datapath: table inet veer, proxy listening on %s",
                 ", ".join(f"{LOOPBACK[f]}:{p} ({proto.value}, {role.value})"
                           for (f, proto, role), p in sorted(
                               self.engine.ports.items(),
                               key=lambda kv: (kv[0][0], kv[0][1].value, kv[0][2].value))))

    @staticmethod
    def _early_demux() -> None:
        try:
            if routing.early_demux_off():
                log.info("TPROXY: TCP early demux turned off in this network namespace "
                         "(net.ipv4.tcp_early_demux=0): a TIME_WAIT socket of the proxy "
                         "must never catch a client's direct connection")
        except DatapathError as err:
            # A container without write access to /proc/sys: everything works
            # but the rare case early_demux_off() describes.
            log.warning("TPROXY: %s; a client that connects through a Service and then "
                        "straight to the same backend from the same port may hang for up "
                        "to a minute (set net.ipv4.tcp_early_demux=0 on the node)", err)

    # ---- frontends ---------------------------------------------------------------

    def upsert_frontend(self, frontend: Frontend) -> bool:
        key = frontend.key
        if key.address.version not in self._families:
            raise DatapathError(f"frontend {key}: IPv6 is off in this network namespace")
        if key.protocol not in (Protocol.TCP, Protocol.UDP):
            raise DatapathError(f"frontend {key}: TPROXY mode serves TCP and UDP only")
        held = self._held
        if held.frontends.get(key) == frontend:
            return False
        self._classify([*frontend.backends, *frontend.external_backends])
        # The proxy first: nftables must never hand it a connection it cannot place.
        self.engine.update(frontend)
        held.frontends[key] = frontend
        verdicts = ruleset.verdicts_of(frontend, self.engine.ports)
        cmds: list[Command] = []
        if verdicts.name not in held.verdicts:
            cmds += ruleset.verdicts_commands(verdicts)
            held.verdicts[verdicts.name] = list(verdicts.chains)
        old = held.target.get(key)
        if old != verdicts.name:
            cmds += ruleset.point_commands(key, verdicts.name, old)
            held.target[key] = verdicts.name
            held.refs[verdicts.name] += 1
            if old is not None:
                held.refs[old] -= 1
        if cmds:
            self._queue.append(_Change(f"frontend {key} ({frontend.service})", cmds))
        return True

    def delete_frontend(self, key: L4Addr) -> bool:
        held = self._held
        old = held.target.pop(key, None)
        had = held.frontends.pop(key, None) is not None
        if old is None:
            if had:
                self.engine.remove(key)
            return had
        held.refs[old] -= 1
        self._queue.append(_Change(f"removing frontend {key}", ruleset.unpoint_commands(key),
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
        self._held.vips.add(address)
        self._routes_dirty = True
        self._queue.append(_Change(
            f"Service address {address}",
            ruleset.element_commands("add", f"vips{address.version}", [str(address)])))
        return True

    def delete_vip(self, address: IPAddress) -> bool:
        if address not in self._held.vips:
            return False
        self._held.vips.discard(address)
        self._routes_dirty = True
        self._queue.append(_Change(
            f"removing Service address {address}",
            ruleset.element_commands("delete", f"vips{address.version}", [str(address)])))
        return True

    def upsert_service_cidr(self, cidr: IPNetwork) -> bool:
        if cidr in self._held.cidrs:
            return False
        self._held.cidrs.add(cidr)
        self._routes_dirty = True
        self._queue.append(_Change(
            f"Service CIDR {cidr}",
            ruleset.element_commands("add", f"cidrs{cidr.version}",
                                     ruleset.set_elements([cidr]))))
        return True

    def delete_service_cidr(self, cidr: IPNetwork) -> bool:
        if cidr not in self._held.cidrs:
            return False
        self._held.cidrs.discard(cidr)
        self._routes_dirty = True
        self._queue.append(_Change(
            f"removing Service CIDR {cidr}",
            ruleset.element_commands("delete", f"cidrs{cidr.version}",
                                     ruleset.set_elements([cidr]))))
        return True

    def set_node_addresses(self, addresses: tuple[IPAddress, ...]) -> bool:
        """The node's devices (where "outside" is) follow from its addresses,
        unless --devices named them. Called at the start of every pass, so the
        devices are known before the first frontend is written."""
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
            [{"flush": {"set": {**_TABLE, "name": "ext_devices"}}},
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
            cmds.append({"flush": {"set": {**_TABLE, "name": name}}})
            cmds += ruleset.element_commands(
                "add", name, ruleset.set_elements(c for c in cidrs if c.version == version))
        self._queue.append(_Change("cluster CIDRs", cmds))
        return True

    # ---- applying ------------------------------------------------------------------

    def finish_pass(self) -> list[str]:
        """Apply every queued change: one transaction, or, if the kernel refuses
        it, one per change so that only the bad ones are left out."""
        self._sync_routes()
        held = self._held
        unused = [name for name, n in held.refs.items() if n <= 0]
        if unused:
            # Last: after the map elements that pointed at them were moved away.
            chains = [c for name in unused for c in held.verdicts.pop(name, [])]
            for name in unused:
                del held.refs[name]
            self._queue.append(_Change("removing unused verdict chains",
                                       ruleset.drop_chains_commands(chains)))
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
                    failed.append(str(err))
                    continue
                change.after()
            self._reload()
            if failed:
                raise DatapathError("; ".join(failed[:5]) + (
                    f" (and {len(failed) - 5} more)" if len(failed) > 5 else "")) from None
            return []
        for change in queue:
            change.after()
        return []

    def _sync_routes(self) -> None:
        """Table 8338: every Service CIDR, and every Service address no CIDR
        covers (with 10,000 ClusterIPs in one CIDR: one route, not 10,001)."""
        if not self._routes_dirty:
            return
        held = self._held
        cidrs = list(held.cidrs)
        wanted: set[IPNetwork] = set(cidrs)
        for vip in held.vips:
            if not any(vip.version == c.version and vip in c for c in cidrs):
                wanted.add(ipaddress.ip_network(vip))
        for dst in wanted - self._routes:
            self._routing.add_service_route(dst)
            self._routes.add(dst)
        for dst in self._routes - wanted:
            self._routing.delete_service_route(dst)
            self._routes.discard(dst)
        self._routes_dirty = False

    # ---- reading back --------------------------------------------------------------

    def dump(self) -> DatapathState:
        """What the kernel holds: the frontends in nftables' maps (as the proxy
        serves them), the Service addresses and CIDRs in its sets. Repairs what
        can be repaired without the reconciler (rules, routes, a lost table)."""
        self.finish_pass()
        if not self._nft.query(ruleset.list_command("set", "ext_devices")):
            log.warning("TPROXY: table inet veer is gone; creating it again")
            self._recreate()
        elif self._copies and not all(
                ruleset.copies(self._nft.query(ruleset.copy_chain_command(version)))
                for version in self._families):
            log.warning("TPROXY: table ip veer or ip6 veer lost its rule; making them again")
            self._copies = make_copy_tables(self._nft, self._families)
        self._routing.setup_rules(self._families)
        self._reload()
        held = self._held
        state = DatapathState()
        for key in held.target:
            fe = held.frontends.get(key)
            # An element this agent did not write: the reconciler removes it.
            state.frontends[key] = ProgrammedFrontend.of(fe) if fe is not None \
                else ProgrammedFrontend(backends=())
        state.vips = self._set_addresses("vips")
        state.service_cidrs = self._set_networks("cidrs")
        held.vips = set(state.vips)
        held.cidrs = set(state.service_cidrs)
        # Routes as the kernel holds them, then what these sets need.
        self._routes = {r for v in self._families for r in self._routing.service_routes(v)}
        self._routes_dirty = True
        self._sync_routes()
        return state

    def _reload(self) -> None:
        """Make what is held in memory what the kernel holds: the map elements
        and the chains they point at. A frontend whose element is missing or
        points elsewhere than written is forgotten (the reconciler writes it
        again); chains nobody points at are removed at the next pass."""
        held = self._held
        kernel: dict[L4Addr, str] = {}
        for version in self._families:
            for obj in self._nft.query(ruleset.list_command("map", ruleset.map_name(version))):
                for elem in obj.get("map", {}).get("elem", []):
                    key = _key_of(elem[0])
                    target = elem[1].get("jump", {}).get("target") \
                        if isinstance(elem[1], dict) else None
                    if key is not None and target:
                        kernel[key] = target
        chains: dict[str, list[str]] = {}
        for obj in self._nft.query({"list": {"chains": {"family": NFT_FAMILY}}}):
            chain = obj.get("chain", {})
            if chain.get("table") == NFT_TABLE and chain.get("name") != "prerouting":
                chains.setdefault(ruleset.base_of(chain["name"]), []).append(chain["name"])
        for key in [k for k in held.frontends if kernel.get(k) != held.target.get(k)]:
            del held.frontends[key]
        held.target = kernel
        held.verdicts = chains
        held.refs = Counter(kernel.values())
        for name in chains:
            held.refs.setdefault(name, 0)

    def _recreate(self) -> None:
        self._nft.run(ruleset.skeleton(), "creating table inet veer")
        if self._copies:
            self._copies = make_copy_tables(self._nft, self._families)
        self._held = _Held()
        for table in self.engine.tables.values():
            table.clear()
        devices, self._devices = self._devices, ()
        self._set_devices(devices)
        cluster, self._cluster = self._cluster, frozenset()
        self.set_cluster_cidrs(cluster)
        self.finish_pass()

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
        for obj in self._nft.query({"list": {"counters": {"family": NFT_FAMILY,
                                                          "table": NFT_TABLE}}}):
            counter = obj.get("counter")
            if counter and counter.get("table") == NFT_TABLE:
                out[counter["name"]] = int(counter.get("packets", 0))
        return out

    def close(self) -> None:
        """Stop the proxy (its connections end). nftables and routing stay, as
        eBPF mode leaves its programs: a restarted agent replaces them."""
        self.engine.close()
        self._routing.close()


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
