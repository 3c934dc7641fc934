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

import bisect
import itertools
from dataclasses import dataclass
from types import MappingProxyType

# The labels are defined with their rule (labels_proxied); re-exported for
# agent/api/views.py, which names them when it says why a Service is not proxied.
from agent.compute.endpoints import HEADLESS_LABEL as HEADLESS_LABEL
from agent.compute.endpoints import SERVICE_PROXY_NAME_LABEL as SERVICE_PROXY_NAME_LABEL
from agent.compute.endpoints import (
    Categorized,
    categorize,
    endpoint_views,
    labels_proxied,
    local_ready_endpoints,
)
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
from agent.model.snapshot import ClusterSnapshot, touched_since


def is_proxied(svc: Service, config: ComputeConfig) -> bool:
    """Whether veer should program this Service at all (kube-proxy's rules;
    the label rule is the one its EndpointSlices pass too)."""
    if not labels_proxied(svc.meta.labels, config):
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
    config: ComputeConfig,
) -> _Sets:
    """The endpoints of `port`, or with a split, of the split's Services."""
    if policy is None or not policy.split:
        cat: Categorized = categorize(endpoint_views(snapshot, svc, port, family, config),
                                      node, *uses)
        return _Sets(Weighted(cat.cluster), Weighted(cat.local), cat.has_any)
    cluster_parts: list[tuple[int, tuple[L4Addr, ...]]] = []
    local_parts: list[tuple[int, tuple[L4Addr, ...]]] = []
    has_any = False
    # Weighted split Services without / with a ClusterIP of `family`.
    lacking: list[str] = []
    of_family = False
    namespace = svc.meta.namespace
    for entry in policy.split:
        other = snapshot.services.get((namespace, entry.service))
        other_port = split_port(port, other) if other is not None else None
        if other is None or other_port is None:
            out.problem(svc, "SplitPortMissing",
                        f"split Service {entry.service} has no port matching "
                        f"{port.name or port.port}/{port.protocol.value}; it gets no traffic")
            continue
        if entry.weight > 0:
            if any(IPFamily.of(ip) == family for ip in other.cluster_ips):
                of_family = True
            else:
                lacking.append(entry.service)
        cat = categorize(endpoint_views(snapshot, other, other_port, family, config),
                         node, *uses)
        cluster_parts.append((entry.weight, cat.cluster))
        local_parts.append((entry.weight, cat.local))
        has_any = has_any or (entry.weight > 0 and cat.has_any)
    if lacking and not of_family and not has_any:
        # Not the passing "no ready endpoint right now": the split can never
        # give this family of the target's frontends a backend, so they
        # refuse every connection until the policy or the Services change.
        names = sorted(set(lacking))
        which = (f"Service {names[0]} has" if len(names) == 1
                 else f"Services {', '.join(names)} have")
        out.problem(svc, "SplitFamilyMissing",
                    f"split {which} no {family.value} ClusterIP: the Service's "
                    f"{family.value} frontends get no backends and refuse connections")
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

    for port in svc.ports:
        if port.protocol not in config.protocols:
            continue
        external = externally_accessible(svc, port)
        external_local = external and svc.external_traffic_policy == TrafficPolicyKind.LOCAL
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
                              (uses_cluster, uses_local), policy, out, config)
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
            # An address listed twice is one frontend, not a conflict of the
            # Service with itself (the API server does not refuse repeats).
            # An externalIP that is also its LoadBalancer IP is that one
            # frontend: kube-proxy's nftables mode checks the source ranges
            # of an LB IP whatever rule the packet came by.
            lb_ips = set(lb_ips_of(svc))
            for address in dict.fromkeys(svc.external_ips):
                if IPFamily.of(address) == family and address not in lb_ips:
                    out.add(
                        _external_frontend(ctx, FrontendKind.EXTERNAL_IP, address, port.port),
                        vip=True,
                    )
            for address in dict.fromkeys(lb_ips_of(svc)):
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

    # kube-proxy serves the check of every LoadBalancer with policy Local,
    # even before it has an ingress address or NodePorts (allocate...NodePorts
    # false): the load balancer may probe it all the same.
    if (svc.type == ServiceType.LOAD_BALANCER and svc.health_check_node_port
            and svc.external_traffic_policy == TrafficPolicyKind.LOCAL):
        out.health_checks.append(HealthCheck(
            svc.health_check_node_port, namespace, name,
            local_ready_endpoints(snapshot, svc, node.name, config)))


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


ServiceKey = tuple[str, str]
_GENERATIONS = itertools.count(1)  # of DesiredStates made by a ComputeCache, process-wide
# One frontend as one Service's ops claim it: (Service, op index, frontend, vip).
_Claim = tuple[ServiceKey, int, Frontend, bool]


def _claim_order(claim: _Claim) -> tuple[ServiceKey, int]:
    return claim[0], claim[1]


