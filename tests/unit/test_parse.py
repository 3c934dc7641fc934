"""agent.model.parse: Kubernetes dicts -> the typed model.

Every field kube-proxy reads must survive parsing; unknown fields are
ignored; malformed input raises ModelError naming the object and the field.
"""

from __future__ import annotations

import copy
from ipaddress import ip_address, ip_network
from typing import Any

import pytest
from builders import ep, eport, eps, port, service

from agent.errors import ModelError
from agent.model.objects import (
    AccessAction,
    AccessPolicy,
    AccessRule,
    AffinityOverride,
    Algorithm,
    Endpoint,
    EndpointHints,
    EndpointPort,
    EndpointSlice,
    IPFamily,
    Node,
    NodeAddress,
    ObjectMeta,
    ObjectRef,
    Protocol,
    Redirect,
    RedirectMode,
    Service,
    ServicePort,
    ServiceType,
    SessionAffinity,
    SplitEntry,
    TrafficPolicy,
    TrafficPolicyKind,
)
from agent.model.parse import (
    _endpoints_checked,
    _endpoints_fast,
    _Fields,
    parse_endpoint_slice,
    parse_ip,
    parse_node,
    parse_object,
    parse_service,
    parse_traffic_policy,
)

# ---- addresses ----------------------------------------------------------------

# The fast IPv4 path must accept and refuse exactly what ipaddress does
# (but for the legacy forms and zones below).
ADDRESS_TEXTS = [
    "10.244.1.17", "0.0.0.0", "255.255.255.255", "fd00::1", "::ffff:10.0.0.1", "::",
    "1.2.3", "1", "0x1.2.3.4", "256.1.1.1", "1.2.3.-1",
    " 1.2.3.4", "1.2.3.4 ", "1.2.3.4\n", "1.2.3.4\x00", "1.2.3.4.5", "1.2.3.4/32",
    "\uff11.2.3.4", "1.2.3.\u0664", "", "fd00::g", "10.0.0.1%eth0",
]


@pytest.mark.parametrize(("text", "expected"), [
    ("01.2.3.4", "1.2.3.4"), ("1.2.3.04", "1.2.3.4"), ("010.096.000.001", "10.96.0.1"),
    ("0010.0.0.1", "10.0.0.1"),
])
def test_legacy_ipv4_octets_read_as_decimal(text: str, expected: str) -> None:
    """The API server accepts leading zeros (with a warning) where it does not
    allocate the address itself; kube-proxy reads them as decimal."""
    assert parse_ip(text) == ip_address(expected)


@pytest.mark.parametrize("text", ["010.0.0.256", "00001.0.0.1", "1.2.3.4.05", "fe80::1%eth0",
                                  "fd00::1%1"])
def test_what_kubernetes_refuses_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_ip(text)


@pytest.mark.parametrize("text", ADDRESS_TEXTS)
def test_parse_ip_agrees_with_ipaddress(text: str) -> None:
    try:
        expected = ip_address(text)
    except ValueError:
        with pytest.raises(ValueError):
            parse_ip(text)
        return
    got = parse_ip(text)
    assert (got, type(got)) == (expected, type(expected))


# ---- Service ----------------------------------------------------------------

FULL_SERVICE: dict[str, Any] = {
    "apiVersion": "v1",
    "kind": "Service",
    "metadata": {
        "name": "web",
        "namespace": "shop",
        "uid": "0b7c-uid",
        "resourceVersion": "4711",
        "generation": 3,
        "creationTimestamp": "2024-05-01T10:00:00Z",
        "labels": {"app": "web", "service.kubernetes.io/service-proxy-name": "veer"},
        "annotations": {"note": "kept"},
        "managedFields": [{"manager": "kubectl"}],  # unknown to veer: ignored
    },
    "spec": {
        "type": "LoadBalancer",
        "clusterIP": "10.96.0.10",
        "clusterIPs": ["10.96.0.10", "fd00:96::10"],
        "ipFamilies": ["IPv4", "IPv6"],
        "ipFamilyPolicy": "RequireDualStack",
        "ports": [
            {"name": "http", "protocol": "TCP", "port": 80, "targetPort": "http",
             "nodePort": 30080, "appProtocol": "kubernetes.io/h2c"},
            {"name": "dns", "protocol": "UDP", "port": 53, "targetPort": 9053,
             "nodePort": 30053},
            {"name": "metrics", "protocol": "TCP", "port": 9100, "targetPort": "9101"},
            {"name": "sig", "protocol": "SCTP", "port": 3868},
        ],
        "externalIPs": ["192.0.2.10", "2001:db8::10"],
        "loadBalancerSourceRanges": ["198.51.100.0/24", " 2001:db8:1::/48 "],
        "externalTrafficPolicy": "Local",
        "internalTrafficPolicy": "Local",
        "healthCheckNodePort": 32000,
        "sessionAffinity": "ClientIP",
        "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 600}},
        "trafficDistribution": "PreferClose",
        "publishNotReadyAddresses": True,
        "selector": {"app": "web"},  # unknown to veer: ignored
        "allocateLoadBalancerNodePorts": True,  # unknown to veer: ignored
        "someFutureField": {"x": [1, 2]},
    },
    "status": {
        "loadBalancer": {
            "ingress": [
                {"ip": "203.0.113.7", "ipMode": "VIP"},
                {"hostname": "lb.example.com"},  # no ip: nothing to program
                {"ip": "2001:db8::7"},
            ]
        },
        "conditions": [],
    },
}


