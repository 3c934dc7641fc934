"""snapshot + node identity -> DesiredState. Pure: the same inputs always give
the same output, so this is tested with tables and golden files.

kube-proxy's semantics that live here:
- which Services are proxied at all (headless, ExternalName, the
  service-proxy-name and headless labels);
- how a Service port finds its endpoints' port: by the Service port's *name*
  and protocol in the EndpointSlice ports (the EndpointSlice controller has
  already resolved named targetPorts into numbers per Pod);
- which endpoints receive traffic (agent/compute/endpoints.py: ready ones,
  the serving-and-terminating fallback, topology hints, Local policies);
- which frontends a Service has on this node: its ClusterIPs, NodePorts on
  the node's addresses (restricted by --nodeport-addresses), externalIPs and
  LoadBalancer ingress IPs, each port over TCP or UDP;
- for each frontend, the backends for traffic that starts on this node and
  for traffic from outside, and whether an empty set refuses or drops;
- sessionAffinity, loadBalancerSourceRanges and healthCheckNodePort.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType

from agent.compute.endpoints import Categorized, categorize, endpoint_views
from agent.compute.policy import (
    Weighted,
    access_of,
    affinity_of,
    features_of,
    merge_split,
    policies_in_force,
    policy_name,
    redirect_target,
    split_port,
    tproxy_redirect_port,
)
from agent.compute.types import (
    AccessSpec,
    ComputeConfig,
    DesiredState,
    EmptyVerdict,
    Frontend,
    FrontendKind,
    HealthCheck,
    L4Addr,
    NodeIdentity,
    ServicePortName,
    ServiceProblem,
)
from agent.model.objects import (
    Algorithm,
    IPAddress,
    IPFamily,
    IPNetwork,
    Service,
    ServicePort,
    ServiceType,
    TrafficPolicy,
    TrafficPolicyKind,
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


def externally_accessible(svc: Service, port: ServicePort) -> bool:
    """kube-proxy's ExternallyAccessible: a NodePort, an LB IP or an externalIP."""
    return bool(node_port_of(svc, port) or lb_ips_of(svc) or svc.external_ips)


def node_port_of(svc: Service, port: ServicePort) -> int:
    # The API server allocates nodePorts only for these types; a nodePort
    # written by hand on a ClusterIP Service is ignored.
    if svc.type in (ServiceType.NODE_PORT, ServiceType.LOAD_BALANCER):
        return port.node_port
    return 0


def lb_ips_of(svc: Service) -> tuple[IPAddress, ...]:
    return svc.load_balancer_ips if svc.type == ServiceType.LOAD_BALANCER else ()


def nodeport_addresses(node: NodeIdentity, config: ComputeConfig) -> tuple[IPAddress, ...]:
    """The node addresses where NodePorts answer."""
    if not config.nodeport_addresses:
        return node.addresses
    return tuple(
        a for a in node.addresses
        if any(a.version == c.version and a in c for c in config.nodeport_addresses)
    )


def _verdict(has_any: bool) -> EmptyVerdict:
    """An empty backend set refuses when the Service has no endpoint anywhere,
    and drops when endpoints exist elsewhere but policy keeps traffic local."""
    return EmptyVerdict.DROP if has_any else EmptyVerdict.REFUSE


class _Builder:
    """Accumulates frontends, reporting conflicts (first Service by name wins)."""

    def __init__(self) -> None:
        self.frontends: dict[L4Addr, Frontend] = {}
        self.vips: set[IPAddress] = set()
        self.problems: list[ServiceProblem] = []
        self.health_checks: list[HealthCheck] = []

    def add(self, frontend: Frontend, vip: bool) -> None:
        owner = self.frontends.get(frontend.key)
        if owner is not None:
            svc = frontend.service
            self.problems.append(
                ServiceProblem(
                    svc.namespace,
                    svc.name,
                    "FrontendConflict",
                    f"{frontend.key} is already served for {owner.service}; skipped",
                )
            )
            return
        self.frontends[frontend.key] = frontend
        if vip:
            self.vips.add(frontend.key.address)


