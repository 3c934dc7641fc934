"""Small manifest writers for datapath tests."""

from __future__ import annotations

import ipaddress
import json

from agent.compute.types import L4Addr
from agent.model.objects import Protocol

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
    """A Service and one EndpointSlice of the sandbox's pods, as JSON
    documents in one YAML stream."""
    return service_with_addresses(name, cluster_ip, [POD_IPS[p] for p in pods], port, target,
                                  protocol, not_ready=tuple(POD_IPS[p] for p in not_ready))


def service_with_addresses(name: str, cluster_ip: str, addresses: list[str],
                           port: int = 80, target: int = 8080, protocol: str = "TCP",
                           not_ready: tuple[str, ...] = ()) -> str:
    """A Service of one family and one EndpointSlice whose endpoints are
    `addresses`, pods' or not (addresses nobody holds)."""
    family = "IPv6" if ":" in cluster_ip else "IPv4"
    svc = {"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": name, "namespace": "default"},
           "spec": {"clusterIP": cluster_ip, "ipFamilies": [family],
                    "ports": [{"name": "p", "protocol": protocol, "port": port,
                               "targetPort": target}]}}
    eps = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"name": f"{name}-1", "namespace": "default",
                        "labels": {"kubernetes.io/service-name": name}},
           "addressType": family, "ports": [{"name": "p", "protocol": protocol, "port": target}],
           "endpoints": [{"addresses": [a], "conditions": {"ready": a not in not_ready}}
                         for a in addresses]}
    return json.dumps(svc) + "\n---\n" + json.dumps(eps) + "\n"


def l4(address: str, port: int, protocol: str = "TCP") -> str:
    """How the agent's status names a frontend or backend (L4Addr's text)."""
    return str(L4Addr(ipaddress.ip_address(address), port, Protocol(protocol)))


def backends(pods: list[str], target: int = 8080, protocol: str = "TCP") -> list[str]:
    return [l4(POD_IPS[p], target, protocol) for p in pods]