def test_service_keeps_every_field_kube_proxy_uses() -> None:
    assert parse_service(FULL_SERVICE) == Service(
        meta=ObjectMeta(
            name="web",
            namespace="shop",
            uid="0b7c-uid",
            resource_version="4711",
            generation=3,
            creation_timestamp="2024-05-01T10:00:00Z",
            labels={"app": "web", "service.kubernetes.io/service-proxy-name": "veer"},
            annotations={"note": "kept"},
        ),
        type=ServiceType.LOAD_BALANCER,
        cluster_ips=(ip_address("10.96.0.10"), ip_address("fd00:96::10")),
        headless=False,
        ip_families=(IPFamily.IPV4, IPFamily.IPV6),
        ip_family_policy="RequireDualStack",
        ports=(
            ServicePort("http", Protocol.TCP, 80, "http", 30080, "kubernetes.io/h2c"),
            ServicePort("dns", Protocol.UDP, 53, 9053, 30053),
            ServicePort("metrics", Protocol.TCP, 9100, 9101),
            ServicePort("sig", Protocol.SCTP, 3868, 3868),
        ),
        external_ips=(ip_address("192.0.2.10"), ip_address("2001:db8::10")),
        load_balancer_ips=(ip_address("203.0.113.7"), ip_address("2001:db8::7")),
        load_balancer_source_ranges=(
            ip_network("198.51.100.0/24"),
            ip_network("2001:db8:1::/48"),
        ),
        external_traffic_policy=TrafficPolicyKind.LOCAL,
        internal_traffic_policy=TrafficPolicyKind.LOCAL,
        health_check_node_port=32000,
        session_affinity=SessionAffinity.CLIENT_IP,
        session_affinity_timeout=600,
        traffic_distribution="PreferClose",
        publish_not_ready_addresses=True,
    )


def test_service_defaults() -> None:
    """What the API server would have defaulted, for a minimal manifest."""
    svc = parse_service(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "min"},
            "spec": {"clusterIP": "10.96.0.5", "ports": [{"port": 80}]},
        }
    )
    assert svc.meta.namespace == "default"
    assert svc.ref == ObjectRef("Service", "default", "min")
    assert svc.type == ServiceType.CLUSTER_IP
    assert svc.cluster_ips == (ip_address("10.96.0.5"),)
    assert not svc.headless
    assert svc.ports == (ServicePort("", Protocol.TCP, 80, 80),)
    assert svc.external_traffic_policy == TrafficPolicyKind.CLUSTER
    assert svc.internal_traffic_policy == TrafficPolicyKind.CLUSTER
    assert svc.session_affinity == SessionAffinity.NONE
    assert svc.session_affinity_timeout == 10800
    assert svc.ip_family_policy == "SingleStack"
    assert svc.traffic_distribution == ""
    assert svc.external_ips == svc.load_balancer_ips == ()
    assert dict(svc.meta.labels) == dict(svc.meta.annotations) == {}


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        pytest.param(8080, 8080, id="int"),
        pytest.param("http-alt", "http-alt", id="named"),
        pytest.param("8080", 8080, id="numeric-string"),
        pytest.param(None, 443, id="absent-defaults-to-port"),
        pytest.param(0, 443, id="zero-defaults-to-port"),
        pytest.param("", 443, id="empty-defaults-to-port"),
    ],
)
def test_service_target_port(target: int | str | None, expected: int | str) -> None:
    svc = parse_service(service("web", port("https", 443, target)))
    assert svc.ports[0].target_port == expected


@pytest.mark.parametrize(
    ("spec", "headless", "cluster_ips"),
    [
        pytest.param({"clusterIP": "None"}, True, (), id="headless-clusterIP"),
        pytest.param({"clusterIP": "None", "clusterIPs": ["None"]}, True, (), id="headless-both"),
        pytest.param({"clusterIP": "10.96.0.7"}, False, ("10.96.0.7",), id="clusterIP-only"),
        pytest.param(
            {"clusterIPs": ["fd00:96::7", "10.96.0.7"]},
            False,
            ("fd00:96::7", "10.96.0.7"),
            id="dual-stack-v6-primary",
        ),
        pytest.param(
            {"clusterIP": "10.96.0.7", "clusterIPs": []}, False, ("10.96.0.7",),
            id="empty-clusterIPs-falls-back",
        ),
        pytest.param({}, False, (), id="not-allocated"),
        pytest.param(
            {"type": "ExternalName", "externalName": "db.example.com", "clusterIP": "10.96.0.8"},
            False,
            (),
            id="external-name-has-no-cluster-ip",
        ),
    ],
)
def test_service_cluster_ips(
    spec: dict[str, Any], headless: bool, cluster_ips: tuple[str, ...]
) -> None:
    svc = parse_service(
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"}, "spec": spec}
    )
    assert svc.headless is headless
    assert svc.cluster_ips == tuple(ip_address(ip) for ip in cluster_ips)


