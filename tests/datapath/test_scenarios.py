"""The Service scenario suite: kube-proxy's behaviour as a table of flows,
checked with real traffic on two nodes.

Conventions (agent/sandbox/multinode.py), stated once:

    node-1  10.0.0.1 / fd00:10::1   zone-a   pods web-a .2, web-b .3, cli-1 .4
    node-2  10.0.0.2 / fd00:10::2   zone-b   pods web-c .2, cli-2 .3
    pods    10.244.<node>.<n> / fd00:10:244:<node>::<n>; web-* serve :8080
    ext     10.0.0.100 / fd00:10::100, on the LAN, no route to any pod;
            routes to the externalIP 10.0.1.7 / fd00:11::7 and the LB IP
            10.0.1.10 / fd00:11::10 via node-1
    Service svc: ClusterIP 10.96.1.<case> / fd00:96::1:<case>, port 80 -> 8080,
            nodePort 31000 + <case>; the agents run with --cluster-cidr.

Each case: the Service (spec and endpoints), where the client is (a pod on
node-1 or node-2, node-1 itself, or outside), what it dials (ClusterIP,
a node's NodePort, the externalIP, the LB IP, or an unexposed port), and
what must happen: exactly which pods answer and, where it is certain, which
client address each pod sees ("pod@address"); or that the connection is
REFUSED (ECONNREFUSED at once), UNREACHABLE (EHOSTUNREACH at once: where
kube-proxy drops, a local client fails fast) or DROPPED (no answer).

Every case also runs over IPv6 (its twin maps each address to its IPv6
counterpart), except those with no IPv6 meaning.

A client outside the cluster is refused by an ICMP port-unreachable answer,
as kube-proxy's REJECT does, which its TCP stack reports as ECONNREFUSED.

The suite runs once per datapath mode: eBPF (the agents' default on this
kernel) and TPROXY (--mode tproxy). Where TPROXY mode cannot behave as eBPF
mode does, the case is listed in TPROXY_DIFFERENCES with the reason (the
README lists them too) and must fail there (xfail, strict).

It runs once more in eBPF mode with --nodeport-mode dsr ("ebpf-dsr"): a flow
from outside to a backend on another node is not source-NATed, and that
node answers the client itself, so the pod sees the client's address. A case
whose outcome differs there gives it as `dsr` (an IPv6 twin maps it too);
pods and the backend's own node are still source-NATed.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from agent.sandbox.multinode import MultiNodeCluster
from tests.datapath.conftest import require_datapath

PODS = {"web-a": 1, "web-b": 1, "cli-1": 1, "web-c": 2, "cli-2": 2}
IP4 = {"web-a": "10.244.1.2", "web-b": "10.244.1.3", "cli-1": "10.244.1.4",
       "web-c": "10.244.2.2", "cli-2": "10.244.2.3"}
IP6 = {p: ip.replace("10.244.1.", "fd00:10:244:1::").replace("10.244.2.", "fd00:10:244:2::")
       for p, ip in IP4.items()}
NODE_OF = {"web-a": "node-1", "web-b": "node-1", "web-c": "node-2"}
EXT4, EXT6 = "10.0.0.100", "fd00:10::100"
NODE4 = {1: "10.0.0.1", 2: "10.0.0.2"}
NODE6 = {1: "fd00:10::1", 2: "fd00:10::2"}
EXTERNAL_IP = {4: "10.0.1.7", 6: "fd00:11::7"}
LB_IP = {4: "10.0.1.10", 6: "fd00:11::10"}

READY = "ready"
TERMINATING = "serving-terminating"
NOT_READY = "not-ready"


@dataclass(frozen=True)
class Case:
    name: str
    client: str  # "cli-1", "cli-2", "node-1" or "ext"
    dst: str  # "clusterip", "nodeport-1", "nodeport-2", "externalip", "lb", "badport"
    expect: frozenset[str] | str  # {"pod@seen" or "pod"} or REFUSED/UNREACHABLE/DROPPED
    spec: dict[str, Any] = field(default_factory=dict)
    endpoints: dict[str, str] = field(default_factory=lambda: {
        "web-a": READY, "web-b": READY, "web-c": READY})
    hints: dict[str, list[str]] = field(default_factory=dict)  # pod -> zones
    family: int = 4
    dsr: frozenset[str] | str | None = None  # the outcome under --nodeport-mode dsr, if other


def seen(pods: str, who: str) -> frozenset[str]:
    return frozenset(f"{p}@{who}" for p in pods.split())


REFUSED, UNREACHABLE, DROPPED = "REFUSED", "UNREACHABLE", "DROPPED"
LOCAL = {"externalTrafficPolicy": "Local"}
NODEPORT = {"type": "NodePort"}

CASES = [
    # ---- ClusterIP, from every kind of client --------------------------------
    Case("clusterip from a pod on node-1", "cli-1", "clusterip",
         seen("web-a web-b web-c", IP4["cli-1"])),
    Case("clusterip from a pod on node-2", "cli-2", "clusterip",
         seen("web-a web-b web-c", IP4["cli-2"])),
    Case("clusterip from node-1 itself", "node-1", "clusterip",
         frozenset({"web-a", "web-b", "web-c"})),
    Case("clusterip over IPv6 from a pod on node-2", "cli-2", "clusterip",
         seen("web-a web-b web-c", IP6["cli-2"]), family=6),
    Case("clusterip without endpoints is refused", "cli-1", "clusterip", REFUSED,
         endpoints={}),
    Case("clusterip port not exposed is refused", "cli-1", "badport", REFUSED),
    Case("not-ready endpoints get nothing", "cli-1", "clusterip",
         seen("web-a", IP4["cli-1"]),
         endpoints={"web-a": READY, "web-b": NOT_READY, "web-c": NOT_READY}),
    Case("serving-terminating endpoints only while none is ready", "cli-1", "clusterip",
         seen("web-b", IP4["cli-1"]),
         endpoints={"web-a": TERMINATING, "web-b": READY, "web-c": TERMINATING}),
    Case("no ready endpoint: serving-terminating ones serve", "cli-2", "clusterip",
         seen("web-a web-c", IP4["cli-2"]),
         endpoints={"web-a": TERMINATING, "web-b": NOT_READY, "web-c": TERMINATING}),
    # ---- internalTrafficPolicy ------------------------------------------------
    Case("internal Local from node-1: node-1's endpoints", "cli-1", "clusterip",
         seen("web-a web-b", IP4["cli-1"]), spec={"internalTrafficPolicy": "Local"}),
    Case("internal Local from node-2: node-2's endpoint", "cli-2", "clusterip",
         seen("web-c", IP4["cli-2"]), spec={"internalTrafficPolicy": "Local"}),
    Case("internal Local, no local endpoint: unreachable at once", "cli-2", "clusterip",
         UNREACHABLE, spec={"internalTrafficPolicy": "Local"},
         endpoints={"web-a": READY}),
    # ---- topology ---------------------------------------------------------------
    Case("zone hints keep node-2's pod in zone-b", "cli-2", "clusterip",
         seen("web-c", IP4["cli-2"]), spec={"trafficDistribution": "PreferClose"},
         hints={"web-a": ["zone-a"], "web-b": ["zone-a"], "web-c": ["zone-b"]}),
    Case("zone hints without one for zone-b are ignored", "cli-2", "clusterip",
         seen("web-a web-b", IP4["cli-2"]), spec={"trafficDistribution": "PreferClose"},
         endpoints={"web-a": READY, "web-b": READY},
         hints={"web-a": ["zone-a"], "web-b": ["zone-a"]}),
    # ---- NodePort and externalTrafficPolicy --------------------------------------
    Case("nodeport Cluster from outside via node-1", "ext", "nodeport-1",
         seen("web-a web-b", EXT4) | seen("web-c", NODE4[1]), spec=NODEPORT,
         dsr=seen("web-a web-b web-c", EXT4)),
    Case("nodeport Cluster from outside via node-2", "ext", "nodeport-2",
         seen("web-a web-b", NODE4[2]) | seen("web-c", EXT4), spec=NODEPORT,
         dsr=seen("web-a web-b web-c", EXT4)),
    Case("nodeport Local from outside via node-1 keeps the client address", "ext",
         "nodeport-1", seen("web-a web-b", EXT4), spec=NODEPORT | LOCAL),
    Case("nodeport Local from outside via node-2", "ext", "nodeport-2",
         seen("web-c", EXT4), spec=NODEPORT | LOCAL),
    Case("nodeport Local over IPv6 from outside via node-1", "ext", "nodeport-1",
         seen("web-a web-b", EXT6), spec=NODEPORT | LOCAL, family=6),
    Case("nodeport Cluster over IPv6 from outside via node-2", "ext", "nodeport-2",
         seen("web-a web-b", NODE6[2]) | seen("web-c", EXT6), spec=NODEPORT, family=6,
         dsr=seen("web-a web-b web-c", EXT6)),
    Case("nodeport Local, no endpoint on node-1: dropped from outside", "ext", "nodeport-1",
         DROPPED, spec=NODEPORT | LOCAL, endpoints={"web-c": READY}),
    Case("nodeport Local from a pod on the node: every endpoint (short-circuit)", "cli-1",
         "nodeport-1", seen("web-a web-b web-c", IP4["cli-1"]), spec=NODEPORT | LOCAL),
    Case("nodeport Local from a pod on another node: every endpoint (short-circuit)",
         "cli-2", "nodeport-1", seen("web-a web-b", IP4["cli-2"]) | seen("web-c", NODE4[1]),
         spec=NODEPORT | LOCAL),
    Case("nodeport without endpoints: refused from outside (ICMP port unreachable)", "ext",
         "nodeport-1", REFUSED, spec=NODEPORT, endpoints={}),
    Case("nodeport without endpoints: refused from a pod", "cli-1", "nodeport-1", REFUSED,
         spec=NODEPORT, endpoints={}),
    # ---- externalIPs and LoadBalancer ----------------------------------------------
    Case("externalIP from outside", "ext", "externalip",
         seen("web-a web-b", EXT4) | seen("web-c", NODE4[1]),
         spec={"externalIPs": [EXTERNAL_IP[4]]}, dsr=seen("web-a web-b web-c", EXT4)),
    Case("externalIP from a pod", "cli-2", "externalip",
         seen("web-a web-b web-c", IP4["cli-2"]), spec={"externalIPs": [EXTERNAL_IP[4]]}),
    Case("LB IP Local from outside", "ext", "lb", seen("web-a web-b", EXT4),
         spec={"type": "LoadBalancer"} | LOCAL),
    Case("LB source ranges let the client in", "ext", "lb",
         seen("web-a web-b", EXT4) | seen("web-c", NODE4[1]),
         spec={"type": "LoadBalancer",
               "loadBalancerSourceRanges": [f"{EXT4}/32", f"{EXT6}/128"]},
         dsr=seen("web-a web-b web-c", EXT4)),
    Case("LB source ranges keep the client out", "ext", "lb", DROPPED,
         spec={"type": "LoadBalancer",
               "loadBalancerSourceRanges": ["10.0.0.99/32", "fd00:10::99/128"]}),
    Case("LB over IPv6 from outside", "ext", "lb",
         seen("web-a web-b", EXT6) | seen("web-c", NODE6[1]),
         spec={"type": "LoadBalancer"}, family=6, dsr=seen("web-a web-b web-c", EXT6)),
    # With --nodeport-mode dsr too: a pod is source-NATed; so is a node's own
    # connection to a backend on it (node-1's pods' replies to node-1 itself
    # would never leave node-1 by its LAN device).
    Case("nodeport Cluster from a pod on another node: its node's pods see node-1", "cli-2",
         "nodeport-1", seen("web-a web-b", IP4["cli-2"]) | seen("web-c", NODE4[1]),
         spec=NODEPORT),
    Case("nodeport Cluster from node-1 itself via node-2: node-1's pods see node-2", "node-1",
         "nodeport-2", seen("web-a web-b", NODE4[2]) | seen("web-c", NODE4[1]),
         spec=NODEPORT),
]


# Every IPv4 address an expectation can name, and its IPv6 twin.
TO_V6 = {**{IP4[p]: IP6[p] for p in IP4}, EXT4: EXT6, NODE4[1]: NODE6[1], NODE4[2]: NODE6[2]}


def ipv6_twin(case: Case) -> Case | None:
    """The same case over IPv6 (None where it has no IPv6 meaning: a
    client on node-1 itself picks its own source address either way)."""
    if case.family == 6 or case.dst == "badport":
        return None

    def v6(expect: frozenset[str] | str) -> frozenset[str] | str:
        if isinstance(expect, str):
            return expect
        return frozenset(f"{pod}@{TO_V6[addr]}" if addr else pod
                         for pod, _, addr in (e.partition("@") for e in expect))

    return Case(f"{case.name} (IPv6)", case.client, case.dst, v6(case.expect), case.spec,
                case.endpoints, case.hints, family=6,
                dsr=None if case.dsr is None else v6(case.dsr))


ALL_CASES = [c for c in CASES] + [t for t in map(ipv6_twin, CASES) if t is not None]


def manifest(index: int, case: Case) -> str:
    """Service svc for case number `index` (its addresses change per case, so
    the agents' status shows when this case is programmed)."""
    spec: dict[str, Any] = {
        "clusterIP": f"10.96.1.{index}",
        "clusterIPs": [f"10.96.1.{index}", f"fd00:96::1:{index}"],
        "ipFamilies": ["IPv4", "IPv6"], "ipFamilyPolicy": "RequireDualStack",
        "ports": [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080}],
    }
    spec.update(case.spec)
    if spec.get("type") in ("NodePort", "LoadBalancer"):
        spec["ports"][0]["nodePort"] = 31000 + index
    if "externalIPs" in spec:
        spec["externalIPs"] = [EXTERNAL_IP[4], EXTERNAL_IP[6]]
    svc: dict[str, Any] = {"apiVersion": "v1", "kind": "Service",
                           "metadata": {"name": "svc", "namespace": "default"}, "spec": spec}
    if spec.get("type") == "LoadBalancer":
        svc["status"] = {"loadBalancer": {"ingress": [{"ip": LB_IP[4]}, {"ip": LB_IP[6]}]}}
    docs = [svc]
    for family, ips in (("IPv4", IP4), ("IPv6", IP6)):
        endpoints = []
        for pod, state in case.endpoints.items():
            conditions = {
                READY: {"ready": True, "serving": True, "terminating": False},
                TERMINATING: {"ready": False, "serving": True, "terminating": True},
                NOT_READY: {"ready": False, "serving": False, "terminating": False},
            }[state]
            ep: dict[str, Any] = {"addresses": [ips[pod]], "nodeName": NODE_OF[pod],
                                  "conditions": conditions}
            if pod in case.hints:
                ep["hints"] = {"forZones": [{"name": z} for z in case.hints[pod]]}
            endpoints.append(ep)
        docs.append({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"svc-{family.lower()}", "namespace": "default",
                         "labels": {"kubernetes.io/service-name": "svc"}},
            "addressType": family,
            "ports": [{"name": "http", "protocol": "TCP", "port": 8080}],
            "endpoints": endpoints,
        })
    return "\n---\n".join(json.dumps(d) for d in docs) + "\n"


