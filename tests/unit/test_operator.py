"""The operator's parts without a cluster: the status writer over indexes
(agent/operator/handlers.py) against a fake API server, the merge patch it
sends, and leader election on a Lease (agent/operator/lease.py) with a fake
clock.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import pytest
from builders import port, service
from kubefake import FakeApi

from agent.errors import KubeApiError
from agent.kube.client import LEASES, TRAFFIC_POLICIES
from agent.operator.conditions import Event, NodeReport
from agent.operator.handlers import StatusWriter, merge_patch, service_info
from agent.operator.lease import LeaderElector

NS = "demo"


def tp(name: str, *targets: str, second: int = 0) -> dict[str, Any]:
    return {
        "apiVersion": "veer.dev/v1alpha1",
        "kind": "TrafficPolicy",
        "metadata": {"name": name, "namespace": NS, "generation": 1,
                     "creationTimestamp": f"2026-01-01T00:00:0{second}Z"},
        "spec": {"targetRefs": [{"name": t} for t in targets]},
    }


class Cluster:
    """A fake API server and kopf-like indexes over it."""

    def __init__(self) -> None:
        self.api = FakeApi()
        self.services: dict[tuple[str, str], list[Any]] = {}
        self.nodes: dict[str, list[NodeReport]] = {}
        self.events: list[tuple[str, str, str]] = []
        self.writer = StatusWriter(self.api, emit=self.record)

    def record(self, body: Mapping[str, Any], event: Event) -> None:
        self.events.append((body["metadata"]["name"], event.type, event.reason))

    def add_policy(self, body: dict[str, Any]) -> None:
        self.api.put(TRAFFIC_POLICIES, body)

    def add_service(self, name: str) -> None:
        self.services[(NS, name)] = [service_info(service(name, port("http", 80), ns=NS))]

    def policies(self) -> dict[tuple[str, str], list[dict[str, Any]]]:
        """The policy index as kopf would hold it: the latest bodies."""
        return {key: [body] for key, body in self.api.objects[TRAFFIC_POLICIES].items()}

    def write(self) -> int:
        before = self.writer.patches
        self.writer.policies = self.policies()
        self.writer.services = self.services
        self.writer.veernodes = self.nodes
        asyncio.run(self.writer.write_all())
        return self.writer.patches - before

    def status(self, name: str) -> dict[str, Any]:
        status: dict[str, Any] = self.api.objects[TRAFFIC_POLICIES][(NS, name)]["status"]
        return status

    def conditions(self, name: str) -> dict[str, tuple[str, str]]:
        return {c["type"]: (c["status"], c["reason"]) for c in self.status(name)["conditions"]}


def test_statuses_are_written_once_and_follow_services() -> None:
    c = Cluster()
    c.add_policy(tp("a", "web", second=1))
    c.add_policy(tp("b", "web", second=2))
    assert c.write() == 2
    assert c.conditions("a") == {"Accepted": ("True", "Accepted"),
                                 "ResolvedRefs": ("False", "TargetNotFound"),
                                 "Programmed": ("False", "NoNodes")}
    assert c.conditions("b")["Accepted"] == ("False", "Conflicted")
    assert c.status("a")["programmed"] == "0/0"
    assert sorted(c.events) == [("a", "Normal", "Accepted"), ("a", "Warning", "TargetNotFound"),
                                ("b", "Warning", "Conflicted"), ("b", "Warning", "TargetNotFound")]
    assert c.write() == 0  # nothing changed: nothing written

    c.add_service("web")
    c.nodes["node-1"] = [NodeReport.of("node-1", {"trafficPolicies": [
        {"namespace": NS, "name": "a", "generation": 1, "programmed": False,
         "reason": "NotImplemented", "message": "not yet"}]})]
    c.events.clear()
    assert c.write() == 2  # a: refs resolved and 0/1; b: 0/1
    assert c.conditions("a") == {"Accepted": ("True", "Accepted"),
                                 "ResolvedRefs": ("True", "ResolvedRefs"),
                                 "Programmed": ("False", "Pending")}
    assert c.status("a")["programmed"] == "0/1"
    assert c.status("a")["nodes"]["notProgrammed"] == [
        {"name": "node-1", "reason": "NotImplemented", "message": "not yet"}]
    assert sorted(c.events) == [("a", "Normal", "ResolvedRefs"), ("b", "Normal", "ResolvedRefs")]

    # The older policy goes: the newer one wins the Service.
    c.api.remove(TRAFFIC_POLICIES, NS, "a")
    c.events.clear()
    assert c.write() == 1
    assert c.conditions("b")["Accepted"] == ("True", "Accepted")
    assert c.events == [("b", "Normal", "Accepted")]

    # Programmed everywhere: notProgrammed is removed from the status.
    c.nodes["node-1"] = [NodeReport.of("node-1", {"trafficPolicies": [
        {"namespace": NS, "name": "b", "generation": 1, "programmed": True}]})]
    c.events.clear()
    assert c.write() == 1
    assert c.status("b")["nodes"] == {"total": 1, "programmed": 1}
    assert c.conditions("b")["Programmed"] == ("True", "Programmed")
    assert c.events == [("b", "Normal", "Programmed")]


def test_a_status_not_yet_seen_back_is_not_written_twice() -> None:
    c = Cluster()
    c.add_policy(tp("a", "web"))
    stale_index = c.policies()  # the watch has not delivered our patch yet
    assert c.write() == 1
    c.writer.policies = stale_index
    asyncio.run(c.writer.write_all())
    assert c.writer.patches == 1


def test_a_failed_write_is_retried_and_a_deleted_policy_skipped() -> None:
    c = Cluster()
    c.add_policy(tp("a", "web"))
    c.add_policy(tp("gone", "web"))
    path = TRAFFIC_POLICIES.path(NS, "a", "status")
    c.api.fail("PATCH", path, KubeApiError(f"PATCH {path}", 500, "etcd timeout"))
    gone = TRAFFIC_POLICIES.path(NS, "gone", "status")
    c.api.fail("PATCH", gone, KubeApiError(f"PATCH {gone}", 404, "not found"))
    c.writer._dirty = asyncio.Event()
    assert c.write() == 0
    assert c.writer._dirty.is_set()
    assert c.write() == 2


def test_merge_patch_removes_what_is_gone() -> None:
    current = {"programmed": "0/1", "nodes": {"total": 1, "programmed": 0,
                                              "notProgrammed": [{"name": "n1"}]},
               "extra": 1}
    desired = {"programmed": "1/1", "nodes": {"total": 1, "programmed": 1}}
    assert merge_patch(current, desired) == {
        "programmed": "1/1", "nodes": {"programmed": 1, "notProgrammed": None}, "extra": None}
    assert merge_patch(desired, desired) == {}


# ---- leader election ---------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def elector(api: FakeApi, identity: str, clock: Clock) -> LeaderElector:
    return LeaderElector(api, "veer-system", "veer-operator", identity, lease_duration=15,
                         renew_deadline=10, retry_period=2, clock=clock,
                         wall=lambda: f"2026-01-01T00:00:{int(clock.now) % 60:02d}.000000Z")


def lease(api: FakeApi) -> dict[str, Any]:
    spec: dict[str, Any] = api.objects[LEASES][("veer-system", "veer-operator")]["spec"]
    return spec


def test_one_candidate_leads_and_the_other_takes_over_when_it_stops_renewing() -> None:
    api, clock = FakeApi(), Clock()
    a, b = elector(api, "a", clock), elector(api, "b", clock)
    assert a.try_acquire_or_renew() and a.leading
    assert lease(api)["holderIdentity"] == "a" and lease(api)["leaseTransitions"] == 0
    assert not b.try_acquire_or_renew()
    for _ in range(10):  # a renews every 2 s: b never gets it
        clock.now += 2
        assert a.renew()
        assert not b.try_acquire_or_renew()
    assert b.holder == "a"

    clock.now += 14  # a stopped renewing 14 s ago (b's clock): still a's
    assert not b.try_acquire_or_renew()
    clock.now += 2
    assert b.try_acquire_or_renew()
    assert lease(api)["holderIdentity"] == "b" and lease(api)["leaseTransitions"] == 1
    # a wakes up: it has lost, and must not take the Lease back.
    assert not a.renew() and not a.leading


def test_a_leader_that_cannot_renew_gives_up_at_the_deadline() -> None:
    api, clock = FakeApi(), Clock()
    a = elector(api, "a", clock)
    assert a.try_acquire_or_renew()
    path = LEASES.path("veer-system", "veer-operator")
    broken = KubeApiError(f"GET {path}", 0, "connection refused")
    api.fail("GET", path, *([broken] * 10))
    clock.now += 4
    assert a.renew()  # 4 s without renewing: still within the deadline
    clock.now += 6
    assert not a.renew()  # 10 s: lost
    assert not a.leading


def test_a_released_lease_is_taken_at_once() -> None:
    api, clock = FakeApi(), Clock()
    a, b = elector(api, "a", clock), elector(api, "b", clock)
    assert a.try_acquire_or_renew()
    assert not b.try_acquire_or_renew()
    a.release()
    assert lease(api)["holderIdentity"] == ""
    assert b.try_acquire_or_renew()
    assert lease(api)["holderIdentity"] == "b"


def test_two_candidates_writing_at_once_do_not_both_win() -> None:
    api, clock = FakeApi(), Clock()
    a, b = elector(api, "a", clock), elector(api, "b", clock)
    assert a.try_acquire_or_renew()
    a.release()
    # Both read the free Lease; b writes first; a's write carries an old version.
    path = LEASES.path("veer-system", "veer-operator")
    stale = api.get(path)
    assert b.try_acquire_or_renew()
    original_get = api.get
    api.get = lambda p: stale if p == path else original_get(p)  # type: ignore[method-assign]
    assert not a.try_acquire_or_renew()
    assert lease(api)["holderIdentity"] == "b"


def test_renew_deadline_must_be_shorter_than_the_lease() -> None:
    with pytest.raises(ValueError):
        LeaderElector(FakeApi(), "ns", "n", "a", lease_duration=10, renew_deadline=10)
