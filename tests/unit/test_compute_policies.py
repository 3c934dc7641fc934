"""compute_desired for the behaviours beyond plain ClusterIP: NodePort,
externalIPs, LoadBalancer, traffic policies, terminating endpoints,
topology, affinity, source ranges, health checks. kube-proxy's behaviour
(pkg/proxy/topology.go, nftables/proxier.go) is the specification.

Address conventions, used by every case below:

    this node        node-1, zone-a, addresses 10.0.0.1 and fd00::1
    other node       node-2, zone-b
    ClusterIPs       10.96.0.1 / fd00:96::1
    externalIP       198.51.100.7          LoadBalancer IP  192.0.2.10
    pods on node-1   10.244.1.<n>          pods on node-2   10.244.2.<n>
    Service port     80 "http" -> pod port 8080; nodePort 30080

Each case lists every frontend it must produce as the line
agent/compute/render.py prints for it:

    addr:port/proto  Kind  ns/name:port  -> <backends for traffic from this node>
        [external[(Local)] -> <backends for traffic from outside>]
        [affinity Ns] [sources CIDR,...]

where an empty set reads "(none: refuse)" (no endpoint anywhere: kube-proxy's
REJECT) or "(none: drop)" (endpoints elsewhere, none local under a Local
policy: kube-proxy's DROP).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

import pytest
from builders import Doc, ep, eport, eps, models, port, service

from agent.compute import ComputeConfig, NodeIdentity, compute_desired
from agent.compute.render import render_frontend
from agent.model.snapshot import ClusterSnapshot

NODE = NodeIdentity(
    "node-1",
    zone="zone-a",
    addresses=(ipaddress.ip_address("10.0.0.1"), ipaddress.ip_address("fd00::1")),
)
HTTP = [eport("http", 8080)]
A1, A2 = "10.244.1.2", "10.244.1.3"  # on node-1
B1, B2 = "10.244.2.2", "10.244.2.3"  # on node-2


def local(ip: str, **kw: Any) -> Doc:
    return ep(ip, node="node-1", **kw)


def remote(ip: str, **kw: Any) -> Doc:
    return ep(ip, node="node-2", **kw)


def hinted(ip: str, node: str, zones: list[str] | None = None,
           nodes: list[str] | None = None) -> Doc:
    hints: dict[str, Any] = {}
    if zones is not None:
        hints["forZones"] = [{"name": z} for z in zones]
    if nodes is not None:
        hints["forNodes"] = [{"name": n} for n in nodes]
    return ep(ip, node=node, hints=hints)


def web(*, type: str | None = None, node_port: int | None = None, **spec: Any) -> Doc:
    return service("web", port("http", 80, 8080, node_port=node_port), ips="10.96.0.1",
                   type=type, **spec)


def with_lb(doc: Doc, *ips: str) -> Doc:
    doc["status"] = {"loadBalancer": {"ingress": [{"ip": ip} for ip in ips]}}
    return doc


def be(*ips: str) -> str:
    return " ".join(f"{ip}:8080/TCP" for ip in sorted(ips, key=ipaddress.ip_address))


@dataclass
class Case:
    name: str
    objects: list[Doc]
    lines: list[str]
    config: ComputeConfig = field(default_factory=ComputeConfig)
    health: list[str] = field(default_factory=list)


CIP = "10.96.0.1:80/TCP  ClusterIP  default/web:http  -> "
NP = "10.0.0.1:30080/TCP  NodePort  default/web:http  -> "

CASES = [
    # ---- NodePort and externalTrafficPolicy -------------------------------
    Case(
        "nodeport, policy Cluster: every endpoint from anywhere",
        [web(type="NodePort", node_port=30080), eps("w", "web", local(A1), remote(B1), ports=HTTP)],
        [CIP + be(A1, B1), NP + be(A1, B1) + "  external -> " + be(A1, B1)],
    ),
    Case(
        "nodeport, policy Local: outside traffic to local endpoints only",
        [
            web(type="NodePort", node_port=30080, externalTrafficPolicy="Local"),
            eps("w", "web", local(A1), remote(B1), ports=HTTP),
        ],
        [CIP + be(A1, B1), NP + be(A1, B1) + "  external(Local) -> " + be(A1)],
    ),
    Case(
        "nodeport, policy Local, no local endpoint: outside traffic dropped, local short-circuits",
        [
            web(type="NodePort", node_port=30080, externalTrafficPolicy="Local"),
            eps("w", "web", remote(B1), remote(B2), ports=HTTP),
        ],
        [CIP + be(B1, B2), NP + be(B1, B2) + "  external(Local) -> (none: drop)"],
    ),
    Case(
        "nodeport, no endpoints anywhere: refused from everywhere",
        [web(type="NodePort", node_port=30080, externalTrafficPolicy="Local")],
        [CIP + "(none: refuse)", NP + "(none: refuse)  external(Local) -> (none: refuse)"],
    ),
    Case(
        "nodePort written on a ClusterIP Service is ignored",
        [web(node_port=30080), eps("w", "web", local(A1), ports=HTTP)],
        [CIP + be(A1)],
    ),
    Case(
        "nodeport-addresses restricts where NodePorts answer",
        [web(type="NodePort", node_port=30080), eps("w", "web", local(A1), ports=HTTP)],
        [CIP + be(A1)],
        config=ComputeConfig(nodeport_addresses=frozenset({ipaddress.ip_network("10.9.0.0/16")})),
    ),
    # ---- internalTrafficPolicy ------------------------------------------------
    Case(
        "internal policy Local: ClusterIP to local endpoints only",
        [
            web(internalTrafficPolicy="Local"),
            eps("w", "web", local(A1), local(A2), remote(B1), ports=HTTP),
        ],
        [CIP + be(A1, A2)],
    ),
    Case(
        "internal policy Local, endpoints only elsewhere: dropped, not refused",
        [web(internalTrafficPolicy="Local"), eps("w", "web", remote(B1), ports=HTTP)],
        [CIP + "(none: drop)"],
    ),
    Case(
        "internal policy Local, no endpoints: refused",
        [web(internalTrafficPolicy="Local")],
        [CIP + "(none: refuse)"],
    ),
    Case(
        "internal Local with a NodePort: external traffic still uses every endpoint",
        [
            web(type="NodePort", node_port=30080, internalTrafficPolicy="Local"),
            eps("w", "web", local(A1), remote(B1), ports=HTTP),
        ],
        [CIP + be(A1), NP + be(A1, B1) + "  external -> " + be(A1, B1)],
    ),
    # ---- terminating endpoints ------------------------------------------------
    Case(
        "serving-terminating endpoints are used only when none is ready",
        [
            web(),
            eps("w", "web", remote(B1, ready=False, serving=True, terminating=True),
                remote(B2), ports=HTTP),
        ],
        [CIP + be(B2)],
    ),
    Case(
        "no ready endpoint: fall back to serving-terminating ones",
        [
            web(),
            eps("w", "web", remote(B1, ready=False, serving=True, terminating=True),
                remote(B2, ready=False, serving=False, terminating=True), ports=HTTP),
        ],
        [CIP + be(B1)],
    ),
    Case(
        "Local policy falls back to local serving-terminating endpoints",
        [
            web(type="NodePort", node_port=30080, externalTrafficPolicy="Local"),
            eps("w", "web", local(A1, ready=False, serving=True, terminating=True),
                remote(B1), ports=HTTP),
        ],
        [CIP + be(B1), NP + be(B1) + "  external(Local) -> " + be(A1)],
    ),
    Case(
        "not serving and terminating: never used",
        [web(), eps("w", "web", remote(B1, ready=False, serving=False, terminating=True),
                    ports=HTTP)],
        [CIP + "(none: refuse)"],
    ),
    # ---- topology -------------------------------------------------------------
    Case(
        "zone hints followed when every ready endpoint has one and one is ours",
        [
            web(trafficDistribution="PreferClose"),
            eps("w", "web", hinted(A1, "node-1", zones=["zone-a"]),
                hinted(B1, "node-2", zones=["zone-b"]), ports=HTTP),
        ],
        [CIP + be(A1)],
    ),
    Case(
        "zone hints ignored when one ready endpoint has none",
        [
            web(),
            eps("w", "web", hinted(A1, "node-1", zones=["zone-a"]), remote(B1), ports=HTTP),
        ],
        [CIP + be(A1, B1)],
    ),
    Case(
        "zone hints ignored when none names our zone",
        [
            web(),
            eps("w", "web", hinted(B1, "node-2", zones=["zone-b"]),
                hinted(B2, "node-2", zones=["zone-b"]), ports=HTTP),
        ],
        [CIP + be(B1, B2)],
    ),
    Case(
        "zone hints ignore not-ready endpoints when deciding",
        [
            web(),
            eps("w", "web", hinted(A1, "node-1", zones=["zone-a"]),
                remote(B2, ready=False), hinted(B1, "node-2", zones=["zone-b"]), ports=HTTP),
        ],
        [CIP + be(A1)],
    ),
    Case(
        "node hints (PreferSameNode) win over zone hints",
        [
            web(trafficDistribution="PreferSameNode"),
            eps("w", "web", hinted(A1, "node-1", zones=["zone-a"], nodes=["node-1"]),
                hinted(A2, "node-1", zones=["zone-a"], nodes=["node-3"]),
                hinted(B1, "node-2", zones=["zone-b"], nodes=["node-2"]), ports=HTTP),
        ],
        [CIP + be(A1)],
    ),
    Case(
        "node hints for another node only: fall back to zone hints",
        [
            web(),
            eps("w", "web", hinted(A2, "node-1", zones=["zone-a"], nodes=["node-3"]),
                hinted(B1, "node-2", zones=["zone-b"], nodes=["node-2"]), ports=HTTP),
        ],
        [CIP + be(A2)],
    ),
    # ---- externalIPs, LoadBalancer, source ranges --------------------------------
    Case(
        "externalIPs on a ClusterIP Service",
        [web(externalIPs=["198.51.100.7"]), eps("w", "web", local(A1), remote(B1), ports=HTTP)],
        [
            CIP + be(A1, B1),
            "198.51.100.7:80/TCP  ExternalIP  default/web:http  -> " + be(A1, B1)
            + "  external -> " + be(A1, B1),
        ],
    ),
    Case(
        "LoadBalancer: ingress IP with source ranges, and its NodePort",
        [
            with_lb(web(type="LoadBalancer", node_port=30080,
                        externalTrafficPolicy="Local",
                        loadBalancerSourceRanges=["203.0.113.0/24", "2001:db8::/32"]),
                    "192.0.2.10"),
            eps("w", "web", local(A1), remote(B1), ports=HTTP),
        ],
        [
            CIP + be(A1, B1),
            NP + be(A1, B1) + "  external(Local) -> " + be(A1),
            "192.0.2.10:80/TCP  LoadBalancer  default/web:http  -> " + be(A1, B1)
            + "  external(Local) -> " + be(A1) + "  sources 203.0.113.0/24",
        ],
    ),
    Case(
        "LoadBalancer without allocated NodePorts",
        [with_lb(web(type="LoadBalancer"), "192.0.2.10"),
         eps("w", "web", remote(B1), ports=HTTP)],
        [
            CIP + be(B1),
            "192.0.2.10:80/TCP  LoadBalancer  default/web:http  -> " + be(B1)
            + "  external -> " + be(B1),
        ],
    ),
    Case(
        "load balancer IPs of a NodePort Service (stale status) are ignored",
        [with_lb(web(type="NodePort", node_port=30080), "192.0.2.10"),
         eps("w", "web", remote(B1), ports=HTTP)],
        [CIP + be(B1), NP + be(B1) + "  external -> " + be(B1)],
    ),
    # ---- affinity -----------------------------------------------------------------
    Case(
        "ClientIP affinity on every frontend of the Service",
        [
            web(type="NodePort", node_port=30080, sessionAffinity="ClientIP",
                sessionAffinityConfig={"clientIP": {"timeoutSeconds": 600}}),
            eps("w", "web", remote(B1), ports=HTTP),
        ],
        [
            CIP + be(B1) + "  affinity 600s",
            NP + be(B1) + "  external -> " + be(B1) + "  affinity 600s",
        ],
    ),
    Case(
        "ClientIP affinity defaults to three hours",
        [web(sessionAffinity="ClientIP"), eps("w", "web", remote(B1), ports=HTTP)],
        [CIP + be(B1) + "  affinity 10800s"],
    ),
    # ---- health check node port -------------------------------------------------
    Case(
        "healthCheckNodePort counts this node's endpoints",
        [
            with_lb(web(type="LoadBalancer", node_port=30080, externalTrafficPolicy="Local",
                        healthCheckNodePort=32000), "192.0.2.10"),
            eps("w", "web", local(A1), local(A2), remote(B1), ports=HTTP),
        ],
        [
            CIP + be(A1, A2, B1),
            NP + be(A1, A2, B1) + "  external(Local) -> " + be(A1, A2),
            "192.0.2.10:80/TCP  LoadBalancer  default/web:http  -> " + be(A1, A2, B1)
            + "  external(Local) -> " + be(A1, A2),
        ],
        health=["32000 default/web local-endpoints=2"],
    ),
    Case(
        "healthCheckNodePort: a node whose endpoints all terminate fails the check",
        [
            with_lb(web(type="LoadBalancer", node_port=30080, externalTrafficPolicy="Local",
                        healthCheckNodePort=32000), "192.0.2.10"),
            eps("w", "web", local(A1, ready=False, serving=True, terminating=True),
                remote(B1), ports=HTTP),
        ],
        [
            CIP + be(B1),
            # The draining pod still serves this node's Local traffic (its
            # fallback), but the load balancer must stop sending new clients.
            NP + be(B1) + "  external(Local) -> " + be(A1),
            "192.0.2.10:80/TCP  LoadBalancer  default/web:http  -> " + be(B1)
            + "  external(Local) -> " + be(A1),
        ],
        health=["32000 default/web local-endpoints=0"],
    ),
    Case(
        "healthCheckNodePort counts a pod once, whatever its ports",
        [
            service("web", port("http", 80, 8080, node_port=30080),
                    port("https", 443, 8443, node_port=30443), ips="10.96.0.1",
                    type="LoadBalancer", externalTrafficPolicy="Local",
                    healthCheckNodePort=32000),
            eps("w", "web", local(A1), ports=[eport("http", 8080), eport("https", 8443)]),
        ],
        [
            CIP + be(A1),
            NP + be(A1) + "  external(Local) -> " + be(A1),
            "10.96.0.1:443/TCP  ClusterIP  default/web:https  -> 10.244.1.2:8443/TCP",
            "10.0.0.1:30443/TCP  NodePort  default/web:https  -> 10.244.1.2:8443/TCP"
            "  external(Local) -> 10.244.1.2:8443/TCP",
        ],
        health=["32000 default/web local-endpoints=1"],
    ),
    Case(
        "healthCheckNodePort does not count endpoints of a slice labelled for another proxy",
        [
            web(type="LoadBalancer", externalTrafficPolicy="Local", healthCheckNodePort=32000,
                allocateLoadBalancerNodePorts=False),
            eps("w", "web", local(A1), ports=HTTP),
            eps("w-other", "web", local(A2), ports=HTTP,
                labels={"service.kubernetes.io/service-proxy-name": "other"}),
        ],
        [CIP + be(A1)],
        health=["32000 default/web local-endpoints=1"],
    ),
    Case(
        "healthCheckNodePort of a LoadBalancer with no address nor NodePorts yet",
        [
            web(type="LoadBalancer", externalTrafficPolicy="Local", healthCheckNodePort=32000,
                allocateLoadBalancerNodePorts=False),
            eps("w", "web", local(A1), ports=HTTP),
        ],
        [CIP + be(A1)],
        health=["32000 default/web local-endpoints=1"],
    ),
    Case(
        "no health check for a NodePort Service (kube-proxy's is for LoadBalancers)",
        [web(type="NodePort", node_port=30080, externalTrafficPolicy="Local",
             healthCheckNodePort=32000), eps("w", "web", local(A1), ports=HTTP)],
        [CIP + be(A1), NP + be(A1) + "  external(Local) -> " + be(A1)],
    ),
    Case(
        "an ipMode Proxy ingress is left to the load balancer",
        [web(type="LoadBalancer", node_port=30080)
         | {"status": {"loadBalancer": {"ingress": [
             {"ip": "192.0.2.10", "ipMode": "Proxy"}, {"ip": "192.0.2.11", "ipMode": "VIP"},
             {"ip": ""}, {"hostname": "lb.example"}]}}},
         eps("w", "web", local(A1), ports=HTTP)],
        [
            CIP + be(A1),
            NP + be(A1) + "  external -> " + be(A1),
            "192.0.2.11:80/TCP  LoadBalancer  default/web:http  -> " + be(A1)
            + "  external -> " + be(A1),
        ],
    ),
    # Neither listing is ready; the serving-and-terminating one is not used as
    # a fallback for an address a new, unready pod now holds (either order).
    *(Case(
        "an address in two slices: the running pod, not the terminating one it replaced"
        f" ({order})",
        [web(),
         eps(old, "web", local(A1, ready=False, serving=True, terminating=True), ports=HTTP),
         eps(new, "web", local(A1, ready=False, serving=False), ports=HTTP)],
        [CIP + "(none: refuse)"],
    ) for order, old, new in (("terminating slice first", "a-old", "b-new"),
                              ("running slice first", "b-old", "a-new"))),
    Case(
        "loadBalancerSourceRanges and externalIPs with leading zeros read as decimal",
        [with_lb(web(type="LoadBalancer", node_port=30080,
                     loadBalancerSourceRanges=["010.000.0.0/8"],
                     externalIPs=["203.000.113.007"]), "192.0.2.10"),
         eps("w", "web", local(A1), ports=HTTP)],
        [
            CIP + be(A1),
            NP + be(A1) + "  external -> " + be(A1),
            "203.0.113.7:80/TCP  ExternalIP  default/web:http  -> " + be(A1)
            + "  external -> " + be(A1),
            "192.0.2.10:80/TCP  LoadBalancer  default/web:http  -> " + be(A1)
            + "  external -> " + be(A1) + "  sources 10.0.0.0/8",
        ],
    ),
    Case(
        "no health check for policy Cluster",
        [web(type="NodePort", node_port=30080, healthCheckNodePort=32000),
         eps("w", "web", local(A1), ports=HTTP)],
        [CIP + be(A1), NP + be(A1) + "  external -> " + be(A1)],
    ),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_policies(case: Case) -> None:
    state = compute_desired(ClusterSnapshot.of(models(*case.objects)), NODE, case.config)
    got = sorted(render_frontend(f) for f in state.frontends.values())
    assert got == sorted(case.lines), case.name
    health = [f"{h.port} {h.namespace}/{h.name} local-endpoints={h.local_endpoints}"
              for h in state.health_checks]
    assert health == case.health


def test_dual_stack_nodeport_answers_on_both_families() -> None:
    svc = service("web", port("http", 80, 8080, node_port=30080),
                  ips=["10.96.0.1", "fd00:96::1"], type="NodePort",
                  ipFamilyPolicy="RequireDualStack")
    objects = [
        svc,
        eps("w4", "web", local(A1), ports=HTTP),
        eps("w6", "web", local("fd00:10:244:1::2"), ports=HTTP),
    ]
    state = compute_desired(ClusterSnapshot.of(models(*objects)), NODE, ComputeConfig())
    assert sorted(str(k) for k in state.frontends) == sorted([
        "10.96.0.1:80/TCP", "[fd00:96::1]:80/TCP", "10.0.0.1:30080/TCP", "[fd00::1]:30080/TCP",
    ])
    v6 = state.frontends[next(k for k in state.frontends if str(k) == "[fd00::1]:30080/TCP")]
    assert [str(b) for b in v6.backends] == ["[fd00:10:244:1::2]:8080/TCP"]
    # NodePorts are not Service VIPs: the node's own address must not refuse other ports.
    assert {str(v) for v in state.vips} == {"10.96.0.1", "fd00:96::1"}



def test_an_address_listed_twice_is_one_frontend_not_a_conflict() -> None:
    """A repeated externalIP or LoadBalancer ingress IP (the API server takes
    both) gives its frontend once, without the Service conflicting with
    itself; with or without the compute cache."""
    from agent.compute.desired import ComputeCache

    objects = [
        with_lb(web(type="LoadBalancer", node_port=30080,
                    externalIPs=["198.51.100.7", "198.51.100.7"]), "192.0.2.10", "192.0.2.10"),
        eps("w", "web", remote(B1), ports=HTTP),
    ]
    for cache in (None, ComputeCache()):
        state = compute_desired(ClusterSnapshot.of(models(*objects)), NODE, ComputeConfig(),
                                cache=cache)
        assert state.problems == ()
        assert sorted(render_frontend(f) for f in state.frontends.values()) == sorted([
            CIP + be(B1),
            NP + be(B1) + "  external -> " + be(B1),
            "198.51.100.7:80/TCP  ExternalIP  default/web:http  -> " + be(B1)
            + "  external -> " + be(B1),
            "192.0.2.10:80/TCP  LoadBalancer  default/web:http  -> " + be(B1)
            + "  external -> " + be(B1),
        ])


def test_an_external_ip_that_is_also_the_lb_ip_is_the_lb_frontend() -> None:
    """An externalIP that is also the Service's LoadBalancer IP (mapped or
    not) is one frontend, the LoadBalancer's, whose source ranges apply, as
    in kube-proxy's nftables mode; not a conflict of the Service with
    itself. A mapped externalIP of another address is that IPv4 address."""
    svc = with_lb(web(type="LoadBalancer", node_port=30080,
                      externalIPs=["192.0.2.10", "::ffff:192.0.2.10", "::ffff:198.51.100.7"],
                      loadBalancerSourceRanges=["203.0.113.0/24"]), "192.0.2.10")
    state = compute_desired(ClusterSnapshot.of(models(svc, eps("w", "web", remote(B1),
                                                                  ports=HTTP))),
                            NODE, ComputeConfig())
    assert state.problems == ()
    kinds = {str(k): f.kind.value for k, f in state.frontends.items()}
    assert kinds == {"10.96.0.1:80/TCP": "ClusterIP", "10.0.0.1:30080/TCP": "NodePort",
                     "192.0.2.10:80/TCP": "LoadBalancer", "198.51.100.7:80/TCP": "ExternalIP"}
    lb = next(f for k, f in state.frontends.items() if str(k) == "192.0.2.10:80/TCP")
    assert [str(r) for r in lb.source_ranges] == ["203.0.113.0/24"]


def split_to(*entries: tuple[str, int]) -> Doc:
    return {"apiVersion": "veer.dev/v1alpha1", "kind": "TrafficPolicy",
            "metadata": {"name": "tp", "namespace": "default"},
            "spec": {"targetRefs": [{"name": "web"}],
                     "split": [{"service": n, "weight": w} for n, w in entries]}}


V6_POD = "fd00:10:244:2::2"
V6 = service("v6", port("http", 80, 8080), ips="fd00:96::6")
V6_EPS = eps("v6-1", "v6", remote(V6_POD), ports=HTTP)
V4 = service("v4", port("http", 80, 8080), ips="10.96.0.4")


@pytest.mark.parametrize(("name", "objects", "problems", "backends"), [
    ("IPv4 target split only to an IPv6 Service: reported",
     [web(), split_to(("v6", 1)), V6, V6_EPS],
     ["SplitFamilyMissing: split Service v6 has no IPv4 ClusterIP: the Service's IPv4 "
      "frontends get no backends and refuse connections"],
     {"10.96.0.1:80/TCP": "(none: refuse)"}),
    ("dual-stack target split to an IPv6 Service: its IPv4 family reported, IPv6 served",
     [service("web", port("http", 80, 8080), ips=["10.96.0.1", "fd00:96::1"],
              ipFamilyPolicy="RequireDualStack"), split_to(("v6", 1)), V6, V6_EPS],
     ["SplitFamilyMissing: split Service v6 has no IPv4 ClusterIP: the Service's IPv4 "
      "frontends get no backends and refuse connections"],
     {"10.96.0.1:80/TCP": "(none: refuse)", "[fd00:96::1]:80/TCP": f"[{V6_POD}]:8080/TCP"}),
    ("every split Service of the family lacks it: all named",
     [web(), split_to(("v6", 1), ("v6b", 2)), V6, V6_EPS,
      service("v6b", port("http", 80, 8080), ips="fd00:96::7")],
     ["SplitFamilyMissing: split Services v6, v6b have no IPv4 ClusterIP: the Service's "
      "IPv4 frontends get no backends and refuse connections"],
     {"10.96.0.1:80/TCP": "(none: refuse)"}),
], ids=["ipv4-target", "dual-stack-target", "every-split-service-named"])
def test_a_split_to_services_without_the_family_is_reported(
    name: str, objects: list[Doc], problems: list[str], backends: dict[str, str]
) -> None:
    assert split_outcome(objects) == (problems, backends), name


def test_a_split_service_of_the_family_without_endpoints_is_not_that_problem() -> None:
    """No endpoint of the family right now is an ordinary, passing state (pods
    starting, a rollout): only a split that cannot have one is reported."""
    refuse = {"10.96.0.1:80/TCP": "(none: refuse)"}
    missing, _ = split_outcome([web(), split_to(("v6", 1)), V6, V6_EPS])
    assert [m.partition(":")[0] for m in missing] == ["SplitFamilyMissing"]
    # v4 has the family but no endpoint yet: the same refusal, not reported.
    assert split_outcome([web(), split_to(("v6", 1), ("v4", 1)), V6, V6_EPS, V4]) == (
        [], refuse)
    # Only a drained (weight 0) split Service lacks the family.
    assert split_outcome([web(), split_to(("v6", 0), ("v4", 1)), V6, V6_EPS, V4,
                          eps("v4-1", "v4", remote(B1), ports=HTTP)]) == (
        [], {"10.96.0.1:80/TCP": be(B1)})


def split_outcome(objects: list[Doc]) -> tuple[list[str], dict[str, str]]:
    """web's problems ("reason: message") and its frontends' backends as
    rendered, the same with and without the compute cache."""
    from agent.compute.desired import ComputeCache

    outcomes = []
    for cache in (None, ComputeCache()):
        state = compute_desired(ClusterSnapshot.of(models(*objects)), NODE, ComputeConfig(),
                                cache=cache)
        problems = [f"{p.reason}: {p.message}" for p in state.problems
                    if (p.namespace, p.name) == ("default", "web")]
        backends = {str(k): render_frontend(f).partition("  -> ")[2].partition("  policy")[0]
                    for k, f in state.frontends.items() if f.service.name == "web"}
        outcomes.append((problems, backends))
    assert outcomes[0] == outcomes[1]
    return outcomes[0]

def test_the_compute_cache_changes_the_time_not_the_result(monkeypatch: Any) -> None:
    """With a ComputeCache, compute_desired recomputes only the Services whose
    inputs (the objects themselves) changed, and returns what a fresh
    computation returns, conflicts between Services included."""
    import agent.compute.desired as desired_mod
    from agent.compute.desired import ComputeCache, compute_desired
    from agent.compute.render import render_desired
    from agent.compute.types import ComputeConfig, NodeIdentity
    from agent.model.parse import parse_object
    from agent.model.snapshot import ClusterSnapshot

    def svc(name: str, ip: str) -> dict[str, Any]:
        return {"apiVersion": "v1", "kind": "Service",
                "metadata": {"name": name, "namespace": "default"},
                "spec": {"clusterIP": ip, "ports": [{"name": "http", "protocol": "TCP",
                                                     "port": 80, "targetPort": 8080}]}}

    def eps(name: str, ip: str) -> dict[str, Any]:
        return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": f"{name}-1", "namespace": "default",
                             "labels": {"kubernetes.io/service-name": name}},
                "addressType": "IPv4", "ports": [{"name": "http", "protocol": "TCP",
                                                  "port": 8080}],
                "endpoints": [{"addresses": [ip], "conditions": {"ready": True}}]}

    objects = {f"s{i}": parse_object(svc(f"s{i}", f"10.96.0.{i + 1}")) for i in range(5)}
    objects |= {f"e{i}": parse_object(eps(f"s{i}", f"10.244.0.{i + 1}")) for i in range(5)}
    # s5 claims s0's address: a conflict the first Service by name wins.
    objects["s5"] = parse_object(svc("s5", "10.96.0.1"))
    calls: list[str] = []
    real = desired_mod._one_service

    def counting(snapshot: Any, s: Any, *args: Any) -> Any:
        calls.append(s.meta.name)
        return real(snapshot, s, *args)

    monkeypatch.setattr(desired_mod, "_one_service", counting)
    node, config, cache = NodeIdentity("node-1"), ComputeConfig(), ComputeCache()
    first = compute_desired(ClusterSnapshot.of(objects.values()), node, config, cache)
    assert sorted(calls) == ["s0", "s1", "s2", "s3", "s4", "s5"]
    calls.clear()
    objects["e3"] = parse_object(eps("s3", "10.244.9.9"))  # one Service's endpoints change
    snapshot = ClusterSnapshot.of(objects.values())
    second = compute_desired(snapshot, node, config, cache)
    assert calls == ["s3"]
    assert render_desired(second) == render_desired(compute_desired(snapshot, node, config))
    assert render_desired(second) != render_desired(first)
    assert "FrontendConflict" in render_desired(second)
    calls.clear()
    compute_desired(snapshot, NodeIdentity("node-2"), config, cache)  # another node: all again
    assert len(calls) == 6