class _Assembly:
    """What replaying every Service's _ServiceOut into a _Builder, in Service
    order, gives, kept from call to call and updated one Service at a time.

    The _Builder's rule, "the first Service by name wins a frontend", is kept
    as: every frontend key has its claims sorted by (Service, op index), the
    first one is in force, and each other one is a FrontendConflict problem
    of its Service at that op. Problems and health checks come out in the
    order the replay gives them, from the few Services that have any (own
    problems, health checks, or a claim on a contested key)."""

    def __init__(self) -> None:
        self.outs: dict[ServiceKey, _ServiceOut] = {}
        self._claims: dict[L4Addr, list[_Claim]] = {}
        self._keys: list[L4Addr] = []  # claimed frontend keys, in sort_key order
        # The frontends in force: in _keys' order unless _reorder says that a
        # key was inserted in the middle since the last frontends().
        self._out: dict[L4Addr, Frontend] = {}
        self._reorder = False
        self._vips: dict[IPAddress, int] = {}  # VIP -> frontends in force that hold it
        self._vips_frozen: frozenset[IPAddress] | None = None  # None: changed since
        self._noted: set[ServiceKey] = set()  # with a problem or a health check op
        self._contested: set[L4Addr] = set()  # frontend keys with more than one claim
        self.changed = True  # since the last frontends()
        self.touched: set[L4Addr] = set()  # keys whose frontend in force changed, since then

    def set(self, key: ServiceKey, out: _ServiceOut | None) -> None:
        """Make `out` Service `key`'s contribution (None: it has none)."""
        old = self.outs.get(key)
        if old is out:
            return
        self.changed = True
        # The new claims first, then the old ones go: a key the Service keeps
        # never leaves _keys (re-inserting it would cost a reordering).
        self._noted.discard(key)
        if out is not None:
            self.outs[key] = out
            for i, op in enumerate(out.ops):
                if isinstance(op, tuple):
                    self._update(op[0].key, add=(key, i, op[0], op[1]))
                else:
                    self._noted.add(key)
        else:
            del self.outs[key]
        if old is not None:
            for i, op in enumerate(old.ops):
                if isinstance(op, tuple):
                    self._update(op[0].key, remove=(key, i, op[0], op[1]))

    def _update(self, fkey: L4Addr, add: _Claim | None = None,
                remove: _Claim | None = None) -> None:
        claims = self._claims.get(fkey)
        before = claims[0] if claims else None
        if claims is None:
            claims = self._claims[fkey] = []
            at = bisect.bisect_right(self._keys, fkey.sort_key(), key=L4Addr.sort_key)
            self._keys.insert(at, fkey)
            self._reorder = self._reorder or at != len(self._keys) - 1
        if remove is not None:  # that very claim (a new one may have its order)
            claims[:] = [c for c in claims if c[2] is not remove[2] or c[0:2] != remove[0:2]]
        if add is not None:
            bisect.insort(claims, add, key=_claim_order)
        after = claims[0] if claims else None
        if len(claims) > 1:
            self._contested.add(fkey)
        else:
            self._contested.discard(fkey)
        if not claims:
            del self._claims[fkey]
            del self._keys[bisect.bisect_left(self._keys, fkey.sort_key(),
                                              key=L4Addr.sort_key)]
        if before is not after:
            self.touched.add(fkey)
            if after is None:
                del self._out[fkey]
            else:
                self._out[fkey] = after[2]
            if before is not None and before[3]:
                self._count_vip(before[2].key.address, -1)
            if after is not None and after[3]:
                self._count_vip(after[2].key.address, +1)

    def _count_vip(self, address: IPAddress, delta: int) -> None:
        self._vips_frozen = None
        n = self._vips.get(address, 0) + delta
        if n:
            self._vips[address] = n
        else:
            del self._vips[address]

    def frontends(self) -> dict[L4Addr, Frontend]:
        """The frontends in force, in sort_key order: a copy, which keeps the
        keys' hashes (cheap), unless keys have to be put in order again."""
        self.changed = False
        self.touched = set()
        if self._reorder:
            self._out = {k: self._out[k] for k in self._keys}
            self._reorder = False
        return dict(self._out)

    def vips(self) -> frozenset[IPAddress]:
        if self._vips_frozen is None:
            self._vips_frozen = frozenset(self._vips)
        return self._vips_frozen

    def problems_and_checks(self) -> tuple[list[ServiceProblem], list[HealthCheck]]:
        visit = set(self._noted)
        for fkey in self._contested:
            visit.update(c[0] for c in self._claims[fkey])
        problems: list[ServiceProblem] = []
        checks: list[HealthCheck] = []
        for key in sorted(visit):
            for i, op in enumerate(self.outs[key].ops):
                if isinstance(op, tuple):
                    first = self._claims[op[0].key][0]
                    if _claim_order(first) != (key, i):
                        svc = op[0].service
                        problems.append(ServiceProblem(
                            svc.namespace, svc.name, "FrontendConflict",
                            f"{op[0].key} is already served for {first[2].service}; skipped"))
                elif isinstance(op, ServiceProblem):
                    problems.append(op)
                else:
                    checks.append(op)
        return problems, checks


