"""TrafficPolicies as compute applies them: which policy governs which
Service, and what it changes in that Service's frontends.

Which policy is in force is decided exactly as the operator decides it
(agent/operator/conditions.py `evaluate`: accepted, references resolved, the
older of two conflicting policies wins), so a node never acts on a policy
that `kubectl get tp` shows as not accepted.

What a policy changes, for every frontend of its target Service:
- `algorithm` and, for Maglev, the table size;
- `sessionAffinity` overrides the Service's (None switches affinity off);
- `split`: the backends become the endpoints of the listed Services, each
  endpoint weighing its Service's weight divided by that Service's endpoint
  count (so 90/10 splits traffic 90/10 whatever the replica counts); a
  weight of 0 drains a Service; a Service listed twice adds up;
- `access`: the rules, numbered in policy order (counters and events name
  them by that number).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import reduce

from agent.compute.tables import normalized
from agent.compute.types import AccessRuleSpec, AccessSpec, ComputeConfig, L4Addr
from agent.model.objects import (
    IPAddress,
    Protocol,
    RedirectMode,
    Service,
    ServicePort,
    SessionAffinity,
    TrafficPolicy,
)
from agent.model.snapshot import ClusterSnapshot
from agent.operator.conditions import PolicyInput, ServiceInfo, evaluate

# Features a policy can use, as DesiredState.policies names them.
FEATURE_ALGORITHM = "loadBalancing.algorithm"
FEATURE_AFFINITY = "loadBalancing.sessionAffinity"
FEATURE_SPLIT = "split"
FEATURE_ACCESS = "access"
FEATURE_REDIRECT = "redirect"
FEATURE_REDIRECT_TPROXY = "redirect.mode=TPROXY"
FEATURE_SOCKMAP = "acceleration.sockmap"

# Per-endpoint weights are a Service's weight times this scale divided by its
# endpoint count, or times the least common multiple of the counts when that
# is smaller, so that the division is exact.
WEIGHT_SCALE = 10000


def policies_in_force(snapshot: ClusterSnapshot, config: ComputeConfig,
                      ) -> dict[tuple[str, str], TrafficPolicy]:
    """(namespace, Service name) -> the TrafficPolicy that governs it."""
    if not snapshot.traffic_policies:
        return {}
    inputs = [PolicyInput.of(p) for p in snapshot.traffic_policies.values()]
    verdicts = evaluate(inputs, (ServiceInfo.of(s) for s in snapshot.services.values()),
                        dict(config.agent_ports))
    out: dict[tuple[str, str], TrafficPolicy] = {}
    for p in inputs:
        if p.policy is None or not verdicts[p.key].in_force:
            continue
        for target in p.policy.target_refs:
            out[(p.namespace, target)] = p.policy
    return out


def features_of(policy: TrafficPolicy) -> frozenset[str]:
    out = {FEATURE_ALGORITHM}
    if policy.session_affinity is not None:
        out.add(FEATURE_AFFINITY)
    if policy.split:
        out.add(FEATURE_SPLIT)
    if policy.access is not None:
        out.add(FEATURE_ACCESS)
    if policy.redirect is not None:
        out.add(FEATURE_REDIRECT_TPROXY if policy.redirect.mode is RedirectMode.TPROXY
                else FEATURE_REDIRECT)
    if policy.sockmap:
        out.add(FEATURE_SOCKMAP)
    return frozenset(out)


def policy_name(policy: TrafficPolicy) -> str:
    return f"{policy.meta.namespace}/{policy.meta.name}"


def affinity_of(svc: Service, policy: TrafficPolicy | None) -> int:
    """The ClientIP affinity timeout in force, 0 for none."""
    if policy is not None and policy.session_affinity is not None:
        override = policy.session_affinity
        return override.timeout_seconds if override.type == SessionAffinity.CLIENT_IP else 0
    if svc.session_affinity == SessionAffinity.CLIENT_IP:
        return svc.session_affinity_timeout
    return 0


def access_of(policy: TrafficPolicy | None) -> AccessSpec | None:
    if policy is None or policy.access is None:
        return None
    return AccessSpec(
        default_action=policy.access.default_action,
        rules=tuple(
            AccessRuleSpec(i, rule.action, rule.sources)
            for i, rule in enumerate(policy.access.rules)
        ),
    )


def split_port(target: ServicePort, other: Service) -> ServicePort | None:
    """The port of a split Service that stands for the target's `target` port:
    the one with the same name, else the same number and protocol."""
    for port in other.ports:
        if port.name == target.name and port.protocol == target.protocol:
            return port
    for port in other.ports:
        if port.port == target.port and port.protocol == target.protocol:
            return port
    return None


@dataclass(frozen=True)
class Weighted:
    """A backend set with per-backend weights (empty weights: all equal)."""

    backends: tuple[L4Addr, ...]
    weights: tuple[int, ...] = ()


def merge_split(parts: Sequence[tuple[int, Sequence[L4Addr]]]) -> Weighted:
    """(Service weight, its endpoints) per split entry -> one weighted set."""
    live = [(w, tuple(b)) for w, b in parts if w > 0 and b]
    if not live:
        return Weighted(())
    lcm = reduce(math.lcm, (len(b) for _, b in live))
    scale = lcm if lcm <= WEIGHT_SCALE else WEIGHT_SCALE
    total: dict[L4Addr, int] = {}
    for weight, backends in live:
        per = max(1, round(weight * scale / len(backends)))
        for be in backends:
            total[be] = total.get(be, 0) + per
    ordered = tuple(sorted(total))
    return Weighted(ordered, normalized([total[b] for b in ordered]))


def split_services(
    snapshot: ClusterSnapshot, policy: TrafficPolicy, namespace: str
) -> list[tuple[int, Service | None, str]]:
    """(weight, Service or None if missing, name) per split entry."""
    services: Mapping[tuple[str, str], Service] = snapshot.services
    return [
        (entry.weight, services.get((namespace, entry.service)), entry.service)
        for entry in policy.split
    ]


def redirect_target(policy: TrafficPolicy | None, protocol: Protocol,
                    node_address: IPAddress | None) -> L4Addr | None:
    """Where a frontend's connections are redirected: the node-local proxy on
    this node's address of the frontend's family. TCP only (the proxy learns
    the destination per connection); TPROXY-mode redirects are not done by
    the socket path."""
    if policy is None or policy.redirect is None or node_address is None:
        return None
    if protocol is not Protocol.TCP or policy.redirect.mode is RedirectMode.TPROXY:
        return None
    return L4Addr(node_address, policy.redirect.port, protocol)


def tproxy_redirect_port(policy: TrafficPolicy | None, protocol: Protocol) -> int:
    """The proxy port of a `redirect` with mode TPROXY, for a TCP frontend; 0 otherwise."""
    if policy is None or policy.redirect is None or protocol is not Protocol.TCP:
        return 0
    return policy.redirect.port if policy.redirect.mode is RedirectMode.TPROXY else 0
