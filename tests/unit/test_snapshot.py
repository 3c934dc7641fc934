"""agent.model.snapshot: ClusterSnapshot and the Store sources write to."""

from __future__ import annotations

import threading

import pytest
from builders import ep, eport, eps, models, node, port, service

from agent.model.objects import EndpointSlice, ObjectRef, Service
from agent.model.snapshot import ClusterSnapshot, Store

POLICY = {
    "apiVersion": "veer.dev/v1alpha1",
    "kind": "TrafficPolicy",
    "metadata": {"name": "p", "namespace": "shop"},
    "spec": {"targetRefs": [{"name": "web"}]},
}


def test_of_sorts_objects_by_kind_and_key() -> None:
    objs = models(
        service("web", port("http", 80), ns="shop"),
        service("web", port("http", 80), ns="other", ips="10.96.0.2"),
        eps("web-1", "web", ep("10.244.1.2"), ns="shop"),
        node("node-1"),
        POLICY,
    )
    snap = ClusterSnapshot.of(objs)
    assert set(snap.services) == {("shop", "web"), ("other", "web")}
    assert set(snap.endpoint_slices) == {("shop", "web-1")}
    assert set(snap.nodes) == {"node-1"}
    assert set(snap.traffic_policies) == {("shop", "p")}
    assert sorted(map(str, (o.ref for o in snap.objects()))) == sorted(
        map(str, (o.ref for o in objs))
    )


def test_snapshot_is_read_only() -> None:
    snap = ClusterSnapshot.of(models(service("web", port("http", 80))))
    with pytest.raises(TypeError):
        snap.services[("default", "x")] = snap.services[("default", "web")]  # type: ignore[index]


def test_slices_for_matches_label_and_namespace_in_name_order() -> None:
    docs = [
        eps("web-zz", "web", ep("10.244.1.4")),
        eps("web-aa", "web", ep("10.244.1.2")),
        eps("web-mm", "web", ep("fd00:10:244:1::2")),
        eps("web-other-ns", "web", ep("10.244.1.9"), ns="other"),  # same name, other namespace
        eps("web-xyz", "web-canary", ep("10.244.1.8")),  # named like web, labelled for another
        eps("web", None, ep("10.244.1.7")),  # no service-name label: nobody's
    ]
    forward = ClusterSnapshot.of(models(*docs))
    backward = ClusterSnapshot.of(models(*reversed(docs)))
    for snap in (forward, backward):
        assert [s.meta.name for s in snap.slices_for("default", "web")] == [
            "web-aa", "web-mm", "web-zz"
        ]
        assert [s.meta.name for s in snap.slices_for("other", "web")] == ["web-other-ns"]
        assert [s.meta.name for s in snap.slices_for("default", "web-canary")] == ["web-xyz"]
        assert snap.slices_for("default", "missing") == ()
        assert snap.slices_for("default", "") == ()


# ---- Store --------------------------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1


def _web(ip: str = "10.96.0.1", target: int = 8080) -> Service:
    svc = models(service("web", port("http", 80, target), ips=ip))[0]
    assert isinstance(svc, Service)
    return svc


def _slice(name: str = "web-1", ip: str = "10.244.1.2") -> EndpointSlice:
    s = models(eps(name, "web", ep(ip), ports=[eport("http", 8080)]))[0]
    assert isinstance(s, EndpointSlice)
    return s


def test_store_starts_unsynced_and_empty() -> None:
    store = Store()
    assert not store.synced
    assert store.snapshot().objects() == []


def test_replace_notifies_only_on_change() -> None:
    store, listener = Store(), Recorder()
    store.subscribe(listener)

    # The first complete view counts as a change even when empty: it is news
    # that the source has synced.
    assert store.replace([]) is True
    assert store.synced and listener.calls == 1

    assert store.replace([_web(), _slice()]) is True
    assert listener.calls == 2
    first = store.snapshot()
    assert set(first.services) == {("default", "web")}

    # Equal by value (freshly parsed objects): no change, same snapshot.
    assert store.replace([_slice(), _web()]) is False
    assert listener.calls == 2
    assert store.snapshot() is first

    assert store.replace([_web(target=9090), _slice()]) is True
    assert listener.calls == 3
    assert store.snapshot().services[("default", "web")].ports[0].target_port == 9090
    # An older snapshot never changes.
    assert first.services[("default", "web")].ports[0].target_port == 8080

    assert store.replace([_web(target=9090)]) is True
    assert listener.calls == 4
    assert store.snapshot().endpoint_slices == {}


def test_apply_upserts_and_deletes() -> None:
    store, listener = Store(), Recorder()
    store.subscribe(listener)

    assert store.apply(upserts=[_web(), _slice()]) is True
    assert listener.calls == 1
    assert not store.synced  # only the source says when its view is complete

    assert store.apply(upserts=[_web()]) is False  # same value
    assert store.apply(deletes=[ObjectRef("Service", "default", "nope")]) is False
    assert store.apply() is False
    assert listener.calls == 1

    assert store.apply(upserts=[_slice(ip="10.244.1.3")]) is True
    assert [str(e.addresses[0]) for s in store.snapshot().slices_for("default", "web")
            for e in s.endpoints] == ["10.244.1.3"]
    assert listener.calls == 2

    assert store.apply(deletes=[ObjectRef("EndpointSlice", "default", "web-1")]) is True
    assert store.snapshot().slices_for("default", "web") == ()
    assert listener.calls == 3

    # One call with several changes notifies once.
    assert store.apply(upserts=[_slice("web-2"), _slice("web-3")],
                       deletes=[ObjectRef("Service", "default", "web")]) is True
    assert listener.calls == 4
    assert store.snapshot().services == {}


def test_mark_synced_notifies_once() -> None:
    store, listener = Store(), Recorder()
    store.subscribe(listener)
    store.mark_synced()
    store.mark_synced()
    assert store.synced and listener.calls == 1
    # Already synced: an unchanged replace is no news.
    assert store.replace([]) is False
    assert listener.calls == 1


def test_every_listener_is_called() -> None:
    store, a, b = Store(), Recorder(), Recorder()
    store.subscribe(a)
    store.subscribe(b)
    store.replace([_web()])
    assert (a.calls, b.calls) == (1, 1)


def test_listener_runs_outside_the_lock() -> None:
    """A listener may read the store (the runner's wake-up does): no deadlock."""
    store = Store()
    seen: list[int] = []
    store.subscribe(lambda: seen.append(len(store.snapshot().services)))
    worker = threading.Thread(target=store.replace, args=([_web()],), daemon=True)
    worker.start()
    worker.join(5)
    assert not worker.is_alive(), "listener deadlocked on the store's lock"
    assert seen == [1]