def test_external_name_keeps_its_name() -> None:
    svc = parse_service(service("db", ips=(), type="ExternalName", externalName="db.example.com"))
    assert svc.type == ServiceType.EXTERNAL_NAME
    assert svc.external_name == "db.example.com"


# ---- EndpointSlice ------------------------------------------------------------


def test_endpoint_slice_keeps_every_field_kube_proxy_uses() -> None:
    doc = eps(
        "web-abc",
        "web",
        ep("10.244.1.2", ready=True, serving=True, terminating=False, node="node-1",
           zone="zone-a", hostname="web-0",
           hints={"forZones": [{"name": "zone-a"}], "forNodes": [{"name": "node-1"}]},
           targetRef={"kind": "Pod", "name": "web-0"}),
        ep("10.244.2.2", ready=False, serving=True, terminating=True, node="node-2",
           zone="zone-b"),
        ports=[
            {"name": "http", "protocol": "TCP", "port": 8080, "appProtocol": "http"},
            eport("dns", 9053, "UDP"),
            eport("all", None, None),
        ],
        ns="shop",
        labels={"endpointslice.kubernetes.io/managed-by": "endpointslice-controller"},
    )
    doc["metadata"]["ownerReferences"] = [{"kind": "Service", "name": "web"}]
    s = parse_endpoint_slice(doc)
    assert s.ref == ObjectRef("EndpointSlice", "shop", "web-abc")
    assert s.service_name == "web"
    assert s.address_type == "IPv4"
    assert s.endpoints == (
        Endpoint(
            addresses=(ip_address("10.244.1.2"),),
            ready=True,
            serving=True,
            terminating=False,
            node_name="node-1",
            zone="zone-a",
            hostname="web-0",
            hints=EndpointHints(for_zones=("zone-a",), for_nodes=("node-1",)),
        ),
        Endpoint(
            addresses=(ip_address("10.244.2.2"),),
            ready=False,
            serving=True,
            terminating=True,
            node_name="node-2",
            zone="zone-b",
        ),
    )
    assert s.ports == (
        EndpointPort("http", 8080, Protocol.TCP, "http"),
        EndpointPort("dns", 9053, Protocol.UDP),
        EndpointPort("all", None, Protocol.TCP),
    )


@pytest.mark.parametrize(
    ("conditions", "expected"),
    [
        # (ready, serving, terminating)
        pytest.param({}, (True, True, False), id="all-absent"),
        pytest.param({"ready": True}, (True, True, False), id="ready"),
        # The API: "A nil value should be interpreted as true" (not-ready and
        # not terminating is unused all the same).
        pytest.param({"ready": False}, (False, True, False), id="not-ready:serving-absent"),
        pytest.param({"ready": False, "terminating": True}, (False, True, True),
                     id="terminating:serving-absent-is-a-fallback"),
        pytest.param({"serving": False}, (True, False, False), id="serving-false-ready-absent"),
        pytest.param(
            {"ready": False, "serving": True, "terminating": True},
            (False, True, True),
            id="serving-terminating",
        ),
        pytest.param(
            {"ready": False, "serving": False, "terminating": True},
            (False, False, True),
            id="terminating-not-serving",
        ),
        pytest.param({"ready": None, "terminating": None}, (True, True, False), id="nulls"),
    ],
)
def test_endpoint_condition_defaults(
    conditions: dict[str, Any], expected: tuple[bool, bool, bool]
) -> None:
    doc = eps("s", "svc", {"addresses": ["10.244.1.2"], "conditions": conditions})
    e = parse_endpoint_slice(doc).endpoints[0]
    assert (e.ready, e.serving, e.terminating) == expected


def test_endpoint_without_conditions_is_ready() -> None:
    e = parse_endpoint_slice(eps("s", "svc", ep("10.244.1.2"))).endpoints[0]
    assert (e.ready, e.serving, e.terminating, e.hints) == (True, True, False, None)


def test_endpoint_slice_without_service_label_and_fqdn() -> None:
    s = parse_endpoint_slice(
        eps("ext", None, {"addresses": ["db.example.com"]}, address_type="FQDN")
    )
    assert s.service_name == ""
    assert s.address_type == "FQDN"
    assert s.endpoints[0].addresses == ()  # FQDN endpoints carry no IPs
    assert s.endpoints[0].ready


