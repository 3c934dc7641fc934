"""TrafficPolicy status without a cluster (agent/operator/conditions.py):
Accepted beyond the schema, ResolvedRefs, conflicts (the older policy wins),
Programmed "n/m" from the VeerNode reports, the status object (checked
against the CRD's schema) and the Events its transitions produce. Reasons
are those of crds/README.md.

Conventions: policies live in namespace "demo"; creationTimestamps are
"2026-01-01T00:00:0Ns" so N orders them; Services are named after their role.
"""

from __future__ import annotations

from typing import Any

import pytest
from builders import port, service
from crd_schema import REPO, crd_schema, errors

from agent.errors import ModelError
from agent.model.parse import parse_object, parse_service
from agent.operator.conditions import (
    NodeReport,
    PolicyInput,
    ServiceInfo,
    Verdict,
    agent_ports,
    aggregate,
    evaluate,
    policy_status,
    transitions,
)

NS = "demo"
NOW = 1_767_225_600.0  # 2026-01-01T00:00:00Z
TP_SCHEMA = crd_schema(REPO / "crds" / "trafficpolicies.veer.dev.yaml")


def tp(name: str, *targets: str, second: int = 0, generation: int = 1,
       **spec: Any) -> PolicyInput:
    doc = {
        "apiVersion": "veer.dev/v1alpha1",
        "kind": "TrafficPolicy",
        "metadata": {"name": name, "namespace": NS, "generation": generation,
                     "creationTimestamp": f"2026-01-01T00:00:0{second}Z"},
        "spec": {"targetRefs": [{"name": t} for t in targets], **spec},
    }
    try:
        obj = parse_object(doc)
    except ModelError as err:
        return PolicyInput(NS, name, generation, doc["metadata"]["creationTimestamp"], None,
                           str(err))
    assert obj is not None
    return PolicyInput.of(obj)  # type: ignore[arg-type]


def svc(name: str, **kwargs: Any) -> ServiceInfo:
    return ServiceInfo.of(parse_service(service(name, port("http", 80), ns=NS, **kwargs)))


def conditions(v: Verdict) -> tuple[tuple[str, str], tuple[str, str]]:
    return ((v.accepted.status, v.accepted.reason),
            (v.resolved_refs.status, v.resolved_refs.reason))


def test_a_valid_policy_is_accepted_and_resolved() -> None:
    v = evaluate([tp("a", "web", split=[{"service": "web", "weight": 1},
                                        {"service": "canary", "weight": 1}])],
                 [svc("web"), svc("canary")])[(NS, "a")]
    assert conditions(v) == (("True", "Accepted"), ("True", "ResolvedRefs"))
    assert v.accepted.message == "applies to Service web"
    assert v.in_force


@pytest.mark.parametrize(("policy", "services", "reason", "message"), [
    (tp("a", "web", "api"), [], "TargetNotFound",
     "target Services api, web not found in namespace demo"),
    (tp("a", "web", split=[{"service": "canary", "weight": 1}]), [], "TargetNotFound",
     "target Service web and split Service canary not found in namespace demo"),
    (tp("a", "web", split=[{"service": "canary", "weight": 1}]), [svc("web")],
     "BackendNotFound", "split Service canary not found in namespace demo"),
])
def test_missing_services_are_not_found(
    policy: PolicyInput, services: list[ServiceInfo], reason: str, message: str
) -> None:
    v = evaluate([policy], services)[(NS, "a")]
    assert conditions(v) == (("True", "Accepted"), ("False", reason))
    assert v.resolved_refs.message == message
    assert not v.in_force
    # ... and it clears once the Services exist, with nothing else changed.
    v = evaluate([policy], [svc("web"), svc("api"), svc("canary")])[(NS, "a")]
    assert conditions(v) == (("True", "Accepted"), ("True", "ResolvedRefs"))


