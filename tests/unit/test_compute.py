"""compute_desired: kube-proxy's Service semantics as a table.

Address conventions, used by every case below:

    Service ClusterIPs  10.96.0.<n>             fd00:96::<n>
    pod (endpoint) IPs  10.244.<node>.<n>       fd00:10:244:<node>::<n>
    nodes               node-1 (this node), node-2
    Service ports       80 "http", 53 "dns", 8081 "admin"
    pod ports           8080 (http), 9053 (dns), 9081 (admin)

Each case lists the objects (as manifests) and the frontends it must produce,
as "frontend": ["backend", ...]; an empty list means the frontend refuses
connections (kube-proxy's REJECT for a Service without endpoints). Frontends
not listed must not exist. A failing case is reported by its name.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest
from builders import Doc, desired, ep, eport, eps, frontends_text, models, port, service

from agent.compute import ComputeConfig, NodeIdentity, compute_desired
from agent.model.objects import IPFamily
from agent.model.snapshot import ClusterSnapshot

HTTP = [eport("http", 8080)]
DNS = [eport("dns", 9053, "UDP")]
PROXY_NAME = "service.kubernetes.io/service-proxy-name"


@dataclass
class Case:
    name: str
    objects: list[Doc]
    frontends: dict[str, list[str]]
    problems: list[tuple[str, str]] = field(default_factory=list)  # (namespace/name, reason)
    config: ComputeConfig = field(default_factory=ComputeConfig)


CASES = [
    # ---- protocols and families ---------------------------------------------
    Case(
        "tcp",
        [
            service("web", port("http", 80, 8080)),
            eps("web-1", "web", ep("10.244.1.3"), ep("10.244.1.2"), ports=HTTP),
        ],
        {"10.96.0.1:80/TCP": ["10.244.1.2:8080/TCP", "10.244.1.3:8080/TCP"]},
    ),
    Case(
        "udp",
        [
            service("dns", port("dns", 53, 9053, "UDP"), ips="10.96.0.10"),
            eps("dns-1", "dns", ep("10.244.1.2"), ep("10.244.2.2"), ports=DNS),
        ],
        {"10.96.0.10:53/UDP": ["10.244.1.2:9053/UDP", "10.244.2.2:9053/UDP"]},
    ),
    Case(
        "protocol absent means TCP",
        [
            service("web", port("http", 80, 8080, protocol=None)),
            eps("web-1", "web", ep("10.244.1.2"), ports=[eport("http", 8080, None)]),
        ],
        {"10.96.0.1:80/TCP": ["10.244.1.2:8080/TCP"]},
    ),
    Case(
        "same port number over TCP and UDP is two frontends",
        [
            service("dns", port("dns-tcp", 53, 9053, "TCP"), port("dns", 53, 9053, "UDP"),
                    ips="10.96.0.10"),
            eps("dns-1", "dns", ep("10.244.1.2"),
                ports=[eport("dns-tcp", 9053, "TCP"), eport("dns", 9053, "UDP")]),
        ],
        {
            "10.96.0.10:53/TCP": ["10.244.1.2:9053/TCP"],
            "10.96.0.10:53/UDP": ["10.244.1.2:9053/UDP"],
        },
    ),
    Case(
        "ipv6 single-stack",
        [
            service("web", port("http", 80, 8080), ips="fd00:96::1"),
            eps("web-1", "web", ep("fd00:10:244:1::2"), ep("fd00:10:244:2::2"), ports=HTTP),
        ],
        {"[fd00:96::1]:80/TCP": ["[fd00:10:244:1::2]:8080/TCP", "[fd00:10:244:2::2]:8080/TCP"]},
    ),
    Case(
        "dual-stack: each family gets only its own endpoints",
        [
            service("web", port("http", 80, 8080), ips=("10.96.0.1", "fd00:96::1"),
                    ipFamilyPolicy="RequireDualStack"),
            eps("web-v4", "web", ep("10.244.1.2"), ep("10.244.2.2"), ports=HTTP),
            eps("web-v6", "web", ep("fd00:10:244:1::2"), ports=HTTP),
        ],
        {
            "10.96.0.1:80/TCP": ["10.244.1.2:8080/TCP", "10.244.2.2:8080/TCP"],
            "[fd00:96::1]:80/TCP": ["[fd00:10:244:1::2]:8080/TCP"],
        },
    ),
    Case(
        "dual-stack, IPv6 primary, no IPv6 endpoints yet: IPv6 refuses",
        [
            service("web", port("http", 80, 8080), ips=("fd00:96::1", "10.96.0.1"),
                    ipFamilyPolicy="PreferDualStack"),
            eps("web-v4", "web", ep("10.244.1.2"), ports=HTTP),
        ],
        {"10.96.0.1:80/TCP": ["10.244.1.2:8080/TCP"], "[fd00:96::1]:80/TCP": []},
    ),
    Case(
        "IPv4 Service never gets IPv6 endpoints",
        [
            service("web", port("http", 80, 8080)),
            eps("web-v6", "web", ep("fd00:10:244:1::2"), ports=HTTP),
        ],
        {"10.96.0.1:80/TCP": []},
    ),
    # ---- ports ------------------------------------------------------------------
    Case(
        "multi-port: each port its own endpoints' port",
        [
            service("web", port("http", 80, 8080), port("admin", 8081, 9081)),
            eps("web-1", "web", ep("10.244.1.2"), ep("10.244.1.3"),
                ports=[eport("http", 8080), eport("admin", 9081)]),
        ],
        {
            "10.96.0.1:80/TCP": ["10.244.1.2:8080/TCP", "10.244.1.3:8080/TCP"],
            "10.96.0.1:8081/TCP": ["10.244.1.2:9081/TCP", "10.244.1.3:9081/TCP"],
        },
    ),
    Case(
        "ports match by name, not by number",
        [
            service("web", port("http", 80, 8080), port("metrics", 9090, 9090)),
            # The slice's "http" is 9090 and its "metrics" is 8080: names decide.
            eps("web-1", "web", ep("10.244.1.2"),
                ports=[eport("metrics", 8080), eport("http", 9090)]),
        ],
        {
            "10.96.0.1:80/TCP": ["10.244.1.2:9090/TCP"],
            "10.96.0.1:9090/TCP": ["10.244.1.2:8080/TCP"],
        },
    ),
    Case(
        "named targetPort: each slice carries the number its pods resolved",
        [
            service("web", port("http", 80, "web-port")),
            eps("web-old", "web", ep("10.244.1.2"), ports=[eport("http", 8080)]),
            eps("web-new", "web", ep("10.244.1.3"), ports=[eport("http", 8090)]),
        ],
        {"10.96.0.1:80/TCP": ["10.244.1.2:8080/TCP", "10.244.1.3:8090/TCP"]},
    ),
    Case(
        "ports match by protocol too",
        [
            service("dns", port("dns", 53, 9053, "UDP"), ips="10.96.0.10"),
            eps("dns-1", "dns", ep("10.244.1.2"), ports=[eport("dns", 9053, "TCP")]),
        ],
        {"10.96.0.10:53/UDP": []},
    ),
    Case(
        "unnamed single port matches the unnamed slice port",
        [
            service("web", port("", 80, 8080)),
            eps("web-1", "web", ep("10.244.1.2"), ports=[eport("", 8080)]),
        ],
        {"10.96.0.1:80/TCP": ["10.244.1.2:8080/TCP"]},
    ),
    Case(
        "slice port without a number carries no backend",
        [
            service("web", port("http", 80, 8080)),
            eps("web-1", "web", ep("10.244.1.2"), ports=[eport("http", None)]),
            eps("web-2", "web", ep("10.244.1.3"), ports=HTTP),
        ],
        {"10.96.0.1:80/TCP": ["10.244.1.3:8080/TCP"]},
    ),
    # ---- which endpoints ----------------------------------------------------------
    Case(
        "only ready endpoints (ready absent means ready)",
        [
            service("web", port("http", 80, 8080)),
            eps("web-1", "web",
                ep("10.244.1.2", ready=True),
                ep("10.244.1.3"),
                ep("10.244.1.4", ready=False),
                ep("10.244.1.5", ready=False, serving=True, terminating=True),
                ep("10.244.1.6", ready=False, serving=False, terminating=True),
                ports=HTTP),
        ],
        {"10.96.0.1:80/TCP": ["10.244.1.2:8080/TCP", "10.244.1.3:8080/TCP"]},
    ),
    Case(
        "no ready endpoint: serving terminating ones are used",
        [
            service("web", port("http", 80, 8080)),
            eps("web-1", "web",
                ep("10.244.1.4", ready=False),
                ep("10.244.1.5", ready=False, serving=True, terminating=True),
                ep("10.244.1.6", ready=False, serving=False, terminating=True),
                ports=HTTP),
        ],
        {"10.96.0.1:80/TCP": ["10.244.1.5:8080/TCP"]},
    ),
    Case(
        "no ready and no serving endpoint: refuse",
        [
            service("web", port("http", 80, 8080)),
            eps("web-1", "web", ep("10.244.1.4", ready=False),
                ep("10.244.1.6", ready=False, serving=False, terminating=True), ports=HTTP),
        ],
        {"10.96.0.1:80/TCP": []},
    ),
    Case(
        "terminating fallback is per family",
        [
            service("web", port("http", 80, 8080), ips=("10.96.0.1", "fd00:96::1")),
            eps("web-v4", "web", ep("10.244.1.2"),
                ep("10.244.1.5", ready=False, serving=True, terminating=True), ports=HTTP),
            eps("web-v6", "web",
                ep("fd00:10:244:1::5", ready=False, serving=True, terminating=True), ports=HTTP),
        ],
        {
            "10.96.0.1:80/TCP": ["10.244.1.2:8080/TCP"],
            "[fd00:96::1]:80/TCP": ["[fd00:10:244:1::5]:8080/TCP"],
        },
    ),
    Case(
        "endpoints merged across slices and de-duplicated",
        [
            service("web", port("http", 80, 8080)),
            eps("web-b", "web", ep("10.244.1.3"), ep("10.244.1.2"), ports=HTTP),
            eps("web-a", "web", ep("10.244.1.2"), ep("10.244.2.2"), ports=HTTP),
            eps("web-c", "web", ep("10.244.1.3", ready=False), ports=HTTP),
        ],
        {"10.96.0.1:80/TCP": ["10.244.1.2:8080/TCP", "10.244.1.3:8080/TCP",
                              "10.244.2.2:8080/TCP"]},
    ),
    Case(
        "only an endpoint's first address is used",
        [
            service("web", port("http", 80, 8080)),
            eps("web-1", "web", {"addresses": ["10.244.1.2", "10.244.1.200"]}, ports=HTTP),
        ],
        {"10.96.0.1:80/TCP": ["10.244.1.2:8080/TCP"]},
    ),
    Case(
        "slices of other Services and namespaces, and unlabelled slices, are not used",
        [
            service("web", port("http", 80, 8080)),
            eps("web-1", "web", ep("10.244.1.2"), ports=HTTP),
            eps("web-2", "web", ep("10.244.1.3"), ports=HTTP, ns="other"),
            eps("web-3", "web-canary", ep("10.244.1.4"), ports=HTTP),
            eps("web", None, ep("10.244.1.5"), ports=HTTP),
        ],
        {"10.96.0.1:80/TCP": ["10.244.1.2:8080/TCP"]},
    ),
    Case(
        "no endpoints: the frontend exists and refuses",
        [service("web", port("http", 80, 8080))],
        {"10.96.0.1:80/TCP": []},
    ),
    Case(
        "empty slice: refuse",
        [service("web", port("http", 80, 8080)), eps("web-1", "web", ports=HTTP)],
        {"10.96.0.1:80/TCP": []},
    ),
    # ---- which Services ------------------------------------------------------------
    Case(
        "headless Service is not proxied",
        [
            service("db", port("pg", 5432), ips="None"),
            eps("db-1", "db", ep("10.244.1.2"), ports=[eport("pg", 5432)]),
        ],
        {},
    ),
    Case(
        "ExternalName Service is not proxied",
        [service("ext", port("http", 80), ips="10.96.0.7", type="ExternalName",
                 externalName="example.com")],
        {},
    ),
    Case(
        "Service without a ClusterIP yet is not proxied",
        [service("web", port("http", 80, 8080), ips=())],
        {},
    ),
    Case(
        "Service without ports has no frontend and no VIP",
        [service("web", ips="10.96.0.1")],
        {},
    ),
    Case(
        "label service.kubernetes.io/headless: not proxied even with a ClusterIP",
        [
            service("web", port("http", 80, 8080),
                    labels={"service.kubernetes.io/headless": ""}),
            eps("web-1", "web", ep("10.244.1.2"), ports=HTTP),
        ],
        {},
    ),
    Case(
        "service-proxy-name label: left to that proxy by default",
        [
            service("web", port("http", 80, 8080), labels={PROXY_NAME: "veer"}),
            service("plain", port("http", 80, 8080), ips="10.96.0.2"),
        ],
        {"10.96.0.2:80/TCP": []},
    ),
    Case(
        "service-proxy-name label equal to ours: proxied, as are unlabelled Services",
        [
            service("web", port("http", 80, 8080), labels={PROXY_NAME: "veer"}),
            service("other", port("http", 80, 8080), ips="10.96.0.2",
                    labels={PROXY_NAME: "other-proxy"}),
            service("plain", port("http", 80, 8080), ips="10.96.0.3"),
            eps("web-1", "web", ep("10.244.1.2"), ports=HTTP),
        ],
        {"10.96.0.1:80/TCP": ["10.244.1.2:8080/TCP"], "10.96.0.3:80/TCP": []},
        config=ComputeConfig(service_proxy_name="veer"),
    ),
    # kube-proxy's label selector hides EndpointSlices as it hides Services:
    # a slice so labelled gives no endpoints even to an unlabelled Service.
    Case(
        "EndpointSlices labelled for another proxy or headless are not read",
        [
            service("web", port("http", 80, 8080)),
            eps("web-1", "web", ep("10.244.1.2"), ports=HTTP),
            eps("web-2", "web", ep("10.244.1.3"), ports=HTTP, labels={PROXY_NAME: "other"}),
            eps("web-3", "web", ep("10.244.1.4"), ports=HTTP,
                labels={"service.kubernetes.io/headless": ""}),
        ],
        {"10.96.0.1:80/TCP": ["10.244.1.2:8080/TCP"]},
    ),
    Case(
        "EndpointSlices labelled with our service-proxy-name are read, others not",
        [
            service("web", port("http", 80, 8080), labels={PROXY_NAME: "veer"}),
            eps("web-1", "web", ep("10.244.1.2"), ports=HTTP, labels={PROXY_NAME: "veer"}),
            eps("web-2", "web", ep("10.244.1.3"), ports=HTTP, labels={PROXY_NAME: "other"}),
            eps("web-3", "web", ep("10.244.1.4"), ports=HTTP),
        ],
        {"10.96.0.1:80/TCP": ["10.244.1.2:8080/TCP", "10.244.1.4:8080/TCP"]},
        config=ComputeConfig(service_proxy_name="veer"),
    ),
    # ---- problems ---------------------------------------------------------------------
    Case(
        "SCTP is reported; the Service's TCP port and other Services still work",
        [
            service("sig", port("http", 80, 8080), port("sctp", 3868, 3868, "SCTP"),
                    ips="10.96.0.5"),
            eps("sig-1", "sig", ep("10.244.1.2"),
                ports=[eport("http", 8080), eport("sctp", 3868, "SCTP")]),
            service("only-sctp", port("sctp", 3868, 3868, "SCTP"), ips="10.96.0.6"),
            service("web", port("http", 80, 8080)),
            eps("web-1", "web", ep("10.244.1.3"), ports=HTTP),
        ],
        {
            "10.96.0.1:80/TCP": ["10.244.1.3:8080/TCP"],
            "10.96.0.5:80/TCP": ["10.244.1.2:8080/TCP"],
        },
        problems=[("default/only-sctp", "UnsupportedProtocol"),
                  ("default/sig", "UnsupportedProtocol")],
    ),
    Case(
        "two Services on one address and port: the first in namespace/name order wins",
        [
            service("b-web", port("http", 80, 8080)),
            service("a-web", port("http", 80, 9090)),
            eps("a-web-1", "a-web", ep("10.244.1.2"), ports=[eport("http", 9090)]),
            eps("b-web-1", "b-web", ep("10.244.1.3"), ports=HTTP),
        ],
        {"10.96.0.1:80/TCP": ["10.244.1.2:9090/TCP"]},
        problems=[("default/b-web", "FrontendConflict")],
    ),
    Case(
        "a conflicting port does not take the Service's other ports down",
        [
            service("a", port("http", 80, 8080)),
            service("b", port("http", 80, 8080), port("admin", 8081, 9081)),
        ],
        {"10.96.0.1:80/TCP": [], "10.96.0.1:8081/TCP": []},
        problems=[("default/b", "FrontendConflict")],
    ),
    Case(
        "same address, same port, other protocol: no conflict",
        [
            service("a", port("http", 53, 8080, "TCP")),
            service("b", port("dns", 53, 9053, "UDP")),
        ],
        {"10.96.0.1:53/TCP": [], "10.96.0.1:53/UDP": []},
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_compute(case: Case) -> None:
    state = desired(*case.objects, config=case.config)
    assert frontends_text(state) == case.frontends
    # VIPs are exactly the cluster IPs that carry a frontend.
    assert state.vips == {k.address for k in state.frontends}
    assert [(f"{p.namespace}/{p.name}", p.reason) for p in state.problems] == case.problems
    for key, frontend in state.frontends.items():
        assert frontend.key == key
        assert list(frontend.backends) == sorted(set(frontend.backends))


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_compute_ignores_input_order(case: Case) -> None:
    objects = models(*case.objects)
    node = NodeIdentity("node-1")
    expected = compute_desired(ClusterSnapshot.of(objects), node, case.config)
    rng = random.Random(case.name)
    for _ in range(3):
        rng.shuffle(objects)
        assert compute_desired(ClusterSnapshot.of(objects), node, case.config) == expected


def test_frontend_names_service_port_and_kind() -> None:
    state = desired(service("web", port("http", 80, 8080), ns="shop"))
    (frontend,) = state.frontends.values()
    assert str(frontend.service) == "shop/web:http"
    assert frontend.kind.value == "ClusterIP"


def test_vips_are_only_addresses_with_frontends() -> None:
    state = desired(
        service("web", port("http", 80, 8080), ips=("10.96.0.1", "fd00:96::1")),
        service("sctp", port("s", 3868, 3868, "SCTP"), ips="10.96.0.2"),
        service("none", ips="10.96.0.3"),
        service("db", port("pg", 5432), ips="None"),
    )
    assert {str(v) for v in state.vips} == {"10.96.0.1", "fd00:96::1"}
    assert {IPFamily.of(v) for v in state.vips} == {IPFamily.IPV4, IPFamily.IPV6}


def test_service_cidrs_pass_through() -> None:
    from ipaddress import ip_network

    cidrs = frozenset({ip_network("10.96.0.0/16"), ip_network("fd00:96::/112")})
    assert desired(config=ComputeConfig(service_cidrs=cidrs)).service_cidrs == cidrs


@pytest.mark.parametrize("svc_type", ["NodePort", "LoadBalancer"])
def test_cluster_ip_of_other_service_types_is_served(svc_type: str) -> None:
    state = desired(
        service("web", port("http", 80, 8080, node_port=30080), type=svc_type),
        eps("web-1", "web", ep("10.244.1.2"), ports=HTTP),
    )
    assert frontends_text(state)["10.96.0.1:80/TCP"] == ["10.244.1.2:8080/TCP"]


def test_problem_message_names_service_and_protocol() -> None:
    state = desired(service("sig", port("sctp", 3868, 3868, "SCTP"), ns="tel"))
    (problem,) = state.problems
    assert str(problem).startswith("Service/tel/sig: UnsupportedProtocol: ")
    assert "SCTP" in problem.message


def test_conflict_message_names_the_winner() -> None:
    state = desired(service("a", port("http", 80)), service("b", port("http", 80)))
    (problem,) = state.problems
    assert "10.96.0.1:80/TCP" in problem.message and "default/a:http" in problem.message
