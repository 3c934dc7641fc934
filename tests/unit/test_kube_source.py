"""The Kubernetes source against a fake API server (tests/unit/kubefake.py):
nothing is synced before every kind is listed; relists change the Store only
where objects differ, and delete what is gone; watch events, 410 Gone and
broken connections; malformed objects are logged and skipped; a missing
TrafficPolicy CRD counts as no policies.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable

import pytest
from builders import ep, eport, eps, node, port, service
from kubefake import FakeApi

from agent.errors import KubeApiError
from agent.kube.client import ENDPOINT_SLICES, NODES, SERVICES, TRAFFIC_POLICIES
from agent.kube.source import Backoff, Expired, KubeSource
from agent.model.objects import ObjectRef
from agent.model.snapshot import Store

NODE = "node-1"


def policy(name: str, *targets: str, ns: str = "demo") -> dict[str, object]:
    return {
        "apiVersion": "veer.dev/v1alpha1",
        "kind": "TrafficPolicy",
        "metadata": {"name": name, "namespace": ns, "generation": 1},
        "spec": {"targetRefs": [{"name": t} for t in targets]},
    }


@pytest.fixture
def api() -> FakeApi:
    fake = FakeApi()
    fake.put(SERVICES, service("web", port("http", 80, 8080), ips="10.96.0.10", ns="demo"))
    fake.put(ENDPOINT_SLICES, eps("web-abc", "web", ep("10.244.1.2", ready=True),
                                  ports=[eport("http", 8080)], ns="demo"))
    fake.put(NODES, node(NODE))
    fake.put(NODES, node("node-2"))
    return fake


def changes(store: Store) -> list[int]:
    seen: list[int] = []
    store.subscribe(lambda: seen.append(1))
    return seen


def wait(check: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_nothing_is_synced_until_every_kind_is_listed(api: FakeApi) -> None:
    store = Store()
    source = KubeSource(api, store, NODE)
    for resource in (SERVICES, ENDPOINT_SLICES, NODES):
        source.relist(resource)
        assert not store.synced
    assert ("Service", "demo", "web") in {
        (r.kind, r.namespace, r.name) for r in store.snapshot().services.values() for r in [r.ref]
    }
    api.missing.add(TRAFFIC_POLICIES)  # the CRD is not installed: that kind is empty
    assert source.relist(TRAFFIC_POLICIES) == ""
    assert store.synced
    assert source.last_report.problems == (
        "TrafficPolicy: the CRD trafficpolicies.veer.dev is not installed; treating it as "
        "none (checking again every 30s)",
    )
    # Only this node's Node is followed.
    assert set(store.snapshot().nodes) == {NODE}


def test_a_relist_of_the_same_objects_changes_nothing(api: FakeApi) -> None:
    store = Store()
    source = KubeSource(api, store, NODE)
    for resource in source.kinds:
        source.relist(resource)
    before = store.snapshot()
    seen = changes(store)
    for resource in source.kinds:
        source.relist(resource)
    assert seen == []
    assert store.snapshot() is before


def test_objects_gone_after_a_relist_are_deleted(api: FakeApi) -> None:
    store = Store()
    source = KubeSource(api, store, NODE)
    for resource in source.kinds:
        source.relist(resource)
    api.put(TRAFFIC_POLICIES, policy("tp", "web"))
    source.relist(TRAFFIC_POLICIES)
    assert ("demo", "tp") in store.snapshot().traffic_policies
    # Deleted while the watch was down: no DELETED event ever comes.
    api.remove(SERVICES, "demo", "web")
    api.remove(TRAFFIC_POLICIES, "demo", "tp")
    source.relist(SERVICES)
    source.relist(TRAFFIC_POLICIES)
    snap = store.snapshot()
    assert snap.services == {} and snap.traffic_policies == {}
    assert ("demo", "web-abc") in snap.endpoint_slices


def test_watch_events_update_the_store(api: FakeApi) -> None:
    store = Store()
    source = KubeSource(api, store, NODE)
    version = source.relist(SERVICES)
    added = api.put(SERVICES, service("api", port("http", 80), ips="10.96.0.11", ns="demo"))
    version = source.apply_event(SERVICES, {"type": "ADDED", "object": added}, version)
    assert version == added["metadata"]["resourceVersion"]
    assert ("demo", "api") in store.snapshot().services
    changed = service("api", port("http", 81), ips="10.96.0.11", ns="demo")
    changed["metadata"]["resourceVersion"] = "900"
    assert source.apply_event(SERVICES, {"type": "MODIFIED", "object": changed}, version) == "900"
    assert store.snapshot().services[("demo", "api")].ports[0].port == 81
    bookmark = {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "950"}}}
    assert source.apply_event(SERVICES, bookmark, "900") == "950"
    gone = {"type": "DELETED", "object": {**changed, "metadata": {
        **changed["metadata"], "resourceVersion": "960"}}}
    assert source.apply_event(SERVICES, gone, "950") == "960"
    assert ("demo", "api") not in store.snapshot().services
    assert ("demo", "web") in store.snapshot().services


def _modified(name: str, number: int, version: str) -> dict[str, object]:
    svc = service(name, port("http", number), ips="10.96.0.11", ns="demo")
    svc["metadata"]["resourceVersion"] = version
    return {"type": "MODIFIED", "object": svc}


def test_events_wake_at_once_and_are_recorded_once_per_snapshot(api: FakeApi) -> None:
    """A watch event wakes the Store's listeners when it arrives; it is parsed
    and recorded when the next snapshot is taken, and an object edited twice
    in between is recorded once, in its latest version."""
    store = Store()
    source = KubeSource(api, store, NODE)
    version = source.relist(SERVICES)
    woken = changes(store)
    recorded: list[object] = []
    store.subscribe_changes(recorded.extend)
    source.apply_event(SERVICES, _modified("api", 80, "901"), version)
    source.apply_event(SERVICES, _modified("api", 81, "902"), "901")
    assert woken == [1, 1] and recorded == []
    assert store.snapshot().services[("demo", "api")].ports[0].port == 81
    assert len(recorded) == 1
    store.snapshot()
    assert len(recorded) == 1  # nothing queued: nothing recorded again


def test_a_list_supersedes_the_events_queued_before_it(api: FakeApi) -> None:
    store = Store()
    source = KubeSource(api, store, NODE)
    version = source.relist(SERVICES)
    # An edit seen by the old watch, then the watch breaks and the list
    # (which the server answers with the object as it is now) comes first.
    source.apply_event(SERVICES, _modified("web", 81, "901"), version)
    source.relist(SERVICES)
    assert store.snapshot().services[("demo", "web")].ports[0].port == 80


def test_a_snapshot_on_any_thread_never_records_an_older_version(api: FakeApi) -> None:
    """Events keep coming while other threads take snapshots (the reconciler,
    the API server): each snapshot holds some version, never one older than
    a snapshot before it, and the last one holds the last event's."""
    store = Store()
    source = KubeSource(api, store, NODE)
    version = source.relist(SERVICES)
    done = threading.Event()
    seen: dict[str, list[int]] = {"a": [], "b": []}

    def take(name: str) -> None:
        while not done.is_set():
            svc = store.snapshot().services.get(("demo", "api"))
            if svc is not None:
                seen[name].append(svc.ports[0].port)

    takers = [threading.Thread(target=take, args=(n,)) for n in seen]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # threads interleave often: races show up
    try:
        for t in takers:
            t.start()
        for number in range(1000, 3000):
            version = source.apply_event(SERVICES, _modified("api", number, str(number)), version)
    finally:
        done.set()
        for t in takers:
            t.join()
        sys.setswitchinterval(interval)
    assert store.snapshot().services[("demo", "api")].ports[0].port == 2999
    for ports in seen.values():
        assert ports == sorted(ports)


