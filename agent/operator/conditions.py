"""TrafficPolicy status from what the cluster holds: pure functions, no I/O.

    evaluate(policies, services)       -> Verdict per policy: Accepted, ResolvedRefs
    aggregate(policy, verdict, nodes)  -> Programmed, from the VeerNode reports
    policy_status(...)                 -> the status object the operator writes
    transitions(before, after)         -> what users must see as Events

The operator (agent/operator/handlers.py) runs them over its kopf indexes;
the agent (agent/kube/report.py) runs `evaluate` over its own snapshot to
know which policies are in force on its node. Both see the same answer for
the same objects.

The reasons are those crds/README.md documents.

Accepted (the policy as a whole, beyond what the CRD's schema checks):
- False/Invalid, the message says which check failed:
  the spec does not parse (a manifest applied without the CRD's validation,
  or a CRD older than this operator; the message names the field);
  a target or split Service is headless or ExternalName (veer does not
  proxy those, so nothing could apply);
  redirect.port is a port every node already uses (the veer agent's metrics
  or health port, a Service's NodePort or its healthCheckNodePort).
- False/Conflicted: another policy targets one of the same Services and is
  older (creationTimestamp, then name); the message names it. Only accepted
  policies claim their targets, so a policy that lost everything does not
  block a third one.
- True/Accepted otherwise.
ResolvedRefs: False/TargetNotFound while a target Service is missing from
the policy's namespace, False/BackendNotFound while only a split Service is
(both clear when the Service appears), Unknown/Invalid for a policy that
does not parse, else True/ResolvedRefs.
Programmed: see `aggregate`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from agent.defaults import DEFAULT_AGENT_PORTS
from agent.model.objects import Service, ServiceType, TrafficPolicy

NamespacedName = tuple[str, str]

# Ports the veer agent listens on on every node (kube-proxy's metrics and
# health ports, agent/defaults.py): a redirect proxy cannot have them. These
# are the defaults of the agent's --metrics-bind-address and
# --healthz-bind-address. The agent and the operator must reach the same
# verdict (agent/kube/report.py runs `evaluate` too): the agent passes the
# ports it was started with, the operator those its --agent-metrics-port and
# --agent-healthz-port name, which the chart sets from the same values.
AGENT_PORTS: Mapping[int, str] = dict(DEFAULT_AGENT_PORTS)


def agent_ports(metrics: int, health: int) -> Mapping[int, str]:
    """The agent's ports by what they serve (0: not served)."""
    return {port: what for port, what in ((metrics, "metrics"), (health, "health")) if port}

# The most nodes named in status.nodes.notProgrammed (the CRD's maxItems).
MAX_NOT_PROGRAMMED = 16


@dataclass(frozen=True)
class Condition:
    type: str
    status: str  # "True", "False" or "Unknown"
    reason: str
    message: str

    @property
    def true(self) -> bool:
        return self.status == "True"


@dataclass(frozen=True)
class PolicyInput:
    """One TrafficPolicy as the API server holds it: parsed, or why not."""

    namespace: str
    name: str
    generation: int
    created: str  # metadata.creationTimestamp, RFC 3339 in UTC (sorts as text)
    policy: TrafficPolicy | None
    error: str = ""  # why it does not parse, when policy is None
    uid: str = ""

    @property
    def key(self) -> NamespacedName:
        return (self.namespace, self.name)

    @staticmethod
    def of(policy: TrafficPolicy) -> PolicyInput:
        meta = policy.meta
        return PolicyInput(meta.namespace, meta.name, meta.generation,
                           meta.creation_timestamp, policy, uid=meta.uid)


@dataclass(frozen=True)
class ServiceInfo:
    """What the policy checks need to know about one Service."""

    namespace: str
    name: str
    unsupported: str = ""  # "headless" or "ExternalName": veer does not proxy it
    node_ports: tuple[int, ...] = ()
    # Bound on every node by the agent's health-check server
    # (agent/health/service_checks.py), as a NodePort is; 0: none.
    health_check_node_port: int = 0

    @staticmethod
    def of(service: Service) -> ServiceInfo:
        unsupported = ""
        if service.type == ServiceType.EXTERNAL_NAME:
            unsupported = "ExternalName"
        elif service.headless:
            unsupported = "headless"
        ports = tuple(sorted({p.node_port for p in service.ports if p.node_port}))
        # Taken whenever set, as node ports are: the API server keeps it only
        # on a LoadBalancer with externalTrafficPolicy Local, which veer serves.
        return ServiceInfo(service.meta.namespace, service.meta.name, unsupported, ports,
                           service.health_check_node_port)