def test_ipv6_endpoint_slice() -> None:
    s = parse_endpoint_slice(eps("v6", "web", ep("fd00:10:244:1::2")))
    assert s.address_type == "IPv6"
    assert s.endpoints[0].addresses == (ip_address("fd00:10:244:1::2"),)


def test_mapped_ipv4_addresses_are_read_as_ipv4() -> None:
    """The API server accepts ::ffff:a.b.c.d where an IPv4 address may go
    (Go's net.IP holds both alike); kube-proxy reads it as a.b.c.d."""
    four = ip_address("10.244.1.2")
    s = parse_endpoint_slice(eps("v4", "web", ep("::ffff:10.244.1.2"), address_type="IPv4"))
    assert s.endpoints[0].addresses == (four,)
    doc = service("web", port("http", 80, 8080), ips="10.96.0.1", type="LoadBalancer",
                  externalIPs=["::ffff:198.51.100.7"])
    doc["status"] = {"loadBalancer": {"ingress": [{"ip": "::ffff:192.0.2.10"}]}}
    svc = parse_service(doc)
    assert svc.external_ips == (ip_address("198.51.100.7"),)
    assert svc.load_balancer_ips == (ip_address("192.0.2.10"),)
    # A plain IPv6 address stays IPv6; a mapped one in an IPv6 slice is
    # IPv4, so the slice is refused (as the API server refuses it).
    assert parse_endpoint_slice(eps("v6", "web", ep("fd00::2"))).endpoints[0].addresses == (
        ip_address("fd00::2"),)
    with pytest.raises(ModelError):
        parse_endpoint_slice(eps("v6", "web", ep("::ffff:10.244.1.2"), address_type="IPv6"))


# ---- Node -----------------------------------------------------------------------


def test_node() -> None:
    n = parse_node(
        {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": "node-1", "labels": {"topology.kubernetes.io/zone": "zone-a"}},
            "spec": {
                "podCIDR": "10.244.1.0/24",
                "podCIDRs": ["10.244.1.0/24", "fd00:10:244:1::/64"],
            },
            "status": {
                "addresses": [
                    {"type": "InternalIP", "address": "10.0.0.1"},
                    {"type": "Hostname", "address": "node-1"},
                ],
                "capacity": {"cpu": "4"},
            },
        }
    )
    assert n == Node(
        meta=ObjectMeta(name="node-1", labels={"topology.kubernetes.io/zone": "zone-a"}),
        addresses=(NodeAddress("InternalIP", "10.0.0.1"), NodeAddress("Hostname", "node-1")),
        pod_cidrs=(ip_network("10.244.1.0/24"), ip_network("fd00:10:244:1::/64")),
    )
    assert n.zone == "zone-a"
    assert n.ref == ObjectRef("Node", "", "node-1")
    assert str(n.ref) == "Node/node-1"


def test_node_single_pod_cidr_and_no_zone() -> None:
    n = parse_node(
        {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n", "namespace": "ignored"},
         "spec": {"podCIDR": "10.244.3.0/24"}}
    )
    assert n.pod_cidrs == (ip_network("10.244.3.0/24"),)
    assert n.zone == ""
    assert n.meta.namespace == ""  # cluster-scoped


# ---- TrafficPolicy ----------------------------------------------------------------

FULL_POLICY: dict[str, Any] = {
    "apiVersion": "veer.dev/v1alpha1",
    "kind": "TrafficPolicy",
    "metadata": {"name": "web-policy", "namespace": "shop", "generation": 2},
    "spec": {
        "targetRefs": [{"kind": "Service", "name": "web"}, {"name": "web-canary"}],
        "loadBalancing": {
            "algorithm": "Maglev",
            "sessionAffinity": {"type": "ClientIP", "timeoutSeconds": 300},
        },
        "split": [{"service": "web", "weight": 90}, {"service": "web-canary", "weight": 10}],
        "access": {
            "defaultAction": "Deny",
            "rules": [{"action": "Allow", "sources": ["10.244.0.0/16", "fd00:10:244::/48"]}],
        },
        "redirect": {"port": 15001, "mode": "TPROXY"},
        "acceleration": {"sockmap": True},
    },
    "status": {"conditions": [{"type": "Accepted"}]},
}


def test_traffic_policy_keeps_every_field() -> None:
    assert parse_traffic_policy(FULL_POLICY) == TrafficPolicy(
        meta=ObjectMeta(name="web-policy", namespace="shop", generation=2),
        target_refs=("web", "web-canary"),
        algorithm=Algorithm.MAGLEV,
        session_affinity=AffinityOverride(SessionAffinity.CLIENT_IP, 300),
        split=(SplitEntry("web", 90), SplitEntry("web-canary", 10)),
        access=AccessPolicy(
            AccessAction.DENY,
            (AccessRule(AccessAction.ALLOW,
                        (ip_network("10.244.0.0/16"), ip_network("fd00:10:244::/48"))),),
        ),
        redirect=Redirect(15001, RedirectMode.TPROXY),
        sockmap=True,
    )


