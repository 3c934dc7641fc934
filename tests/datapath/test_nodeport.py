"""NodePort from outside the cluster: the TC path, across two nodes.

Topology (agent/sandbox/multinode.py): node-1 10.0.0.1 with web-a
10.244.1.2 and web-b 10.244.1.3; node-2 10.0.0.2 with web-c 10.244.2.2; an
external client 10.0.0.100 on the same LAN with no route to any pod; a client
pod cli-2 10.244.2.3 on node-2. Service
web: NodePort 30080 -> pod port 8080. Each nginx answers GET /client with
"<pod>:<port> <the client address it saw>".

Each case: which node the client dials, the Service's
externalTrafficPolicy, and the exact set of (backend, address seen) pairs
that may answer.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from agent.datapath.ebpf.inspect import MapsReader
from agent.datapath.ebpf.maps import SockLbMaps
from agent.sandbox.holder import Holder
from agent.sandbox.multinode import MultiNodeCluster
from tests.datapath.conftest import require_datapath

EXT = "10.0.0.100"
LB_IP = "10.0.1.10"
N = 150


def web(policy: str, endpoints: dict[str, str], **spec: object) -> str:
    """Service web: TCP 80 -> 8080 on nodePort 30080, UDP 53 -> 9053 on 30053;
    `spec` adds to its spec; a `lb` key makes it a LoadBalancer at LB_IP."""
    lb = spec.pop("lb", False)
    svc: dict[str, object] = {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {
            "type": "NodePort", "clusterIP": "10.96.0.10", "externalTrafficPolicy": policy,
            "ports": [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080,
                       "nodePort": 30080},
                      {"name": "dns", "protocol": "UDP", "port": 53, "targetPort": 9053,
                       "nodePort": 30053}],
            **spec,
        },
    }
    if lb:
        svc["spec"]["type"] = "LoadBalancer"  # type: ignore[index]
        svc["status"] = {"loadBalancer": {"ingress": [{"ip": LB_IP}]}}
    eps = {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "web-1", "namespace": "default",
                     "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "protocol": "TCP", "port": 8080},
                  {"name": "dns", "protocol": "UDP", "port": 9053}],
        "endpoints": [{"addresses": [ip], "nodeName": node} for ip, node in endpoints.items()],
    }
    return json.dumps(svc) + "\n---\n" + json.dumps(eps) + "\n"


@pytest.fixture(scope="module")
def cluster() -> Iterator[MultiNodeCluster]:
    require_datapath()
    with MultiNodeCluster(pods={"web-a": 1, "web-b": 1, "web-c": 2, "cli-2": 2}) as c:
        c.start_agents(["--cluster-cidr", "10.244.0.0/16,fd00:10:244::/48"])
        # The LoadBalancer IP of the tests below is announced to node-1.
        c.topo.ns(c.external, "ip", "route", "add", f"{LB_IP}/32", "via", "10.0.0.1")
        yield c


ALL = {"10.244.1.2": "node-1", "10.244.1.3": "node-1", "10.244.2.2": "node-2"}


@dataclass(frozen=True)
class Case:
    name: str
    policy: str
    node_ip: str
    answers: frozenset[str]  # "<pod>:8080 <address the pod saw>"


CASES = [
    Case("Cluster via node-1: local pods see the client, the remote one sees node-1",
         "Cluster", "10.0.0.1",
         frozenset({f"web-a:8080 {EXT}", f"web-b:8080 {EXT}", "web-c:8080 10.0.0.1"})),
    Case("Cluster via node-2: the remote pods see node-2",
         "Cluster", "10.0.0.2",
         frozenset({"web-a:8080 10.0.0.2", "web-b:8080 10.0.0.2", f"web-c:8080 {EXT}"})),
    Case("Local via node-1: only node-1's pods, client address preserved",
         "Local", "10.0.0.1", frozenset({f"web-a:8080 {EXT}", f"web-b:8080 {EXT}"})),
    Case("Local via node-2: only node-2's pod, client address preserved",
         "Local", "10.0.0.2", frozenset({f"web-c:8080 {EXT}"})),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_nodeport_from_outside(cluster: MultiNodeCluster, case: Case) -> None:
    cluster.write_manifest("web.yaml", web(case.policy, ALL))
    local = case.policy == "Local"
    for node in cluster.nodes:
        mine = [f"{ip}:8080/TCP" for ip, n in ALL.items() if n == node.name or not local]
        cluster.wait_external(f"{node.address}:30080/TCP", node, mine, local)
    result = cluster.probe_from_outside(
        "tcp", case.node_ip, "30080", "--count", str(N), "--path", "/client", "--timeout", "5"
    )
    assert result["errors"] == {}, result
    assert set(result["answers"]) == case.answers, result
    # The client talks to the NodePort and never sees a backend's address.
    assert result["peer_mismatch"] == 0


@pytest.mark.parametrize("address", ["10.0.0.1", "fd00:10::1"])
def test_no_endpoints_from_outside_is_refused(cluster: MultiNodeCluster, address: str) -> None:
    """kube-proxy REJECTs: the client gets ICMP port unreachable, which its
    TCP stack reports as ECONNREFUSED at once."""
    cluster.write_manifest("web.yaml", web("Cluster", {}) + "\n---\n" + web6("Cluster", {}))
    cluster.wait_external("10.0.0.1:30080/TCP", cluster.nodes[0], [], False)
    cluster.wait_external("[fd00:10::1]:30090/TCP", cluster.nodes[0], [], False)
    port = "30080" if "." in address else "30090"
    result = cluster.probe_from_outside("tcp", address, port, "--count", "3", "--timeout", "5")
    assert result["answers"] == {} and result["errors"] == {"ECONNREFUSED": 3}, result


def test_refusals_from_outside_go_on_while_the_agent_is_down(
        cluster: MultiNodeCluster) -> None:
    """The refusal is a tail call: its program array is pinned, so a killed
    agent leaves it in place (the kernel empties an array nobody holds)."""
    cluster.write_manifest("web.yaml", web("Cluster", {}))
    node = cluster.nodes[0]
    cluster.wait_external("10.0.0.1:30080/TCP", node, [], False)
    cluster.stop_agent(node, signal.SIGKILL)
    try:
        result = cluster.probe_from_outside("tcp", "10.0.0.1", "30080", "--count", "3",
                                            "--timeout", "5")
    finally:
        cluster.start_agents(["--cluster-cidr", "10.244.0.0/16,fd00:10:244::/48"],
                             only=[node])
    assert result["answers"] == {} and result["errors"] == {"ECONNREFUSED": 3}, result


def test_local_policy_without_local_endpoints_drops(cluster: MultiNodeCluster) -> None:
    cluster.write_manifest("web.yaml", web("Local", {"10.244.2.2": "node-2"}))
    cluster.wait_external("10.0.0.1:30080/TCP", cluster.nodes[0], [], True)
    result = cluster.probe_from_outside(
        "tcp", "10.0.0.1", "30080", "--count", "2", "--timeout", "1"
    )
    assert result["answers"] == {} and result["errors"] == {"TIMEOUT": 2}, result


def test_udp_flow_from_outside_moves_when_its_backend_goes(cluster: MultiNodeCluster) -> None:
    """One client socket (one source port) sending through a NodePort: when
    its backend is removed, the NAT entry is cleared at once and the next
    datagram reaches a live backend; nothing is lost to a stale entry."""
    frontend = "10.0.0.1:30053/UDP"
    cluster.write_manifest("web.yaml", web("Cluster", {"10.244.1.2": "node-1"}))
    cluster.wait_external(frontend, cluster.nodes[0], ["10.244.1.2:9053/UDP"], False)
    client = cluster.spawn_probe_outside(
        "udp", "10.0.0.1", "30053", "--persistent", "40", "--interval", "0.1", "--timeout", "1"
    )
    assert client.stdout is not None
    assert json.loads(client.stdout.readline()) == {"started": True}
    time.sleep(1)
    cluster.write_manifest("web.yaml", web("Cluster", {"10.244.2.2": "node-2"}))
    cluster.wait_external(frontend, cluster.nodes[0], ["10.244.2.2:9053/UDP"], False)
    out, _ = client.communicate(timeout=60)
    result = json.loads(out.strip().splitlines()[-1])
    assert [name for name, _ in result["runs"]] == ["web-a", "web-c"], result
    assert result["errors"] == {}, result


def test_cluster_ip_from_a_pod_on_another_node(cluster: MultiNodeCluster) -> None:
    """node-2's agent balances its pod's connection over every endpoint,
    local or on node-1, and no address is translated on the wire."""
    cluster.write_manifest("web.yaml", web("Cluster", ALL))
    cluster.wait_programmed("10.96.0.10:80/TCP",
                            {"node-2": sorted(f"{ip}:8080/TCP" for ip in ALL)})
    result = cluster.probe_from_pod("cli-2", "tcp", "10.96.0.10", "80", "--count", str(N),
                                    "--path", "/client")
    assert result["errors"] == {} and result["peer_mismatch"] == 0, result
    assert set(result["answers"]) == {
        "web-a:8080 10.244.2.3", "web-b:8080 10.244.2.3", "web-c:8080 10.244.2.3"}, result


def test_nodeport_of_another_node_from_a_pod(cluster: MultiNodeCluster) -> None:
    """A pod on node-2 dialing node-1's NodePort goes over the wire to node-1,
    whose TC program serves it like any outside client."""
    cluster.write_manifest("web.yaml", web("Cluster", ALL))
    cluster.wait_external("10.0.0.1:30080/TCP", cluster.nodes[0],
                          sorted(f"{ip}:8080/TCP" for ip in ALL), False)
    result = cluster.probe_from_pod("cli-2", "tcp", "10.0.0.1", "30080", "--count", str(N),
                                    "--path", "/client", "--timeout", "5")
    assert result["errors"] == {}, result
    assert set(result["answers"]) == {
        "web-a:8080 10.244.2.3", "web-b:8080 10.244.2.3", "web-c:8080 10.0.0.1"}, result


def web6(policy: str, endpoints: dict[str, str]) -> str:
    """Dual-stack Service web6: TCP 80 -> 8080 on nodePort 30090 over both
    families; `endpoints` maps pod name -> node."""
    svc = {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web6", "namespace": "default"},
        "spec": {
            "type": "NodePort", "clusterIP": "10.96.0.60",
            "clusterIPs": ["10.96.0.60", "fd00:96::60"], "ipFamilies": ["IPv4", "IPv6"],
            "ipFamilyPolicy": "RequireDualStack", "externalTrafficPolicy": policy,
            "ports": [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080,
                       "nodePort": 30090}],
        },
    }
    docs = [svc]
    for family, ips in (("IPv4", POD4), ("IPv6", POD6)):
        docs.append({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"web6-{family.lower()}", "namespace": "default",
                         "labels": {"kubernetes.io/service-name": "web6"}},
            "addressType": family,
            "ports": [{"name": "http", "protocol": "TCP", "port": 8080}],
            "endpoints": [{"addresses": [ips[pod]], "nodeName": node}
                          for pod, node in endpoints.items()],
        })
    return "\n---\n".join(json.dumps(d) for d in docs) + "\n"


POD4 = {"web-a": "10.244.1.2", "web-b": "10.244.1.3", "web-c": "10.244.2.2"}
POD6 = {"web-a": "fd00:10:244:1::2", "web-b": "fd00:10:244:1::3", "web-c": "fd00:10:244:2::2"}
EXT6 = "fd00:10::100"
ALL_PODS = {"web-a": "node-1", "web-b": "node-1", "web-c": "node-2"}


@pytest.mark.parametrize(
    ("policy", "node", "answers"),
    [
        ("Cluster", 0, {f"web-a:8080 {EXT6}", f"web-b:8080 {EXT6}", "web-c:8080 fd00:10::1"}),
        ("Local", 1, {f"web-c:8080 {EXT6}"}),
    ],
    ids=["cluster-via-node-1", "local-via-node-2"],
)
def test_ipv6_nodeport_from_outside(
    cluster: MultiNodeCluster, policy: str, node: int, answers: set[str]
) -> None:
    cluster.write_manifest("web6.yaml", web6(policy, ALL_PODS))
    target = cluster.nodes[node]
    local = policy == "Local"
    want = [f"[{POD6[p]}]:8080/TCP" for p, n in ALL_PODS.items()
            if not local or n == target.name]
    cluster.wait_external(f"[{target.address6}]:30090/TCP", target, want, local)
    result = cluster.probe_from_outside(
        "tcp", target.address6, "30090", "--count", str(N), "--path", "/client",
        "--timeout", "5",
    )
    assert result["errors"] == {} and result["peer_mismatch"] == 0, result
    assert set(result["answers"]) == answers, result


def test_load_balancer_source_ranges(cluster: MultiNodeCluster) -> None:
    frontend = f"{LB_IP}:80/TCP"
    backends = sorted(f"{ip}:8080/TCP" for ip in ALL)
    node = cluster.nodes[0]
    cluster.write_manifest("web.yaml", web("Cluster", ALL, lb=True,
                                           loadBalancerSourceRanges=[f"{EXT}/32"]))
    cluster.wait_external(frontend, node, backends, False, sources=[f"{EXT}/32"])
    allowed = cluster.probe_from_outside("tcp", LB_IP, "80", "--count", "30", "--timeout", "5")
    assert allowed["errors"] == {} and len(allowed["answers"]) >= 2, allowed

    cluster.write_manifest("web.yaml", web("Cluster", ALL, lb=True,
                                           loadBalancerSourceRanges=["10.0.0.99/32"]))
    cluster.wait_external(frontend, node, backends, False, sources=["10.0.0.99/32"])
    # The client is now outside the ranges: its packets are dropped.
    denied = cluster.probe_from_outside("tcp", LB_IP, "80", "--count", "2", "--timeout", "1")
    assert denied["answers"] == {} and denied["errors"] == {"TIMEOUT": 2}, denied


def test_client_ip_affinity_from_outside(cluster: MultiNodeCluster) -> None:
    spec = {"sessionAffinity": "ClientIP",
            "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}}}
    cluster.write_manifest("web.yaml", web("Cluster", ALL, **spec))
    cluster.wait_external("10.0.0.1:30080/TCP", cluster.nodes[0],
                          sorted(f"{ip}:8080/TCP" for ip in ALL), False, affinity=60)
    result = cluster.probe_from_outside("tcp", "10.0.0.1", "30080", "--count", "60",
                                        "--timeout", "5")
    # 60 connections over 3 backends all on one: 3^-59 by chance.
    assert result["errors"] == {} and len(result["answers"]) == 1, result


def test_affinity_from_outside_follows_a_switch_to_the_local_policy(
    cluster: MultiNodeCluster,
) -> None:
    """An outside client's affinity names web-c (on node-2). The Service
    then turns Local: node-1's clients may still reach web-c (the socket
    scope serves every endpoint), but outside clients only node-1's pods.
    The client's entry must no longer count for the external scope, or its
    flows would go to web-c un-SNATed (Local keeps the client's address) and
    never be answered."""
    spec = {"sessionAffinity": "ClientIP",
            "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 600}}}
    cluster.write_manifest("web.yaml", web("Cluster", {"10.244.2.2": "node-2"}, **spec))
    cluster.wait_external("10.0.0.1:30080/TCP", cluster.nodes[0], ["10.244.2.2:8080/TCP"],
                          False, affinity=600)
    before = cluster.probe_from_outside("tcp", "10.0.0.1", "30080", "--count", "3",
                                        "--timeout", "5")
    assert before["answers"] == {"web-c:8080": 3}, before
    both = {"10.244.1.2": "node-1", "10.244.2.2": "node-2"}
    cluster.write_manifest("web.yaml", web("Local", both, **spec))
    cluster.wait_external("10.0.0.1:30080/TCP", cluster.nodes[0], ["10.244.1.2:8080/TCP"],
                          True, affinity=600)
    after = cluster.probe_from_outside("tcp", "10.0.0.1", "30080", "--count", "3",
                                       "--timeout", "5")
    assert after["answers"] == {"web-a:8080": 3} and after["errors"] == {}, after


def test_pod_reaching_a_local_policy_nodeport_is_served_cluster_wide(
    cluster: MultiNodeCluster,
) -> None:
    """kube-proxy's short-circuit: with --cluster-cidr, a pod (cli-2 on
    node-2) reaching node-1's NodePort under externalTrafficPolicy: Local is
    served from every endpoint, not only node-1's."""
    cluster.write_manifest("web.yaml", web("Local", ALL))
    cluster.wait_external("10.0.0.1:30080/TCP", cluster.nodes[0],
                          ["10.244.1.2:8080/TCP", "10.244.1.3:8080/TCP"], True)
    result = cluster.probe_from_pod("cli-2", "tcp", "10.0.0.1", "30080", "--count", str(N),
                                    "--path", "/client", "--timeout", "5")
    assert result["errors"] == {}, result
    assert set(result["answers"]) == {
        "web-a:8080 10.244.2.3", "web-b:8080 10.244.2.3", "web-c:8080 10.0.0.1"}, result


