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


# (what happened: who sent at which time), and how long the flow then lives
# after its last datagram.
CASES = [
    # Still active after 2 s, with a reply seen: a stream, conntrack's 120 s.
    ("stream", [("client", 1000.0), ("backend", 1000.1), ("client", 1003.0)], 120.0),
    ("no replies", [("client", 1000.0), ("client", 1003.0)], 30.0),
    # Replies, but every datagram within the flow's first 2 s.
    ("short exchange", [("client", 1000.0), ("backend", 1000.5), ("client", 1001.0)], 30.0),
    # The first reply comes late: conntrack ages it before noting it.
    ("first reply late", [("client", 1000.0), ("client", 1001.0), ("backend", 1003.0)], 30.0),
    ("second reply late", [("client", 1000.0), ("client", 1001.0), ("backend", 1003.0),
                           ("backend", 1004.0)], 120.0),
    # A late answer refreshes it, but a single query is a one-shot.
    ("single datagram", [("client", 1000.0), ("backend", 1003.0)], 5.0),
]


@pytest.mark.parametrize(("events", "lives"), [(e, t) for _, e, t in CASES],
                         ids=[name for name, _, _ in CASES])
def test_a_flow_lives_as_long_as_conntrack_would_keep_it(
    pair: _Pair, events: list[tuple[str, float]], lives: float,
) -> None:
    for who, at in events:
        (pair.client_sends if who == "client" else pair.backend_replies)(at)
    last = events[-1][1]
    assert pair.alive_at(last + lives - 1.0)
    assert not pair.alive_at(last + lives)


def test_a_datagram_too_big_for_the_path_is_lost_not_the_flow(pair: _Pair) -> None:
    """EMSGSIZE (here the socketpair's; a router's "fragmentation needed" in
    life) costs the datagram only: the flow and its backend stay."""
    pair.client_sends(1000.0)
    pair.flow.to_backend(b"x" * (4 << 20))
    assert pair.engine.counted.get("udp_too_big") == 1
    assert pair.alive_at(1001.0)
    pair.client_sends(1002.0)
