"""Explain and the maps view, on a datapath programmed by the real reconciler.

The fake datapath is programmed by the Reconciler from compute's output, then
read back through StateReader, so these tables check the verdict order of
bpf/sock_lb.c (as agent/api/explain.py restates it) without a kernel; the
datapath tests check the same answers against the real maps.

Addresses: Service CIDR 10.96.0.0/16; web 10.96.0.10:80 -> pods .2 .3 (ready),
.5 (not ready); empty 10.96.0.99:80 without endpoints.
"""

from __future__ import annotations

import dataclasses
import ipaddress

import pytest
from builders import desired, ep, eport, eps, port, service

from agent.api.explain import explain
from agent.api.views import actual_text, maps_message
from agent.compute import ComputeConfig
from agent.compute.render import render_desired
from agent.compute.types import L4Addr
from agent.datapath.fake import FakeDatapath
from agent.datapath.inspect import StateReader
from agent.model.objects import Protocol
from agent.reconcile.reconciler import Reconciler

CONFIG = ComputeConfig(service_cidrs=frozenset({ipaddress.ip_network("10.96.0.0/16")}))
STATE = desired(
    service("web", port("http", 80, 8080), ips="10.96.0.10"),
    eps("web-1", "web", ep("10.244.1.2", ready=True), ep("10.244.1.3", ready=True),
        ep("10.244.1.5", ready=False), ports=[eport("http", 8080)]),
    service("empty", port("http", 80, 8080), ips="10.96.0.99"),
    config=CONFIG,
)


@pytest.fixture
def reader() -> StateReader:
    datapath = FakeDatapath()
    result = Reconciler(datapath, lambda: STATE).sync()
    assert result.ok, result.errors
    return StateReader(datapath.dump)


@pytest.mark.parametrize(
    ("dst", "dport", "proto", "verdict", "reason", "backends"),
    [
        ("10.96.0.10", 80, "TCP", "translate", "translated", ["10.244.1.2:8080/TCP",
                                                             "10.244.1.3:8080/TCP"]),
        ("::ffff:10.96.0.10", 80, "TCP", "translate", "translated", ["10.244.1.2:8080/TCP",
                                                                    "10.244.1.3:8080/TCP"]),
        ("10.96.0.99", 80, "TCP", "refuse", "no_backends", []),
        ("10.96.0.10", 9999, "TCP", "refuse", "unknown_port", []),
        ("10.96.0.10", 80, "UDP", "refuse", "unknown_port", []),
        ("10.96.200.1", 80, "TCP", "refuse", "no_service", []),
        ("192.0.2.1", 80, "TCP", "pass", "not_a_service", []),
        ("10.96.0.10", 80, "SCTP", "pass", "protocol_not_handled", []),
    ],
)
def test_verdicts_follow_sock_lb_order(
    reader: StateReader, dst: str, dport: int, proto: str, verdict: str, reason: str,
    backends: list[str],
) -> None:
    got = explain(reader, ipaddress.ip_address(dst), dport, proto, STATE.frontends)
    assert (got.verdict, got.reason) == (verdict, reason), got.steps
    assert [str(c.backend) for c in got.candidates] == backends
    if backends:
        assert all(c.probability == pytest.approx(1 / len(backends)) for c in got.candidates)
        assert got.frontend is not None and got.frontend.service_port == "default/web:http"
    if verdict == "refuse":
        assert got.errno == "ECONNREFUSED" and got.counter.startswith("refused_")


def test_unknown_port_names_the_ports_served(reader: StateReader) -> None:
    got = explain(reader, ipaddress.ip_address("10.96.0.10"), 9999, "TCP", STATE.frontends)
    assert got.served_ports == ["80/TCP"]
    assert "80/TCP" in got.summary


def test_no_service_names_the_cidr(reader: StateReader) -> None:
    got = explain(reader, ipaddress.ip_address("10.96.7.7"), 80, "TCP", STATE.frontends)
    assert got.service_cidr == "10.96.0.0/16"


def test_actual_text_matches_desired_when_in_sync(reader: StateReader) -> None:
    assert actual_text(reader.read(), STATE) == render_desired(STATE)


def test_maps_diff_shows_a_missing_backend() -> None:
    datapath = FakeDatapath()
    assert Reconciler(datapath, lambda: STATE).sync().ok
    web = L4Addr(ipaddress.ip_address("10.96.0.10"), 80, Protocol.TCP)
    held = datapath.state.frontends[web]
    datapath.state.frontends[web] = type(held)(backends=held.backends[:1])

    class Pb:  # the two message types maps_message builds, as plain records
        class MapsResponse:
            def __init__(self, **kw: object) -> None:
                self.__dict__.update(kw)

    msg = maps_message(Pb, STATE, StateReader(datapath.dump).read(), "/bpffs")
    assert not msg.in_sync
    assert "-10.96.0.10:80/TCP  ClusterIP  default/web:http  -> 10.244.1.2:8080/TCP " \
           "10.244.1.3:8080/TCP\n" in msg.diff
    assert "+10.96.0.10:80/TCP  ClusterIP  default/web:http  -> 10.244.1.2:8080/TCP\n" in msg.diff


def test_external_scope_is_projected_and_diffed() -> None:
    """An ExternalIP frontend holds a second (external) scope; the maps view
    renders it like compute does, and a change to it shows in the diff."""
    state = desired(
        service("web", port("http", 80, 8080), ips="10.96.0.10",
                externalIPs=["192.0.2.10"], externalTrafficPolicy="Local"),
        eps("web-1", "web", ep("10.244.1.2", ready=True, node="node-1"),
            ep("10.244.2.2", ready=True, node="node-2"), ports=[eport("http", 8080)]),
        config=CONFIG,
    )
    datapath = FakeDatapath()
    assert Reconciler(datapath, lambda: state).sync().ok
    actual = StateReader(datapath.dump).read()
    external = L4Addr(ipaddress.ip_address("192.0.2.10"), 80, Protocol.TCP)
    assert set(actual.external) == {external}
    assert actual_text(actual, state) == render_desired(state)
    assert "external(Local) -> 10.244.1.2:8080/TCP" in render_desired(state)

    held = datapath.state.frontends[external]
    datapath.state.frontends[external] = dataclasses.replace(held, external_backends=())
    text = actual_text(StateReader(datapath.dump).read(), state)
    assert "192.0.2.10:80/TCP  ExternalIP  default/web:http  -> 10.244.1.2:8080/TCP " \
           "10.244.2.2:8080/TCP  external(Local) -> (none: drop)" in text
