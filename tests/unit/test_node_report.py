"""The agent's VeerNode report (agent/kube/report.py) against a fake API
server: what it lists (accepted policies whose Services exist here, each
programmed or not as the agent's last pass left it), that it fits the CRD,
that it is created when missing and patched only when its content changes
or a heartbeat is due; and the uninstall decision (agent/kube/uninstall.py)
on every path, and the watch of the agent's DaemonSet that feeds it.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from builders import models, node, port, service
from crd_schema import REPO, crd_schema, errors
from kubefake import FakeApi

from agent.errors import KubeApiError
from agent.kube.client import DAEMON_SETS, PODS, VEER_NODES
from agent.kube.report import AgentFacts, Identity, NodeReporter, node_status
from agent.kube.uninstall import Decision, OwnerState, OwnerWatch, decide, owner_of
from agent.model.snapshot import ClusterSnapshot, Store

NODE = "node-1"
VN_SCHEMA = crd_schema(REPO / "crds" / "veernodes.veer.dev.yaml")
IDENTITY = Identity("ebpf", "auto: eBPF is the only datapath", "veer-agent-x7k2p", "0.1.0")


def policy(name: str, *targets: str, second: int = 0, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "veer.dev/v1alpha1",
        "kind": "TrafficPolicy",
        "metadata": {"name": name, "namespace": "demo", "generation": 4, "uid": f"u-{name}",
                     "creationTimestamp": f"2026-01-01T00:00:0{second}Z"},
        "spec": {"targetRefs": [{"name": t} for t in targets], **spec},
    }


def cluster(*extra: dict[str, Any]) -> list[dict[str, Any]]:
    own = node(NODE)
    own["metadata"]["uid"] = "node-uid-1"
    return [own, service("web", port("http", 80), ns="demo"), *extra]


def test_the_report_lists_policies_in_force_as_the_last_pass_left_them() -> None:
    snap = ClusterSnapshot.of(models(*cluster(
        policy("older", "web", second=1),
        policy("newer", "web", second=2),  # conflicted: not in force
        policy("missing", "nothing"),  # its Service is not here
    )))
    facts = AgentFacts(3, True, "Synced", "ok",
                       {"demo/older": (True, "Programmed", "in force on 2 frontends")})
    status = node_status(snap, NODE, IDENTITY, facts, now="2026-01-01T00:01:00Z")
    assert status["trafficPolicies"] == [{
        "namespace": "demo", "name": "older", "uid": "u-older", "generation": 4,
        "mode": "EBPF", "programmed": True, "reason": "Programmed",
        "message": "in force on 2 frontends",
    }]
    # Before a pass has programmed it, a policy is Pending, not programmed.
    pending = node_status(snap, NODE, IDENTITY, AgentFacts(3, True, "Synced", "ok"),
                          now="2026-01-01T00:01:00Z")
    assert [(p["programmed"], p["reason"]) for p in pending["trafficPolicies"]] == [
        (False, "Pending")]
    assert status["nodeUID"] == "node-uid-1"
    assert status["podName"] == "veer-agent-x7k2p"
    assert (status["mode"], status["services"]) == ("EBPF", 3)
    assert status["conditions"] == [{
        "type": "Ready", "status": "True", "lastTransitionTime": "2026-01-01T00:01:00Z",
        "reason": "Synced", "message": "ok"}]
    full = {"apiVersion": "veer.dev/v1alpha1", "kind": "VeerNode",
            "metadata": {"name": NODE}, "spec": {},
            "status": {**status, "heartbeatTime": "2026-01-01T00:01:00Z"}}
    assert list(errors(VN_SCHEMA, full)) == []
    # Ready keeps its transition time while it stays the same.
    again = node_status(snap, NODE, IDENTITY, AgentFacts(4, True, "Synced", "ok"), status,
                        now="2026-01-01T00:09:00Z")
    assert again["conditions"][0]["lastTransitionTime"] == "2026-01-01T00:01:00Z"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_reporter_creates_then_patches_only_on_change() -> None:
    api = FakeApi()
    store = Store()
    clock = Clock()
    facts = AgentFacts(1, True, "Synced", "ok")
    reporter = NodeReporter(api, store, NODE, IDENTITY, facts=lambda: facts, heartbeat=120,
                            clock=clock)
    assert not reporter.report()  # nothing before the first complete view
    assert api.calls == []

    store.replace(models(*cluster()))
    assert reporter.report()
    vn = api.objects[VEER_NODES][("", NODE)]
    assert vn["metadata"]["ownerReferences"] == [
        {"apiVersion": "v1", "kind": "Node", "name": NODE, "uid": "node-uid-1"}]
    assert vn["status"]["trafficPolicies"] == [] and vn["status"]["heartbeatTime"]
    writes = reporter.writes
    assert writes == 2  # created, then its status patched

    clock.now += 60
    assert not reporter.report()  # nothing changed, no heartbeat due
    store.replace(models(*cluster(policy("tp", "web"))))
    assert reporter.report()
    assert [p["name"] for p in api.objects[VEER_NODES][("", NODE)]["status"]
            ["trafficPolicies"]] == ["tp"]
    assert not reporter.report()

    clock.now += 121  # a heartbeat: the same content, a new heartbeatTime
    assert reporter.report()
    assert reporter.writes == writes + 2

    # Someone deleted the report: the next write fails, the one after makes it again.
    api.remove(VEER_NODES, "", NODE)
    facts = AgentFacts(0, False, "SyncFailed", "map full")
    with pytest.raises(KubeApiError):
        reporter.report()
    assert reporter.report()
    status = api.objects[VEER_NODES][("", NODE)]["status"]
    assert status["conditions"][0]["status"] == "False"
    assert [p["name"] for p in status["trafficPolicies"]] == ["tp"]


def test_a_restarted_agent_does_not_rewrite_an_identical_report() -> None:
    api = FakeApi()
    store = Store()
    store.replace(models(*cluster()))
    clock = Clock()
    first = NodeReporter(api, store, NODE, IDENTITY, facts=AgentFacts, clock=clock)
    assert first.report()
    clock.now += 10
    second = NodeReporter(api, store, NODE, IDENTITY, facts=AgentFacts, clock=clock)
    second._last_write = clock.now  # as if its heartbeat were not due
    assert not second.report()
    assert second.writes == 0


# ---- uninstall ----------------------------------------------------------------

NS = "veer-system"
DS = "veer-agent"


def agent_pod(owner: bool = True) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": "veer-agent-x7k2p", "namespace": NS}
    if owner:
        meta["ownerReferences"] = [{"apiVersion": "apps/v1", "kind": "DaemonSet", "name": DS,
                                    "uid": "ds-uid", "controller": True}]
    return {"metadata": meta}


def daemon_set(uid: str = "ds-uid", deleting: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": DS, "namespace": NS, "uid": uid}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return {"metadata": meta}


def test_the_daemon_set_is_found_through_the_pod() -> None:
    api = FakeApi()
    assert "POD_NAMESPACE and POD_NAME are not set" in str(owner_of(api, "", ""))
    assert "cannot read Pod veer-system/veer-agent-x7k2p" in str(
        owner_of(api, NS, "veer-agent-x7k2p"))
    api.put(PODS, agent_pod(owner=False))
    assert "is not owned by a DaemonSet" in str(owner_of(api, NS, "veer-agent-x7k2p"))
    api.put(PODS, agent_pod())
    assert owner_of(api, NS, "veer-agent-x7k2p") == (NS, DS)


@pytest.mark.parametrize(("events", "ds", "uninstalling", "why"), [
    # What the watch saw decides, even when the API server can no longer be asked
    # (helm deleted the agent's RBAC right after the DaemonSet).
    ([("LISTED", daemon_set()), ("MODIFIED", daemon_set(deleting=True))], "forbidden", True,
     "DaemonSet veer-system/veer-agent is being deleted"),
    ([("LISTED", daemon_set()), ("DELETED", daemon_set())], "forbidden", True,
     "DaemonSet veer-system/veer-agent was deleted"),
    ([("LISTED", daemon_set()), ("VANISHED", {})], "forbidden", True, "is gone"),
    # Otherwise a last look at SIGTERM.
    ([("LISTED", daemon_set())], daemon_set(), False, "is in place"),
    ([("LISTED", daemon_set())], None, True, "DaemonSet veer-system/veer-agent is gone"),
    ([("LISTED", daemon_set())], daemon_set(deleting=True), True, "is being deleted"),
    ([("LISTED", daemon_set())], daemon_set(uid="other"), False, "deleted and made again"),
    ([("LISTED", daemon_set()), ("ADDED", daemon_set(uid="other", deleting=True))],
     daemon_set(uid="other"), False, "deleted and made again"),
    # Never seen (no RBAC, or not run by the chart): in doubt, leave it.
    ([("VANISHED", {})], None, False, "cannot tell whether"),
    ([], "forbidden", False, "cannot tell whether DaemonSet veer-system/veer-agent"),
])
def test_uninstall_is_decided_from_the_daemon_set(
    events: list[tuple[str, dict[str, Any]]], ds: dict[str, Any] | str | None,
    uninstalling: bool, why: str,
) -> None:
    api = FakeApi()
    state = OwnerState(NS, DS)
    for kind, obj in events:
        if kind == "VANISHED":
            state.vanished()
        else:
            state.observe(kind, obj)
    path = DAEMON_SETS.path(NS, DS)
    if ds == "forbidden":
        api.fail("GET", path, KubeApiError(f"GET {path}", 401, "Unauthorized"))
    elif isinstance(ds, dict):
        api.put(DAEMON_SETS, ds)
    decision = decide(api, state)
    assert decision.uninstalling is uninstalling
    assert why in decision.why


def test_uninstall_is_not_assumed_without_a_daemon_set() -> None:
    decision = decide(FakeApi(), None, "Pod veer-system/x is not owned by a DaemonSet")
    assert decision == Decision(False, "Pod veer-system/x is not owned by a DaemonSet")


def test_the_owner_watch_sees_the_deletion() -> None:
    api = FakeApi()
    api.put(DAEMON_SETS, daemon_set())
    watch = OwnerWatch(api, OwnerState(NS, DS))
    watch.start()
    try:
        deadline = time.monotonic() + 5
        while not api.watches:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert api.watches[0].field_selector == f"metadata.name={DS}"
        assert watch.snapshot().uid == "ds-uid" and not watch.snapshot().deleting
        api.emit(DAEMON_SETS, "DELETED", daemon_set())
        while not watch.snapshot().deleting:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        watch.stop()
    assert decide(api, watch.snapshot()).uninstalling
