"""Service policies on the socket path (clients on this node), with real traffic.

Conventions: see conftest.py. This node is node-1 with address 10.0.0.1
(examples/sandbox/node.yaml); endpoints marked node-2 stand for pods on
another node (they are real pods here, so a wrong choice would answer).
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from agent.datapath.ebpf.maps import SockLbMaps
from agent.sandbox.cluster import SandboxCluster
from tests.datapath.manifests import POD_IPS

VIP = "10.96.0.42"


def manifest(
    endpoints: dict[str, str],
    *,
    spec: dict[str, Any] | None = None,
    name: str = "pol",
    cluster_ip: str = VIP,
) -> str:
    """Service `name` (port 80 -> 8080, node port 30080 if NodePort) with
    endpoints {pod: nodeName}."""
    svc_spec: dict[str, Any] = {
        "clusterIP": cluster_ip,
        "ports": [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080,
                   "nodePort": 30080}],
    }
    svc_spec.update(spec or {})
    svc = {"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": name, "namespace": "default"}, "spec": svc_spec}
    eps = {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": f"{name}-1", "namespace": "default",
                     "labels": {"kubernetes.io/service-name": name}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "protocol": "TCP", "port": 8080}],
        "endpoints": [{"addresses": [POD_IPS[p]], "nodeName": n} for p, n in endpoints.items()],
    }
    return json.dumps(svc) + "\n---\n" + json.dumps(eps) + "\n"


def apply(cluster: SandboxCluster, text: str, frontend: str, backends: list[str]) -> None:
    cluster.write_manifest("pol.yaml", text)
    cluster.wait_frontend(frontend, [f"{POD_IPS[p]}:8080/TCP" for p in backends])


def counters(cluster: SandboxCluster) -> dict[str, int]:
    maps = SockLbMaps.open(cluster.topo.bpffs)
    try:
        return maps.counters()
    finally:
        maps.close()


ALL3 = {"web-a": "node-1", "web-b": "node-1", "web-c": "node-2"}


def test_client_ip_affinity_keeps_a_client_on_one_backend(cluster: SandboxCluster) -> None:
    spec = {"sessionAffinity": "ClientIP",
            "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}}}
    apply(cluster, manifest(ALL3, spec=spec), f"{VIP}:80/TCP", ["web-a", "web-b", "web-c"])
    first = cluster.probe("tcp", VIP, "80", "--count", "60")
    assert first["errors"] == {} and len(first["answers"]) == 1, first
    (chosen,) = first["answers"]
    # Without affinity, 60 connections over 3 backends all landing on one
    # happens with probability 3^-59: this cannot pass by chance.

    # The chosen backend leaves: the client moves, and sticks to its new one.
    remaining = {p: n for p, n in ALL3.items() if not chosen.startswith(p + ":")}
    apply(cluster, manifest(remaining, spec=spec), f"{VIP}:80/TCP", sorted(remaining))
    after = cluster.probe("tcp", VIP, "80", "--count", "60")
    assert after["errors"] == {} and len(after["answers"]) == 1, after
    assert chosen not in after["answers"]


def test_affinity_expires_after_its_timeout(cluster: SandboxCluster) -> None:
    spec = {"sessionAffinity": "ClientIP",
            "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 1}}}
    apply(cluster, manifest(ALL3, spec=spec), f"{VIP}:80/TCP", ["web-a", "web-b", "web-c"])
    before = counters(cluster)["affinity_hit"]
    cluster.probe("tcp", VIP, "80", "--count", "5", "--interval", "0.05")
    quick = counters(cluster)["affinity_hit"]
    assert quick - before == 4  # the first connection creates the entry
    time.sleep(1.5)
    cluster.probe("tcp", VIP, "80", "--count", "3", "--interval", "1.5")
    # 1.5 s apart with a 1 s timeout: the entry is stale each time.
    assert counters(cluster)["affinity_hit"] == quick


def test_internal_policy_local(cluster: SandboxCluster) -> None:
    spec = {"internalTrafficPolicy": "Local"}
    apply(cluster, manifest(ALL3, spec=spec), f"{VIP}:80/TCP", ["web-a", "web-b"])
    result = cluster.probe("tcp", VIP, "80", "--count", "100")
    assert result["errors"] == {}
    assert set(result["answers"]) == {"web-a:8080", "web-b:8080"}, result

    # Endpoints only on another node: kube-proxy drops; the socket layer fails
    # fast with EHOSTUNREACH instead of a timeout, and never says "refused".
    apply(cluster, manifest({"web-c": "node-2"}, spec=spec), f"{VIP}:80/TCP", [])
    dropped = cluster.probe("tcp", VIP, "80", "--count", "3", "--timeout", "5")
    assert dropped["errors"] == {"EHOSTUNREACH": 3}, dropped


def test_nodeport_from_a_local_pod(cluster: SandboxCluster) -> None:
    apply(cluster, manifest(ALL3, spec={"type": "NodePort"}), "10.0.0.1:30080/TCP",
          ["web-a", "web-b", "web-c"])
    result = cluster.probe("tcp", "10.0.0.1", "30080", "--count", "150")
    assert result["errors"] == {} and result["peer_mismatch"] == 0
    assert set(result["answers"]) == {"web-a:8080", "web-b:8080", "web-c:8080"}, result
    # The node's address is not a Service address: other ports are not refused.
    other = cluster.probe("tcp", "10.0.0.1", "30081", "--count", "1", "--timeout", "1")
    assert "ECONNREFUSED" not in other["errors"], other


def test_external_policy_local_short_circuits_local_clients(cluster: SandboxCluster) -> None:
    spec = {"type": "NodePort", "externalTrafficPolicy": "Local"}
    endpoints = {"web-a": "node-1", "web-c": "node-2"}
    apply(cluster, manifest(endpoints, spec=spec), "10.0.0.1:30080/TCP", ["web-a", "web-c"])
    # A client on this node reaches every endpoint, local or not (kube-proxy's
    # short-circuit); only traffic from outside is kept local.
    result = cluster.probe("tcp", "10.0.0.1", "30080", "--count", "100")
    assert set(result["answers"]) == {"web-a:8080", "web-c:8080"}, result


def test_external_ip_from_a_local_pod(cluster: SandboxCluster) -> None:
    spec = {"externalIPs": ["198.51.100.7"]}
    apply(cluster, manifest(ALL3, spec=spec), "198.51.100.7:80/TCP", ["web-a", "web-b", "web-c"])
    result = cluster.probe("tcp", "198.51.100.7", "80", "--count", "60")
    assert result["errors"] == {} and len(result["answers"]) >= 2, result
    refused = cluster.probe("tcp", "198.51.100.7", "81", "--count", "2", "--timeout", "2")
    assert refused["errors"] == {"ECONNREFUSED": 2}, refused


FETCH = """
import json, sys, urllib.request, urllib.error
try:
    r = urllib.request.urlopen(sys.argv[1], timeout=5)
    code, headers, body = r.status, dict(r.headers), r.read()
