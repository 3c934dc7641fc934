"""snapshot + node identity -> DesiredState. Pure: the same inputs always give
the same output, so this is tested with tables and golden files.

kube-proxy's semantics that live here:
- which Services are proxied at all (headless, ExternalName, the
  service-proxy-name and headless labels);
- how a Service port finds its endpoints' port: by the Service port's *name*
  and protocol in the EndpointSlice ports (the EndpointSlice controller has
  already resolved named targetPorts into numbers per Pod);
- which endpoints receive traffic: ready ones, merged across all slices of the
  Service for the frontend's IP family, de-duplicated by address and port;
  when none is ready, the serving-and-terminating ones (kube-proxy's
  CategorizeEndpoints fallback, KEP-1669), so a rolling update that briefly
  leaves only terminating pods does not drop new connections.
"""

from __future__ import annotations

from types import MappingProxyType

from agent.compute.types import (
    ComputeConfig,
    DesiredState,
    Frontend,
    FrontendKind,
    L4Addr,
    NodeIdentity,
    ServicePortName,
    ServiceProblem,
)
from agent.model.objects import (
    IPAddress,
    IPFamily,
    Service,
    ServicePort,
    ServiceType,
)
from agent.model.snapshot import ClusterSnapshot

SERVICE_PROXY_NAME_LABEL = "service.kubernetes.io/service-proxy-name"
HEADLESS_LABEL = "service.kubernetes.io/headless"


def is_proxied(svc: Service, config: ComputeConfig) -> bool:
    """Whether veer should program this Service at all (kube-proxy's rules)."""
    labels = svc.meta.labels
    if SERVICE_PROXY_NAME_LABEL in labels:
        if config.service_proxy_name is None:
            return False
        if labels[SERVICE_PROXY_NAME_LABEL] != config.service_proxy_name:
            return False
    if HEADLESS_LABEL in labels:
        return False
    if svc.type == ServiceType.EXTERNAL_NAME or svc.headless:
        return False
    return bool(svc.cluster_ips)


def usable_backends(
    snapshot: ClusterSnapshot, svc: Service, port: ServicePort, family: IPFamily
) -> tuple[L4Addr, ...]:
    """The endpoints of one Service port in one IP family that get traffic,
    sorted and unique: the ready ones, or if there are none, the ones that are
    still serving while terminating."""
    ready: set[L4Addr] = set()
    terminating: set[L4Addr] = set()
    for eps in snapshot.slices_for(svc.meta.namespace, svc.meta.name):
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
            if ep.ready:
                ready.add(backend)
            elif ep.serving and ep.terminating:
                terminating.add(backend)
    return tuple(sorted(ready or terminating))


def compute_desired(
    snapshot: ClusterSnapshot, node: NodeIdentity, config: ComputeConfig
) -> DesiredState:
    """The datapath state this node should hold for `snapshot`."""
    del node  # ClusterIP traffic does not depend on the node; later policies will.
    frontends: dict[L4Addr, Frontend] = {}
    vips: set[IPAddress] = set()
    problems: list[ServiceProblem] = []

    for (namespace, name), svc in sorted(snapshot.services.items()):
        if not is_proxied(svc, config):
            continue
        unsupported = sorted({p.protocol.value for p in svc.ports} - {
            p.value for p in config.protocols
        })
        if unsupported:
            problems.append(
                ServiceProblem(
                    namespace,
                    name,
                    "UnsupportedProtocol",
                    f"protocol {', '.join(unsupported)} is not supported by this datapath; "
                    "those ports are not programmed",
                )
            )
        for cluster_ip in svc.cluster_ips:
            family = IPFamily.of(cluster_ip)
            for port in svc.ports:
                if port.protocol not in config.protocols:
                    continue
                key = L4Addr(cluster_ip, port.port, port.protocol)
                owner = frontends.get(key)
                if owner is not None:
                    problems.append(
                        ServiceProblem(
                            namespace,
                            name,
                            "FrontendConflict",
                            f"{key} is already served for {owner.service}; skipped",
                        )
                    )
                    continue
                frontends[key] = Frontend(
                    key=key,
                    service=ServicePortName(namespace, name, port.name),
                    kind=FrontendKind.CLUSTER_IP,
                    backends=usable_backends(snapshot, svc, port, family),
                )
                vips.add(cluster_ip)

    return DesiredState(
        frontends=MappingProxyType(dict(sorted(frontends.items()))),
        vips=frozenset(vips),
        service_cidrs=config.service_cidrs,
        problems=tuple(problems),
    )