def test_agent_restart_does_not_disturb_a_live_udp_flow(cluster: MultiNodeCluster) -> None:
    """The NAT maps are pinned: an agent restart (SIGKILL and start) keeps a
    UDP flow from outside on its backend, without a lost datagram."""
    frontend = "10.0.0.1:30053/UDP"
    cluster.write_manifest("web.yaml", web("Cluster", ALL))
    cluster.wait_external(frontend, cluster.nodes[0],
                          sorted(f"{ip}:9053/UDP" for ip in ALL), False)
    client = cluster.spawn_probe_outside(
        "udp", "10.0.0.1", "30053", "--persistent", "50", "--interval", "0.1", "--timeout", "1"
    )
    assert client.stdout is not None
    assert json.loads(client.stdout.readline()) == {"started": True}
    time.sleep(0.5)
    node = cluster.nodes[0]
    cluster.stop_agent(node, signal.SIGKILL)
    cluster.start_agents(["--cluster-cidr", "10.244.0.0/16,fd00:10:244::/48"],
                         only=[node])
    out, _ = client.communicate(timeout=60)
    result = json.loads(out.strip().splitlines()[-1])
    assert len(result["runs"]) == 1 and result["runs"][0][1] == 50, result
    assert result["errors"] == {}, result


# argv: address, port, source port. One UDP socket; each datagram waits for
# a line on stdin; prints each answer.
UDP_ON_STDIN = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3)
s.bind(("0.0.0.0", int(sys.argv[3]))); s.connect((sys.argv[1], int(sys.argv[2])))
for _ in range(2):
    sys.stdin.readline()
    s.send(b"ping")
    print(s.recv(4096).decode().strip(), flush=True)