@dataclass(frozen=True)
class _PolicyFields:
    """What a TrafficPolicy sets on every frontend of its target."""

    name: str = ""
    algorithm: Algorithm = Algorithm.RANDOM
    access: AccessSpec | None = None
    maglev_size: int = 0
    sockmap: bool = False

    @staticmethod
    def of(policy: TrafficPolicy | None, config: ComputeConfig) -> _PolicyFields:
        if policy is None:
            return _PolicyFields(sockmap=config.sockmap)
        return _PolicyFields(
            name=policy_name(policy),
            algorithm=policy.algorithm,
            access=access_of(policy),
            maglev_size=config.maglev_table_size if policy.algorithm is Algorithm.MAGLEV else 0,
            sockmap=policy.sockmap or config.sockmap,
        )


@dataclass(frozen=True)
class _Sets:
    """One Service port's backend sets in one family, weighted when split."""

    cluster: Weighted
    local: Weighted
    has_any: bool


def _port_sets(
    snapshot: ClusterSnapshot,
    svc: Service,
    port: ServicePort,
    family: IPFamily,
    node: NodeIdentity,
    uses: tuple[bool, bool],
    policy: TrafficPolicy | None,
    out: _ServiceOut,
) -> _Sets:
    """The endpoints of `port`, or with a split, of the split's Services."""
    if policy is None or not policy.split:
        cat: Categorized = categorize(endpoint_views(snapshot, svc, port, family), node, *uses)
        return _Sets(Weighted(cat.cluster), Weighted(cat.local), cat.has_any)
    cluster_parts: list[tuple[int, tuple[L4Addr, ...]]] = []
    local_parts: list[tuple[int, tuple[L4Addr, ...]]] = []
    has_any = False
    namespace = svc.meta.namespace
    for entry in policy.split:
        other = snapshot.services.get((namespace, entry.service))
        other_port = split_port(port, other) if other is not None else None
        if other is None or other_port is None:
            out.problem(svc, "SplitPortMissing",
                        f"split Service {entry.service} has no port matching "
                        f"{port.name or port.port}/{port.protocol.value}; it gets no traffic")
            continue
        cat = categorize(endpoint_views(snapshot, other, other_port, family), node, *uses)
        cluster_parts.append((entry.weight, cat.cluster))
        local_parts.append((entry.weight, cat.local))
        has_any = has_any or (entry.weight > 0 and cat.has_any)
    return _Sets(merge_split(cluster_parts), merge_split(local_parts), has_any)


@dataclass(frozen=True)
class _PortContext:
    """What every external frontend of one Service port in one family shares."""

    ref: ServicePortName
    port: ServicePort
    sets: _Sets
    external: Weighted
    external_local: bool
    affinity: int
    policy: _PolicyFields
    redirect: L4Addr | None
    redirect_tproxy: int


def _external_frontend(
    ctx: _PortContext,
    kind: FrontendKind,
    address: IPAddress,
    number: int,
    ranges: tuple[IPNetwork, ...] = (),
) -> Frontend:
    """A NodePort, ExternalIP or LoadBalancer frontend.

    Traffic that starts on this node to such an address is "short-circuited"
    to the cluster-wide endpoints, as kube-proxy does even under
    externalTrafficPolicy: Local; only traffic from outside honours the policy.
    """
    return Frontend(
        key=L4Addr(address, number, ctx.port.protocol),
        service=ctx.ref,
        kind=kind,
        backends=ctx.sets.cluster.backends,
        weights=ctx.sets.cluster.weights,
        on_empty=_verdict(ctx.sets.has_any),
        external_backends=ctx.external.backends,
        external_weights=ctx.external.weights,
        external_on_empty=_verdict(ctx.sets.has_any),
        external_local=ctx.external_local,
        affinity_timeout=ctx.affinity,
        source_ranges=ranges,
        policy=ctx.policy.name,
        algorithm=ctx.policy.algorithm,
        access=ctx.policy.access,
        maglev_size=ctx.policy.maglev_size,
        redirect=ctx.redirect,
        redirect_tproxy=ctx.redirect_tproxy,
        sockmap=ctx.policy.sockmap,
    )