@dataclass(frozen=True)
class Verdict:
    accepted: Condition
    resolved_refs: Condition

    @property
    def in_force(self) -> bool:
        """Accepted and every reference resolved: nodes should apply it."""
        return self.accepted.true and self.resolved_refs.true


def _names(names: Iterable[str]) -> str:
    items = sorted(set(names))
    if len(items) == 1:
        return f"Service {items[0]}"
    return "Services " + ", ".join(items)


def _accepted(status: bool, reason: str, message: str) -> Condition:
    return Condition("Accepted", "True" if status else "False", reason, message)


def _check(policy: TrafficPolicy, namespace: str, agent: Mapping[int, str],
           services: Mapping[NamespacedName, ServiceInfo],
           node_ports: Mapping[int, str]) -> tuple[Condition | None, Condition]:
    """(Accepted=False if the policy is invalid beyond its schema, else None;
    ResolvedRefs). `node_ports`: port -> what holds it on every node
    ("the NodePort of Service ns/name")."""
    targets = list(policy.target_refs)
    split = [s.service for s in policy.split]
    missing_targets = [n for n in targets if (namespace, n) not in services]
    missing_split = [n for n in split if (namespace, n) not in services and n not in targets]
    if missing_targets or missing_split:
        parts = []
        if missing_targets:
            parts.append(f"target {_names(missing_targets)}")
        if missing_split:
            parts.append(f"split {_names(missing_split)}")
        refs = Condition("ResolvedRefs", "False",
                         "TargetNotFound" if missing_targets else "BackendNotFound",
                         f"{' and '.join(parts)} not found in namespace {namespace}")
    else:
        refs = Condition("ResolvedRefs", "True", "ResolvedRefs",
                         f"{_names(targets + split)} found")

    for name in dict.fromkeys(targets + split):
        info = services.get((namespace, name))
        if info is not None and info.unsupported:
            role = "target" if name in targets else "split"
            return _accepted(False, "Invalid",
                             f"{role} Service {name} is {info.unsupported}: veer does not "
                             "proxy it"), refs
    if policy.redirect is not None:
        port = policy.redirect.port
        if port in agent:
            return _accepted(False, "Invalid",
                             f"redirect.port {port} is the veer agent's {agent[port]} "
                             "port on every node"), refs
        if port in node_ports:
            return _accepted(False, "Invalid",
                             f"redirect.port {port} is {node_ports[port]} on every node"), refs
    return None, refs


def evaluate(
    policies: Iterable[PolicyInput], services: Iterable[ServiceInfo],
    agent: Mapping[int, str] = AGENT_PORTS,
) -> dict[NamespacedName, Verdict]:
    """Accepted and ResolvedRefs of every policy (see the module doc);
    `agent`: the agent's ports (agent_ports())."""
    by_key = {(s.namespace, s.name): s for s in services}
    node_ports: dict[int, str] = {}  # port -> what holds it on every node
    for s in sorted(by_key.values(), key=lambda s: (s.namespace, s.name)):
        for port in s.node_ports:
            node_ports.setdefault(port, f"the NodePort of Service {s.namespace}/{s.name}")
        if s.health_check_node_port:
            node_ports.setdefault(s.health_check_node_port,
                                  f"the healthCheckNodePort of Service {s.namespace}/{s.name}")

    out: dict[NamespacedName, Verdict] = {}
    candidates: list[PolicyInput] = []
    refs_of: dict[NamespacedName, Condition] = {}
    for p in policies:
        if p.policy is None:
            out[p.key] = Verdict(
                _accepted(False, "Invalid", p.error or "the policy does not parse"),
                Condition("ResolvedRefs", "Unknown", "Invalid",
                          "not checked: the policy is invalid"),
            )
            continue
        invalid, refs = _check(p.policy, p.namespace, agent, by_key, node_ports)
        if invalid is not None:
            out[p.key] = Verdict(invalid, refs)
        else:
            candidates.append(p)
            refs_of[p.key] = refs

    # The older policy wins each Service; only accepted policies claim.
    claimed: dict[NamespacedName, str] = {}  # (namespace, service) -> winning policy
    for p in sorted(candidates, key=lambda p: (p.created, p.name)):
        assert p.policy is not None
        targets = p.policy.target_refs
        taken = [(t, claimed[(p.namespace, t)]) for t in targets if (p.namespace, t) in claimed]
        if taken:
            winners = sorted({w for _, w in taken})
            accepted = _accepted(
                False, "Conflicted",
                f"{_names(t for t, _ in taken)} already targeted by the older "
                + ("TrafficPolicy " if len(winners) == 1 else "TrafficPolicies ")
                + ", ".join(f"{p.namespace}/{w}" for w in winners),
            )
        else:
            for t in targets:
                claimed[(p.namespace, t)] = p.name
            accepted = _accepted(True, "Accepted", f"applies to {_names(targets)}")
        out[p.key] = Verdict(accepted, refs_of[p.key])
    return out


