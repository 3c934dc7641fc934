"""TPROXY mode's nftables rules as rendered (agent/datapath/tproxy/ruleset.py):
which verdict each kind of frontend gets, in which chain, for whom.

Pure: no nftables here. The datapath tests (tests/datapath/test_tproxy*.py)
load the same commands into the kernel and send traffic through them.

Conventions: ClusterIP 10.96.0.10:80/TCP, NodePort 10.0.0.1:30080/TCP, pods
10.244.1.x:8080; listener ports 1000 + a number per (family, protocol, role).
"""

from __future__ import annotations

import ipaddress
import json
from typing import Any

from agent.compute.types import (
    AccessRuleSpec,
    AccessSpec,
    EmptyVerdict,
    Frontend,
    FrontendKind,
    L4Addr,
    ServicePortName,
)
from agent.datapath.tproxy import ruleset
from agent.datapath.tproxy.layout import MARK_LOCAL, Role
from agent.model.objects import AccessAction, Protocol

PORTS = {(f, p, r): 1000 + 100 * f + 10 * i + j
         for f in (4, 6)
         for i, p in enumerate((Protocol.TCP, Protocol.UDP))
         for j, r in enumerate(Role)}
SVC = ServicePortName("default", "web", "http")


def l4(addr: str, port: int, proto: Protocol = Protocol.TCP) -> L4Addr:
    return L4Addr(ipaddress.ip_address(addr), port, proto)


PODS = (l4("10.244.1.2", 8080), l4("10.244.1.3", 8080))


def cluster_ip(**kw: Any) -> Frontend:
    fields: dict[str, Any] = {"key": l4("10.96.0.10", 80), "service": SVC,
                              "kind": FrontendKind.CLUSTER_IP, "backends": PODS}
    fields.update(kw)
    return Frontend(**fields)


def node_port(**kw: Any) -> Frontend:
    fields: dict[str, Any] = {"key": l4("10.0.0.1", 30080), "service": SVC,
                              "kind": FrontendKind.NODE_PORT, "backends": PODS,
                              "external_backends": PODS}
    fields.update(kw)
    return Frontend(**fields)


def chains_of(fe: Frontend) -> tuple[str, dict[str, list[list[dict[str, Any]]]]]:
    """The entry chain's name and every chain, renamed base, base_in, ..."""
    chains = ruleset.render_frontend(fe, PORTS)
    entry = next(iter(chains))
    return entry, {name.replace(entry, "base", 1): rules for name, rules in chains.items()}


def text(rule: list[dict[str, Any]]) -> str:
    return json.dumps(rule, sort_keys=True)


def verdict(rule: list[dict[str, Any]]) -> str:
    """A short name for what a rule does."""
    last = rule[-1]
    if "accept" in last:
        tproxy = next(e["tproxy"] for e in rule if "tproxy" in e)
        role = next(r for (f, p, r), port in PORTS.items() if port == tproxy["port"])
        return f"tproxy:{role.value}"
    if "reject" in last:
        return f"reject:{last['reject'].get('expr', last['reject']['type'])}"
    if "drop" in last:
        return "drop"
    if "goto" in last:
        return f"goto:{last['goto']['target']}"
    raise AssertionError(rule)


def verdicts(chain: list[list[dict[str, Any]]]) -> list[str]:
    return [verdict(r) for r in chain]


def counter_of(rule: list[dict[str, Any]]) -> str:
    return next(e["counter"] for e in rule if "counter" in e)


def test_cluster_ip_goes_to_the_node_or_pod_listener() -> None:
    entry, chains = chains_of(cluster_ip())
    assert list(chains) == ["base"] and entry.startswith("tcp4_serve_")
    rules = chains["base"]
    assert verdicts(rules) == ["tproxy:node", "tproxy:pod", "reject:tcp reset"]
    assert '"iifname"' in text(rules[0]) and '"lo"' in text(rules[0])
    tproxy = next(e["tproxy"] for e in rules[1] if "tproxy" in e)
    assert tproxy == {"family": "ip", "addr": "127.0.0.1",
                      "port": PORTS[(4, Protocol.TCP, Role.POD)]}
    # Marked for local delivery (routing rule 9337).
    assert str(MARK_LOCAL) in text(rules[1])
    # No listener (the agent is gone): refused, and counted as such.
    assert counter_of(rules[2]) == "proxy_missing"


