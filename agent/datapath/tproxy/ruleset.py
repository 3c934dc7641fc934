"""The nftables side of TPROXY mode, rendered as libnftables JSON commands.

Pure functions of a Frontend and the proxy's listener ports: no I/O, so the
rules can be read and tested without root.

    table inet veer
      prerouting (filter hook, priority mangle)
        1. mark & MARK_PROXY                 accept   the proxy's own packets
        2. tcp/udp/icmp/icmpv6, socket mark & MARK_PROXY
                                        mark MARK_LOCAL, accept
                                                      replies to the proxy's upstream
                                                      sockets, and ICMP errors about
                                                      what they sent (and a client's
                                                      later packets to its proxied
                                                      socket)
        3. ip daddr . l4proto . dport  vmap @fe4  ->  jump <verdicts>
           ip6 daddr . l4proto . dport vmap @fe6
        4. daddr @vips*  -> refused (RST / ICMP port unreachable): a port no
                            Service exposes on a Service address
           daddr @cidrs* -> refused: a Service CIDR address without a Service

      <verdicts> (the map's elements point at them; shared by every frontend
                  that renders alike, see Verdicts)
        [NodePort/ExternalIP/LB] iifname @ext_devices  goto <verdicts>_out
        [access rules]  deny -> refused at once; allow -> goto <verdicts>_in
        iif lo -> tproxy to the NODE listener; else -> tproxy to the POD listener
        (no backend: refused, or EHOSTUNREACH where kube-proxy drops)
      <verdicts>_out (from the node's devices: externalTrafficPolicy)
        [loadBalancerSourceRanges] saddr not in them -> drop
        [access rules]  deny -> drop; allow -> goto <verdicts>_outok
        [Local policy] saddr @cluster* -> tproxy to the SHORTCUT listener
        tproxy to the OUTSIDE listener (no backend: ICMP port unreachable, or drop)

    table ip veer, table ip6 veer (`dup` exists only in single-family tables;
                                   made apart, so a kernel without it still
                                   serves: copy_tables)
      output (filter hook)
        icmp host unreachable / icmpv6 address unreachable that this node
        sends to another host (it could not resolve a neighbour): a copy
        through lo, which brings it to the upstream socket that sent the
        packet it quotes

Every tproxy rule also sets MARK_LOCAL, which routing rule 9337 turns into
local delivery (agent/datapath/tproxy/routing.py). A tproxy rule that finds
no listener (the proxy is not running) does not match; the next rule refuses.

Each refusal, drop and denial counts into a named counter whose name is the
eBPF datapath's counter for the same verdict, so metrics read alike.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from agent.compute.types import EmptyVerdict, Frontend, L4Addr
from agent.datapath.tproxy.layout import (
    LOOPBACK,
    MARK_LOCAL,
    MARK_PROXY,
    NFT_COPY_FAMILIES,
    NFT_FAMILY,
    NFT_TABLE,
    Role,
)
from agent.datapath.tproxy.nft import Command
from agent.model.objects import AccessAction, IPNetwork, Protocol

Expr = dict[str, Any]
Rule = list[Expr]
# (address family 4/6, protocol, role) -> the proxy's listener port for it.
Ports = Mapping[tuple[int, Protocol, Role], int]

COUNTERS = (
    "refused_no_backend",  # a frontend without backends, from this node
    "refused_unknown_port",  # a Service address, a port it does not expose
    "refused_no_service",  # inside a Service CIDR, no Service there
    "dropped_no_local",  # Local policy, no local endpoint: EHOSTUNREACH from this node
    "nat_reject",  # from outside, no endpoint anywhere: ICMP port unreachable
    "nat_drop",  # from outside, Local policy without local endpoint: dropped
    "nat_denied_source",  # from outside, not in loadBalancerSourceRanges: dropped
    "access_denied",  # a TrafficPolicy access rule refused a client of this node
    "nat_access_denied",  # ... dropped a client from outside
    "proxy_missing",  # a tproxy rule found no listener: the proxy is not running
)

_TABLE = {"family": NFT_FAMILY, "table": NFT_TABLE}
_L4 = {"meta": {"key": "l4proto"}}
_IIFNAME = {"meta": {"key": "iifname"}}
_MARK = {"meta": {"key": "mark"}}
_PROTO = {Protocol.TCP: "tcp", Protocol.UDP: "udp"}


def _ipf(family: int) -> str:
    return "ip" if family == 4 else "ip6"


def _match(left: Any, right: Any, op: str = "==") -> Expr:
    return {"match": {"op": op, "left": left, "right": right}}


def _payload(protocol: str, field: str) -> Expr:
    return {"payload": {"protocol": protocol, "field": field}}


def _counter(name: str) -> Expr:
    return {"counter": name}


def _set_of(cidrs: Iterable[IPNetwork]) -> Expr:
    """An anonymous set of ranges. Overlapping ranges are merged first: an
    interval set refuses overlaps."""
    elements: list[Any] = []
    by_family: dict[int, list[IPNetwork]] = {}
    for cidr in cidrs:
        by_family.setdefault(cidr.version, []).append(cidr)
    for nets in by_family.values():
        for net in ipaddress.collapse_addresses(nets):  # type: ignore[type-var]
            if net.prefixlen == net.max_prefixlen:
                elements.append(str(net.network_address))
            else:
                elements.append({"prefix": {"addr": str(net.network_address),
                                            "len": net.prefixlen}})
    return {"set": elements}


def set_elements(cidrs: Iterable[IPNetwork]) -> list[Any]:
    """Elements for a named interval set, merged as an interval set needs."""
    return list(_set_of(cidrs)["set"])


def map_name(family: int) -> str:
    return f"fe{family}"


def element_key(key: L4Addr) -> Expr:
    return {"concat": [str(key.address), _PROTO[key.protocol], key.port]}


# ---- verdicts ----------------------------------------------------------------


def _refuse(protocol: Protocol, counter: str) -> Rule:
    """Refused at once: a TCP reset for TCP (the client's connect() fails with
    ECONNREFUSED), ICMP port unreachable for UDP."""
    if protocol is Protocol.TCP:
        return [_match(_L4, "tcp"), _counter(counter), {"reject": {"type": "tcp reset"}}]
    return [_counter(counter), {"reject": {"type": "icmpx", "expr": "port-unreachable"}}]


def _unreachable(counter: str) -> Rule:
    """ICMP host unreachable: a TCP client's connect() fails with EHOSTUNREACH
    at once (the eBPF path's answer where kube-proxy drops)."""
    return [_counter(counter), {"reject": {"type": "icmpx", "expr": "host-unreachable"}}]


def _icmp_refuse(counter: str) -> Rule:
    """What kube-proxy's REJECT sends outside clients: ICMP port unreachable."""
    return [_counter(counter), {"reject": {"type": "icmpx", "expr": "port-unreachable"}}]


def _drop(counter: str) -> Rule:
    return [_counter(counter), {"drop": None}]


def _tproxy(key: L4Addr, ports: Ports, role: Role, *conditions: Expr) -> Rule:
    family = key.address.version
    return [
        *conditions,
        _match(_L4, _PROTO[key.protocol]),
        {"tproxy": {"family": _ipf(family), "addr": LOOPBACK[family],
                    "port": ports[(family, key.protocol, role)]}},
        {"mangle": {"key": _MARK, "value": {"|": [_MARK, MARK_LOCAL]}}},
        {"accept": None},
    ]


# ---- one frontend ------------------------------------------------------------


def _access_rules(frontend: Frontend, allow_chain: str, deny: Rule) -> tuple[list[Rule], bool]:
    """First-match access rules of the frontend's family, then its default:
    (rules, whether the chain needs the `allow_chain` continuation). No rules
    at all when nobody can be denied."""
    access = frontend.access
    if access is None:
        return [], False
    family = frontend.key.address.version
    rules: list[Rule] = []
    ordered = [(r.action, [s for s in r.sources if s.version == family]) for r in access.rules]
    ordered = [(action, sources) for action, sources in ordered if sources]
    denies = any(a is AccessAction.DENY for a, _ in ordered)
    if not denies and access.default_action is AccessAction.ALLOW:
        return [], False
    saddr = _payload(_ipf(family), "saddr")
    for action, sources in ordered:
        condition = _match(saddr, _set_of(sources))
        if action is AccessAction.ALLOW:
            rules.append([condition, {"goto": {"target": allow_chain}}])
        else:
            rules.append([condition, *deny])
    if access.default_action is AccessAction.ALLOW:
        rules.append([{"goto": {"target": allow_chain}}])
    else:
        rules.append(list(deny))
    return rules, True


def _inside_go(frontend: Frontend, ports: Ports) -> list[Rule]:
    """Connections that start on this node: every frontend's socket scope."""
    key = frontend.key
    if not frontend.backends:
        if frontend.on_empty is EmptyVerdict.DROP:
            return [_unreachable("dropped_no_local")]
        return [_refuse(key.protocol, "refused_no_backend")]
    return [
        _tproxy(key, ports, Role.NODE, _match(_IIFNAME, "lo")),
        _tproxy(key, ports, Role.POD),
        _refuse(key.protocol, "proxy_missing"),
    ]


def _outside_go(frontend: Frontend, ports: Ports) -> list[Rule]:
    """Connections from outside the node: externalTrafficPolicy's backends,
    and kube-proxy's short-circuit for pods of other nodes under Local."""
    key = frontend.key
    rules: list[Rule] = []
    if frontend.external_local and frontend.backends:
        cluster = f"@cluster{key.address.version}"
        rules.append(_tproxy(key, ports, Role.SHORTCUT,
                             _match(_payload(_ipf(key.address.version), "saddr"), cluster)))
    if not frontend.external_backends:
        if frontend.external_on_empty is EmptyVerdict.DROP:
            rules.append(_drop("nat_drop"))
        else:
            rules.append(_icmp_refuse("nat_reject"))
        return rules
    rules.append(_tproxy(key, ports, Role.OUTSIDE))
    rules.append(_icmp_refuse("proxy_missing"))
    return rules


def _render(frontend: Frontend, ports: Ports, base: str) -> dict[str, list[Rule]]:
    """A frontend's chains, named `base` (the entry) and `base` + a suffix."""
    key = frontend.key
    entry = base
    chains: dict[str, list[Rule]] = {entry: []}
    if frontend.kind.external:
        out = base + "_out"
        chains[entry].append([_match(_IIFNAME, "@ext_devices"), {"goto": {"target": out}}])
        out_rules: list[Rule] = []
        if frontend.source_ranges:
            out_rules.append([
                _match(_payload(_ipf(key.address.version), "saddr"),
                       _set_of(frontend.source_ranges), "!="),
                *_drop("nat_denied_source"),
            ])
        out_ok = base + "_outok"
        access, split = _access_rules(frontend, out_ok, _drop("nat_access_denied"))
        out_rules.extend(access)
        if split:
            chains[out] = out_rules
            chains[out_ok] = _outside_go(frontend, ports)
        else:
            chains[out] = out_rules + _outside_go(frontend, ports)
    inside_ok = base + "_in"
    access, split = _access_rules(frontend, inside_ok,
                                  _refuse(key.protocol, "access_denied"))
    chains[entry].extend(access)
    if split:
        chains[inside_ok] = _inside_go(frontend, ports)
    else:
        chains[entry].extend(_inside_go(frontend, ports))
    return chains


_SELF = "%SELF%"  # the chains' own name while their content is hashed


@dataclass(frozen=True)
class Verdicts:
    """What nftables does with one frontend's packets: a few chains, shared
    by every frontend that renders alike. Nothing in them names the frontend
    (its address is the map's key), so 10,000 ClusterIPs with backends are
    10,000 map elements pointing at one chain, not 10,000 chains: one
    transaction writes them in well under a second, and the kernel holds
    little. The name says what the chains do and ends with a hash of their
    content (tcp4_serve_3f2a9c1b, tcp4_serve_ext-serve-local_8a7b6c5d)."""

    name: str  # the entry chain; the others are name + "_in", "_out", "_outok"
    chains: Mapping[str, Sequence[Rule]]  # entry first


def _summary(frontend: Frontend) -> str:
    parts = [f"{_PROTO[frontend.key.protocol]}{frontend.key.address.version}"]
    if frontend.backends:
        parts.append("serve")
    else:
        parts.append("refuse" if frontend.on_empty is EmptyVerdict.REFUSE else "unreach")
    if frontend.kind.external:
        if frontend.external_backends:
            ext = "ext-serve"
        else:
            ext = "ext-refuse" if frontend.external_on_empty is EmptyVerdict.REFUSE \
                else "ext-drop"
        parts.append(ext + ("-local" if frontend.external_local else ""))
        if frontend.source_ranges:
            parts.append("ranges")
    if frontend.access is not None:
        parts.append("access")
    return "_".join(parts)


def verdicts_of(frontend: Frontend, ports: Ports) -> Verdicts:
    text = json.dumps(_render(frontend, ports, _SELF), sort_keys=True)
    name = f"{_summary(frontend)}_{hashlib.sha1(text.encode()).hexdigest()[:8]}"
    return Verdicts(name, json.loads(text.replace(_SELF, name)))


def render_frontend(frontend: Frontend, ports: Ports) -> dict[str, list[Rule]]:
    """A frontend's chains by name, entry chain first (for reading and tests)."""
    return {name: list(rules) for name, rules in verdicts_of(frontend, ports).chains.items()}


def verdicts_commands(verdicts: Verdicts) -> list[Command]:
    """Create a set of shared chains (new: nothing refers to them yet)."""
    cmds: list[Command] = [{"add": {"chain": {**_TABLE, "name": n}}} for n in verdicts.chains]
    for name, rules in verdicts.chains.items():
        for rule in rules:
            cmds.append({"add": {"rule": {**_TABLE, "chain": name, "expr": rule}}})
    return cmds


def drop_chains_commands(names: Iterable[str]) -> list[Command]:
    """Remove chains no map element refers to any more."""
    names = list(names)
    return ([{"flush": {"chain": {**_TABLE, "name": n}}} for n in names]
            + [{"delete": {"chain": {**_TABLE, "name": n}}} for n in names])


def point_commands(key: L4Addr, target: str, old: str | None) -> list[Command]:
    """Point a frontend's map element at `target` (replacing the one that
    pointed at `old`: a verdict map element is replaced by delete and add,
    in the same transaction)."""
    name = map_name(key.address.version)
    cmds: list[Command] = []
    if old is not None:
        cmds.append({"delete": {"element": {**_TABLE, "name": name,
                                            "elem": [element_key(key)]}}})
    cmds.append({"add": {"element": {**_TABLE, "name": name,
                                     "elem": [[element_key(key), {"jump": {"target": target}}]]}}})
    return cmds


def unpoint_commands(key: L4Addr) -> list[Command]:
    return [{"delete": {"element": {**_TABLE, "name": map_name(key.address.version),
                                    "elem": [element_key(key)]}}}]


def base_of(chain: str) -> str:
    """The shared chains' name a chain belongs to."""
    for suffix in ("_outok", "_out", "_in"):
        if chain.endswith(suffix):
            return chain[: -len(suffix)]
    return chain


# ---- the table -----------------------------------------------------------------


def _named_set(name: str, kind: str, interval: bool = False) -> Command:
    spec: dict[str, Any] = {**_TABLE, "name": name, "type": kind}
    if interval:
        spec["flags"] = ["interval"]
    return {"add": {"set": spec}}


def _dispatch(family: int) -> Rule:
    return [{"vmap": {
        "key": {"concat": [_payload(_ipf(family), "daddr"), _L4, _payload("th", "dport")]},
        "data": f"@{map_name(family)}",
    }}]


def _refuse_addresses(family: int, named: str, counter: str) -> list[Rule]:
    """Refuse what is addressed to the set's addresses. Clients of the node
    itself send from the loopback address (routing.py), so answers to them
    are never addressed to a Service address and never refused here."""
    daddr = _match(_payload(_ipf(family), "daddr"), f"@{named}")
    return [
        [daddr, *_refuse(Protocol.TCP, counter)],
        [daddr, _match(_L4, "udp"), *_refuse(Protocol.UDP, counter)],
    ]


def skeleton() -> list[Command]:
    """Replace table inet veer with an empty one: sets, maps, counters and
    the prerouting chain, in one transaction (adding first makes the delete
    safe when the table does not exist yet)."""
    table = {"family": NFT_FAMILY, "name": NFT_TABLE}
    cmds: list[Command] = [
        {"add": {"table": table}},
        {"delete": {"table": table}},
        {"add": {"table": table}},
        _named_set("ext_devices", "ifname"),
        _named_set("vips4", "ipv4_addr"),
        _named_set("vips6", "ipv6_addr"),
        _named_set("cidrs4", "ipv4_addr", interval=True),
        _named_set("cidrs6", "ipv6_addr", interval=True),
        _named_set("cluster4", "ipv4_addr", interval=True),
        _named_set("cluster6", "ipv6_addr", interval=True),
    ]
    for family, addr in ((4, "ipv4_addr"), (6, "ipv6_addr")):
        cmds.append({"add": {"map": {**_TABLE, "name": map_name(family),
                                     "type": [addr, "inet_proto", "inet_service"],
                                     "map": "verdict"}}})
    for name in COUNTERS:
        cmds.append({"add": {"counter": {**_TABLE, "name": name}}})
    cmds.append({"add": {"chain": {**_TABLE, "name": "prerouting", "type": "filter",
                                   "hook": "prerouting", "prio": -150, "policy": "accept"}}})
    rules: list[Rule] = [
        [_match({"&": [_MARK, MARK_PROXY]}, MARK_PROXY), {"accept": None}],
        # Packets for one of the proxy's own sockets (it marks them all):
        # replies to its upstream connections, which are addressed to the
        # client, and a client's later packets. Only live sockets match (the
        # socket mark of a TIME_WAIT or request socket does not), so a SYN
        # that meets an old TIME_WAIT socket of the same ports goes on to
        # tproxy, which hands it to the listener, and a client's later direct
        # connection to a backend is never caught by an upstream socket's
        # TIME_WAIT of the same ports. For an ICMP error, `socket` looks up
        # the datagram or segment it quotes: a backend's port unreachable or
        # host unreachable, addressed to the client when the upstream keeps
        # the client's address, reaches the upstream socket (a UDP flow
        # ends and its client is told, icmp.py; a connect() fails at once
        # instead of retrying for two minutes) rather than the client, whose
        # socket would not know the backend's address it quotes.
        [_match(_L4, {"set": ["tcp", "udp", "icmp", "ipv6-icmp"]}),
         _match({"&": [{"socket": {"key": "mark"}}, MARK_PROXY]}, MARK_PROXY),
         {"mangle": {"key": _MARK, "value": {"|": [_MARK, MARK_LOCAL]}}},
         {"accept": None}],
        _dispatch(4),
        _dispatch(6),
    ]
    for family in (4, 6):
        rules += _refuse_addresses(family, f"vips{family}", "refused_unknown_port")
        rules += _refuse_addresses(family, f"cidrs{family}", "refused_no_service")
    for rule in rules:
        cmds.append({"add": {"rule": {**_TABLE, "chain": "prerouting", "expr": rule}}})
    return cmds


def copy_tables(versions: Iterable[int]) -> list[Command]:
    """Replace table ip veer and/or ip6 veer, one per IP version: an output
    chain each, with the rule of _own_unreachable_copy."""
    cmds: list[Command] = []
    for version in versions:
        family = NFT_COPY_FAMILIES[version]
        table = {"family": family, "name": NFT_TABLE}
        where = {"family": family, "table": NFT_TABLE}
        cmds += [{"add": {"table": table}}, {"delete": {"table": table}},
                 {"add": {"table": table}},
                 {"add": {"chain": {**where, "name": "output", "type": "filter",
                                    "hook": "output", "prio": -150, "policy": "accept"}}},
                 {"add": {"rule": {**where, "chain": "output",
                                   "expr": _own_unreachable_copy(version)}}}]
    return cmds


def copy_chain_command(version: int) -> Command:
    """List the output chain of table ip veer (ip6 veer), with its rule."""
    return {"list": {"chain": {"family": NFT_COPY_FAMILIES[version], "table": NFT_TABLE,
                               "name": "output"}}}


def copies(listed: Iterable[Mapping[str, Any]]) -> bool:
    """Whether what copy_chain_command listed holds the copying rule."""
    return any("dup" in expr for obj in listed
               for expr in obj.get("rule", {}).get("expr", []))


def _own_unreachable_copy(version: int) -> Rule:
    """When this node cannot resolve a neighbour (a pod of its own that does
    not answer ARP or neighbour solicitation), the kernel answers the packets
    it held with "host unreachable" (IPv6: "address unreachable") addressed to
    their source. A packet of an upstream socket has the client's address as
    its source, so the error leaves for the client, which has no socket that
    knows it; prerouting never sees it, since it was made here, and the
    proxy's connect() would retry its SYN for two minutes. So a copy of each
    such error goes through lo as well (`dup`; the original leaves as
    before). The copy is delivered on this node, where the kernel hands it
    to the socket that sent the packet it quotes (a connecting TCP socket
    fails with EHOSTUNREACH; so does an IPv4 UDP flow, icmp.py), as it does
    a backend's error that prerouting's rule 2 diverted.

    The rule cannot tell the proxy's errors from others: the only socket an
    ICMP error has at this hook is the kernel's own. So the node's other
    host unreachables to other hosts are copied too (about traffic it
    forwards, and veer's own refusals where kube-proxy drops). Such a copy
    quotes no socket of this node and is dropped by the kernel, after
    counting in its ICMP statistics (IcmpInDestUnreachs, IcmpInErrors) and
    reaching raw ICMP sockets; the one exception would be a UDP socket of
    the node bound to the wildcard address, with IP_RECVERR, on the quoted
    packet's source port, which takes the copy for an error of its own. An
    error already addressed to this node (out through lo) needs no copy."""
    if version == 4:
        kind, code = "icmp", "host-unreachable"
    else:
        kind, code = "icmpv6", "addr-unreachable"
    # Every packet the node sends passes this rule: the ICMP type (which
    # brings its own layer-4 protocol check) comes first, so any other
    # packet fails at the first comparison, not after a device-name one.
    return [_match(_payload(kind, "type"), "destination-unreachable"),
            _match(_payload(kind, "code"), code),
            _match({"meta": {"key": "oifname"}}, "lo", "!="),
            {"dup": {"addr": LOOPBACK[version], "dev": "lo"}}]


def element_commands(verb: str, set_name: str, elements: Sequence[Any]) -> list[Command]:
    """Add or delete elements of one of the table's named sets."""
    if not elements:
        return []
    return [{verb: {"element": {**_TABLE, "name": set_name, "elem": list(elements)}}}]


def list_command(kind: str, name: str) -> Command:
    return {"list": {kind: {**_TABLE, "name": name}}}


def table_ref() -> dict[str, str]:
    return {"family": NFT_FAMILY, "name": NFT_TABLE}
