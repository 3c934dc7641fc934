"""The nftables chain of TrafficPolicy redirects with mode TPROXY (eBPF
mode): one socket-transparent rule, then one tproxy rule per frontend, in a
stable order, as libnftables JSON."""

from __future__ import annotations

import ipaddress

from agent.compute.types import L4Addr
from agent.datapath.ebpf.tproxy_redirect import CHAIN, commands, rules
from agent.datapath.tproxy.layout import MARK_LOCAL
from agent.model.objects import Protocol


def key(addr: str, port: int) -> L4Addr:
    return L4Addr(ipaddress.ip_address(addr), port, Protocol.TCP)


def test_rules_divert_replies_then_tproxy_each_frontend_in_order() -> None:
    got = rules({key("fd00:96::7", 443): 15004, key("10.96.1.10", 80): 15003})
    assert got[0][1] == {"match": {"op": "==", "left": {"socket": {"key": "transparent"}},
                                   "right": 1}}
    v4, v6 = got[1], got[2]
    assert v4[0]["match"]["right"] == "10.96.1.10" and v4[1]["match"]["right"] == 80
    assert v4[2] == {"tproxy": {"family": "ip", "port": 15003}}
    assert v6[0]["match"]["left"]["payload"]["protocol"] == "ip6"
    assert v6[2] == {"tproxy": {"family": "ip6", "port": 15004}}
    for rule in got:  # every rule marks for local delivery and stops
        assert rule[-2]["mangle"]["value"] == {"|": [{"meta": {"key": "mark"}}, MARK_LOCAL]}
        assert rule[-1] == {"accept": None}


def test_commands_rebuild_the_chain_in_one_transaction() -> None:
    cmds = commands({key("10.96.1.10", 80): 15003})
    assert [next(iter(c)) for c in cmds] == ["add", "add", "flush", "add", "add"]
    assert cmds[1]["add"]["chain"]["hook"] == "prerouting"
    assert cmds[2] == {"flush": {"chain": {"family": "inet", "table": "veer", "name": CHAIN}}}
    assert all(c["add"]["rule"]["chain"] == CHAIN for c in cmds[3:])
    # No redirect left: the chain is emptied but for the reply rule.
    assert len(commands({})) == 4
