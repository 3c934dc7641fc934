"""Which endpoints of a Service port get traffic on this node: kube-proxy's
CategorizeEndpoints (pkg/proxy/topology.go), restated.

Inputs are one Service port's endpoints in one IP family, merged across its
EndpointSlices. The answer has three parts:

- `cluster`: endpoints for "Cluster" traffic policy. Ready endpoints that
  topology allows; if none is ready anywhere, the serving-and-terminating
  ones (so a rollout that briefly leaves only terminating pods keeps serving).
- `local`: endpoints on this node for "Local" policy: the local ready ones,
  or if there are none, the local serving-and-terminating ones.
- `has_any`: whether the Service has a usable endpoint anywhere. It decides
  between kube-proxy's two failure modes: no endpoint anywhere is a REJECT
  (connection refused); endpoints elsewhere but none local under a Local
  policy is a DROP.

Topology (hints written by the EndpointSlice controller for
trafficDistribution PreferClose / PreferSameZone / PreferSameNode, or the
topology-mode annotation) narrows `cluster` only when it is safe:
- same-node hints are used when every ready endpoint has node hints and one
  of them names this node;
- else zone hints when every ready endpoint has zone hints and one names
  this node's zone;
- otherwise topology is ignored (kube-proxy's fallback), so a hint that would
  leave this node without endpoints is never followed.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from agent.compute.types import ComputeConfig, L4Addr, NodeIdentity
from agent.model.objects import EndpointSlice, IPFamily, Service, ServicePort
from agent.model.snapshot import ClusterSnapshot

SERVICE_PROXY_NAME_LABEL = "service.kubernetes.io/service-proxy-name"
HEADLESS_LABEL = "service.kubernetes.io/headless"


def labels_proxied(labels: Mapping[str, str], config: ComputeConfig) -> bool:
    """Whether an object with these labels is veer's to see: kube-proxy's
    informer label selector (no service-proxy-name label, no headless label),
    with veer's --service-proxy-name admitting that one name. kube-proxy puts
    the selector on its Service and its EndpointSlice informers alike, so a
    slice so labelled is hidden even when its Service is not: the one rule
    for both (desired.is_proxied for Services, proxied_slices for slices)."""
    proxy_name = labels.get(SERVICE_PROXY_NAME_LABEL)
    if proxy_name is not None and proxy_name != config.service_proxy_name:
        return False
    return HEADLESS_LABEL not in labels


def proxied_slices(snapshot: ClusterSnapshot, svc: Service,
                   config: ComputeConfig) -> Iterable[EndpointSlice]:
    """The Service's EndpointSlices that labels_proxied admits, in name order."""
    slices = snapshot.slices_for(svc.meta.namespace, svc.meta.name)
    return (s for s in slices if labels_proxied(s.meta.labels, config))


@dataclass(frozen=True, slots=True)
class EndpointView:
    """One endpoint of one Service port, with what categorization needs."""

    backend: L4Addr
    ready: bool
    serving: bool
    terminating: bool
    node_name: str
    zone_hints: frozenset[str]  # empty: no zone hints
    node_hints: frozenset[str]  # empty: no node hints

    @property
    def serving_terminating(self) -> bool:
        return self.serving and self.terminating


class TopologyMode(enum.StrEnum):
    NONE = ""
    NODE = "node"
    ZONE = "zone"


@dataclass(frozen=True, slots=True)
class Categorized:
    cluster: tuple[L4Addr, ...]
    local: tuple[L4Addr, ...]
    has_any: bool
    topology: TopologyMode = TopologyMode.NONE


def endpoint_views(
    snapshot: ClusterSnapshot, svc: Service, port: ServicePort, family: IPFamily,
    config: ComputeConfig,
) -> list[EndpointView]:
    """The endpoints of one Service port in one family, merged across slices
    (those `config`'s label rule admits: proxied_slices).

    The Service port finds its number in each slice by port *name* and
    protocol (the EndpointSlice controller resolved named targetPorts per Pod).
    An address listed twice counts once (see _better for which listing).
    """
    found: dict[L4Addr, EndpointView] = {}
    for eps in proxied_slices(snapshot, svc, config):
        if eps.address_type != family.value:
            continue
        target = next(
            (
                p.port
                for p in eps.ports
                if p.name == port.name and p.protocol == port.protocol and p.port
            ),
            None,
        )
        if target is None:
            continue
        for ep in eps.endpoints:
            if not ep.addresses:
                continue
            # Kubernetes uses only the first address of an endpoint.
            backend = L4Addr(ep.addresses[0], target, port.protocol)
            view = EndpointView(
                backend=backend,
                ready=ep.ready,
                serving=ep.serving,
                terminating=ep.terminating,
                node_name=ep.node_name,
                zone_hints=frozenset(ep.hints.for_zones) if ep.hints else frozenset(),
                node_hints=frozenset(ep.hints.for_nodes) if ep.hints else frozenset(),
            )
            previous = found.get(backend)
            if previous is None or _better(view, previous):
                found[backend] = view
    return [found[k] for k in sorted(found, key=L4Addr.sort_key)]