def test_ipv6_udp_frontend_uses_the_ipv6_udp_listeners() -> None:
    fe = cluster_ip(key=l4("fd00:96::20", 53, Protocol.UDP),
                    backends=(l4("fd00:10:244:1::2", 9053, Protocol.UDP),))
    rules = chains_of(fe)[1]["base"]
    tproxy = next(e["tproxy"] for e in rules[1] if "tproxy" in e)
    assert tproxy == {"family": "ip6", "addr": "::1",
                      "port": PORTS[(6, Protocol.UDP, Role.POD)]}
    assert verdicts(rules)[-1] == "reject:port-unreachable"


def test_empty_frontends_refuse_or_answer_unreachable_like_the_ebpf_path() -> None:
    refuse = chains_of(cluster_ip(backends=()))[1]["base"]
    assert verdicts(refuse) == ["reject:tcp reset"]
    assert counter_of(refuse[0]) == "refused_no_backend"
    udp = chains_of(cluster_ip(key=l4("10.96.0.53", 53, Protocol.UDP), backends=()))[1]
    assert verdicts(udp["base"]) == ["reject:port-unreachable"]
    # Where kube-proxy drops (Local policy, endpoints elsewhere), a client of
    # this node fails at once with EHOSTUNREACH.
    rules = chains_of(cluster_ip(backends=(), on_empty=EmptyVerdict.DROP))[1]["base"]
    assert verdicts(rules) == ["reject:host-unreachable"]
    assert counter_of(rules[0]) == "dropped_no_local"


def test_node_port_splits_outside_traffic_by_device() -> None:
    name, chains = chains_of(node_port())
    entry, out = chains["base"], chains["base_out"]
    assert verdicts(entry) == [f"goto:{name}_out", "tproxy:node", "tproxy:pod",
                               "reject:tcp reset"]
    assert "@ext_devices" in text(entry[0])
    # From outside: the OUTSIDE listener; no listener: ICMP, as kube-proxy's REJECT.
    assert verdicts(out) == ["tproxy:outside", "reject:port-unreachable"]


def test_node_port_local_policy_short_circuits_cluster_pods() -> None:
    out = chains_of(node_port(external_local=True, external_backends=PODS[:1]))[1]["base_out"]
    assert verdicts(out) == ["tproxy:shortcut", "tproxy:outside", "reject:port-unreachable"]
    assert "@cluster4" in text(out[0])


def test_outside_clients_without_endpoints_are_refused_or_dropped() -> None:
    out = chains_of(node_port(external_backends=()))[1]["base_out"]
    assert verdicts(out) == ["reject:port-unreachable"] and counter_of(out[0]) == "nat_reject"
    out = chains_of(node_port(external_backends=(),
                              external_on_empty=EmptyVerdict.DROP))[1]["base_out"]
    assert verdicts(out) == ["drop"] and counter_of(out[0]) == "nat_drop"


def test_load_balancer_source_ranges_drop_everyone_else() -> None:
    fe = node_port(key=l4("10.0.1.10", 80), kind=FrontendKind.LOAD_BALANCER,
                   source_ranges=(ipaddress.ip_network("10.0.0.100/32"),
                                  ipaddress.ip_network("192.0.2.0/24")))
    out = chains_of(fe)[1]["base_out"]
    assert verdicts(out)[0] == "drop" and counter_of(out[0]) == "nat_denied_source"
    match = out[0][0]["match"]
    assert match["op"] == "!=" and match["right"] == {"set": [
        "10.0.0.100", {"prefix": {"addr": "192.0.2.0", "len": 24}}]}


def access(default: AccessAction, *rules: tuple[AccessAction, list[str]]) -> AccessSpec:
    return AccessSpec(default, tuple(
        AccessRuleSpec(i, action, tuple(ipaddress.ip_network(s) for s in sources))
        for i, (action, sources) in enumerate(rules)))