# ---- Programmed: what the nodes report ---------------------------------------


@dataclass(frozen=True)
class NodeEntry:
    """One policy in one VeerNode's status.trafficPolicies."""

    generation: int
    programmed: bool
    reason: str = ""
    message: str = ""
    uid: str = ""


@dataclass(frozen=True)
class NodeReport:
    """One VeerNode: the node's name, the policies it reports, its heartbeat."""

    node: str
    policies: Mapping[NamespacedName, NodeEntry] = field(default_factory=dict)
    heartbeat: float | None = None  # heartbeatTime, Unix seconds
    heartbeat_seconds: int = 60

    def stale(self, now: float) -> bool:
        """No heartbeat for three heartbeat periods: the agent is not reporting."""
        return self.heartbeat is not None and now - self.heartbeat > 3 * self.heartbeat_seconds

    @staticmethod
    def of(name: str, status: Mapping[str, Any] | None) -> NodeReport:
        """From a VeerNode's status (malformed entries are skipped)."""
        status = status or {}
        entries: dict[NamespacedName, NodeEntry] = {}
        raw = status.get("trafficPolicies")
        for item in raw if isinstance(raw, list) else []:
            if not isinstance(item, Mapping):
                continue
            ns, pname = item.get("namespace"), item.get("name")
            gen = item.get("generation")
            if not isinstance(ns, str) or not isinstance(pname, str) or not isinstance(gen, int):
                continue
            entries[(ns, pname)] = NodeEntry(
                gen, item.get("programmed") is True, str(item.get("reason") or ""),
                str(item.get("message") or ""), str(item.get("uid") or ""),
            )
        heartbeat = None
        with contextlib.suppress(KeyError, ValueError):
            heartbeat = datetime.fromisoformat(str(status["heartbeatTime"])).timestamp()
        period = status.get("heartbeatSeconds")
        return NodeReport(name, entries, heartbeat,
                          period if isinstance(period, int) and period > 0 else 60)


@dataclass(frozen=True)
class NotProgrammed:
    node: str
    reason: str
    message: str


@dataclass(frozen=True)
class Programmed:
    condition: Condition
    programmed: int  # nodes where the current generation is in force
    total: int  # nodes that report (VeerNode objects)
    not_programmed: tuple[NotProgrammed, ...] = ()

    @property
    def fraction(self) -> str:
        return f"{self.programmed}/{self.total}"


def _node_state(policy: PolicyInput, report: NodeReport, now: float) -> NotProgrammed | None:
    """None if the node has the policy's current generation in force."""
    entry = report.policies.get(policy.key)
    if report.stale(now):
        assert report.heartbeat is not None
        return NotProgrammed(report.node, "AgentNotReporting",
                             f"last report {now - report.heartbeat:.0f}s ago")
    if entry is None or (policy.uid and entry.uid and entry.uid != policy.uid):
        return NotProgrammed(report.node, "NotReported", "the node does not list the policy")
    if entry.generation != policy.generation:
        return NotProgrammed(report.node, "NotReported",
                             f"the node lists generation {entry.generation}, "
                             f"not {policy.generation}")
    if not entry.programmed:
        return NotProgrammed(report.node, entry.reason or "NotProgrammed", entry.message)
    return None


