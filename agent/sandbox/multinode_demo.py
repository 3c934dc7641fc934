"""`veer sandbox --nodes N`: several nodes on one machine, an agent on each,
and NodePort traffic from a client outside the cluster, under both
externalTrafficPolicy values, reported per node: which pod answered and which
client address it saw. Every figure is measured in the run that prints it."""

from __future__ import annotations

import json
from collections import Counter

from agent.sandbox.multinode import MultiNodeCluster
from agent.sandbox.topology import wait_for_interrupt

NODE_PORT = 30080


def _service(policy: str, cluster: MultiNodeCluster) -> str:
    svc = {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {"type": "NodePort", "clusterIP": "10.96.0.10", "externalTrafficPolicy": policy,
                 "ports": [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080,
                            "nodePort": NODE_PORT}]},
    }
    eps = {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "web-1", "namespace": "default",
                     "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "protocol": "TCP", "port": 8080}],
        "endpoints": [{"addresses": [cluster.pod_ips[pod]], "nodeName": node.name}
                      for node in cluster.nodes for pod in node.pods],
    }
    return json.dumps(svc) + "\n---\n" + json.dumps(eps) + "\n"


def run_multinode_demo(nodes: int, requests: int, keep: bool) -> int:
    pods = {f"web-{i}{c}": i for i in range(1, nodes + 1) for c in "ab"}
    print(f"veer sandbox: {nodes} nodes on a LAN (10.0.0.0/24), two nginx pods on each,")
    print("an agent per node (own cgroup and bpffs), and a client outside the cluster "
          "(10.0.0.100).\n")
    with MultiNodeCluster(nodes=nodes, pods=pods) as cluster:
        cluster.start_agents()
        for policy in ("Cluster", "Local"):
            cluster.write_manifest("web.yaml", _service(policy, cluster))
            for node in cluster.nodes:
                mine = [cluster.pod_ips[p] for p in node.pods]
                want = sorted(f"{ip}:8080/TCP" for n in cluster.nodes
                              for ip in (cluster.pod_ips[p] for p in n.pods)
                              if policy == "Cluster" or ip in mine)
                cluster.wait_external(f"{node.address}:{NODE_PORT}/TCP", node, want,
                                      policy == "Local")
            print(f"== externalTrafficPolicy: {policy}: {requests} connections from outside "
                  "to each node's NodePort")
            for node in cluster.nodes:
                result = cluster.probe_from_outside(
                    "tcp", node.address, str(NODE_PORT), "--count", str(requests),
                    "--path", "/client", "--timeout", "5")
                answers: Counter[str] = Counter()
                for answer, count in result["answers"].items():
                    answers[answer] += count
                print(f"  via {node.name} {node.address}:{NODE_PORT}"
                      + (f"  errors: {result['errors']}" if result["errors"] else ""))
                for answer, count in sorted(answers.items()):
                    pod, _, seen = answer.partition(" ")
                    note = "client address kept" if seen == "10.0.0.100" else "SNAT to the node"
                    print(f"    {pod:<12} {count:>5}  saw {seen:<12} ({note})")
            print()
        if keep:
            print("the sandbox keeps running until Ctrl-C; manifests:", cluster.manifests)
            wait_for_interrupt()
    print("sandbox removed: namespaces, cgroups, pins and processes are gone.")
    return 0
