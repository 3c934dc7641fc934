"""Terse builders of Kubernetes objects as plain dicts (what a manifest or the
API server hands veer), and helpers that turn them into the model.

Builders return dicts, not model objects, so every test goes through the real
parser exactly as production input does. Keyword arguments left at None are
left out of the object, so "absent" and "false" stay distinguishable.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Any

from agent.compute import ComputeConfig, DesiredState, NodeIdentity, compute_desired
from agent.model.parse import Model, parse_object
from agent.model.snapshot import ClusterSnapshot

Doc = dict[str, Any]


def _meta(name: str, ns: str | None, labels: dict[str, str] | None) -> Doc:
    meta: Doc = {"name": name}
    if ns is not None:
        meta["namespace"] = ns
    if labels:
        meta["labels"] = dict(labels)
    return meta


def port(
    name: str,
    number: int,
    target: int | str | None = None,
    protocol: str | None = "TCP",
    node_port: int | None = None,
) -> Doc:
    """One Service port; `target` None leaves targetPort out (it defaults to the port)."""
    p: Doc = {"name": name, "port": number}
    if protocol is not None:
        p["protocol"] = protocol
    if target is not None:
        p["targetPort"] = target
    if node_port is not None:
        p["nodePort"] = node_port
    return p


def service(
    name: str,
    *ports: Doc,
    ips: Iterable[str] | str = ("10.96.0.1",),
    ns: str | None = "default",
    type: str | None = None,
    labels: dict[str, str] | None = None,
    **spec: Any,
) -> Doc:
    """A Service. `ips` is its clusterIPs ("None" for headless, () for none)."""
    cluster_ips = [ips] if isinstance(ips, str) else list(ips)
    body: Doc = dict(spec)
    if cluster_ips:
        body["clusterIP"] = cluster_ips[0]
        body["clusterIPs"] = cluster_ips
        if cluster_ips != ["None"] and "ipFamilies" not in body:
            body["ipFamilies"] = [
                "IPv4" if ipaddress.ip_address(ip).version == 4 else "IPv6" for ip in cluster_ips
            ]
    if type is not None:
        body["type"] = type
    body["ports"] = list(ports)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(name, ns, labels),
        "spec": body,
    }


def ep(
    ip: str,
    ready: bool | None = None,
    serving: bool | None = None,
    terminating: bool | None = None,
    node: str | None = None,
    zone: str | None = None,
    **extra: Any,
) -> Doc:
    """One EndpointSlice endpoint; absent conditions stay absent."""
    conditions = {
        k: v
        for k, v in (("ready", ready), ("serving", serving), ("terminating", terminating))
        if v is not None
    }
    e: Doc = {"addresses": [ip], **extra}
    if conditions:
        e["conditions"] = conditions
    if node is not None:
        e["nodeName"] = node
    if zone is not None:
        e["zone"] = zone
    return e


def eport(name: str, number: int | None, protocol: str | None = "TCP") -> Doc:
    """One EndpointSlice port."""
    p: Doc = {"name": name}
    if number is not None:
        p["port"] = number
    if protocol is not None:
        p["protocol"] = protocol
    return p


def eps(
    name: str,
    service_name: str | None,
    *endpoints: Doc,
    ports: Iterable[Doc] = (),
    ns: str | None = "default",
    address_type: str | None = None,
    labels: dict[str, str] | None = None,
) -> Doc:
    """An EndpointSlice of `service_name` (None: no service-name label).

    The address type is guessed from the first endpoint when not given.
    """
    all_labels = dict(labels or {})
    if service_name is not None:
        all_labels["kubernetes.io/service-name"] = service_name
    if address_type is None:
        first = endpoints[0]["addresses"][0] if endpoints else "0.0.0.0"
        address_type = "IPv4" if ipaddress.ip_address(first).version == 4 else "IPv6"
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": _meta(name, ns, all_labels),
        "addressType": address_type,
        "ports": list(ports),
        "endpoints": list(endpoints),
    }


def node(name: str, zone: str | None = None, **extra: Any) -> Doc:
    labels = {"topology.kubernetes.io/zone": zone} if zone else None
    return {"apiVersion": "v1", "kind": "Node", "metadata": _meta(name, None, labels), **extra}


def models(*docs: Doc) -> list[Model]:
    out = []
    for doc in docs:
        obj = parse_object(doc)
        assert obj is not None, f"builder produced an unconsumed kind: {doc.get('kind')}"
        out.append(obj)
    return out


def snapshot(*docs: Doc) -> ClusterSnapshot:
    return ClusterSnapshot.of(models(*docs))


def desired(*docs: Doc, config: ComputeConfig | None = None) -> DesiredState:
    return compute_desired(snapshot(*docs), NodeIdentity("node-1"), config or ComputeConfig())


def frontends_text(state: DesiredState) -> dict[str, list[str]]:
    """{frontend: [backend, ...]} as strings, for readable comparisons."""
    return {str(k): [str(b) for b in f.backends] for k, f in state.frontends.items()}
