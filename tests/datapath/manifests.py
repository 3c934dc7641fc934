"""Small manifest writers for datapath tests."""

from __future__ import annotations

import json

POD_IPS = {"web-a": "10.244.1.2", "web-b": "10.244.1.3", "web-c": "10.244.1.4",
           "web-d": "10.244.1.5"}


def service_with_endpoints(
    name: str,
    cluster_ip: str,
    pods: list[str],
    port: int = 80,
    target: int = 8080,
    protocol: str = "TCP",
    not_ready: tuple[str, ...] = (),
) -> str:
    """A Service and one EndpointSlice, as JSON documents in one YAML stream."""
    svc = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "clusterIP": cluster_ip,
            "ports": [{"name": "p", "protocol": protocol, "port": port, "targetPort": target}],
        },
    }
    eps = {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"{name}-1",
            "namespace": "default",
            "labels": {"kubernetes.io/service-name": name},
        },
        "addressType": "IPv4",
        "ports": [{"name": "p", "protocol": protocol, "port": target}],
        "endpoints": [
            {"addresses": [POD_IPS[p]], "conditions": {"ready": p not in not_ready}}
            for p in pods
        ],
    }
    return json.dumps(svc) + "\n---\n" + json.dumps(eps) + "\n"


def backends(pods: list[str], target: int = 8080, protocol: str = "TCP") -> list[str]:
    return [f"{POD_IPS[p]}:{target}/{protocol}" for p in pods]