def _service_frontends(
    out: _ServiceOut,
    snapshot: ClusterSnapshot,
    svc: Service,
    node: NodeIdentity,
    config: ComputeConfig,
    policy: TrafficPolicy | None,
) -> None:
    namespace, name = svc.meta.namespace, svc.meta.name
    affinity = affinity_of(svc, policy)
    fields = _PolicyFields.of(policy, config)
    internal_local = svc.internal_traffic_policy == TrafficPolicyKind.LOCAL
    families = sorted({IPFamily.of(ip) for ip in svc.cluster_ips})
    node_addresses = nodeport_addresses(node, config)
    local_endpoint_total = 0
    any_external_local = False

    for port in svc.ports:
        if port.protocol not in config.protocols:
            continue
        external = externally_accessible(svc, port)
        external_local = external and svc.external_traffic_policy == TrafficPolicyKind.LOCAL
        any_external_local = any_external_local or external_local
        uses_cluster = not internal_local or external
        uses_local = internal_local or external_local
        ref = ServicePortName(namespace, name, port.name)

        for family in families:
            proxy_at = next((a for a in node.addresses if IPFamily.of(a) == family), None)
            redirect = redirect_target(policy, port.protocol, proxy_at)
            tproxy_port = tproxy_redirect_port(policy, port.protocol)
            if (policy is not None and policy.redirect is not None and proxy_at is None
                    and not tproxy_port):
                out.problem(svc, "RedirectWithoutNodeAddress",
                            f"this node has no {family.value} address for the redirect "
                            "proxy; connections are balanced as usual")
            sets = _port_sets(snapshot, svc, port, family, node,
                              (uses_cluster, uses_local), policy, out)
            local_endpoint_total += len(sets.local.backends) if external_local else 0
            internal = sets.local if internal_local else sets.cluster
            for cluster_ip in (ip for ip in svc.cluster_ips if IPFamily.of(ip) == family):
                out.add(
                    Frontend(
                        key=L4Addr(cluster_ip, port.port, port.protocol),
                        service=ref,
                        kind=FrontendKind.CLUSTER_IP,
                        backends=internal.backends,
                        weights=internal.weights,
                        on_empty=_verdict(sets.has_any),
                        affinity_timeout=affinity,
                        policy=fields.name,
                        algorithm=fields.algorithm,
                        access=fields.access,
                        maglev_size=fields.maglev_size,
                        redirect=redirect,
                        redirect_tproxy=tproxy_port,
                        sockmap=fields.sockmap,
                    ),
                    vip=True,
                )
            if not external:
                continue
            ctx = _PortContext(
                ref, port, sets, sets.local if external_local else sets.cluster,
                external_local, affinity, fields, redirect, tproxy_port,
            )
            node_port = node_port_of(svc, port)
            if node_port:
                for address in node_addresses:
                    if IPFamily.of(address) == family:
                        out.add(
                            _external_frontend(ctx, FrontendKind.NODE_PORT, address, node_port),
                            vip=False,
                        )
            for address in svc.external_ips:
                if IPFamily.of(address) == family:
                    out.add(
                        _external_frontend(ctx, FrontendKind.EXTERNAL_IP, address, port.port),
                        vip=True,
                    )
            for address in lb_ips_of(svc):
                if IPFamily.of(address) == family:
                    ranges = tuple(
                        r for r in svc.load_balancer_source_ranges if r.version == address.version
                    )
                    out.add(
                        _external_frontend(
                            ctx, FrontendKind.LOAD_BALANCER, address, port.port, ranges
                        ),
                        vip=True,
                    )

    if any_external_local and svc.health_check_node_port:
        out.health_checks.append(
            HealthCheck(svc.health_check_node_port, namespace, name, local_endpoint_total)
        )


class _ServiceOut:
    """What one Service contributes, recorded in order so that it can be
    replayed into a _Builder (which decides conflicts between Services)."""

    def __init__(self) -> None:
        self.ops: list[tuple[Frontend, bool] | ServiceProblem | HealthCheck] = []
        self.health_checks = _Appender(self.ops)

    def add(self, frontend: Frontend, vip: bool) -> None:
        self.ops.append((frontend, vip))

    def problem(self, svc: Service, reason: str, message: str) -> None:
        found = ServiceProblem(svc.meta.namespace, svc.meta.name, reason, message)
        if found not in self.ops:
            self.ops.append(found)

    def replay(self, out: _Builder) -> None:
        for op in self.ops:
            if isinstance(op, tuple):
                out.add(*op)
            elif isinstance(op, ServiceProblem):
                out.problems.append(op)
            else:
                out.health_checks.append(op)


class _Appender:
    """`out.health_checks.append(...)` for a _ServiceOut."""

    def __init__(self, ops: list[tuple[Frontend, bool] | ServiceProblem | HealthCheck]) -> None:
        self._ops = ops

    def append(self, check: HealthCheck) -> None:
        self._ops.append(check)


