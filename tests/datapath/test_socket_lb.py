"""Socket-level load balancing for ClusterIP Services, with real traffic.

Conventions: see conftest.py. Each case names the destination a client pod
dials and what must hold: which backends may answer (and that each gets a
fair share), or which error the client sees.

The spread bound: with n connections over k backends chosen uniformly, each
backend's count is Binomial(n, 1/k). For n=300, k=3 the standard deviation
is ~8.2 around 100; requiring >= 50 per backend is six deviations away, a
false failure about once in a billion runs, while a broken choice (one
backend never picked, or all traffic to one) fails at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from agent.sandbox.cluster import SandboxCluster

WEB_TCP = {"web-a:8080", "web-b:8080", "web-c:8080"}
WEB_ADMIN = {"web-a:8081", "web-b:8081", "web-c:8081"}
WEB_UDP = {"web-a", "web-b", "web-c"}
N = 300
MIN_SHARE = 50


@dataclass(frozen=True)
class Flow:
    name: str
    args: tuple[str, ...]
    backends: frozenset[str]


SPREAD_FLOWS = [
    Flow("ipv4 tcp multi-slice named port", ("tcp", "10.96.0.10", "80"), frozenset(WEB_TCP)),
    Flow("ipv4 tcp second port", ("tcp", "10.96.0.10", "8081"), frozenset(WEB_ADMIN)),
    Flow("ipv4 udp unconnected", ("udp", "10.96.0.53", "53"), frozenset(WEB_UDP)),
    Flow("ipv4 udp connected", ("udp", "10.96.0.53", "53", "--connect"), frozenset(WEB_UDP)),
    Flow("dual-stack v4 tcp", ("tcp", "10.96.0.20", "80"), frozenset(WEB_TCP)),
    Flow("dual-stack v6 tcp", ("tcp", "fd00:96::20", "80"), frozenset(WEB_TCP)),
    Flow("dual-stack v6 udp", ("udp", "fd00:96::20", "53"), frozenset(WEB_UDP)),
    Flow("dual-stack v6 udp connected", ("udp", "fd00:96::20", "53", "--connect"),
         frozenset(WEB_UDP)),
]


@pytest.mark.parametrize("flow", SPREAD_FLOWS, ids=lambda f: f.name)
def test_spread_over_ready_endpoints_only(shared_cluster: SandboxCluster, flow: Flow) -> None:
    result = shared_cluster.probe(*flow.args, "--count", str(N))
    assert result["errors"] == {}, result
    answers = result["answers"]
    # Only ready endpoints of this Service: web-d (not ready) never answers.
    assert set(answers) == flow.backends, result
    assert sum(answers.values()) == N
    for backend, count in answers.items():
        assert count >= MIN_SHARE, f"{backend} got {count} of {N}: {answers}"
    # getpeername() (TCP, connected UDP) and recvfrom() (unconnected UDP) show
    # the Service address, never the backend's.
    assert result["peer_mismatch"] == 0, result


@pytest.mark.parametrize(
    ("name", "args"),
    [
        ("service without endpoints", ("tcp", "10.96.0.99", "80")),
        ("port the Service does not expose", ("tcp", "10.96.0.10", "9999")),
        ("udp to a tcp-only port", ("udp", "10.96.0.10", "80")),
        ("address in the Service CIDR with no Service", ("tcp", "10.96.200.1", "80")),
        ("ipv6 address in the Service CIDR with no Service", ("tcp", "fd00:96::99", "80")),
    ],
)
def test_refused_at_once(shared_cluster: SandboxCluster, name: str, args: tuple[str, ...]) -> None:
    result = shared_cluster.probe(*args, "--count", "5", "--timeout", "5")
    assert result["answers"] == {}, name
    # ECONNREFUSED, not a timeout: the socket hook fails the call itself.
    assert result["errors"] == {"ECONNREFUSED": 5}, (name, result)


def test_pod_ip_is_untouched(shared_cluster: SandboxCluster) -> None:
    result = shared_cluster.probe("tcp", "10.244.1.3", "8080", "--count", "20")
    assert result["answers"] == {"web-b:8080": 20}
    assert result["peer_mismatch"] == 0


def test_unsupported_service_is_reported_and_others_work(shared_cluster: SandboxCluster) -> None:
    status = shared_cluster.status()
    assert status is not None
    assert any(
        "signalling" in p and "UnsupportedProtocol" in p and "SCTP" in p
        for p in status["problems"]
    ), status["problems"]
    assert not any(k.startswith("10.96.0.30:") for k in status["frontends"])
    result = shared_cluster.probe("tcp", "10.96.0.10", "80", "--count", "30")
    assert result["errors"] == {} and set(result["answers"]) <= WEB_TCP