class ComputeCache:
    """Per-Service results of earlier calls, so that a change to one Service
    costs that Service, not N.

    An entry is reused while everything the Service's result depends on is
    the very same object as when it was computed: the Service, its
    EndpointSlices, the TrafficPolicy governing it, and for a split the
    other Services and their slices (snapshots share the objects that did
    not change). The results are assembled into the frontends in force
    (_Assembly), which is updated only for the Services whose result
    changed. Which Services to look at: when the snapshot follows the last
    one in its Store's change log (touched_since) and no TrafficPolicy is
    in force (a policy's verdict may depend on any Service), only those the
    log names; otherwise every one. A different node identity or config
    empties the cache. The result is the same as without a cache; only the
    time differs."""

    def __init__(self) -> None:
        self._context: tuple[NodeIdentity, ComputeConfig] | None = None
        self._reset()

    def _reset(self) -> None:
        self._entries: dict[ServiceKey, tuple[tuple[object, ...], _ServiceOut]] = {}
        self._assembly = _Assembly()
        self._snapshot: ClusterSnapshot | None = None
        self._desired: DesiredState | None = None
        self._governed = False  # whether the last call had policies in force

    def compute(self, snapshot: ClusterSnapshot, node: NodeIdentity,
                config: ComputeConfig) -> DesiredState:
        governing = policies_in_force(snapshot, config)
        context = (node, config)
        if context != self._context:
            self._reset()
            self._context = context
        ungoverned = not governing and not self._governed  # now and last time
        touched = None
        if self._snapshot is not None and ungoverned:
            touched = touched_since(self._snapshot, snapshot)
        self._snapshot, self._governed = snapshot, bool(governing)
        assembly = self._assembly
        # In name order: deterministic. (New frontends whose keys sort last
        # are appended in place; others cost a reordering, _Assembly.frontends.)
        candidates = sorted(snapshot.services.keys() if touched is None else touched)
        for key in candidates:
            svc = snapshot.services.get(key)
            if svc is None:
                self._entries.pop(key, None)
                assembly.set(key, None)
                continue
            policy = governing.get(key)
            deps = _deps(snapshot, svc, policy)
            held = self._entries.get(key)
            if held is not None and _same(held[0], deps):
                result = held[1]
            else:
                result = _one_service(snapshot, svc, node, config, policy)
                self._entries[key] = (deps, result)
            assembly.set(key, result)
        if touched is None:
            for gone in [k for k in assembly.outs if k not in snapshot.services]:
                self._entries.pop(gone, None)
                assembly.set(gone, None)
        if self._desired is not None and not assembly.changed and ungoverned:
            return self._desired  # nothing in force changed: the very same state
        problems, checks = assembly.problems_and_checks()
        before, touched_keys = self._desired, frozenset(assembly.touched)
        self._desired = _desired_state(
            assembly.frontends(), assembly.vips(), problems, checks, node, config, governing,
            generation=next(_GENERATIONS),
            follows=(before.generation, touched_keys) if before is not None else None,
        )
        return self._desired


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
    `cache`, only what changed since the last call is recomputed
    (ComputeCache); the result is the same."""
    if cache is not None:
        return cache.compute(snapshot, node, config)
    out = _Builder()
    governing = policies_in_force(snapshot, config)
    for key, svc in sorted(snapshot.services.items()):
        _one_service(snapshot, svc, node, config, governing.get(key)).replay(out)
    return _desired_state(dict(sorted(out.frontends.items(), key=lambda kv: kv[0].sort_key())),
                          frozenset(out.vips), out.problems, out.health_checks, node, config,
                          governing)


def _desired_state(
    frontends: dict[L4Addr, Frontend], vips: frozenset[IPAddress],
    problems: list[ServiceProblem], health_checks: list[HealthCheck],
    node: NodeIdentity, config: ComputeConfig, governing: dict[ServiceKey, TrafficPolicy],
    generation: int = 0, follows: tuple[int, frozenset[L4Addr]] | None = None,
) -> DesiredState:
    return DesiredState(
        generation=generation,
        follows=follows,
        frontends=MappingProxyType(frontends),
        vips=vips,
        service_cidrs=config.service_cidrs,
        problems=tuple(problems),
        health_checks=tuple(sorted(health_checks, key=lambda h: (h.port, h.namespace))),
        node_addresses=node.addresses,
        cluster_cidrs=config.cluster_cidrs,
        policies=MappingProxyType({
            policy_name(p): features_of(p)
            for p in sorted({policy_name(p): p for p in governing.values()}.values(),
                            key=policy_name)
        }),
    )