class ComputeCache:
    """Per-Service results of earlier calls, so that a change to one Service
    recomputes that Service only.

    An entry is reused while everything the Service's result depends on is
    the very same object as when it was computed: the Service, its
    EndpointSlices, the TrafficPolicy governing it, and for a split the
    other Services and their slices (snapshots share the objects that did
    not change). A different node identity or config empties the cache. The
    result is the same as without a cache; only the time differs."""

    def __init__(self) -> None:
        self._entries: dict[tuple[str, str], tuple[tuple[object, ...], _ServiceOut]] = {}
        self._context: tuple[NodeIdentity, ComputeConfig] | None = None

    def lookup(self, key: tuple[str, str], deps: tuple[object, ...],
               context: tuple[NodeIdentity, ComputeConfig]) -> _ServiceOut | None:
        if context != self._context:
            self._entries.clear()
            self._context = context
            return None
        held = self._entries.get(key)
        if held is None or not _same(held[0], deps):
            return None
        return held[1]

    def store(self, key: tuple[str, str], deps: tuple[object, ...], result: _ServiceOut) -> None:
        self._entries[key] = (deps, result)

    def keep_only(self, keys: set[tuple[str, str]]) -> None:
        for gone in set(self._entries) - keys:
            del self._entries[gone]


def _same(a: object, b: object) -> bool:
    """Identity, looking into tuples (the hot path of a cached compute: one
    call per Service per pass)."""
    if a is b:
        return True
    if type(a) is tuple and type(b) is tuple and len(a) == len(b):
        return all(map(_same, a, b))
    return False


def _deps(snapshot: ClusterSnapshot, svc: Service,
          policy: TrafficPolicy | None) -> tuple[object, ...]:
    namespace, name = svc.meta.namespace, svc.meta.name
    split = tuple(
        (snapshot.services.get((namespace, e.service)), snapshot.slices_for(namespace, e.service))
        for e in (policy.split if policy is not None else ())
    )
    return (svc, snapshot.slices_for(namespace, name), policy, split)


def _one_service(
    snapshot: ClusterSnapshot, svc: Service, node: NodeIdentity, config: ComputeConfig,
    policy: TrafficPolicy | None,
) -> _ServiceOut:
    out = _ServiceOut()
    if not is_proxied(svc, config):
        return out
    unsupported = sorted({p.protocol.value for p in svc.ports} - {
        p.value for p in config.protocols
    })
    if unsupported:
        out.ops.append(ServiceProblem(
            svc.meta.namespace, svc.meta.name, "UnsupportedProtocol",
            f"protocol {', '.join(unsupported)} is not supported by this datapath; "
            "those ports are not programmed",
        ))
    _service_frontends(out, snapshot, svc, node, config, policy)
    return out


def compute_desired(
    snapshot: ClusterSnapshot, node: NodeIdentity, config: ComputeConfig,
    cache: ComputeCache | None = None,
) -> DesiredState:
    """The datapath state this node should hold for `snapshot`. With a
    `cache`, Services whose inputs did not change since the last call are
    not recomputed (ComputeCache)."""
    out = _Builder()
    governing = policies_in_force(snapshot)
    context = (node, config)
    for key, svc in sorted(snapshot.services.items()):
        policy = governing.get(key)
        deps = _deps(snapshot, svc, policy) if cache is not None else ()
        result = cache.lookup(key, deps, context) if cache is not None else None
        if result is None:
            result = _one_service(snapshot, svc, node, config, policy)
            if cache is not None:
                cache.store(key, deps, result)
        result.replay(out)
    if cache is not None:
        cache.keep_only(set(snapshot.services))

    return DesiredState(
        frontends=MappingProxyType(dict(sorted(out.frontends.items(),
                                               key=lambda kv: kv[0].sort_key()))),
        vips=frozenset(out.vips),
        service_cidrs=config.service_cidrs,
        problems=tuple(out.problems),
        health_checks=tuple(sorted(out.health_checks, key=lambda h: (h.port, h.namespace))),
        node_addresses=node.addresses,
        cluster_cidrs=config.cluster_cidrs,
        policies=MappingProxyType({
            policy_name(p): features_of(p)
            for p in sorted({policy_name(p): p for p in governing.values()}.values(),
                            key=policy_name)
        }),
    )