def test_access_rules_first_match_refuse_inside_and_drop_outside() -> None:
    spec = access(AccessAction.ALLOW,
                  (AccessAction.DENY, ["10.244.1.100/32"]),
                  (AccessAction.ALLOW, ["10.244.0.0/16"]),
                  (AccessAction.DENY, ["10.0.0.0/8", "fd00::/8"]))
    name, chains = chains_of(node_port(access=spec))
    entry = chains["base"]
    assert verdicts(entry) == [f"goto:{name}_out", "reject:tcp reset", f"goto:{name}_in",
                               "reject:tcp reset", f"goto:{name}_in"]
    assert counter_of(entry[1]) == "access_denied"
    # Only this frontend's family: the IPv6 range is left out.
    assert "fd00::" not in text(entry[3])
    assert verdicts(chains["base_in"]) == ["tproxy:node", "tproxy:pod", "reject:tcp reset"]
    out = chains["base_out"]
    assert verdicts(out) == ["drop", f"goto:{name}_outok", "drop", f"goto:{name}_outok"]
    assert counter_of(out[0]) == "nat_access_denied"
    assert verdicts(chains["base_outok"]) == [
        "tproxy:outside", "reject:port-unreachable"]


def test_default_deny_and_rules_that_cannot_deny() -> None:
    name, deny = chains_of(cluster_ip(access=access(
        AccessAction.DENY, (AccessAction.ALLOW, ["10.244.1.5/32"]))))
    assert verdicts(deny["base"]) == [f"goto:{name}_in", "reject:tcp reset"]
    # Allow rules and an Allow default deny nobody: no access rules at all.
    allow = chains_of(cluster_ip(access=access(
        AccessAction.ALLOW, (AccessAction.ALLOW, ["10.244.1.5/32"]))))[1]
    assert list(allow) == ["base"]


def test_overlapping_ranges_are_merged_for_interval_sets() -> None:
    merged = ruleset.set_elements([ipaddress.ip_network(c) for c in
                                   ("10.0.0.0/8", "10.1.0.0/16", "10.2.3.4/32", "fd00::/8")])
    assert merged == [{"prefix": {"addr": "10.0.0.0", "len": 8}},
                      {"prefix": {"addr": "fd00::", "len": 8}}]


def test_frontends_that_render_alike_share_their_chains() -> None:
    """10,000 ClusterIPs with backends point at one chain: the map's key is
    the frontend, the chain only says what to do."""
    one = ruleset.verdicts_of(cluster_ip(), PORTS)
    other = ruleset.verdicts_of(cluster_ip(key=l4("10.96.7.7", 443),
                                           backends=(l4("10.244.9.9", 9),)), PORTS)
    assert one.name == other.name and one.chains == other.chains
    # What differs in the rules differs in the name.
    empty = ruleset.verdicts_of(cluster_ip(backends=()), PORTS)
    assert empty.name.startswith("tcp4_refuse_") and empty.name != one.name
    ranges = ruleset.verdicts_of(node_port(kind=FrontendKind.LOAD_BALANCER, source_ranges=(
        ipaddress.ip_network("10.0.0.100/32"),)), PORTS)
    assert ranges.name.startswith("tcp4_serve_ext-serve_ranges_")
    assert ruleset.base_of(ranges.name + "_outok") == ranges.name


def test_a_frontend_moves_between_chains_in_one_go() -> None:
    key = l4("10.96.0.10", 80)
    moved = ruleset.point_commands(key, "tcp4_serve_x", "tcp4_refuse_y")
    assert [next(iter(c)) for c in moved] == ["delete", "add"]
    element = moved[1]["add"]["element"]
    assert element["name"] == "fe4" and element["elem"] == [[
        {"concat": ["10.96.0.10", "tcp", 80]}, {"jump": {"target": "tcp4_serve_x"}}]]
    assert [next(iter(c)) for c in ruleset.point_commands(key, "tcp4_serve_x", None)] == ["add"]
    verdicts = ruleset.verdicts_of(node_port(), PORTS)
    created = ruleset.verdicts_commands(verdicts)
    # Every chain exists before a rule can jump to it.
    first_rule = next(i for i, c in enumerate(created) if "rule" in c["add"])
    assert all("chain" in c["add"] for c in created[:first_rule])
    assert len(created[:first_rule]) == len(verdicts.chains) == 2
    gone = ruleset.drop_chains_commands(list(verdicts.chains))
    assert [next(iter(c)) for c in gone] == ["flush", "flush", "delete", "delete"]