def test_an_object_the_parser_fails_on_loses_nothing_else(
        api: FakeApi, monkeypatch: pytest.MonkeyPatch) -> None:
    """A parser bug (any exception, not a ModelError) on one queued object
    skips that object, reported, and records the rest of its batch."""
    from agent.kube import source as source_module

    parse = source_module.parse_object

    def buggy(doc: object) -> object:
        assert isinstance(doc, dict)
        if doc["metadata"]["name"] == "api":
            raise KeyError("surprise")
        return parse(doc)

    store = Store()
    source = KubeSource(api, store, NODE)
    version = source.relist(SERVICES)
    monkeypatch.setattr(source_module, "parse_object", buggy)
    source.apply_event(SERVICES, _modified("api", 80, "901"), version)
    source.apply_event(SERVICES, _modified("web", 81, "902"), "901")
    services = store.snapshot().services
    assert ("demo", "api") not in services
    assert services[("demo", "web")].ports[0].port == 81
    [problem] = source.last_report.problems
    assert problem.startswith("Service/demo/api: cannot be parsed (KeyError"), problem


def test_watch_errors(api: FakeApi) -> None:
    source = KubeSource(api, Store(), NODE)
    with pytest.raises(Expired):
        source.apply_event(SERVICES, {"type": "ERROR", "object": {
            "kind": "Status", "code": 410, "reason": "Expired",
            "message": "too old resource version: 1 (200)"}}, "1")
    with pytest.raises(KubeApiError) as err:
        source.apply_event(SERVICES, {"type": "ERROR", "object": {
            "kind": "Status", "code": 500, "message": "etcd is sad"}}, "1")
    assert err.value.status == 500