"""


def test_a_udp_flow_lives_while_either_direction_is_active(cluster: MultiNodeCluster) -> None:
    """Each direction's NAT entry is refreshed by its own packets. A client
    that keeps sending while the backend stays silent for longer than the
    UDP timeout (180 s; here the reply entry is aged by hand) leaves only
    the reply entry idle: the flow is alive, and the backend's next answer
    is still translated back to the client."""
    frontend = "10.0.0.1:30053/UDP"
    cluster.write_manifest("web.yaml", web("Cluster", {"10.244.2.2": "node-2"}))
    cluster.wait_external(frontend, cluster.nodes[0], ["10.244.2.2:9053/UDP"], False)
    port = 27126
    client = cluster.topo.spawn(
        cluster.external, [sys.executable, "-c", UDP_ON_STDIN, "10.0.0.1", "30053", str(port)],
        in_cgroup=False, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert client.stdin is not None and client.stdout is not None
    client.stdin.write(b"\n")
    client.stdin.flush()
    first = client.stdout.readline().decode().strip()
    assert first.startswith("web-c"), first
    maps = SockLbMaps.open(cluster.nodes[0].bpffs)
    try:
        [(key, value)] = [(k, v) for k, v in maps.nat_rev.items()
                          if k.proto == 17 and socket.ntohs(k.dport) == port]
        flags = value.last_seen_ns & (0b11 << 62)
        value.last_seen_ns = (time.monotonic_ns() - 200 * 10**9) | flags
        maps.nat_rev.put(key, value)
    finally:
        maps.close()
    client.stdin.write(b"\n")
    client.stdin.flush()
    assert client.stdout.readline().decode().strip() == first
    assert client.wait(timeout=10) == 0, client.stderr.read() if client.stderr else b""
    cluster.topo.forget(client)


@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_the_sweeps_reply_key_is_the_kernels(cluster: MultiNodeCluster, proto: str) -> None:
    """The LeastConnections sweep judges a UDP flow by both of its entries,
    finding the reverse one with lc_sweep._reply_key, its copy of tc_nat.c's
    veer_nat_other_key: for every flow the kernel made, source-NATed or not,
    the key must be the reverse entry's."""
    from agent.datapath.ebpf.lc_sweep import _reply_key

    cluster.write_manifest("web.yaml", web("Cluster", ALL))
    frontend = "30053" if proto == "udp" else "30080"
    cluster.wait_external(f"10.0.0.1:{frontend}/{proto.upper()}", cluster.nodes[0],
                          [f"{a}:{9053 if proto == 'udp' else 8080}/{proto.upper()}"
                           for a in sorted(ALL)], False)
    ident = 17 if proto == "udp" else 6
    recent = time.monotonic_ns() - 30 * 10**9  # this test's flows, not earlier tests'
    maps = SockLbMaps.open(cluster.nodes[0].bpffs)
    try:
        # Backends are picked at random: 20 flows all go to node-1's own two
        # backends (none source-NATed) about one time in 3,300, so probe
        # again (at most 5 times) until both kinds are among them.
        for _ in range(5):
            result = cluster.probe_from_outside(proto, "10.0.0.1", frontend, "--count", "20",
                                                "--timeout", "5")
            assert result["errors"] == {}, result
            flows = [(k, v) for k, v in maps.nat_fwd.items()
                     if k.proto == ident and bytes(k.saddr[:4]) == bytes([10, 0, 0, 100])
                     and socket.ntohs(k.dport) == int(frontend)
                     and v.last_seen_ns & ~(0b111 << 61) > recent]
            assert flows and (proto == "udp" or len(flows) >= 20), flows
            snat = sum(bytes(v.saddr[:4]) == bytes([10, 0, 0, 1]) for _, v in flows)
            if 0 < snat < len(flows):
                break
        assert 0 < snat < len(flows), "both kinds of flow: source-NATed and not"
        for k, v in flows:
            assert maps.nat_rev.get(_reply_key(k, v)) is not None, (k, v)
    finally:
        maps.close()


def test_udp_service_scaled_to_zero_and_back(cluster: MultiNodeCluster) -> None:
    frontend = "10.0.0.1:30053/UDP"
    cluster.write_manifest("web.yaml", web("Cluster", {}))
    cluster.wait_external(frontend, cluster.nodes[0], [], False)
    gone = cluster.probe_from_outside("udp", "10.0.0.1", "30053", "--count", "2",
                                      "--timeout", "1")
    assert gone["errors"] == {"TIMEOUT": 2}, gone
    cluster.write_manifest("web.yaml", web("Cluster", {"10.244.2.2": "node-2"}))
    cluster.wait_external(frontend, cluster.nodes[0], ["10.244.2.2:9053/UDP"], False)
    back = cluster.probe_from_outside("udp", "10.0.0.1", "30053", "--count", "10",
                                      "--timeout", "2")
    assert back["answers"] == {"web-c": 10} and back["errors"] == {}, back


# get(addr, port, src_port, path): one HTTP/1.0 GET from that source port,
# its body. The scripts below run it in a client's namespace.
GET_FROM_PORT = """
import socket, sys
def get(addr, port, src_port, path="/"):
    s = socket.socket(); s.settimeout(5)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", src_port)); s.connect((addr, port))
    s.sendall(b"GET " + path.encode() + b" HTTP/1.0\\r\\n\\r\\n"); data = b""
    while chunk := s.recv(4096): data += chunk
    s.close(); return data.split(b"\\r\\n\\r\\n", 1)[1].decode().strip()
"""

# The fixed source ports of these scripts lie below the ephemeral range
# (32768-60999): a port the kernel gave an earlier connection of the same
# namespace may still be in TIME_WAIT, without SO_REUSEADDR, and bind() would
# fail with EADDRINUSE.
REUSE_PORT = GET_FROM_PORT + """
local = {"web-a": "10.244.1.2", "web-b": "10.244.1.3"}  # node-1's pods: no SNAT
for port in range(24678, 24698):  # web-c (remote, SNAT) would not test this
    first = get(sys.argv[1], int(sys.argv[2]), port)
    if first.split(":")[0] in local:
        print(first, get(local[first.split(":")[0]], 8080, port))
        break
"""


def test_new_direct_connection_reusing_the_ports_of_a_translated_one(
    cluster: MultiNodeCluster,
) -> None:
    """A pod connects through node-1's Local NodePort (served by a local pod,
    no SNAT: node-1 keeps a reverse NAT entry), then, from the same source
    port, straight to that pod. The old entry must not rewrite the new
    connection's replies."""
    cluster.write_manifest("web.yaml", web("Local", ALL))
    cluster.wait_external("10.0.0.1:30080/TCP", cluster.nodes[0],
                          ["10.244.1.2:8080/TCP", "10.244.1.3:8080/TCP"], True)
    node = next(n for n in cluster.nodes if "cli-2" in n.pods)

    def join_node_cgroup() -> None:
        with open(os.path.join(node.cgroup, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))

    res = subprocess.run(
        ["ip", "netns", "exec", cluster.topo.pods["cli-2"].netns, sys.executable, "-c",
         REUSE_PORT, "10.0.0.1", "30080"],
        capture_output=True, text=True, timeout=60, preexec_fn=join_node_cgroup,
    )
    assert res.returncode == 0, res.stderr
    via_nodeport, direct = res.stdout.split()
    assert via_nodeport == direct and via_nodeport in ("web-a:8080", "web-b:8080"), res.stdout


