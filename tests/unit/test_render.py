"""agent.compute.render: the stable text form of a DesiredState."""

from __future__ import annotations

from ipaddress import ip_address, ip_network
from types import MappingProxyType

from agent.compute.render import render_desired
from agent.compute.types import (
    DesiredState,
    Frontend,
    FrontendKind,
    L4Addr,
    ServicePortName,
    ServiceProblem,
)
from agent.model.objects import Protocol


def _addr(text: str, port: int, proto: Protocol = Protocol.TCP) -> L4Addr:
    return L4Addr(ip_address(text), port, proto)


def test_empty_state_renders_nothing() -> None:
    assert render_desired(DesiredState()) == ""


def test_render_sorts_and_formats() -> None:
    v6 = _addr("fd00:96::1", 80)
    v4_high = _addr("10.96.1.1", 80)
    v4_udp = _addr("10.96.0.9", 53, Protocol.UDP)
    v4_tcp = _addr("10.96.0.9", 53)
    frontends = {
        # Inserted out of order on purpose.
        v6: Frontend(v6, ServicePortName("default", "web", "http"), FrontendKind.CLUSTER_IP,
                     (_addr("fd00:10:244:1::2", 8080),)),
        v4_high: Frontend(v4_high, ServicePortName("ns", "empty", ""), FrontendKind.CLUSTER_IP,
                          ()),
        v4_udp: Frontend(v4_udp, ServicePortName("kube-system", "dns", "dns"),
                         FrontendKind.CLUSTER_IP,
                         (_addr("10.244.1.2", 9053, Protocol.UDP),
                          _addr("10.244.1.3", 9053, Protocol.UDP))),
        v4_tcp: Frontend(v4_tcp, ServicePortName("kube-system", "dns", "dns-tcp"),
                         FrontendKind.CLUSTER_IP, (_addr("10.244.1.2", 9053),)),
    }
    state = DesiredState(
        frontends=MappingProxyType(frontends),
        vips=frozenset({ip_address("fd00:96::1"), ip_address("10.96.1.1"),
                        ip_address("10.96.0.9")}),
        service_cidrs=frozenset({ip_network("fd00:96::/112"), ip_network("10.96.0.0/16"),
                                 ip_network("10.96.0.0/12")}),
        problems=(
            ServiceProblem("ns", "z", "UnsupportedProtocol", "SCTP"),
            ServiceProblem("ns", "a", "FrontendConflict", "taken"),
        ),
    )
    assert render_desired(state).splitlines() == [
        "10.96.0.9:53/TCP  ClusterIP  kube-system/dns:dns-tcp  -> 10.244.1.2:9053/TCP",
        "10.96.0.9:53/UDP  ClusterIP  kube-system/dns:dns  -> "
        "10.244.1.2:9053/UDP 10.244.1.3:9053/UDP",
        "10.96.1.1:80/TCP  ClusterIP  ns/empty  -> (none: refuse)",
        "[fd00:96::1]:80/TCP  ClusterIP  default/web:http  -> [fd00:10:244:1::2]:8080/TCP",
        "vip 10.96.0.9",
        "vip 10.96.1.1",
        "vip fd00:96::1",
        "cidr 10.96.0.0/12",
        "cidr 10.96.0.0/16",
        "cidr fd00:96::/112",
        # Problems keep compute's order.
        "problem Service/ns/z: UnsupportedProtocol: SCTP",
        "problem Service/ns/a: FrontendConflict: taken",
    ]
    assert render_desired(state).endswith("\n")