def test_a_malformed_object_is_logged_and_skipped(
    api: FakeApi, caplog: pytest.LogCaptureFixture
) -> None:
    store = Store()
    source = KubeSource(api, store, NODE)
    version = source.relist(SERVICES)
    bad = service("bad", port("http", 80), ips="10.96.0.12", ns="demo")
    bad["spec"]["ports"][0]["port"] = "eighty"
    with caplog.at_level(logging.ERROR):
        source.apply_event(SERVICES, {"type": "ADDED", "object": bad}, version)
    assert ("demo", "bad") not in store.snapshot().services
    message = "Service/demo/bad: spec.ports[0].port: expected an integer, got str"
    assert message in caplog.text
    assert source.last_report.problems == (message,)

    # An update that does not parse leaves the last good version in force,
    # through watch events and relists alike.
    good = store.snapshot().services[("demo", "web")]
    broken = service("web", port("http", 80, 8080), ips="10.96.0.10", ns="demo")
    broken["spec"]["clusterIPs"] = ["not-an-ip"]
    source.apply_event(SERVICES, {"type": "MODIFIED", "object": broken}, version)
    assert store.snapshot().services[("demo", "web")] == good
    api.put(SERVICES, broken)
    source.relist(SERVICES)
    assert store.snapshot().services[("demo", "web")] == good
    assert len(source.last_report.problems) == 1  # "bad" is not listed: forgotten
    assert "Service/demo/web: spec.clusterIPs[0]" in source.last_report.problems[0]

    # Deleting the broken object clears its problem (once the deletion is
    # recorded: the next snapshot, which every reconcile pass takes).
    source.apply_event(SERVICES, {"type": "DELETED", "object": broken}, version)
    assert ("demo", "web") not in store.snapshot().services
    assert source.last_report.problems == ()