def test_finished_connections_release_their_snat_ports(cluster: MultiNodeCluster) -> None:
    """Each SNATed connection holds a port of node-1 in veer_nat_rev. When it
    ends (FIN/RST seen), its entries are marked closing, so the port is free
    for a new flow 10 s later instead of being held until the map fills."""
    cluster.write_manifest("web.yaml", web("Cluster", {"10.244.2.2": "node-2"}))
    cluster.wait_external("10.0.0.1:30080/TCP", cluster.nodes[0], ["10.244.2.2:8080/TCP"],
                          False)
    result = cluster.probe_from_outside("tcp", "10.0.0.1", "30080", "--count", "20",
                                        "--timeout", "5")
    assert result["answers"] == {"web-c:8080": 20}, result
    maps = SockLbMaps.open(cluster.nodes[0].bpffs)
    try:
        held = [v for k, v in maps.nat_rev.items()
                if bytes(k.daddr[:4]) == bytes([10, 0, 0, 1]) and k.proto == 6]
    finally:
        maps.close()
    assert len(held) >= 20
    closing = 1 << 63
    open_ = [v for v in held if not v.last_seen_ns & closing]
    assert not open_, f"{len(open_)} of {len(held)} SNAT entries of finished connections"


# argv: address, port, source port; prints "<pod>:<port> <client address seen>".
FROM_PORT = GET_FROM_PORT + """
print(get(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), "/client"))
"""


def _snat_ports(cluster: MultiNodeCluster, backend: bytes) -> set[int]:
    """The node-1 ports of veer_nat_rev's TCP entries from `backend`:8080."""
    maps = SockLbMaps.open(cluster.nodes[0].bpffs)
    try:
        return {socket.ntohs(k.dport) for k, _ in maps.nat_rev.items()
                if bytes(k.saddr[:4]) == backend and socket.ntohs(k.sport) == 8080
                and bytes(k.daddr[:4]) == bytes([10, 0, 0, 1]) and k.proto == 6}
    finally:
        maps.close()


def test_the_nodes_own_connection_reusing_the_ports_of_a_source_natted_flow(
    cluster: MultiNodeCluster,
) -> None:
    """The outside client reaches web-c (on node-2) through node-1's
    NodePort from port P: node-1 source-NATs it to 10.0.0.1:P (the client's
    port, kept). The flow ends, and its reply entry stays 10 s for late
    packets. Node-1 itself then connects to web-c from 10.0.0.1:P, the very
    tuple web-c saw: the replies are node-1's, not the old flow's."""
    cluster.write_manifest("web.yaml", web("Cluster", {"10.244.2.2": "node-2"}))
    cluster.wait_external("10.0.0.1:30080/TCP", cluster.nodes[0], ["10.244.2.2:8080/TCP"],
                          False)
    port = 27123  # outside the tests' other fixed ports
    via_nodeport = cluster.topo.exec(
        cluster.external, [sys.executable, "-c", FROM_PORT, "10.0.0.1", "30080", str(port)],
        timeout=30, in_cgroup=False)
    assert via_nodeport.returncode == 0, via_nodeport.stderr
    assert via_nodeport.stdout.split() == ["web-c:8080", "10.0.0.1"], via_nodeport.stdout
    # The ended flow's reply entry is there, so the next connection meets it.
    assert port in _snat_ports(cluster, bytes([10, 244, 2, 2])), "the flow kept another port"
    direct = cluster.topo.exec(
        cluster.nodes[0].netns, [sys.executable, "-c", FROM_PORT, "10.244.2.2", "8080",
                                 str(port)],
        timeout=30, in_cgroup=False)
    assert direct.returncode == 0, direct.stderr
    assert direct.stdout.split() == ["web-c:8080", "10.0.0.1"], direct.stdout


HOLD_FROM_PORT = """
import http.client, sys
conn = http.client.HTTPConnection(sys.argv[1], int(sys.argv[2]), timeout=5,
                                  source_address=("0.0.0.0", int(sys.argv[3])))
for _ in range(2):  # two requests on one connection, each after a line on stdin
    conn.request("GET", "/client")
    print(conn.getresponse().read().decode().strip(), flush=True)
    sys.stdin.readline()
"""


def test_a_source_natted_flow_avoids_the_ports_of_the_nodes_own_connection(
    cluster: MultiNodeCluster,
) -> None:
    """Node-1 holds a connection to web-c from 10.0.0.1:P. The outside client
    then reaches web-c through node-1's NodePort from its port P too: the
    source NAT must not keep P (web-c would see the node's tuple again), and
    both connections go on."""
    cluster.write_manifest("web.yaml", web("Cluster", {"10.244.2.2": "node-2"}))
    cluster.wait_external("10.0.0.1:30080/TCP", cluster.nodes[0], ["10.244.2.2:8080/TCP"],
                          False)
    port = 27124
    web_c = bytes([10, 244, 2, 2])
    assert port not in _snat_ports(cluster, web_c)
    node = cluster.topo.spawn(
        cluster.nodes[0].netns,
        [sys.executable, "-c", HOLD_FROM_PORT, "10.244.2.2", "8080", str(port)],
        in_cgroup=False, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert node.stdin is not None and node.stdout is not None
    assert node.stdout.readline().split() == [b"web-c:8080", b"10.0.0.1"]
    via_nodeport = cluster.topo.exec(
        cluster.external, [sys.executable, "-c", FROM_PORT, "10.0.0.1", "30080", str(port)],
        timeout=30, in_cgroup=False)
    assert via_nodeport.returncode == 0, via_nodeport.stderr
    assert via_nodeport.stdout.split() == ["web-c:8080", "10.0.0.1"], via_nodeport.stdout
    ports = _snat_ports(cluster, web_c)
    assert ports and port not in ports, ports  # source-NATed, to another port
    node.stdin.write(b"\n")
    node.stdin.flush()
    assert node.stdout.readline().split() == [b"web-c:8080", b"10.0.0.1"]  # still the node's
    node.stdin.write(b"\n")
    node.stdin.flush()
    assert node.wait(timeout=10) == 0, node.stderr.read() if node.stderr else b""
    cluster.topo.forget(node)


# argv: address, port, source port. One UDP datagram; prints the answer.
UDP_ONCE = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3)
s.bind(("0.0.0.0", int(sys.argv[3]))); s.connect((sys.argv[1], int(sys.argv[2])))
s.send(b"ping"); print(s.recv(4096).decode().strip())
"""


@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_the_nodes_own_connection_moves_off_the_port_of_a_live_flow(
    cluster: MultiNodeCluster, proto: str,
) -> None:
    """The outside client holds a flow to web-c through node-1's NodePort
    from port P, source-NATed to 10.0.0.1:P (its port, kept). Node-1 itself
    then talks to web-c from 10.0.0.1:P, a port its kernel thinks free: web-c
    would see one tuple for two flows. As conntrack does, node-1 moves its
    own connection to another port, and both flows go on."""
    cluster.write_manifest("web.yaml", web("Cluster", {"10.244.2.2": "node-2"}))
    udp = proto == "udp"
    frontend, pod_port = ("30053", 9053) if udp else ("30080", 8080)
    cluster.wait_external(f"10.0.0.1:{frontend}/{proto.upper()}", cluster.nodes[0],
                          [f"10.244.2.2:{pod_port}/{proto.upper()}"], False)
    port = 27128 if udp else 27127
    held = cluster.topo.spawn(
        cluster.external,
        [sys.executable, "-c", UDP_ON_STDIN if udp else HOLD_FROM_PORT, "10.0.0.1", frontend,
         str(port)],
        in_cgroup=False, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert held.stdin is not None and held.stdout is not None
    if udp:
        held.stdin.write(b"\n")
        held.stdin.flush()
    first = held.stdout.readline().decode().strip()
    assert first.startswith("web-c"), first
    maps = SockLbMaps.open(cluster.nodes[0].bpffs)
    try:
        ident = 17 if udp else 6
        kept = [k for k, _ in maps.nat_rev.items()
                if k.proto == ident and socket.ntohs(k.dport) == port
                and bytes(k.daddr[:4]) == bytes([10, 0, 0, 1])]
        assert kept, "the flow was source-NATed to another port: nothing to clash with"
        script = UDP_ONCE if udp else FROM_PORT
        direct, (node1, *_) = counted(cluster, lambda: {"run": cluster.topo.exec(
            cluster.nodes[0].netns,
            [sys.executable, "-c", script, "10.244.2.2", str(pod_port), str(port)],
            timeout=30, in_cgroup=False)})
        res = direct["run"]
        assert res.returncode == 0, res.stderr
        assert res.stdout.startswith("web-c"), res.stdout
        # Moved once, or (rarely) again: web-c may answer the first SYN from
        # the new port with an ACK instead (a TIME_WAIT there of an earlier
        # flow on that port, whose timestamps came from another client's
        # clock); node-1's socket answers it with RST, which closes the
        # entry, and its retransmitted SYN is a new connection, moved afresh.
        # The connection then goes on from that port, as checked below.
        assert node1["nat_host_moved"] >= 1, node1
        # The node's tuple is rewritten to another port.
        own = [v for k, v in maps.nat_fwd.items()
               if k.proto == ident and socket.ntohs(k.sport) == port
               and bytes(k.saddr[:4]) == bytes([10, 0, 0, 1])
               and bytes(k.daddr[:4]) == bytes([10, 244, 2, 2])]
        assert len(own) == 1 and socket.ntohs(own[0].sport) != port, own
        # `veer conntrack` lists both flows as the kernel holds them.
        reader = MapsReader(maps)
        every, total = reader.nat_flows()
        assert total == len(every) >= 2
        flows = {(f.client_address, f.client_port, f.frontend_address, f.frontend_port): f
                 for f in every if f.protocol == proto.upper()}
        node_ip, web_c = ipaddress.ip_address("10.0.0.1"), ipaddress.ip_address("10.244.2.2")
        mine = flows[(node_ip, port, web_c, pod_port)]
        assert (mine.service_id, mine.source_address, mine.source_port, mine.backend_address,
                mine.backend_port) == (0, node_ip, socket.ntohs(own[0].sport), web_c,
                                       pod_port), mine
        client = flows[(ipaddress.ip_address("10.0.0.100"), port, node_ip, int(frontend))]
        assert client.service_id != 0 and (client.source_address, client.source_port,
                                           client.backend_address) == (node_ip, port, web_c)
        assert client.flags == () and client.idle_seconds < 60, client
        # Filtered on the raw entries: the outside client's address.
        outside = ipaddress.ip_address("10.0.0.100")
        theirs, n = reader.nat_flows(outside)
        ends = {(f.client_address, f.client_port, f.source_port) for f in theirs}
        assert n == len(theirs) and (outside, port, port) in ends, theirs
        assert (node_ip, port, mine.source_port) not in ends, theirs
        assert all(outside in (f.client_address, f.source_address) for f in theirs), theirs
        one, n = reader.nat_flows(port=port, limit=1)
        assert len(one) == 1 and n >= 2, (one, n)
    finally:
        maps.close()
    held.stdin.write(b"\n")
    held.stdin.flush()
    assert held.stdout.readline().decode().strip() == first  # still the client's flow
    if not udp:
        held.stdin.write(b"\n")
        held.stdin.flush()
    assert held.wait(timeout=10) == 0, held.stderr.read() if held.stderr else b""
    cluster.topo.forget(held)
    if not udp:
        # Both ends closed: the flow's entry is marked closing (FIN both ways).
        def closed() -> bool:
            maps = SockLbMaps.open(cluster.nodes[0].bpffs)
            try:
                flows, _ = MapsReader(maps).nat_flows(ipaddress.ip_address("10.0.0.100"), port)
            finally:
                maps.close()
            return any(f.frontend_port == int(frontend) and "closing" in f.flags
                       and "half-closed" not in f.flags for f in flows)
        deadline = time.monotonic() + 10
        while not closed():
            assert time.monotonic() < deadline, "the ended flow is not marked closing"
            time.sleep(0.1)


# argv: LB address, node address, source port. One client port, two live
# connections to two frontends of one Service (its LoadBalancer IP and its
# NodePort): clients reuse an ephemeral port across destinations.
TWO_FRONTENDS_ONE_PORT = """
import http.client, socket, sys
def connect(addr, port, src):
    s = socket.socket(); s.settimeout(5)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", src)); s.connect((addr, port))
    conn = http.client.HTTPConnection(addr, port, timeout=5); conn.sock = s
    return conn