def test_a_service_in_another_namespace_does_not_resolve() -> None:
    other = ServiceInfo("other", "web")
    v = evaluate([tp("a", "web")], [other])[(NS, "a")]
    assert v.resolved_refs.reason == "TargetNotFound"


def test_the_agents_ports_are_those_it_was_given() -> None:
    """An agent whose metrics port moved: a redirect onto the new port is
    refused, one onto the old default is not; a port served by nothing (its
    bind address empty) is free."""
    moved = agent_ports(19249, 10256)
    v = evaluate([tp("a", "web", redirect={"port": 19249})], [svc("web")], moved)[(NS, "a")]
    assert (v.accepted.reason, v.accepted.message) == (
        "Invalid", "redirect.port 19249 is the veer agent's metrics port on every node")
    v = evaluate([tp("a", "web", redirect={"port": 10249})], [svc("web")], moved)[(NS, "a")]
    assert v.accepted.true, v.accepted
    v = evaluate([tp("a", "web", redirect={"port": 10256})], [svc("web")],
                 agent_ports(19249, 0))[(NS, "a")]
    assert v.accepted.true, v.accepted


@pytest.mark.parametrize(("policy", "services", "reason", "message"), [
    (tp("a", "dns"), [svc("dns", ips="None")], "Invalid",
     "target Service dns is headless: veer does not proxy it"),
    (tp("a", "web", split=[{"service": "ext", "weight": 1}]),
     [svc("web"), ServiceInfo(NS, "ext", "ExternalName")], "Invalid",
     "split Service ext is ExternalName: veer does not proxy it"),
    (tp("a", "web", redirect={"port": 10256}), [svc("web")], "Invalid",
     "redirect.port 10256 is the veer agent's health port on every node"),
    (tp("a", "web", redirect={"port": 30080}),
     [svc("web"), ServiceInfo("shop", "front", node_ports=(30080,))], "Invalid",
     "redirect.port 30080 is the NodePort of Service shop/front on every node"),
    # The agent's health-check server binds it on every node, as a NodePort.
    (tp("a", "web", redirect={"port": 32000}),
     [svc("web"), svc("front", type="LoadBalancer", externalTrafficPolicy="Local",
                      healthCheckNodePort=32000)], "Invalid",
     "redirect.port 32000 is the healthCheckNodePort of Service demo/front on every node"),
    (tp("a", "web", split=[{"service": "web", "weight": 0}]), [svc("web")], "Invalid",
     "TrafficPolicy/demo/a: spec.split: at least one split weight must be greater than 0"),
])
def test_what_the_schema_cannot_check_is_not_accepted(
    policy: PolicyInput, services: list[ServiceInfo], reason: str, message: str
) -> None:
    v = evaluate([policy], services)[(NS, "a")]
    assert (v.accepted.status, v.accepted.reason, v.accepted.message) == ("False", reason, message)
    assert not v.in_force


def test_the_older_policy_wins_a_conflict() -> None:
    # "zeta" is older than "alpha": the timestamp decides, not the name.
    got = evaluate([tp("alpha", "web", second=2), tp("zeta", "web", second=1)], [svc("web")])
    assert got[(NS, "zeta")].accepted.true
    loser = got[(NS, "alpha")].accepted
    assert (loser.status, loser.reason) == ("False", "Conflicted")
    assert loser.message == "Service web already targeted by the older TrafficPolicy demo/zeta"
    # Created in the same second: the name decides.
    got = evaluate([tp("b", "web", second=1), tp("a", "web", second=1)], [svc("web")])
    assert got[(NS, "a")].accepted.true and not got[(NS, "b")].accepted.true


def test_only_accepted_policies_claim_their_targets() -> None:
    got = evaluate([
        tp("first", "web", second=1),
        tp("second", "web", "api", second=2),  # loses web, so it does not hold api
        tp("third", "api", second=3),
        tp("invalid", "shop", second=0, redirect={"port": 10249}),  # never claims shop
        tp("fourth", "shop", second=4),
    ], [svc("web"), svc("api"), svc("shop")])
    assert {k[1] for k, v in got.items() if v.accepted.true} == {"first", "third", "fourth"}
    assert got[(NS, "second")].accepted.message == (
        "Service web already targeted by the older TrafficPolicy demo/first")