def destination(index: int, case: Case) -> tuple[str, int]:
    v6 = case.family == 6
    return {
        "clusterip": (f"fd00:96::1:{index}" if v6 else f"10.96.1.{index}", 80),
        "badport": (f"10.96.1.{index}", 81),
        "nodeport-1": ((NODE6 if v6 else NODE4)[1], 31000 + index),
        "nodeport-2": ((NODE6 if v6 else NODE4)[2], 31000 + index),
        "externalip": (EXTERNAL_IP[case.family], 80),
        "lb": (LB_IP[case.family], 80),
    }[case.dst]


# The agents' options per mode: eBPF is what auto picks on this kernel.
# ebpf-sockmap: the whole suite again with sockmap acceleration asked for on
# every Service (same-node TCP connections spliced), as issue #5 requires.
MODES = {"ebpf": [], "ebpf-sockmap": ["--sockmap"], "tproxy": ["--mode", "tproxy"],
         "ebpf-dsr": ["--nodeport-mode", "dsr"]}

# Cases where TPROXY mode differs from eBPF mode, and why.
TPROXY_DIFFERENCES: dict[str, str] = {}


@pytest.fixture(scope="module", params=list(MODES))
def cluster(request: pytest.FixtureRequest) -> Iterator[MultiNodeCluster]:
    require_datapath()
    with MultiNodeCluster(pods=PODS) as c:
        c.start_agents([*MODES[request.param], "--cluster-cidr",
                        "10.244.0.0/16,fd00:10:244::/48"])
        for net in ("10.0.1.0/24", "fd00:11::/64"):
            via = "10.0.0.1" if ":" not in net else "fd00:10::1"
            c.topo.ns(c.external, "ip", "route", "add", net, "via", via)
        yield c


