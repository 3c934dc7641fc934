"""The TPROXY proxy's choice of backend (agent/datapath/tproxy/choice.py) and
of whether an upstream connection keeps the client's address (engine.py).

The choice must be the eBPF programs' choice from the same compute output:
Maglev flow by flow as agent/compute/tables.py predicts, round robin as a
cycle over the slot table, weights as the table apportions them,
LeastConnections by open connections per weight, ClientIP affinity until its
timeout. No sockets are opened here except the engine's epoll and eventfd.

Conventions: backends 10.244.1.2-4:8080 (a, b, c); client 10.244.1.100.
"""

from __future__ import annotations

import ipaddress
import socket
from collections import Counter
from collections.abc import Iterator

import pytest

from agent.compute.tables import backend_name, flow_hash, flow_words, maglev_table
from agent.compute.types import Frontend, FrontendKind, L4Addr, ServicePortName
from agent.datapath.tproxy.choice import Chooser, ChooserState, OpenCounts, client_bytes
from agent.datapath.tproxy.engine import Engine
from agent.datapath.tproxy.layout import Locality, Role
from agent.model.objects import Algorithm, Protocol

A, B, C = (L4Addr(ipaddress.ip_address(f"10.244.1.{n}"), 8080, Protocol.TCP) for n in (2, 3, 4))
CLIENT = "10.244.1.100"


def chooser(algorithm: Algorithm = Algorithm.RANDOM, weights: tuple[int, ...] = (),
            affinity: int = 0, backends: tuple[L4Addr, ...] = (A, B, C),
            counts: OpenCounts | None = None, state: ChooserState | None = None) -> Chooser:
    return Chooser(Protocol.TCP, backends, weights, algorithm, 1021 if algorithm is
                   Algorithm.MAGLEV else 0, affinity, counts or OpenCounts(), state)


def test_random_reaches_every_backend() -> None:
    c = chooser()
    got = Counter(c.pick(CLIENT, p) for p in range(3000))
    assert set(got) == {A, B, C} and min(got.values()) > 800


def test_round_robin_cycles_and_keeps_its_cursor_across_updates() -> None:
    state = ChooserState(cursor=0)
    c = chooser(Algorithm.ROUND_ROBIN, state=state)
    assert [c.pick(CLIENT, p) for p in range(6)] == [A, B, C, A, B, C]
    # An update (a new chooser with the old state) continues the cycle.
    c2 = chooser(Algorithm.ROUND_ROBIN, state=state)
    assert c2.pick(CLIENT, 1) == A


def test_weights_split_round_robin_in_proportion() -> None:
    c = chooser(Algorithm.ROUND_ROBIN, weights=(9, 1, 0))
    got = Counter(c.pick(CLIENT, p) for p in range(1000))
    assert got == Counter({A: 900, B: 100})


def test_maglev_picks_what_the_table_and_the_flow_hash_say() -> None:
    c = chooser(Algorithm.MAGLEV)
    table = maglev_table([backend_name(b.address.packed, b.port) for b in (A, B, C)], [], 1021)
    for port in range(40000, 40300):
        h = flow_hash(flow_words(client_bytes(CLIENT),
                                 int.from_bytes(port.to_bytes(2, "big"), "little"), 6))
        assert c.pick(CLIENT, port) == (A, B, C)[table[h % 1021]]


def test_client_bytes_are_the_kernels_layout() -> None:
    assert client_bytes("10.244.1.100") == bytes([10, 244, 1, 100]) + bytes(12)
    assert client_bytes("fd00::1") == socket.inet_pton(socket.AF_INET6, "fd00::1")


def test_least_connections_takes_the_emptiest_per_weight() -> None:
    counts = OpenCounts()
    c = chooser(Algorithm.LEAST_CONNECTIONS, counts=counts)
    for backend in (A, A, B, B, C):
        counts.add(backend)
    assert {c.pick(CLIENT, p) for p in range(50)} == {C}
    weighted = chooser(Algorithm.LEAST_CONNECTIONS, weights=(4, 1, 1), counts=counts)
    counts.add(C)  # A: 2 open / weight 4 beats B and C: 2 open / weight 1
    assert {weighted.pick(CLIENT, p) for p in range(50)} == {A}
    counts.remove(A)
    counts.remove(A)
    assert A not in counts.open


def test_least_connections_spreads_ties() -> None:
    c = chooser(Algorithm.LEAST_CONNECTIONS)
    assert len({c.pick(CLIENT, p) for p in range(200)}) == 3