def aggregate(policy: PolicyInput, verdict: Verdict, reports: Sequence[NodeReport],
              now: float) -> Programmed:
    """On how many nodes the policy's current generation is in force.

    A node counts when its VeerNode lists the policy (namespace, name, uid) at
    metadata.generation with programmed: true, and its heartbeat is younger
    than three heartbeat periods. Every VeerNode counts toward the total.
    """
    total = len(reports)
    missing: list[NotProgrammed] = []
    for report in sorted(reports, key=lambda r: r.node):
        state = _node_state(policy, report, now)
        if state is not None:
            missing.append(state)
    done = total - len(missing)
    if not verdict.accepted.true:
        condition = Condition("Programmed", "False", "NotAccepted",
                              f"agents do not program a policy that is not accepted: "
                              f"{verdict.accepted.message}")
    elif total == 0:
        condition = Condition("Programmed", "False", "NoNodes",
                              "no node reports (no VeerNode objects): is the veer agent running?")
    elif done == total:
        condition = Condition("Programmed", "True", "Programmed",
                              f"programmed on all {total} node(s)")
    else:
        shown = "; ".join(
            f"{m.node}: {m.reason}" + (f" ({m.message})" if m.message else "")
            for m in missing[:3]
        )
        more = f"; and {len(missing) - 3} more" if len(missing) > 3 else ""
        unresolved = ("" if verdict.resolved_refs.true
                      else f" ({verdict.resolved_refs.message})")
        condition = Condition("Programmed", "False", "Pending",
                              f"programmed on {done} of {total} node(s){unresolved}; "
                              f"{shown}{more}")
    return Programmed(condition, done, total, tuple(missing))


# ---- the status object, and what changed ------------------------------------


def policy_status(
    policy: PolicyInput,
    verdict: Verdict,
    programmed: Programmed,
    previous: Mapping[str, Any] | None,
    now: str,
) -> dict[str, Any]:
    """status for the policy. A condition keeps its lastTransitionTime while
    its status stays the same (metav1.Condition's contract), so an unchanged
    verdict yields a status equal to `previous`."""
    before = {c.get("type"): c for c in _conditions(previous)}
    conditions = []
    for c in (verdict.accepted, verdict.resolved_refs, programmed.condition):
        old = before.get(c.type)
        since = now
        if old is not None and old.get("status") == c.status and old.get("lastTransitionTime"):
            since = str(old["lastTransitionTime"])
        conditions.append({
            "type": c.type,
            "status": c.status,
            "observedGeneration": policy.generation,
            "lastTransitionTime": since,
            "reason": c.reason,
            "message": c.message,
        })
    nodes: dict[str, Any] = {"total": programmed.total, "programmed": programmed.programmed}
    if programmed.not_programmed:
        nodes["notProgrammed"] = [
            {"name": m.node, "reason": m.reason, **({"message": m.message} if m.message else {})}
            for m in programmed.not_programmed[:MAX_NOT_PROGRAMMED]
        ]
    return {
        "observedGeneration": policy.generation,
        "conditions": conditions,
        "programmed": programmed.fraction,
        "nodes": nodes,
    }


def _conditions(status: Mapping[str, Any] | None) -> list[Mapping[str, Any]]:
    raw = (status or {}).get("conditions")
    return [c for c in raw if isinstance(c, Mapping)] if isinstance(raw, list) else []


@dataclass(frozen=True)
class Event:
    type: str  # "Normal" or "Warning"
    reason: str
    message: str


def transitions(before: Mapping[str, Any] | None, after: Mapping[str, Any]) -> list[Event]:
    """The Events that tell a user what changed between two statuses:
    acceptance, conflicts and invalid specs, missing Services (and their
    return), and becoming programmed everywhere."""
    old = {c.get("type"): c for c in _conditions(before)}
    out: list[Event] = []
    for c in _conditions(after):
        kind, status, reason = c.get("type"), c.get("status"), str(c.get("reason"))
        message = str(c.get("message") or "")
        prev = old.get(kind) or {}
        changed = (prev.get("status"), prev.get("reason"), prev.get("message")) != (
            status, reason, message)
        if not changed:
            continue
        if kind == "Accepted":
            if status == "True":
                if prev.get("status") != "True":
                    out.append(Event("Normal", "Accepted", message))
            else:
                out.append(Event("Warning", reason, message))
        elif kind == "ResolvedRefs":
            if status == "False":
                out.append(Event("Warning", reason, message))
            elif status == "True" and prev.get("status") == "False":
                out.append(Event("Normal", "ResolvedRefs", message))
        elif kind == "Programmed" and status == "True" and prev.get("status") != "True":
            out.append(Event("Normal", "Programmed", message))
    return out