def wait_programmed(cluster: MultiNodeCluster, index: int, case: Case) -> None:
    """Both agents hold this case's Service: its ClusterIP frontend (and, for
    external kinds, this node's external side) appears only in the pass that
    programmed the whole case."""
    key = f"10.96.1.{index}:80/TCP"
    for node in cluster.nodes:
        cluster.wait_status(node, lambda s: key in s["frontends"], f"case {index} on {node.name}")
        if case.dst.startswith(("nodeport", "externalip", "lb")):
            addr, port = destination(index, case)
            ext = f"[{addr}]:{port}/TCP" if ":" in addr else f"{addr}:{port}/TCP"
            if case.dst.startswith("nodeport") and not ext.startswith(
                    (f"[{node.address6}]", f"{node.address}:")):
                continue
            cluster.wait_status(node, lambda s, e=ext: e in s.get("external_frontends", {}),
                                f"case {index} external on {node.name}")


def run_client(cluster: MultiNodeCluster, case: Case, addr: str, port: int,
               count: int) -> dict[str, Any]:
    args = ("tcp", addr, str(port), "--count", str(count), "--path", "/client",
            "--timeout", "1" if case.expect == DROPPED else "5")
    if case.client == "ext":
        return cluster.probe_from_outside(*args)
    if case.client == "node-1":
        return cluster.probe_from_node(1, *args)
    return cluster.probe_from_pod(case.client, *args)