except urllib.error.HTTPError as e:
    code, headers, body = e.code, dict(e.headers), e.read()
print(json.dumps({"code": code, "weight": headers.get("X-Load-Balancing-Endpoint-Weight"),
                  "body": json.loads(body)}))
"""


def fetch(cluster: SandboxCluster, url: str) -> dict[str, Any]:
    res = cluster.topo.exec(cluster.client, [sys.executable, "-c", FETCH, url])
    assert res.returncode == 0, res.stderr
    return dict(json.loads(res.stdout))


def test_health_check_node_port_answers_like_kube_proxy(cluster: SandboxCluster) -> None:
    # kube-proxy serves the check of a LoadBalancer (one with no address yet
    # here: its NodePort is what the test reaches).
    spec = {"type": "LoadBalancer", "externalTrafficPolicy": "Local",
            "healthCheckNodePort": 32100}
    apply(cluster, manifest({"web-a": "node-1", "web-b": "node-1", "web-c": "node-2"},
                            spec=spec), "10.0.0.1:30080/TCP", ["web-a", "web-b", "web-c"])
    # The agent serves it in the node's namespace; the pod reaches the node
    # at its gateway address.
    url = "http://169.254.1.1:32100/"
    got = fetch(cluster, url)
    assert got == {"code": 200, "weight": "2", "body": {
        "service": {"namespace": "default", "name": "pol"}, "localEndpoints": 2,
        "serviceProxyHealthy": True}}, got

    apply(cluster, manifest({"web-c": "node-2"}, spec=spec), "10.0.0.1:30080/TCP", ["web-c"])
    got = fetch(cluster, url)
    assert got["code"] == 503 and got["body"]["localEndpoints"] == 0, got