def test_affinity_keeps_a_client_until_the_timeout_and_leaves_a_gone_backend() -> None:
    state = ChooserState()
    c = chooser(affinity=10, state=state)
    first = c.pick(CLIENT, 1, now=100.0)
    assert all(c.pick(CLIENT, p, now=100.0 + p) == first for p in range(2, 8))
    assert c.affinity_hits == 6
    # Each use renews the entry; 10 s of silence ends it.
    c.expire_affinity(now=117.0)
    assert CLIENT not in state.affinity
    # An entry naming a backend that left is not used.
    state.affinity[CLIENT] = (A, 200.0)
    without_a = chooser(affinity=10, state=state, backends=(B, C))
    assert without_a.pick(CLIENT, 1, now=201.0) in (B, C)


def test_another_backend_for_a_failed_one_keeps_weights() -> None:
    """pick_other (a connection whose backend refused or did not answer):
    never one that failed, by the weights among those left; nothing once
    every backend failed. has_other agrees, a weight of 0 giving nothing."""
    c = chooser(Algorithm.MAGLEV, weights=(1, 3, 6))
    got = Counter(c.pick_other({A}) for _ in range(9000))
    assert set(got) == {B, C}
    assert 0.25 < got[B] / 9000 < 0.42  # 3 of the 9 weights left: a third
    assert c.pick_other({A, B, C}) is None
    assert c.has_other({A, B}) and not c.has_other({A, B, C})
    zero = chooser(weights=(1, 1, 0))
    assert not zero.has_other({A, B})  # C has weight 0: never given
    assert zero.pick_other({A, B}) is None


def test_a_client_with_affinity_sticks_to_the_replacement() -> None:
    state = ChooserState()
    sticky = chooser(affinity=10, state=state)
    first = sticky.pick(CLIENT, 1)
    assert first is not None
    other = sticky.pick_other({first})
    assert other not in (None, first)
    assert sticky.pick(CLIENT, 2) == first  # picking another moves nobody...
    sticky.stick(CLIENT, other)  # ...its connect having started does
    assert sticky.pick(CLIENT, 3) == other


def test_an_empty_frontend_picks_nothing() -> None:
    assert chooser(backends=()).pick(CLIENT, 1) is None


# ---- where the upstream connection comes from -----------------------------------


@pytest.fixture
def engine() -> Iterator[Engine]:
    e = Engine((4,))
    svc = ServicePortName("default", "web", "http")
    e.update(Frontend(L4Addr(ipaddress.ip_address("10.0.0.1"), 30080, Protocol.TCP), svc,
                      FrontendKind.NODE_PORT, backends=(A, B, C), external_backends=(A,)))
    e.locality = {"10.244.1.2": Locality.HERE, "10.244.1.3": Locality.REMOTE,
                  "10.244.1.4": Locality.NODE}
    yield e
    e.close()


def keeps(engine: Engine, role: Role, backend: L4Addr, client: str = CLIENT) -> bool:
    table = engine.tables[(Protocol.TCP, role.external)][("10.0.0.1", 30080)]
    table.slots = (backend,)
    route = engine.route(socket.SOCK_STREAM, role, ("10.0.0.1", 30080), client, 5555)
    assert route is not None and route[0] == backend
    return route[2]


def test_pods_keep_their_address_unless_the_backend_is_the_node_or_themselves(
        engine: Engine) -> None:
    assert keeps(engine, Role.POD, A) and keeps(engine, Role.POD, B)
    assert not keeps(engine, Role.POD, C)  # a host-network endpoint would answer directly
    assert not keeps(engine, Role.POD, A, client="10.244.1.2")  # hairpin


def test_outside_clients_keep_their_address_only_to_pods_of_this_node(engine: Engine) -> None:
    assert keeps(engine, Role.OUTSIDE, A)
    assert not keeps(engine, Role.SHORTCUT, B)  # another node would answer the client directly
    assert keeps(engine, Role.SHORTCUT, A)


def test_the_node_itself_never_lends_its_address(engine: Engine) -> None:
    assert not keeps(engine, Role.NODE, A)


def test_outside_clients_use_the_external_backends(engine: Engine) -> None:
    picks = {engine.route(socket.SOCK_STREAM, Role.OUTSIDE, ("10.0.0.1", 30080), "10.0.0.100",
                          p) for p in range(30)}
    assert {p[0] for p in picks if p} == {A}
    counters = engine.counters()
    assert counters["nat_new"] == 30 and counters["translated"] == 30