def ask(conn):
    conn.request("GET", "/client"); return conn.getresponse().read().decode().strip()
lb = connect(sys.argv[1], 80, int(sys.argv[3]))
first = ask(lb)
nodeport = connect(sys.argv[2], 30080, int(sys.argv[3]))
print(first, ask(nodeport), ask(lb), sep="|")
"""


def test_one_client_port_to_two_frontends_gets_two_snat_ports(
    cluster: MultiNodeCluster,
) -> None:
    """The outside client, from port P, holds a connection to the
    LoadBalancer IP (SNATed by node-1 to 10.0.0.1:P, P being free) and then
    opens one to the NodePort of the same Service from P too. That is not
    P's previous connection ending: the second flow needs another SNAT port,
    or web-c would see one tuple for two connections and both would break."""
    cluster.write_manifest("web.yaml", web("Cluster", {"10.244.2.2": "node-2"}, lb=True))
    cluster.wait_external("10.0.0.1:30080/TCP", cluster.nodes[0], ["10.244.2.2:8080/TCP"],
                          False)
    cluster.wait_external(f"{LB_IP}:80/TCP", cluster.nodes[0], ["10.244.2.2:8080/TCP"], False)
    port = 27125
    res = cluster.topo.exec(
        cluster.external,
        [sys.executable, "-c", TWO_FRONTENDS_ONE_PORT, LB_IP, "10.0.0.1", str(port)],
        timeout=30, in_cgroup=False)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().split("|") == ["web-c:8080 10.0.0.1"] * 3, res.stdout
    ports = _snat_ports(cluster, bytes([10, 244, 2, 2]))
    assert port in ports and len(ports - {port}) >= 1, ports


# argv: port. An HTTP server in a node's own network (a hostNetwork pod):
# answers "host:<port> <client address it saw>".
HOST_SERVER = """
import http.server, sys
class Answer(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = f"host:{sys.argv[1]} {self.client_address[0]}".encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body)))
        self.end_headers(); self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.HTTPServer(("0.0.0.0", int(sys.argv[1])), Answer).serve_forever()
"""


def one_port_service(name: str, cluster_ip: str, node_port: int, target: str,
                     node: str, policy: str = "Cluster") -> str:
    """Service `name`: TCP port 80 on `node_port` -> `target` ("address:port")
    on `node`, its only endpoint."""
    address, port = target.rsplit(":", 1)
    svc = {"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": name, "namespace": "default"},
           "spec": {"type": "NodePort", "clusterIP": cluster_ip,
                    "externalTrafficPolicy": policy,
                    "ports": [{"name": "tcp", "protocol": "TCP", "port": 80,
                               "targetPort": int(port), "nodePort": node_port}]}}
    eps = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"name": f"{name}-1", "namespace": "default",
                        "labels": {"kubernetes.io/service-name": name}},
           "addressType": "IPv4",
           "ports": [{"name": "tcp", "protocol": "TCP", "port": int(port)}],
           "endpoints": [{"addresses": [address], "nodeName": node}]}
    return json.dumps(svc) + "\n---\n" + json.dumps(eps) + "\n"


@pytest.mark.parametrize("policy", ["Cluster", "Local"])
def test_a_host_network_backend_on_the_node_reached_from_outside(
    cluster: MultiNodeCluster, policy: str
) -> None:
    """A backend at the node's own address (a hostNetwork pod, such as an
    ingress controller) behind a NodePort: the route lookup answers 'not
    forwarded' (local), and the packet is translated and handed to the
    node's own stack, the client's address kept; from node-2 it is
    forwarded and source-NATed like any remote backend."""
    server = cluster.topo.spawn(cluster.nodes[0].netns,
                                [sys.executable, "-c", HOST_SERVER, "18080"], in_cgroup=False)
    try:
        cluster.write_manifest("host.yaml", one_port_service(
            "host", "10.96.0.30", 30090, "10.0.0.1:18080", "node-1", policy))
        cluster.wait_external("10.0.0.1:30090/TCP", cluster.nodes[0], ["10.0.0.1:18080/TCP"],
                              policy == "Local")
        via = {"10.0.0.1": f"host:18080 {EXT}"}
        if policy == "Cluster":
            cluster.wait_external("10.0.0.2:30090/TCP", cluster.nodes[1],
                                  ["10.0.0.1:18080/TCP"], False)
            via["10.0.0.2"] = "host:18080 10.0.0.2"
        for node_ip, answer in via.items():
            for attempt in range(20):  # the server may still be starting
                res = cluster.topo.exec(
                    cluster.external,
                    [sys.executable, "-c", FROM_PORT, node_ip, "30090", str(27130 + attempt)],
                    timeout=30, in_cgroup=False)
                if res.returncode == 0 or attempt == 19:
                    break
                time.sleep(0.25)
            assert res.returncode == 0, res.stderr
            assert res.stdout.strip() == answer, (node_ip, res.stdout)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(cluster.manifests, "host.yaml"))
        server.terminate()
        server.wait(timeout=10)
        cluster.topo.forget(server)


def test_a_remote_backend_by_another_link_is_source_natted(cluster: MultiNodeCluster) -> None:
    """Node-1 reaches node-2's pods by a link of their own (as through an
    overlay's tunnel), through a gateway, not by the device the client's
    packet came in on. The backend is still on another node: source-NAT,
    or it would answer the outside client directly from its pod address."""
    cluster.write_manifest("web.yaml", web("Cluster", {"10.244.2.2": "node-2"}))
    cluster.wait_external("10.0.0.1:30080/TCP", cluster.nodes[0], ["10.244.2.2:8080/TCP"],
                          False)
    one, two = cluster.nodes[0].netns, cluster.nodes[1].netns
    topo = cluster.topo
    topo.ns(one, "ip", "link", "add", "vr-link", "type", "veth", "peer", "name", "vr-link",
            "netns", two)
    try:
        topo.ns(one, "ip", "addr", "add", "10.9.0.1/30", "dev", "vr-link")
        topo.ns(two, "ip", "addr", "add", "10.9.0.2/30", "dev", "vr-link")
        topo.ns(one, "ip", "link", "set", "vr-link", "up")
        topo.ns(two, "ip", "link", "set", "vr-link", "up")
        topo.ns(one, "ip", "route", "replace", "10.244.2.0/24", "via", "10.9.0.2")
        result = cluster.probe_from_outside("tcp", "10.0.0.1", "30080", "--count", "5",
                                            "--timeout", "5")
        assert result["answers"] == {"web-c:8080": 5} and result["errors"] == {}, result
        res = cluster.topo.exec(
            cluster.external,
            [sys.executable, "-c", FROM_PORT, "10.0.0.1", "30080", "27140"],
            timeout=30, in_cgroup=False)
        assert res.returncode == 0, res.stderr
        assert res.stdout.split() == ["web-c:8080", "10.0.0.1"], res.stdout
    finally:
        topo.ns(one, "ip", "route", "replace", "10.244.2.0/24", "via", "10.0.0.2")
        topo.ns(one, "ip", "link", "del", "vr-link")


# argv: port. Accepts one connection, reads to its end (the client's FIN),
# prints "eof", then at a line on stdin sends "late" and closes.
HALF_CLOSE_SERVER = """
import socket, sys
listener = socket.socket(); listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("0.0.0.0", int(sys.argv[1]))); listener.listen(1)
print("listening", flush=True)
conn, _ = listener.accept()
while conn.recv(4096):
    pass