def _better(view: EndpointView, kept: EndpointView) -> bool:
    """Whether `view` replaces `kept`, an endpoint of the same address and
    port from another slice. A pod network may give a new pod the address
    of one still terminating before its Pod object is gone: the running one
    is preferred, as kube-proxy's endpoint cache does; then a ready listing
    over a not-ready one (an endpoint seen in two slices while it moves)."""
    if view.terminating != kept.terminating:
        return not view.terminating
    return view.ready and not kept.ready


def local_ready_endpoints(snapshot: ClusterSnapshot, svc: Service, node_name: str,
                          config: ComputeConfig) -> int:
    """kube-proxy's LocalReadyEndpoints, which its health check node port
    answers with: the distinct addresses of the Service's ready endpoints on
    this node. Serving-and-terminating ones do not count, though they may
    serve as a fallback: a node whose pods are all draining must fail the
    check, so that the load balancer stops sending it new clients. Each
    family's proxy counts its own; the larger count is the node's."""
    by_family: dict[str, set[object]] = {}
    if not node_name:
        return 0
    for eps in proxied_slices(snapshot, svc, config):
        if eps.address_type not in (IPFamily.IPV4.value, IPFamily.IPV6.value):
            continue
        for ep in eps.endpoints:
            if ep.ready and ep.addresses and ep.node_name == node_name:
                by_family.setdefault(eps.address_type, set()).add(ep.addresses[0])
    return max((len(found) for found in by_family.values()), default=0)


def topology_mode(endpoints: Iterable[EndpointView], node: NodeIdentity) -> TopologyMode:
    """kube-proxy's topologyModeFromHints: which hints, if any, to follow."""
    any_ready = False
    all_node_hints = all_zone_hints = True
    node_match = zone_match = False
    for ep in endpoints:
        if not ep.ready:
            continue
        any_ready = True
        if not ep.node_hints:
            all_node_hints = False
        elif node.name in ep.node_hints:
            node_match = True
        if not ep.zone_hints:
            all_zone_hints = False
        elif node.zone and node.zone in ep.zone_hints:
            zone_match = True
    if not any_ready:
        return TopologyMode.NONE
    if all_node_hints and node_match:
        return TopologyMode.NODE
    if all_zone_hints and zone_match:
        return TopologyMode.ZONE
    return TopologyMode.NONE


def _allowed(ep: EndpointView, mode: TopologyMode, node: NodeIdentity) -> bool:
    if mode is TopologyMode.NODE:
        return node.name in ep.node_hints
    if mode is TopologyMode.ZONE:
        return node.zone in ep.zone_hints
    return True


def _backends(endpoints: Iterable[EndpointView]) -> tuple[L4Addr, ...]:
    return tuple(sorted((ep.backend for ep in endpoints), key=L4Addr.sort_key))


def categorize(
    endpoints: Sequence[EndpointView],
    node: NodeIdentity,
    uses_cluster: bool,
    uses_local: bool,
) -> Categorized:
    """Split endpoints into cluster and local sets (see the module docstring)."""
    cluster: tuple[L4Addr, ...] = ()
    mode = TopologyMode.NONE
    has_any = False
    if uses_cluster:
        mode = topology_mode(endpoints, node)
        cluster = _backends(ep for ep in endpoints if ep.ready and _allowed(ep, mode, node))
        if not cluster:
            cluster = _backends(
                ep for ep in endpoints if ep.serving_terminating and _allowed(ep, mode, node)
            )
        has_any = bool(cluster)

    local: tuple[L4Addr, ...] = ()
    if uses_local:
        mine = [ep for ep in endpoints if ep.node_name and ep.node_name == node.name]
        has_any = has_any or any(ep.ready or ep.serving_terminating for ep in endpoints)
        local = _backends(ep for ep in mine if ep.ready)
        if not local:
            local = _backends(ep for ep in mine if not ep.ready and ep.serving_terminating)
    return Categorized(cluster=cluster, local=local, has_any=has_any, topology=mode)
