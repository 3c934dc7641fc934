"""TPROXY mode's UDP flows age as conntrack's entries do (udp.py): run on
socketpairs and a clock of the test's, without root."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterator

import pytest

from agent.compute.types import L4Addr
from agent.datapath.tproxy import udp
from agent.datapath.tproxy.choice import OpenCounts
from agent.datapath.tproxy.layout import Role
from agent.model.objects import Protocol

BACKEND = L4Addr(ipaddress.ip_address("10.244.1.2"), 9053, Protocol.UDP)
KEY: udp.FlowKey = ("10.244.1.100", 40000, "10.96.0.53", 53)


class _Loop:
    def __init__(self) -> None:
        self.handlers: dict[int, Callable[[int], None]] = {}

    def register(self, fd: int, _events: int, handler: Callable[[int], None]) -> None:
        self.handlers[fd] = handler

    def unregister(self, fd: int) -> None:
        self.handlers.pop(fd, None)


class _Engine:
    """What a Flow uses of the proxy's Engine; `now` is the test's clock."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.loop = _Loop()
        self.flows: dict[udp.FlowKey, udp.Flow] = {}
        self.flows_of: dict[tuple[str, int], set[udp.Flow]] = {}
        self.udp_binds: set[udp.Bind] = set()
        self.counts = OpenCounts()
        self.notifier = None
        self.counted: dict[str, int] = {}

    def count(self, name: str, n: int = 1) -> None:
        self.counted[name] = self.counted.get(name, 0) + n


class _Pair:
    """A flow between a client and a backend, each a socketpair's far end."""

    def __init__(self) -> None:
        self.engine = _Engine()
        up_near, self.backend = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        down_near, self.client = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        for sock in (up_near, down_near, self.backend, self.client):
            sock.setblocking(False)
        self.engine.counts.add(BACKEND)
        self.up_fd = up_near.fileno()
        self.flow = udp.Flow(self.engine, KEY, Role.POD, 4,  # type: ignore[arg-type]
                             udp._Upstream(up_near, BACKEND, None), down_near)

    def client_sends(self, at: float) -> None:
        self.engine.now = at
        self.flow.to_backend(b"q")
        assert self.backend.recv(64) == b"q"

    def backend_replies(self, at: float) -> None:
        self.engine.now = at
        self.backend.send(b"a")
        self.engine.loop.handlers[self.up_fd](0)
        assert self.client.recv(64) == b"a"

    def alive_at(self, at: float) -> bool:
        udp.sweep(self.engine, at)  # type: ignore[arg-type]
        return KEY in self.engine.flows

    def close(self) -> None:
        self.flow.close()
        self.backend.close()
        self.client.close()


@pytest.fixture
def pair() -> Iterator[_Pair]:
    p = _Pair()
    yield p
    p.close()


def test_a_stream_that_saw_replies_keeps_its_backend_for_120_s(pair: _Pair) -> None:
    pair.client_sends(1000.0)
    pair.backend_replies(1000.1)
    pair.client_sends(1003.0)  # still active after 2 s, with a reply seen: a stream
    assert pair.alive_at(1003.0 + 119.0)
    assert not pair.alive_at(1003.0 + 120.0)


def test_a_flow_without_replies_ends_after_30_s(pair: _Pair) -> None:
    pair.client_sends(1000.0)
    pair.client_sends(1003.0)
    assert pair.alive_at(1003.0 + 29.0)
    assert not pair.alive_at(1003.0 + 30.0)


def test_a_flow_whose_datagrams_all_came_in_its_first_2_s_ends_after_30_s(pair: _Pair) -> None:
    pair.client_sends(1000.0)
    pair.backend_replies(1000.5)
    pair.client_sends(1001.0)
    assert pair.alive_at(1001.0 + 29.0)
    assert not pair.alive_at(1001.0 + 30.0)


def test_a_single_datagram_flow_ends_after_5_s_even_with_a_reply(pair: _Pair) -> None:
    pair.client_sends(1000.0)
    pair.backend_replies(1003.0)  # a late answer refreshes it, but one query is a one-shot
    assert pair.alive_at(1003.0 + 4.0)
    assert not pair.alive_at(1003.0 + 5.0)