@pytest.mark.parametrize("index_case", list(enumerate(ALL_CASES, start=1)),
                         ids=[c.name for c in ALL_CASES])
def test_scenario(cluster: MultiNodeCluster, index_case: tuple[int, Case],
                  request: pytest.FixtureRequest) -> None:
    index, case = index_case
    mode = request.node.callspec.params["cluster"]
    if mode == "tproxy" and case.name in TPROXY_DIFFERENCES:
        request.applymarker(pytest.mark.xfail(strict=True,
                                              reason=TPROXY_DIFFERENCES[case.name]))
    expect = case.dsr if mode == "ebpf-dsr" and case.dsr is not None else case.expect
    cluster.write_manifest("svc.yaml", manifest(index, case))
    wait_programmed(cluster, index, case)
    addr, port = destination(index, case)
    if isinstance(expect, str):
        result = run_client(cluster, case, addr, port, 3)
        assert result["answers"] == {}, (case.name, result)
        want = {REFUSED: "ECONNREFUSED", UNREACHABLE: "EHOSTUNREACH", DROPPED: "TIMEOUT"}
        assert result["errors"] == {want[expect]: 3}, (case.name, result)
        return
    result = run_client(cluster, case, addr, port, 120)
    assert result["errors"] == {} and result["peer_mismatch"] == 0, (case.name, result)
    got = set()
    for answer in result["answers"]:
        pod_port, _, address = answer.partition(" ")
        got.add((pod_port.split(":")[0], address))
    want_pods = {e.split("@")[0] for e in expect}
    assert {pod for pod, _ in got} == want_pods, (case.name, result)
    for entry in expect:
        pod, _, address = entry.partition("@")
        if address:
            assert {a for p, a in got if p == pod} == {address}, (case.name, pod, result)