def test_conflicts_stay_within_a_namespace() -> None:
    a = tp("a", "web", second=1)
    b = PolicyInput("other", "b", 1, "2026-01-01T00:00:00Z", a.policy)
    got = evaluate([a, b], [svc("web"), ServiceInfo("other", "web")])
    assert got[(NS, "a")].accepted.true and got[("other", "b")].accepted.true


def report(node: str, generation: int, programmed: bool, reason: str = "",
           heartbeat: str = "2026-01-01T00:00:00Z", uid: str = "") -> NodeReport:
    entry: dict[str, Any] = {"namespace": NS, "name": "a", "generation": generation,
                             "programmed": programmed}
    if reason:
        entry.update(reason=reason, message="not yet")
    if uid:
        entry["uid"] = uid
    return NodeReport.of(node, {"trafficPolicies": [entry], "heartbeatTime": heartbeat,
                                "heartbeatSeconds": 60})


def test_programmed_counts_nodes_at_the_current_generation() -> None:
    policy = tp("a", "web", generation=3)
    verdict = evaluate([policy], [svc("web")])[(NS, "a")]
    nodes = [report("n1", 3, True), report("n2", 3, True), report("n3", 2, True),
             report("n4", 3, False, "NotImplemented"), NodeReport("n5"),
             report("n6", 3, True, heartbeat="2025-12-31T23:56:59Z")]
    p = aggregate(policy, verdict, nodes, NOW)
    assert (p.fraction, p.condition.status, p.condition.reason) == ("2/6", "False", "Pending")
    assert p.condition.message == (
        "programmed on 2 of 6 node(s); n3: NotReported (the node lists generation 2, not 3); "
        "n4: NotImplemented (not yet); n5: NotReported (the node does not list the policy); "
        "and 1 more")
    assert [(m.node, m.reason) for m in p.not_programmed] == [
        ("n3", "NotReported"), ("n4", "NotImplemented"), ("n5", "NotReported"),
        ("n6", "AgentNotReporting")]
    assert p.not_programmed[-1].message == "last report 181s ago"

    p = aggregate(policy, verdict, nodes[:2], NOW)
    assert (p.fraction, p.condition.status, p.condition.reason) == ("2/2", "True", "Programmed")
    p = aggregate(policy, verdict, [report("n1", 3, False, "NotImplemented")], NOW)
    assert (p.fraction, p.condition.reason) == ("0/1", "Pending")
    assert p.condition.message == "programmed on 0 of 1 node(s); n1: NotImplemented (not yet)"
    p = aggregate(policy, verdict, [], NOW)
    assert (p.fraction, p.condition.reason) == ("0/0", "NoNodes")


def test_a_node_reporting_another_policy_of_that_name_does_not_count() -> None:
    policy = PolicyInput(NS, "a", 1, "", tp("a", "web").policy, uid="new")
    verdict = evaluate([policy], [svc("web")])[(NS, "a")]
    p = aggregate(policy, verdict, [report("n1", 1, True, uid="old"),
                                    report("n2", 1, True, uid="new")], NOW)
    assert p.fraction == "1/2"
    assert p.not_programmed[0].reason == "NotReported"


def test_a_policy_not_in_force_is_not_programmed() -> None:
    policy = tp("a", "web")
    p = aggregate(policy, evaluate([policy], [])[(NS, "a")], [report("n1", 1, False)], NOW)
    assert (p.fraction, p.condition.status, p.condition.reason) == ("0/1", "False", "Pending")
    assert p.condition.message == (
        "programmed on 0 of 1 node(s) (target Service web not found in namespace demo); "
        "n1: NotProgrammed")
    loser = tp("b", "web", second=5)
    verdicts = evaluate([policy, loser], [svc("web")])
    p = aggregate(loser, verdicts[loser.key], [report("n1", 1, True)], NOW)
    assert (p.condition.status, p.condition.reason) == ("False", "NotAccepted")