def test_the_loop_survives_errors_expiry_and_server_timeouts(api: FakeApi) -> None:
    store = Store()
    source = KubeSource(api, store, NODE, kinds=(SERVICES,), watch_timeout=lambda: 5,
                        backoff=lambda: Backoff(0.01, 0.05))
    path = SERVICES.path()
    api.fail("LIST", path, KubeApiError("GET " + path, 0, "connection refused"))
    seen = changes(store)
    source.start()
    try:
        wait(lambda: store.synced and api.count("WATCH", path) == 1, "the first watch")
        assert api.count("LIST", path) == 2  # one refused, one served
        assert api.watches[-1].version == str(api.version)
        changes_after_sync = len(seen)

        # The server ends the watch: watch again from the last version, no relist.
        added = api.put(SERVICES, service("api", port("http", 80), ips="10.96.0.11", ns="demo"))
        api.emit(SERVICES, "ADDED", added)
        api.end(SERVICES)
        wait(lambda: api.count("WATCH", path) == 2, "the second watch")
        assert api.count("LIST", path) == 2
        assert api.watches[-1].version == added["metadata"]["resourceVersion"]
        assert ("demo", "api") in store.snapshot().services

        # 410 Gone: list again; the relist finds what changed meanwhile.
        api.remove(SERVICES, "demo", "web")
        api.send(SERVICES, {"type": "ERROR", "object": {"code": 410, "message": "too old"}})
        wait(lambda: api.count("WATCH", path) == 3, "the watch after the relist")
        assert api.count("LIST", path) == 3
        assert set(store.snapshot().services) == {("demo", "api")}

        # A broken connection (the API server restarting): back off, list again;
        # nothing changed, so the Store does not either.
        before = len(seen)
        api.send(SERVICES, KubeApiError("watch", 0, "connection reset"))
        wait(lambda: api.count("WATCH", path) == 4, "the watch after the break")
        assert api.count("LIST", path) == 4
        assert len(seen) == before
        assert changes_after_sync < before
    finally:
        source.stop()
    assert all(w.closed.is_set() for w in api.watches)


def test_a_forbidden_kind_keeps_the_agent_unsynced(
    api: FakeApi, caplog: pytest.LogCaptureFixture
) -> None:
    store = Store()
    # Retries 0.5 s apart: the check between the second and the third try
    # must not race the third (a loaded machine once lost a 10-50 ms race).
    source = KubeSource(api, store, NODE, kinds=(SERVICES, NODES),
                        backoff=lambda: Backoff(0.5, 0.5))
    denied = KubeApiError("GET /api/v1/nodes", 403, 'nodes is forbidden: User "x" cannot list')
    api.fail("LIST", NODES.path(), denied, denied)
    with caplog.at_level(logging.ERROR):
        source.start()
        try:
            wait(lambda: api.count("LIST", NODES.path()) >= 2, "a retry")
            assert not store.synced
            wait(lambda: store.synced, "the third try to succeed")
        finally:
            source.stop()
    assert "the agent's ClusterRole must allow list and watch on nodes" in caplog.text
    assert source.listed == {SERVICES, NODES}
    assert store.snapshot().nodes[NODE].ref == ObjectRef("Node", "", NODE)


def test_a_watch_refused_as_too_old_lists_again_at_once(api: FakeApi) -> None:
    store = Store()
    source = KubeSource(api, store, NODE, kinds=(SERVICES,),
                        backoff=lambda: Backoff(30.0, 30.0))  # a backoff would stall the test
    path = SERVICES.path()
    api.fail("WATCH", path, KubeApiError("GET " + path, 410, "too old resource version"))
    source.start()
    try:
        wait(lambda: api.count("WATCH", path) == 2, "a watch after the relist")
        assert api.count("LIST", path) == 2
    finally:
        source.stop()