def test_the_table_refuses_unexposed_ports_and_steers_replies() -> None:
    cmds = ruleset.skeleton()
    assert [next(iter(c)) for c in cmds[:3]] == ["add", "delete", "add"]  # replace, atomically
    counters = {c["add"]["counter"]["name"] for c in cmds if "counter" in c.get("add", {})}
    assert set(ruleset.COUNTERS) == counters
    rules = [c["add"]["rule"]["expr"] for c in cmds
             if "rule" in c.get("add", {}) and c["add"]["rule"]["chain"] == "prerouting"]
    # The proxy's own packets first, then packets for the proxy's sockets
    # (known by their mark), then the frontend maps, then the refusals.
    assert "accept" in rules[0][-1] and str(0x0080_0000) in text(rules[0])
    assert '"socket": {"key": "mark"}' in text(rules[1]) and str(MARK_LOCAL) in text(rules[1])
    assert [r[0]["vmap"]["data"] for r in rules[2:4]] == ["@fe4", "@fe6"]
    refusals = [counter_of(r) for r in rules[4:]]
    assert set(refusals) == {"refused_unknown_port", "refused_no_service"}
    assert len(refusals) == 8  # {vips, cidrs} x {IPv4, IPv6} x {TCP, UDP}


def test_the_node_s_own_unreachable_errors_are_copied_to_lo() -> None:
    """Only this node's host / address unreachable to another host is
    copied, each family to its own loopback address, and the original is
    not dropped. The tables are apart from table inet veer (skeleton), so
    a kernel without `dup` still gets that one."""
    assert "dup" not in text(ruleset.skeleton())
    cmds = ruleset.copy_tables((4, 6))
    tables = [c[verb]["table"] for c in cmds for verb in c
              if isinstance(c[verb].get("table"), dict)]
    assert tables == [{"family": f, "name": "veer"} for f in ("ip",) * 3 + ("ip6",) * 3]
    chains = [c["add"]["chain"] for c in cmds if "chain" in c.get("add", {})]
    assert [(c["family"], c["name"], c["hook"], c["policy"]) for c in chains] == [
        ("ip", "output", "output", "accept"), ("ip6", "output", "output", "accept")]
    rules = [c["add"]["rule"]["expr"] for c in cmds if "rule" in c.get("add", {})]
    assert [r[-1] for r in rules] == [{"dup": {"addr": "127.0.0.1", "dev": "lo"}},
                                      {"dup": {"addr": "::1", "dev": "lo"}}]
    assert [[(m["match"]["op"], m["match"]["right"]) for m in r[:-1]] for r in rules] == [
        [("==", "destination-unreachable"), ("==", "host-unreachable"), ("!=", "lo")],
        [("==", "destination-unreachable"), ("==", "addr-unreachable"), ("!=", "lo")],
    ]
    # IPv6 off: table ip veer only.
    assert {c["add"]["table"]["family"] for c in ruleset.copy_tables((4,))
            if "table" in c.get("add", {})} == {"ip"}


def test_copies_is_read_from_the_listed_chain() -> None:
    listed = [{"chain": {"family": "ip", "table": "veer", "name": "output"}},
              {"rule": {"family": "ip", "chain": "output",
                        "expr": [{"dup": {"addr": "127.0.0.1", "dev": "lo"}}]}}]
    assert ruleset.copies(listed)
    assert not ruleset.copies(listed[:1])  # a flushed chain
    assert not ruleset.copies([])  # no table