def test_node_reports_skip_malformed_entries() -> None:
    r = NodeReport.of("n1", {"trafficPolicies": [
        {"namespace": NS, "name": "a", "generation": "1", "programmed": True},
        "junk",
        {"namespace": NS, "name": "b", "generation": 2, "programmed": "yes"},
    ], "heartbeatTime": "yesterday"})
    assert list(r.policies) == [(NS, "b")]
    assert not r.policies[(NS, "b")].programmed
    assert r.heartbeat is None and not r.stale(NOW)
    assert NodeReport.of("n2", None).policies == {}


def status_of(policy: PolicyInput, services: list[ServiceInfo], nodes: list[NodeReport],
              previous: dict[str, Any] | None, now: str) -> dict[str, Any]:
    verdict = evaluate([policy], services)[policy.key]
    return policy_status(policy, verdict, aggregate(policy, verdict, nodes, NOW), previous, now)


def test_the_status_object_fits_the_crd_and_keeps_transition_times() -> None:
    policy = tp("a", "web", generation=2)
    first = status_of(policy, [], [], None, "2026-01-01T00:00:10Z")
    assert first["observedGeneration"] == 2 and first["programmed"] == "0/0"
    assert [(c["type"], c["status"], c["reason"]) for c in first["conditions"]] == [
        ("Accepted", "True", "Accepted"),
        ("ResolvedRefs", "False", "TargetNotFound"),
        ("Programmed", "False", "NoNodes"),
    ]
    assert list(errors(TP_SCHEMA, {"spec": {"targetRefs": [{"name": "web"}]},
                                   "status": first})) == []

    # The same verdict later: equal, transition times kept.
    assert status_of(policy, [], [], first, "2026-01-01T00:05:00Z") == first
    # The Service appears: ResolvedRefs turns, Accepted keeps its time.
    later = status_of(policy, [svc("web")], [report("n1", 2, False, "NotImplemented")],
                      first, "2026-01-01T00:06:00Z")
    times = {c["type"]: c["lastTransitionTime"] for c in later["conditions"]}
    assert times == {"Accepted": "2026-01-01T00:00:10Z",
                     "ResolvedRefs": "2026-01-01T00:06:00Z",
                     "Programmed": "2026-01-01T00:00:10Z"}  # still False
    assert later["programmed"] == "0/1"
    assert later["nodes"] == {"total": 1, "programmed": 0, "notProgrammed": [
        {"name": "n1", "reason": "NotImplemented", "message": "not yet"}]}
    assert list(errors(TP_SCHEMA, {"spec": {"targetRefs": [{"name": "web"}]},
                                   "status": later})) == []


def test_transitions_are_the_events_users_see() -> None:
    policy = tp("a", "web")
    missing = status_of(policy, [], [], None, "t0")
    assert [(e.type, e.reason) for e in transitions(None, missing)] == [
        ("Normal", "Accepted"), ("Warning", "TargetNotFound")]
    assert transitions(missing, missing) == []
    found = status_of(policy, [svc("web")], [report("n1", 1, True)], missing, "t1")
    assert [(e.type, e.reason) for e in transitions(missing, found)] == [
        ("Normal", "ResolvedRefs"), ("Normal", "Programmed")]

    loser = tp("b", "web", second=5)
    verdicts = evaluate([policy, loser], [svc("web")])
    conflicted = policy_status(loser, verdicts[loser.key],
                               aggregate(loser, verdicts[loser.key], [], NOW), None, "t2")
    events = transitions(None, conflicted)
    assert [(e.type, e.reason) for e in events] == [("Warning", "Conflicted")]
    assert events[0].message == "Service web already targeted by the older TrafficPolicy demo/a"