def test_traffic_policy_defaults() -> None:
    p = parse_traffic_policy(
        {"apiVersion": "veer.dev/v1alpha1", "kind": "TrafficPolicy",
         "metadata": {"name": "p"}, "spec": {"targetRefs": [{"name": "web"}]}}
    )
    assert p == TrafficPolicy(meta=ObjectMeta(name="p", namespace="default"), target_refs=("web",))
    assert p.algorithm == Algorithm.RANDOM and p.sockmap is False



def _rule_sources(*sources: str) -> dict[str, Any]:
    doc = copy.deepcopy(FULL_POLICY)
    doc["spec"]["access"]["rules"] = [{"action": "Allow", "sources": list(sources)}]
    return doc


# What Go's netip.ParsePrefix (the CRD's CEL cidr()) makes of each, checked
# with Go 1.26; Kubernetes' CEL library also refuses IPv4-mapped addresses.
GO_ACCEPTS = {
    "10.0.0.0/8": "10.0.0.0/8", "0.0.0.0/0": "0.0.0.0/0", "::/0": "::/0",
    "FD00::/64": "fd00::/64", "fd00:0000::/64": "fd00::/64", "::1.2.3.0/120": "::102:300/120",
}
GO_REFUSES = {
    "10.0.0.0/255.0.0.0": "not a netmask", "10.0.0.0/0.255.255.255": "not a netmask",
    "10.0.0.0/08": "no leading zero", "10.0.0.0/00": "no leading zero",
    "fd00::/+64": "decimal", "10.0.0.0/\uff18": "decimal", "fd00::/64 ": "decimal",
    "fe80::%eth0/64": "zone", "::ffff:10.0.0.0/104": "IPv4-mapped",
    "::ffff:0:0/96": "IPv4-mapped", "010.0.0.0/8": "does not appear", "10.0.0.0/33": "more than 32",
    "10.1.2.3/8": "host bits",
}


def test_access_rule_cidrs_are_read_as_the_crd_reads_them() -> None:
    """spec.access.rules[].sources: what the API server refuses, a manifest
    directory refuses too, saying why (Python's ip_network alone takes
    netmasks, leading zeros, zones and IPv4-mapped addresses)."""
    accepted = parse_traffic_policy(_rule_sources(*GO_ACCEPTS))
    assert accepted.access is not None
    assert [str(n) for n in accepted.access.rules[0].sources] == list(GO_ACCEPTS.values())
    for text, why in GO_REFUSES.items():
        with pytest.raises(ModelError) as refused:
            parse_traffic_policy(_rule_sources("10.0.0.0/8", text))
        assert refused.value.field == "spec.access.rules[0].sources[1]", text
        assert why in str(refused.value), (text, str(refused.value))
    # loadBalancerSourceRanges stay as sloppy as kube-proxy reads them.
    svc = service("web", port("http", 80), loadBalancerSourceRanges=["010.0.0.0/08"])
    assert parse_service(svc).load_balancer_source_ranges == (ip_network("10.0.0.0/8"),)

# ---- parse_object dispatch ------------------------------------------------------