def test_list_items_that_cannot_be_named_are_skipped_and_reported(
    api: FakeApi, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The rest of the list is applied and the kind counts as listed (before,
    one such item failed the whole list, retried for ever: never synced);
    the problems last as long as the items do."""
    odd: list[object] = [{"metadata": ["x"]}, "junk", None,
                         {"metadata": {"namespace": "demo"}},
                         {"metadata": {"name": "n", "namespace": ["demo"]}}]
    listed = api.list

    def list_with_odd_items(path: str, field_selector: str = "") -> tuple[list[object], str]:
        items, version = listed(path, field_selector)
        return [*items, *odd], version

    monkeypatch.setattr(api, "list", list_with_odd_items)
    store = Store()
    source = KubeSource(api, store, NODE, kinds=(SERVICES,))
    with caplog.at_level(logging.ERROR):
        source.relist(SERVICES)
    assert store.synced
    assert set(store.snapshot().services) == {("demo", "web")}
    problems = (
        "Service list item 1: metadata: expected an object, got list (skipped)",
        "Service list item 2: expected an object, got str (skipped)",
        "Service list item 3: expected an object, got null (skipped)",
        "Service list item 4: metadata.name: is required (skipped)",
        "Service list item 5: metadata.namespace: expected a string, got list (skipped)",
    )
    assert source.last_report.problems == problems
    assert all(p in caplog.text for p in problems)

    odd.clear()
    source.relist(SERVICES)
    assert source.last_report.problems == ()
    assert set(store.snapshot().services) == {("demo", "web")}


ODD_EVENTS = [
    {"type": "ADDED", "object": ["x"]},
    {"type": "ADDED", "object": None},
    {"type": "MODIFIED", "object": {"metadata": "web"}},
    {"type": "DELETED", "object": {"metadata": {"namespace": "demo", "resourceVersion": "7"}}},
    {"type": "ADDED", "object": {"metadata": {"name": 5, "namespace": "demo"}}},
    {"type": "ADDED"},
    {"type": "SURPRISE", "object": "x"},
    {"object": {"metadata": {"name": "web", "resourceVersion": ["8"]}}},
]


@pytest.mark.parametrize("event", ODD_EVENTS, ids=[str(e) for e in ODD_EVENTS])
def test_a_watch_event_that_cannot_be_used_is_logged_and_ignored(
    api: FakeApi, event: dict[str, object], caplog: pytest.LogCaptureFixture
) -> None:
    """Not a relist, and no problem left behind: a nameless one could never
    be cleared (the stale-problem cleanup goes by name)."""
    store = Store()
    source = KubeSource(api, store, NODE)
    version = source.relist(SERVICES)
    before = store.snapshot()
    with caplog.at_level(logging.WARNING):
        after = source.apply_event(SERVICES, event, version)
    # A usable resourceVersion still moves the watch on: the event was seen.
    assert after == ("7" if event.get("type") == "DELETED" else version)
    assert "ignoring a" in caplog.text
    assert store.snapshot().services == before.services
    assert source.last_report.problems == ()


def test_odd_events_do_not_end_the_watch(api: FakeApi) -> None:
    store = Store()
    source = KubeSource(api, store, NODE, kinds=(SERVICES,), watch_timeout=lambda: 5,
                        backoff=lambda: Backoff(0.01, 0.05))
    path = SERVICES.path()
    source.start()
    try:
        wait(lambda: store.synced and api.count("WATCH", path) == 1, "the first watch")
        for event in ODD_EVENTS:
            api.send(SERVICES, event)
        added = api.put(SERVICES, service("api", port("http", 80), ips="10.96.0.11", ns="demo"))
        api.emit(SERVICES, "ADDED", added)
        wait(lambda: ("demo", "api") in store.snapshot().services, "the good event")
        assert (api.count("LIST", path), api.count("WATCH", path)) == (1, 1)
        assert source.last_report.problems == ()
    finally:
        source.stop()


@pytest.mark.parametrize("status", [
    {"code": "Gone", "message": "too old"},
    {"code": True, "message": "too old"},  # True == 1 to Python; no HTTP status
    ["not", "a", "Status"],
])
def test_an_error_event_without_an_integer_code_is_an_unknown_error(
    api: FakeApi, status: object
) -> None:
    source = KubeSource(api, Store(), NODE)
    with pytest.raises(KubeApiError) as err:
        source.apply_event(SERVICES, {"type": "ERROR", "object": status}, "1")
    assert err.value.status == 0


def test_a_passing_404_keeps_the_policies_until_it_has_lasted(api: FakeApi) -> None:
    """An API server starting up can answer 404 for a custom resource for a
    moment: the policies stay in force (the list fails, as any failed list
    does) until the 404 has lasted crd_retry; then the CRD is taken for gone."""
    api.put(TRAFFIC_POLICIES, policy("canary", "web"))
    store = Store()
    source = KubeSource(api, store, NODE, crd_retry=0.3)
    assert source.relist(TRAFFIC_POLICIES) != ""
    assert set(store.snapshot().traffic_policies) == {("demo", "canary")}
    api.missing.add(TRAFFIC_POLICIES)
    with pytest.raises(KubeApiError) as passing:
        source.relist(TRAFFIC_POLICIES)
    assert passing.value.status == 404
    assert set(store.snapshot().traffic_policies) == {("demo", "canary")}, \
        "a passing 404 cleared them"
    time.sleep(0.35)
    assert source.relist(TRAFFIC_POLICIES) == ""
    assert set(store.snapshot().traffic_policies) == set()
    # Installed again, then a 404: it passes again, without waiting.
    api.missing.discard(TRAFFIC_POLICIES)
    assert source.relist(TRAFFIC_POLICIES) != ""
    api.missing.add(TRAFFIC_POLICIES)
    with pytest.raises(KubeApiError):
        source.relist(TRAFFIC_POLICIES)
    assert set(store.snapshot().traffic_policies) == {("demo", "canary")}


def malformed_web(uid: str) -> dict[str, object]:
    bad = service("web", port("http", 80, 8080), ips="10.96.0.10", ns="demo")
    bad["metadata"]["uid"] = uid  # type: ignore[index]
    bad["spec"]["ports"][0]["port"] = "eighty"  # type: ignore[index]
    return bad


def test_a_deleted_object_made_again_malformed_is_not_kept(api: FakeApi) -> None:
    """The last good version of a malformed object stays in force only while
    it is the same object (uid): a DELETED and an ADDED of a new, malformed
    object coalesced in the queue, or both missed while disconnected, end
    the old one."""
    store = Store()
    source = KubeSource(api, store, NODE)
    source.relist(SERVICES)
    assert ("demo", "web") in store.snapshot().services
    # The same object turning malformed keeps its last good version.
    source.apply_event(SERVICES, {"type": "MODIFIED", "object": malformed_web("uid-web")}, "1")
    assert ("demo", "web") in store.snapshot().services
    # Deleted and made again, malformed, in one batch: gone.
    source.apply_event(SERVICES, {"type": "DELETED", "object": api.objects[SERVICES][
        ("demo", "web")]}, "2")
    source.apply_event(SERVICES, {"type": "ADDED", "object": malformed_web("uid-new")}, "3")
    assert ("demo", "web") not in store.snapshot().services

    # The same, missed while disconnected: the relist finds the new object.
    api.put(SERVICES, service("web", port("http", 80, 8080), ips="10.96.0.10", ns="demo"))
    source.relist(SERVICES)
    assert ("demo", "web") in store.snapshot().services
    api.objects[SERVICES][("demo", "web")] = malformed_web("uid-other")
    source.relist(SERVICES)
    assert ("demo", "web") not in store.snapshot().services


def test_failing_watches_back_off_though_the_lists_succeed(api: FakeApi) -> None:
    """A Role that allows list but not watch: every watch fails, every list
    works. The delay grows (it is reset by a watch that worked, not a list)."""
    delays: list[float] = []

    class RecordingBackoff(Backoff):
        def next(self) -> float:
            delays.append(super().next())
            return delays[-1]

    store = Store()
    source = KubeSource(api, store, NODE, kinds=(SERVICES,),
                        backoff=lambda: RecordingBackoff(0.01, 1.0))
    path = SERVICES.path()
    denied = KubeApiError("watch", 403, "services is forbidden: cannot watch")
    api.fail("WATCH", path, denied, denied, denied, denied)
    source.start()
    try:
        wait(lambda: api.count("WATCH", path) == 5, "the fifth watch")
    finally:
        source.stop()
    assert delays == [0.01, 0.02, 0.04, 0.08]


def test_a_watch_ended_at_once_without_events_is_a_failure(api: FakeApi) -> None:
    """A server that ends every watch at once, with no event, must not be
    asked again in a tight loop: such a watch counts as failed (back off,
    list again), as client-go's reflector counts it."""
    store = Store()
    source = KubeSource(api, store, NODE, kinds=(SERVICES,), watch_timeout=lambda: 5,
                        backoff=lambda: Backoff(0.01, 0.05))
    path = SERVICES.path()
    source.start()
    try:
        wait(lambda: api.count("WATCH", path) == 1, "the first watch")
        api.end(SERVICES)
        wait(lambda: api.count("WATCH", path) == 2, "the watch after the failure")
        assert api.count("LIST", path) == 2, "a watch ended at once was not taken for failed"
    finally:
        source.stop()
