"""The LeastConnections sweep judges a counted flow over as the TC program
judges its NAT entries (agent/datapath/ebpf/lc_sweep.py against tc_nat.c's
veer_flow_stale)."""

from __future__ import annotations

import ipaddress

import pytest

from agent.datapath.ebpf.lc_sweep import _ended, _reply_key
from agent.datapath.ebpf.structs import (
    NAT_CLOSING,
    NAT_FIN,
    TCP_CLOSED_NS,
    TCP_HALF_CLOSED_NS,
    UDP_IDLE_NS,
    NatValue,
    Tuple,
    addr_bytes,
)

NOW = 10**15
CLIENT, FRONTEND, BACKEND, NODE = "192.0.2.7", "10.0.0.1", "10.244.2.2", "10.0.0.1"


def key(proto: int) -> Tuple:
    return Tuple(saddr=addr_bytes(ipaddress.ip_address(CLIENT)),
                 daddr=addr_bytes(ipaddress.ip_address(FRONTEND)),
                 sport=1000, dport=30080, proto=proto, family=2)


def forward(age_ns: int, flags: int = 0) -> NatValue:
    """The forward entry: rewritten to (node:1000 -> backend:8080)."""
    return NatValue(saddr=addr_bytes(ipaddress.ip_address(NODE)),
                    daddr=addr_bytes(ipaddress.ip_address(BACKEND)), sport=1000, dport=8080,
                    last_seen_ns=(NOW - age_ns) | flags)


def reverse(age_ns: int) -> NatValue:
    return NatValue(last_seen_ns=NOW - age_ns)


def test_the_reply_key_is_the_rewritten_tuple_reversed() -> None:
    got = _reply_key(key(17), forward(0))
    assert bytes(got.saddr) == bytes(addr_bytes(ipaddress.ip_address(BACKEND)))
    assert bytes(got.daddr) == bytes(addr_bytes(ipaddress.ip_address(NODE)))
    assert (got.sport, got.dport, got.proto, got.family) == (8080, 1000, 17, 2)


@pytest.mark.parametrize(("fwd_age", "rev_age", "ended"), [
    (UDP_IDLE_NS - 1, None, False),
    (UDP_IDLE_NS + 1, None, True),
    # The client went quiet while the backend still sends: alive.
    (UDP_IDLE_NS + 1, 5, False),
    (UDP_IDLE_NS + 1, UDP_IDLE_NS + 1, True),
])
def test_a_udp_flow_lives_while_either_direction_does(
        fwd_age: int, rev_age: int | None, ended: bool) -> None:
    fwd = forward(fwd_age)
    rev = {bytes(_reply_key(key(17), fwd)): reverse(rev_age)} if rev_age is not None else {}
    assert _ended(key(17), fwd, lambda k: rev.get(bytes(k)), NOW) is ended


@pytest.mark.parametrize(("age", "flags", "ended"), [
    (10**12, 0, False),  # open, however long quiet
    (TCP_CLOSED_NS + 1, NAT_CLOSING, True),
    (TCP_CLOSED_NS - 1, NAT_CLOSING, False),
    # Half closed: the other side may go on sending; quiet for FIN_WAIT, over.
    (TCP_CLOSED_NS + 1, NAT_FIN, False),
    (TCP_HALF_CLOSED_NS + 1, NAT_FIN, True),
])
def test_tcp_flows_end_as_the_program_ends_them(age: int, flags: int, ended: bool) -> None:
    assert _ended(key(6), forward(age, flags), lambda k: None, NOW) is ended


def test_a_flow_without_entry_has_ended() -> None:
    assert _ended(key(6), None, lambda k: None, NOW)