print("eof", flush=True)
sys.stdin.readline()
conn.sendall(b"late"); conn.close()
"""

# argv: address, port. Connects, sends a line, closes its sending side, and
# prints what comes back until the server closes.
HALF_CLOSE_CLIENT = """
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
s.sendall(b"hello\\n"); s.shutdown(socket.SHUT_WR)
data = b""
while chunk := s.recv(4096):
    data += chunk
print(data.decode(), flush=True)
"""


def test_a_half_closed_connection_outlives_the_closing_time(cluster: MultiNodeCluster) -> None:
    """The client sends its FIN and waits; the backend answers later (here:
    both NAT entries aged past the 10 s a closed flow keeps, by hand). One
    FIN closes one direction only: the answer must still be translated."""
    server = cluster.topo.spawn(
        cluster.topo.pods["web-c"].netns, [sys.executable, "-c", HALF_CLOSE_SERVER, "18095"],
        in_cgroup=False, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    client = None
    try:
        assert server.stdin is not None and server.stdout is not None
        assert server.stdout.readline().strip() == b"listening"
        cluster.write_manifest("half.yaml", one_port_service(
            "half", "10.96.0.31", 30095, "10.244.2.2:18095", "node-2"))
        cluster.wait_external("10.0.0.1:30095/TCP", cluster.nodes[0], ["10.244.2.2:18095/TCP"],
                              False)
        client = cluster.topo.spawn(
            cluster.external, [sys.executable, "-c", HALF_CLOSE_CLIENT, "10.0.0.1", "30095"],
            in_cgroup=False, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert server.stdout.readline().strip() == b"eof"
        maps = SockLbMaps.open(cluster.nodes[0].bpffs)
        try:
            aged = 0
            for table in (maps.nat_fwd, maps.nat_rev):
                for k, v in list(table.items()):
                    if k.proto == 6 and 30095 in (socket.ntohs(k.dport), socket.ntohs(v.sport)):
                        flags = v.last_seen_ns & (0b111 << 61)
                        v.last_seen_ns = (time.monotonic_ns() - 11 * 10**9) | flags
                        table.put(k, v)
                        aged += 1
            assert aged == 2, aged
        finally:
            maps.close()
        server.stdin.write(b"\n")
        server.stdin.flush()
        out, err = client.communicate(timeout=20)
        assert out.strip() == b"late", (out, err)
    finally:
        for proc in (server, client):
            if proc is not None:
                proc.kill()
                proc.wait(timeout=10)
                cluster.topo.forget(proc)
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(cluster.manifests, "half.yaml"))


def test_access_rules_drop_denied_outside_clients(cluster: MultiNodeCluster) -> None:
    """A TrafficPolicy's access rules on the per-packet path: the denied
    outside client's packets are dropped (its connect times out; a refusal
    would say the Service is there); a pod of node-2, allowed, is served
    through node-1's NodePort; the drops are counted per rule."""
    rules = {"defaultAction": "Allow",
             "rules": [{"action": "Deny", "sources": [f"{EXT}/32"]}]}
    tp = {"apiVersion": "veer.dev/v1alpha1", "kind": "TrafficPolicy",
          "metadata": {"name": "web-acl", "namespace": "default",
                       "creationTimestamp": "2026-01-01T00:00:00Z"},
          "spec": {"targetRefs": [{"name": "web"}], "access": rules}}
    cluster.write_manifest("web.yaml", web("Cluster", ALL) + "---\n" + json.dumps(tp) + "\n")
    node = cluster.nodes[0]
    cluster.wait_status(node, lambda s: "default/web-acl" in s.get("policies", {}),
                        "web-acl in force on node-1")
    denied = cluster.probe_from_outside("tcp", "10.0.0.1", "30080", "--count", "3",
                                        "--timeout", "1")
    assert denied["answers"] == {} and denied["errors"] == {"TIMEOUT": 3}, denied
    allowed = cluster.probe_from_pod("cli-2", "tcp", "10.0.0.1", "30080", "--count", "10")
    assert allowed["errors"] == {} and sum(allowed["answers"].values()) == 10, allowed
    maps = SockLbMaps.open(node.bpffs)
    try:
        dropped = maps.counters()["nat_access_denied"]
        hits = maps.access_hit_counts()
    finally:
        maps.close()
    assert dropped >= 3, dropped
    assert sum(n for (_, rule), n in hits.items() if rule == 0) >= 3, hits
    cluster.write_manifest("web.yaml", web("Cluster", ALL))


def _policy(name: str, **spec: object) -> str:
    return json.dumps({"apiVersion": "veer.dev/v1alpha1", "kind": "TrafficPolicy",
                       "metadata": {"name": name, "namespace": "default",
                                    "creationTimestamp": "2026-01-01T00:00:00Z"},
                       "spec": {"targetRefs": [{"name": "web"}], **spec}}) + "\n"


def test_algorithms_on_the_per_packet_path(cluster: MultiNodeCluster) -> None:
    """RoundRobin and Maglev choose for flows from outside too (the TC
    program shares the socket path's veer_pick): one outside client's
    connections, one at a time, cycle through the three endpoints; with
    Maglev, each (client address, source port) lands where the table and hash
    of agent/compute/tables.py say, again and again."""
    from agent.compute.tables import backend_name, flow_hash, flow_words, maglev_table

    node = cluster.nodes[0]
    cluster.write_manifest("web.yaml", web("Cluster", ALL) + "---\n" + _policy(
        "web-rr", loadBalancing={"algorithm": "RoundRobin"}))
    cluster.wait_status(node, lambda s: "default/web-rr" in s.get("policies", {}),
                        "web-rr in force on node-1")
    rr, moved = counted(cluster, lambda: cluster.probe_from_outside(
        "tcp", "10.0.0.1", "30080", "--count", "30", "--timeout", "5"))
    seq = [a.split(":")[0] for a in rr["sequence"]]
    assert rr["errors"] == {} and sorted(set(seq)) == ["web-a", "web-b", "web-c"], rr
    assert all(seq[i] == seq[i % 3] for i in range(30)), (
        f"{' '.join(seq)}; counted: {[{k: n for k, n in c.items() if n} for c in moved]}")

    cluster.write_manifest("web.yaml", web("Cluster", ALL) + "---\n" + _policy(
        "web-maglev", loadBalancing={"algorithm": "Maglev"}))
    cluster.wait_status(node, lambda s: "default/web-maglev" in s.get("policies", {}),
                        "web-maglev in force on node-1")
    # Fixed source ports below the ephemeral range: a port an earlier
    # connection took at random may still be in TIME_WAIT (EADDRINUSE).
    first = cluster.probe_from_outside("tcp", "10.0.0.1", "30080", "--count", "60",
                                       "--source-port", "21000", "--timeout", "5")
    again = cluster.probe_from_outside("tcp", "10.0.0.1", "30080", "--count", "60",
                                       "--source-port", "21000", "--timeout", "5")
    got = [a.split(":")[0] for a in first["sequence"]]
    assert first["errors"] == {} and got == [a.split(":")[0] for a in again["sequence"]]
    pods = {"10.244.1.2": "web-a", "10.244.1.3": "web-b", "10.244.2.2": "web-c"}
    ordered = sorted(pods, key=lambda ip: tuple(map(int, ip.split("."))))
    table = maglev_table([backend_name(bytes(map(int, ip.split("."))), 8080)
                          for ip in ordered], [], 1021)
    client = bytes(map(int, EXT.split("."))).ljust(16, b"\0")
    want = [pods[ordered[table[flow_hash(flow_words(
        client, int.from_bytes(p.to_bytes(2, "big"), "little"), 6)) % 1021]]]
        for p in range(21000, 21060)]
    assert got == want
    cluster.write_manifest("web.yaml", web("Cluster", ALL))