@pytest.mark.parametrize(
    ("doc", "cls"),
    [
        pytest.param(service("web", port("http", 80)), Service, id="Service"),
        pytest.param(eps("web-1", "web", ep("10.244.1.2")), EndpointSlice, id="EndpointSlice"),
        pytest.param({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n"}}, Node,
                     id="Node"),
        pytest.param(FULL_POLICY, TrafficPolicy, id="TrafficPolicy"),
        pytest.param({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"},
                      "data": {"k": "v"}}, None, id="ConfigMap"),
        pytest.param({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"}},
                     None, id="Deployment"),
        # A kind of the same name in another API group is not ours.
        pytest.param({"apiVersion": "example.com/v1", "kind": "Service",
                      "metadata": {"name": "x"}}, None, id="Service-of-another-group"),
        pytest.param({"apiVersion": "v1", "kind": "Endpoints", "metadata": {"name": "e"}},
                     None, id="legacy-Endpoints"),
    ],
)
def test_parse_object_dispatch(doc: dict[str, Any], cls: type | None) -> None:
    obj = parse_object(doc)
    if cls is None:
        assert obj is None
    else:
        assert isinstance(obj, cls)


@pytest.mark.parametrize(
    ("doc", "obj", "field"),
    [
        pytest.param({"apiVersion": "v1", "metadata": {"name": "x"}}, "object/x", "kind",
                     id="no-kind"),
        pytest.param({"kind": "Service", "metadata": {"name": "x", "namespace": "ns"}},
                     "Service/ns/x", "apiVersion", id="no-apiVersion"),
        pytest.param({"apiVersion": "v1", "kind": "", "metadata": {"name": "x"}}, "object/x",
                     "kind", id="empty-kind"),
        pytest.param(["not", "an", "object"], "object", ".", id="not-a-mapping"),
    ],
)
def test_parse_object_rejects(doc: Any, obj: str, field: str) -> None:
    with pytest.raises(ModelError) as info:
        parse_object(doc)
    assert (info.value.obj, info.value.field) == (obj, field)


# ---- malformed objects -------------------------------------------------------------


def _svc(**spec: Any) -> dict[str, Any]:
    base = service("web", port("http", 80, 8080), port("dns", 53, 9053, "UDP"))
    base["spec"].update(spec)
    return base


def _with(doc: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A deep copy of `doc` with the dotted `path` (list indexes as numbers) set."""
    out = copy.deepcopy(doc)
    *parents, last = path.split(".")
    cur: Any = out
    for key in parents:
        cur = cur[int(key)] if isinstance(cur, list) else cur.setdefault(key, {})
    if isinstance(cur, list):
        cur[int(last)] = value
    elif value is _DELETE:
        del cur[last]
    else:
        cur[last] = value
    return out


_DELETE = object()
SVC = _svc()
SLICE = eps("web-1", "web", ep("10.244.1.2"), ep("10.244.1.3"), ports=[eport("http", 8080)])
NODE = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-1"}}
POLICY = {"apiVersion": "veer.dev/v1alpha1", "kind": "TrafficPolicy",
          "metadata": {"name": "p", "namespace": "shop"},
          "spec": {"targetRefs": [{"name": "web"}]}}

MALFORMED = [
    # (id, document, expected obj, expected field)
    ("port-out-of-range", _with(SVC, "spec.ports.1.port", 70000),
     "Service/default/web", "spec.ports[1].port"),
    ("port-missing", _with(SVC, "spec.ports.1", {"name": "dns", "protocol": "UDP"}),
     "Service/default/web", "spec.ports[1].port"),
    ("port-is-string", _with(SVC, "spec.ports.0.port", "80"),
     "Service/default/web", "spec.ports[0].port"),
    ("port-is-bool", _with(SVC, "spec.ports.0.port", True),
     "Service/default/web", "spec.ports[0].port"),
    ("protocol-unknown", _with(SVC, "spec.ports.1.protocol", "ICMP"),
     "Service/default/web", "spec.ports[1].protocol"),
    ("target-port-out-of-range", _with(SVC, "spec.ports.0.targetPort", 65536),
     "Service/default/web", "spec.ports[0].targetPort"),
    ("target-port-numeric-string-out-of-range", _with(SVC, "spec.ports.0.targetPort", "99999"),
     "Service/default/web", "spec.ports[0].targetPort"),
    ("target-port-bool", _with(SVC, "spec.ports.0.targetPort", False),
     "Service/default/web", "spec.ports[0].targetPort"),
    ("target-port-list", _with(SVC, "spec.ports.0.targetPort", [8080]),
     "Service/default/web", "spec.ports[0].targetPort"),
    ("node-port-out-of-range", _with(SVC, "spec.ports.0.nodePort", 65536),
     "Service/default/web", "spec.ports[0].nodePort"),
    ("ports-not-a-list", _with(SVC, "spec.ports", {"port": 80}),
     "Service/default/web", "spec.ports"),
    ("port-entry-not-an-object", _with(SVC, "spec.ports.1", 53),
     "Service/default/web", "spec.ports[1]"),
    ("cluster-ips-bad-address", _svc(clusterIPs=["10.96.0.1", "fd00:96::zz"]),
     "Service/default/web", "spec.clusterIPs[1]"),
    ("cluster-ips-two-of-a-family", _svc(clusterIPs=["10.96.0.1", "10.96.0.2"]),
     "Service/default/web", "spec.clusterIPs"),
    ("cluster-ip-bad-address", _with(_svc(clusterIP="10.96.0.300"), "spec.clusterIPs", _DELETE),
     "Service/default/web", "spec.clusterIP"),
    ("cluster-ip-not-a-string", _svc(clusterIPs=[167772161]),
     "Service/default/web", "spec.clusterIPs[0]"),
    ("type-unknown", _svc(type="Internal"), "Service/default/web", "spec.type"),
    ("ip-family-unknown", _svc(ipFamilies=["IPv4", "IPv5"]),
     "Service/default/web", "spec.ipFamilies[1]"),
    ("external-ip-bad", _svc(externalIPs=["192.0.2.1", "example.com"]),
     "Service/default/web", "spec.externalIPs[1]"),
    ("source-range-bad", _svc(loadBalancerSourceRanges=["10.0.0.0/33"]),
     "Service/default/web", "spec.loadBalancerSourceRanges[0]"),
    ("traffic-policy-unknown", _svc(externalTrafficPolicy="Nearby"),
     "Service/default/web", "spec.externalTrafficPolicy"),
    ("affinity-unknown", _svc(sessionAffinity="Cookie"),
     "Service/default/web", "spec.sessionAffinity"),
    ("affinity-timeout-zero", _svc(sessionAffinityConfig={"clientIP": {"timeoutSeconds": 0}}),
     "Service/default/web", "spec.sessionAffinityConfig.clientIP.timeoutSeconds"),
    ("affinity-timeout-too-long",
     _svc(sessionAffinityConfig={"clientIP": {"timeoutSeconds": 86401}}),
     "Service/default/web", "spec.sessionAffinityConfig.clientIP.timeoutSeconds"),
    ("lb-ingress-ip-bad", _with(SVC, "status", {"loadBalancer": {"ingress": [{"ip": "x"}]}}),
     "Service/default/web", "status.loadBalancer.ingress[0].ip"),
    ("spec-not-an-object", _with(SVC, "spec", ["ports"]), "Service/default/web", "spec"),
    ("label-value-not-a-string", _with(SVC, "metadata.labels", {"version": 1.0}),
     "Service/default/web", "metadata.labels.version"),
    ("name-missing", _with(SVC, "metadata.name", _DELETE),
     "Service/default/?", "metadata.name"),
    # The namespace defaults to "default", and the error says so.
    ("cluster-ip-bad-with-empty-cluster-ips", _svc(clusterIP="10.96.0.300", clusterIPs=[]),
     "Service/default/web", "spec.clusterIP"),
    ("namespace-absent", _with(_with(SVC, "metadata.namespace", _DELETE), "spec.ports.0.port", 0),
     "Service/default/web", "spec.ports[0].port"),
    ("slice-address-type-unknown", _with(SLICE, "addressType", "IPv7"),
     "EndpointSlice/default/web-1", "addressType"),
    ("slice-address-type-missing", _with(SLICE, "addressType", _DELETE),
     "EndpointSlice/default/web-1", "addressType"),
    ("slice-address-wrong-family", _with(SLICE, "endpoints.1.addresses", ["fd00::1"]),
     "EndpointSlice/default/web-1", "endpoints[1].addresses[0]"),
    ("slice-address-bad", _with(SLICE, "endpoints.0.addresses", ["10.244.1.999"]),
     "EndpointSlice/default/web-1", "endpoints[0].addresses[0]"),
    ("slice-addresses-not-a-list", _with(SLICE, "endpoints.0.addresses", "10.244.1.2"),
     "EndpointSlice/default/web-1", "endpoints[0].addresses"),
    ("slice-ready-not-bool", _with(SLICE, "endpoints.1.conditions", {"ready": "yes"}),
     "EndpointSlice/default/web-1", "endpoints[1].conditions.ready"),
    ("slice-port-zero", _with(SLICE, "ports.0.port", 0),
     "EndpointSlice/default/web-1", "ports[0].port"),
    ("slice-port-protocol", _with(SLICE, "ports.0.protocol", "tcp"),
     "EndpointSlice/default/web-1", "ports[0].protocol"),
    ("slice-node-name-not-string", _with(SLICE, "endpoints.0.nodeName", 7),
     "EndpointSlice/default/web-1", "endpoints[0].nodeName"),
    ("node-pod-cidr-bad", _with(NODE, "spec", {"podCIDRs": ["10.244.1.0/24", "nope"]}),
     "Node/node-1", "spec.podCIDRs[1]"),
    ("node-address-type-not-string",
     _with(NODE, "status", {"addresses": [{"type": 1, "address": "10.0.0.1"}]}),
     "Node/node-1", "status.addresses[0].type"),
    ("policy-no-targets", _with(POLICY, "spec.targetRefs", []),
     "TrafficPolicy/shop/p", "spec.targetRefs"),
    ("policy-target-without-name", _with(POLICY, "spec.targetRefs", [{"kind": "Service"}]),
     "TrafficPolicy/shop/p", "spec.targetRefs[0].name"),
    ("policy-algorithm-unknown", _with(POLICY, "spec.loadBalancing", {"algorithm": "Fastest"}),
     "TrafficPolicy/shop/p", "spec.loadBalancing.algorithm"),
    ("policy-split-all-zero",
     _with(POLICY, "spec.split", [{"service": "a", "weight": 0}, {"service": "b", "weight": 0}]),
     "TrafficPolicy/shop/p", "spec.split"),
    ("policy-split-weight-too-big", _with(POLICY, "spec.split", [{"service": "a", "weight": 1001}]),
     "TrafficPolicy/shop/p", "spec.split[0].weight"),
    ("policy-redirect-port-missing", _with(POLICY, "spec.redirect", {"mode": "EBPF"}),
     "TrafficPolicy/shop/p", "spec.redirect.port"),
    ("policy-access-source-bad",
     _with(POLICY, "spec.access", {"rules": [{"action": "Deny", "sources": ["10.0.0.0/8", 5]}]}),
     "TrafficPolicy/shop/p", "spec.access.rules[0].sources[1]"),
]


@pytest.mark.parametrize(("doc", "obj", "field"), [m[1:] for m in MALFORMED],
                         ids=[m[0] for m in MALFORMED])
def test_malformed_objects_name_object_and_field(doc: dict[str, Any], obj: str, field: str) -> None:
    with pytest.raises(ModelError) as info:
        parse_object(doc)
    err = info.value
    assert (err.obj, err.field) == (obj, field)
    # The message a user reads starts with where to look.
    assert str(err).startswith(f"{obj}: {field}: ")
    assert err.message


def test_malformed_fixtures_are_otherwise_valid() -> None:
    """The bases the malformed cases start from parse, so each case breaks one thing."""
    for doc in (SVC, SLICE, NODE, POLICY):
        assert parse_object(doc) is not None


# The endpoints of a slice are read by a fast path that hands anything unusual
# to the checked path. Each case changes one field of one endpoint (or the
# endpoint itself) to a valid or a broken value.
_ENDPOINT_VALUES: dict[str, list[Any]] = {
    "addresses": [_DELETE, None, [], ["10.244.1.7"], ["10.244.1.7", "10.244.1.8"],
                  ["fd00::7"], ["10.244.1.999"], ["10.244.1.7\x00"], "10.244.1.7", [7], [None],
                  {"ip": "10.244.1.7"}],
    "conditions": [_DELETE, None, {}, {"ready": False}, {"ready": False, "serving": True},
                   {"terminating": True}, {"ready": None, "serving": None, "terminating": None},
                   {"ready": "yes"}, {"serving": 1}, {"terminating": 0}, ["ready"], "ready"],
    "nodeName": [_DELETE, None, "", "node-1", 7, False, [], {}],
    "zone": [None, "zone-a", 0, ["zone-a"]],
    "hostname": [None, "web-0", 1.5],
    "hints": [None, {"forZones": [{"name": "zone-a"}]}, {}, "zone-a"],
}
_ENDPOINT_CASES = [
    pytest.param(address_type, key, value, id=f"{address_type}-{key}-{i}")
    for address_type in ("IPv4", "IPv6", "FQDN")
    for key, values in _ENDPOINT_VALUES.items()
    for i, value in enumerate(values)
] + [
    pytest.param(address_type, "", value, id=f"{address_type}-endpoint-{i}")
    for address_type in ("IPv4", "IPv6", "FQDN")
    for i, value in enumerate([None, "10.244.1.7", [], {}])
]


@pytest.mark.parametrize(("address_type", "key", "value"), _ENDPOINT_CASES)
def test_fast_endpoints_equal_the_checked_ones(address_type: str, key: str, value: Any) -> None:
    """Where the fast path gives endpoints they are the checked path's; where
    the checked path refuses the slice, the fast path gives none, and the
    slice's error names the field. A plain valid endpoint takes the fast path."""
    first = "fd00::2" if address_type == "IPv6" else "10.244.1.2"
    doc = eps("web-1", "web", ep(first, ready=True, node="node-1"),
              ep(first, ready=True, node="node-1"), address_type=address_type)
    doc = _with(doc, "endpoints.1" if not key else f"endpoints.1.{key}", value)
    root = _Fields("EndpointSlice/default/web-1", doc, "")
    fast = _endpoints_fast(doc["endpoints"], address_type)
    try:
        checked = _endpoints_checked(root, address_type)
    except ModelError as err:
        assert fast is None
        with pytest.raises(ModelError) as info:
            parse_endpoint_slice(doc)
        assert info.value.field == err.field
        assert info.value.field.startswith("endpoints[1]")
        return
    assert fast is None or fast == checked
    assert parse_endpoint_slice(doc).endpoints == tuple(checked)
    plain = key != "hints" or value is None
    if plain and isinstance(doc["endpoints"][1], dict):
        assert fast is not None


# ---- objects ------------------------------------------------------------------------


def test_object_refs_and_families() -> None:
    assert str(ObjectRef("Service", "shop", "web")) == "Service/shop/web"
    assert str(ObjectRef("Node", "", "node-1")) == "Node/node-1"
    assert sorted([ObjectRef("Service", "b", "a"), ObjectRef("EndpointSlice", "a", "z")])[0].kind \
        == "EndpointSlice"
    assert IPFamily.of(ip_address("10.0.0.1")) == IPFamily.IPV4
    assert IPFamily.of(ip_network("fd00::/64")) == IPFamily.IPV6


def test_parsed_objects_are_immutable_and_compare_by_value() -> None:
    a, b = parse_service(FULL_SERVICE), parse_service(copy.deepcopy(FULL_SERVICE))
    assert a == b
    with pytest.raises(AttributeError):
        a.type = ServiceType.CLUSTER_IP  # type: ignore[misc]
    with pytest.raises(TypeError):
        a.meta.labels["app"] = "changed"  # type: ignore[index]