def test_least_connections_counts_flows_from_outside(cluster: MultiNodeCluster) -> None:
    """LeastConnections on the per-packet path: node-1 counts each flow it
    places from outside until the flow's FIN or RST passes, so an outside
    client's held connections fill the backends evenly and a freed backend
    takes the next ones. A flow that ends unseen (its NAT entry evicted) is
    given back by the agent's sweep; in the end nothing stays counted."""
    from agent.datapath.ebpf.lc_sweep import LeastConnSweeper, open_connections

    node = cluster.nodes[0]
    cluster.write_manifest("web.yaml", web("Cluster", ALL) + "---\n" + _policy(
        "web-lc", loadBalancing={"algorithm": "LeastConnections"}))
    cluster.wait_status(node, lambda s: "default/web-lc" in s.get("policies", {}),
                        "web-lc in force on node-1")
    def counted() -> int:
        maps = SockLbMaps.open(node.bpffs)
        try:
            return sum(open_connections(maps).values())
        finally:
            maps.close()

    with Holder(cluster.external) as holder:
        first = [holder.open("10.0.0.1", 30080) for _ in range(6)]
        assert sorted(b.split(":")[0] for b in first) == [
            "web-a", "web-a", "web-b", "web-b", "web-c", "web-c"], first
        assert counted() == 6
        # Free web-c (on the other node, SNATed): both of the next go there
        # (random: 1/9; round robin: never both).
        assert holder.close("web-c:8080") == 2
        deadline = time.monotonic() + 5
        while counted() != 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert counted() == 4
        nxt = [holder.open("10.0.0.1", 30080).split(":")[0] for _ in range(2)]
        assert nxt == ["web-c", "web-c"], nxt

        # Two flows' NAT entries vanish (as when the LRU evicts them): the
        # kernel will never see their end; the sweep gives them back.
        maps = SockLbMaps.open(node.bpffs)
        try:
            ours = [k for k, _ in maps.lc_flows.items()][:2]
            for key in ours:
                maps.nat_fwd.delete(key)
            LeastConnSweeper(maps, interval=0).sweep()
            assert sum(open_connections(maps).values()) == 4
        finally:
            maps.close()
    deadline = time.monotonic() + 5
    while counted() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert counted() == 0
    cluster.write_manifest("web.yaml", web("Cluster", ALL))


# ---- DSR (--nodeport-mode dsr) ------------------------------------------------------
#
# Three nodes, every agent in DSR mode: node-1 10.0.0.1 / fd00:10::1 with
# web-a; node-2 10.0.0.2 / fd00:10::2 with web-c and the client pod cli-2;
# node-3 10.0.0.3 / fd00:10::3 with web-d. Service dsr: TCP 80 -> 8080 on
# nodePort 30100, UDP 53 -> 9053 on 30101, over both families. The clients
# dial node-1's NodePort. A flow to a backend on another node is only DNATed
# by node-1; the backend's node answers the client itself from the frontend's
# address. So the pod sees the client's address, the client sees the replies
# come from the address it dialled (TCP connects at all only then; the UDP
# probe compares each reply's source), and node-1 restores no reply.

DSR_PODS = {"web-a": 1, "web-c": 2, "cli-2": 2, "web-d": 3}
DSR_IP = {
    4: {"web-a": "10.244.1.2", "web-c": "10.244.2.2", "cli-2": "10.244.2.3",
        "web-d": "10.244.3.2"},
    6: {"web-a": "fd00:10:244:1::2", "web-c": "fd00:10:244:2::2", "cli-2": "fd00:10:244:2::3",
        "web-d": "fd00:10:244:3::2"},
}
DSR_NODE_OF = {"web-a": "node-1", "web-c": "node-2", "web-d": "node-3"}
NODE_IP = {4: ["10.0.0.1", "10.0.0.2", "10.0.0.3"], 6: ["fd00:10::1", "fd00:10::2", "fd00:10::3"]}
CLIENT = {4: EXT, 6: EXT6}
DSR_PORTS = {"tcp": 30100, "udp": 30101}


def dsr_service(pods: list[str]) -> str:
    """Dual-stack Service dsr (TCP and UDP NodePorts) whose endpoints are `pods`."""
    svc = {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "dsr", "namespace": "default"},
        "spec": {
            "type": "NodePort", "clusterIP": "10.96.0.70",
            "clusterIPs": ["10.96.0.70", "fd00:96::70"], "ipFamilies": ["IPv4", "IPv6"],
            "ipFamilyPolicy": "RequireDualStack", "externalTrafficPolicy": "Cluster",
            "ports": [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080,
                       "nodePort": DSR_PORTS["tcp"]},
                      {"name": "dns", "protocol": "UDP", "port": 53, "targetPort": 9053,
                       "nodePort": DSR_PORTS["udp"]}],
        },
    }
    docs: list[dict[str, object]] = [svc]
    for family in (4, 6):
        docs.append({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"dsr-ipv{family}", "namespace": "default",
                         "labels": {"kubernetes.io/service-name": "dsr"}},
            "addressType": f"IPv{family}",
            "ports": [{"name": "http", "protocol": "TCP", "port": 8080},
                      {"name": "dns", "protocol": "UDP", "port": 9053}],
            "endpoints": [{"addresses": [DSR_IP[family][p]], "nodeName": DSR_NODE_OF[p]}
                          for p in pods],
        })
    return "\n---\n".join(json.dumps(d) for d in docs) + "\n"


@pytest.fixture(scope="module")
def dsr_cluster() -> Iterator[MultiNodeCluster]:
    require_datapath()
    with MultiNodeCluster(nodes=3, pods=DSR_PODS) as c:
        c.start_agents(["--cluster-cidr", "10.244.0.0/16,fd00:10:244::/48",
                        "--nodeport-mode", "dsr"])
        for node in c.nodes:
            c.wait_status(node, lambda s: s.get("nodeport_mode") == "dsr", "DSR mode")
        yield c


def program(cluster: MultiNodeCluster, pods: list[str]) -> None:
    """Service dsr with `pods` as endpoints, programmed on every node for both
    families: node-1 sends the flows, and the backends' nodes take them in
    only for backends they serve (and restore only those's replies)."""
    cluster.write_manifest("dsr.yaml", dsr_service(pods))
    for index, node in enumerate(cluster.nodes):
        for family in (4, 6):
            for proto, port in DSR_PORTS.items():
                suffix = "/TCP" if proto == "tcp" else "/UDP"
                addr = NODE_IP[family][index]
                frontend = (f"{addr}:{port}{suffix}" if family == 4
                            else f"[{addr}]:{port}{suffix}")
                target = 8080 if proto == "tcp" else 9053
                want = sorted(f"{DSR_IP[family][p]}:{target}{suffix}" if family == 4
                              else f"[{DSR_IP[family][p]}]:{target}{suffix}" for p in pods)
                cluster.wait_external(frontend, node, want, False)


def counted(cluster: MultiNodeCluster, run: Callable[[], dict[str, Any]]
            ) -> tuple[dict[str, Any], list[dict[str, int]]]:
    """`run`'s result and what each node's datapath counted meanwhile (an
    empty dict for a node without pinned maps: the TPROXY runs of these
    tests, test_tproxy_nodes.py)."""
    maps = [SockLbMaps.open(n.bpffs)
            if os.path.exists(os.path.join(n.bpffs, "veer_nat_fwd")) else None
            for n in cluster.nodes]
    try:
        before = [m.counters() if m else {} for m in maps]
        result = run()
        after = [m.counters() if m else {} for m in maps]
    finally:
        for m in maps:
            if m:
                m.close()
    return result, [{k: a[k] - b.get(k, 0) for k in a} for a, b in zip(after, before,
                                                                          strict=True)]


def pod_of(answer: str) -> str:
    """The pod in a probe answer ("web-c:8080 10.0.0.100", or "web-c" for UDP)."""
    return answer.split(" ")[0].split(":")[0]


@pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_dsr_backend_nodes_answer_the_client_themselves(
    dsr_cluster: MultiNodeCluster, proto: str, family: int,
) -> None:
    """Backends on node-2 and node-3 only: every flow goes by DSR, each pod
    sees the client's address, and no reply passes node-1."""
    program(dsr_cluster, ["web-c", "web-d"])
    args = [proto, NODE_IP[family][0], str(DSR_PORTS[proto]), "--count", str(N),
            "--timeout", "5"]
    if proto == "tcp":
        args += ["--path", "/client"]
    result, (node1, node2, node3) = counted(
        dsr_cluster, lambda: dsr_cluster.probe_from_outside(*args))
    assert result["errors"] == {} and result["peer_mismatch"] == 0, result
    by_pod = {pod_of(a): n for a, n in result["answers"].items()}
    assert set(by_pod) == {"web-c", "web-d"}, result
    if proto == "tcp":
        assert set(result["answers"]) == {f"web-c:8080 {CLIENT[family]}",
                                          f"web-d:8080 {CLIENT[family]}"}, result
    # node-1: every new flow sent by DSR (each TCP connection is one; a UDP
    # socket may get the source port of a live flow of an earlier test, and
    # belong to it); nothing source-NATed, no reply restored there.
    assert node1["nat_new"] > 0 and node1["nat_dsr"] == node1["nat_new"], node1
    if proto == "tcp":
        assert node1["nat_new"] == N, node1
    assert node1["nat_snat"] == 0 and node1["nat_reply"] == 0, node1
    # The backends' nodes took the flows in and restored every reply.
    for node, pod in ((node2, "web-c"), (node3, "web-d")):
        assert node["nat_dsr_in"] > 0 and node["nat_reply"] >= by_pod[pod], (pod, node)
        if proto == "tcp":
            assert node["nat_dsr_in"] == by_pod[pod], (pod, node)
        assert node["nat_fail"] == 0, node


@pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
def test_dsr_local_backend_is_served_as_before(dsr_cluster: MultiNodeCluster,
                                               family: int) -> None:
    """A backend on node-1 itself needs no DSR: node-1 DNATs and restores its
    replies on the way out, as in the default mode."""
    program(dsr_cluster, ["web-a", "web-c"])
    result, (node1, node2, _) = counted(dsr_cluster, lambda: dsr_cluster.probe_from_outside(
        "tcp", NODE_IP[family][0], str(DSR_PORTS["tcp"]), "--count", str(N), "--path",
        "/client", "--timeout", "5"))
    assert result["errors"] == {} and result["peer_mismatch"] == 0, result
    assert set(result["answers"]) == {f"web-a:8080 {CLIENT[family]}",
                                      f"web-c:8080 {CLIENT[family]}"}, result
    remote = result["answers"][f"web-c:8080 {CLIENT[family]}"]
    assert node1["nat_new"] == N and node1["nat_dsr"] == remote, node1
    assert node1["nat_snat"] == 0 and node1["nat_reply"] > 0, node1
    assert node2["nat_dsr_in"] == remote, node2


@pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
def test_dsr_is_not_for_pods_nor_for_the_backends_own_node(dsr_cluster: MultiNodeCluster,
                                                          family: int) -> None:
    """The replies of a backend to a client on its own node (the node itself, or
    a pod there) never leave that node by its LAN device, where DSR replies are
    restored: such flows are source-NATed to node-1. Pods are source-NATed
    wherever they are; another node is served by DSR."""
    program(dsr_cluster, ["web-c", "web-d"])
    node1, node2, _ = NODE_IP[family]
    args = ("tcp", node1, str(DSR_PORTS["tcp"]), "--count", str(N), "--path", "/client",
            "--timeout", "5")
    from_node2 = dsr_cluster.probe_from_node(2, *args)
    assert from_node2["errors"] == {} and from_node2["peer_mismatch"] == 0, from_node2
    # web-c is on node-2, the client: SNAT. web-d (node-3) answers node-2 directly.
    assert set(from_node2["answers"]) == {f"web-c:8080 {node1}", f"web-d:8080 {node2}"}, \
        from_node2
    from_pod = dsr_cluster.probe_from_pod("cli-2", *args)
    assert from_pod["errors"] == {} and from_pod["peer_mismatch"] == 0, from_pod
    assert set(from_pod["answers"]) == {f"web-c:8080 {node1}", f"web-d:8080 {node1}"}, from_pod


# The largest UDP payload whose datagram fits the LAN's 1500-byte MTU as it is
# but not with the DSR option added (8 bytes over IPv4, 24 over IPv6), while the
# echo (6 bytes longer: "web-c ") still fits.
NO_ROOM = {4: 1500 - 20 - 8 - 7, 6: 1500 - 40 - 8 - 23}


@pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
def test_dsr_udp_flow_without_room_for_the_frontend_is_source_natted(
    dsr_cluster: MultiNodeCluster, family: int,
) -> None:
    """A UDP flow whose first datagram has no room for the DSR option under the
    MTU cannot tell the backend's node its frontend: it is source-NATed, and
    works, as in the default mode. Smaller datagrams go by DSR."""
    program(dsr_cluster, ["web-c"])
    node1 = NODE_IP[family][0]
    big, (n1, n2, _) = counted(dsr_cluster, lambda: dsr_cluster.probe_from_outside(
        "udp", node1, str(DSR_PORTS["udp"]), "--count", "10", "--size", str(NO_ROOM[family]),
        "--timeout", "5"))
    assert big["answers"] == {"web-c": 10} and big["errors"] == {}, big
    assert big["peer_mismatch"] == 0, big
    # (A socket may get the source port of a live flow of an earlier test, and
    # belong to it: new flows can be fewer than datagrams.)
    assert n1["nat_new"] > 0 and n1["nat_snat"] == n1["nat_new"] and n1["nat_dsr"] == 0, n1
    assert n1["nat_reply"] >= n1["nat_snat"] and n2["nat_dsr_in"] == 0, (n1, n2)
    small, (n1, n2, _) = counted(dsr_cluster, lambda: dsr_cluster.probe_from_outside(
        "udp", node1, str(DSR_PORTS["udp"]), "--count", "10", "--size",
        str(NO_ROOM[family] - 16), "--timeout", "5"))
    assert small["answers"] == {"web-c": 10} and small["peer_mismatch"] == 0, small
    assert n1["nat_new"] > 0 and n1["nat_dsr"] == n1["nat_new"] and n1["nat_snat"] == 0, n1
    assert n2["nat_dsr_in"] > 0, n2


# argv: address, port, frontend address, frontend port, source port. One UDP
# datagram carrying veer's DSR IPv4 option (type 158: the frontend), as a
# node in DSR mode sends a flow's packets to a backend's node.
DSR_CLAIM = """
import socket, struct, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
option = bytes([158, 8]) + socket.inet_aton(sys.argv[3]) + struct.pack("!H", int(sys.argv[4]))
s.setsockopt(socket.IPPROTO_IP, socket.IP_OPTIONS, option)
s.bind(("0.0.0.0", int(sys.argv[5])))
s.sendto(b"x", (sys.argv[1], int(sys.argv[2])))
"""


def test_a_dsr_option_is_taken_only_for_a_backend(dsr_cluster: MultiNodeCluster) -> None:
    """The option is a claim of whoever sent the packet. Node-2 writes the
    reply translation it asks for when the destination is a backend it
    serves (web-c), and not for any other address it routes to (the client
    pod cli-2): else anyone who can reach a pod could rewrite its replies."""
    program(dsr_cluster, ["web-c", "web-d"])
    ext = dsr_cluster.external
    dsr_cluster.topo.ns(ext, "ip", "route", "add", "10.244.2.0/24", "via", "10.0.0.2")
    try:
        for pod, port, source in (("cli-2", 9999, 27150), ("web-c", 9053, 27151)):
            res = dsr_cluster.topo.exec(
                ext, [sys.executable, "-c", DSR_CLAIM, DSR_IP[4][pod], str(port), "10.0.0.1",
                      "30101", str(source)], timeout=30, in_cgroup=False)
            assert res.returncode == 0, res.stderr
        maps = SockLbMaps.open(dsr_cluster.nodes[1].bpffs)
        try:
            deadline = time.monotonic() + 5
            while True:
                claimed = {socket.ntohs(k.dport) for k, _ in maps.nat_rev.items()
                           if bytes(k.daddr[:4]) == socket.inet_aton(EXT)
                           and socket.ntohs(k.dport) in (27150, 27151)}
                if 27151 in claimed or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
        finally:
            maps.close()
        assert claimed == {27151}, claimed
    finally:
        dsr_cluster.topo.ns(ext, "ip", "route", "del", "10.244.2.0/24", "via", "10.0.0.2")
