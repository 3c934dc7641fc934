"""kubeproxy_network_programming_duration_seconds: from an EndpointSlice's
endpoints.kubernetes.io/last-change-trigger-time to the end of the
successful pass that read it (agent/telemetry.py), as kube-proxy measures.
"""

from __future__ import annotations

from builders import ep, eport, eps, models

from agent import telemetry
from agent.metrics import exposition
from agent.metrics.collect import MetricsInput, families
from agent.model.snapshot import Store
from agent.reconcile.reconciler import SyncResult
from agent.telemetry import PROGRAMMING_BUCKETS, Telemetry

START = 1_767_225_600.0  # 2026-01-01T00:00:00Z


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now


def watched(t: Telemetry) -> Store:
    """A Store that tells `t` what changes, as the agent wires them."""
    store = Store()
    store.subscribe_queued(t.note_queued)
    store.subscribe_changes(t.note_changes)
    return store


def slice_at(trigger: str | None, ip: str = "10.244.1.2") -> dict[str, object]:
    doc = eps("web-abc", "web", ep(ip, ready=True), ports=[eport("http", 8080)])
    if trigger is not None:
        doc["metadata"]["annotations"] = {telemetry.TRIGGER_TIME_ANNOTATION: trigger}
    return doc


def test_buckets_are_kube_proxys() -> None:
    assert PROGRAMMING_BUCKETS[:3] == (0.25, 0.5, 1)
    assert PROGRAMMING_BUCKETS[-8:] == (115, 120, 150, 180, 210, 240, 270, 300)
    assert len(PROGRAMMING_BUCKETS) == 2 + 59 + 12 + 7


def test_latency_is_observed_after_the_pass_that_programmed_the_change() -> None:
    clock = Clock()
    t = Telemetry(clock)
    store = watched(t)
    clock.now = START + 10
    store.replace(models(slice_at("2026-01-01T00:00:08.5Z")))
    clock.now = START + 11
    t.record_sync(SyncResult(full=False, errors=["map full"], duration=0.1))
    assert t.snapshot().network_programming.count == 0  # a failed pass programs nothing
    clock.now = START + 12
    t.record_sync(SyncResult(full=False, duration=0.1))
    h = t.snapshot().network_programming
    assert (h.count, h.sum) == (1, 3.5)
    clock.now = START + 13
    t.record_sync(SyncResult(full=True, duration=0.1))
    assert t.snapshot().network_programming.count == 1  # observed once

    # A change noted while a pass runs waits for the next pass.
    clock.now = START + 20
    store.replace(models(slice_at("2026-01-01T00:00:19Z", "10.244.1.3")))
    clock.now = START + 20.05
    t.record_sync(SyncResult(full=False, duration=0.1))  # started before the change
    assert t.snapshot().network_programming.count == 1
    clock.now = START + 21
    t.record_sync(SyncResult(full=False, duration=0.1))
    assert t.snapshot().network_programming.count == 2


def test_a_queued_change_counts_from_when_it_was_queued() -> None:
    """A watch event is queued on arrival and recorded when the pass takes its
    snapshot: the pass that started after the event arrived programmed it,
    although the change was recorded after that pass started."""
    clock = Clock()
    t = Telemetry(clock)
    store = watched(t)
    queued: list[dict[str, object]] = []

    def flush() -> None:
        docs, queued[:] = list(queued), []
        if docs:
            store.apply(models(*docs), queued=True)

    store.add_flusher(flush)
    clock.now = START + 10
    queued.append(slice_at("2026-01-01T00:00:09Z"))
    store.note_queued()
    clock.now = START + 11.5  # the pass started at 11 and takes its snapshot now
    assert store.snapshot().endpoint_slices
    clock.now = START + 12
    t.record_sync(SyncResult(full=False, duration=1.0))
    h = t.snapshot().network_programming
    assert (h.count, h.sum) == (1, 3.0)
    assert t.snapshot().last_queued_time == START + 10


def test_changes_from_before_the_start_or_without_a_time_are_not_counted() -> None:
    clock = Clock()
    t = Telemetry(clock)
    store = watched(t)
    clock.now = START + 5
    store.replace(models(slice_at("2025-12-31T23:59:00Z")))  # before the agent started
    store.replace(models(slice_at(None, "10.244.1.3")))
    store.replace(models(slice_at("not a time", "10.244.1.4")))
    clock.now = START + 6
    t.record_sync(SyncResult(full=True, duration=0.1))
    assert t.snapshot().network_programming.count == 0


def test_the_histogram_is_exposed_under_kube_proxys_name() -> None:
    clock = Clock()
    t = Telemetry(clock)
    store = watched(t)
    clock.now = START + 2
    store.replace(models(slice_at("2026-01-01T00:00:01Z")))
    clock.now = START + 3
    t.record_sync(SyncResult(full=True, duration=0.01))
    text = exposition.render(families(MetricsInput(
        telemetry=t.snapshot(), mode="ebpf", maps=[], counters={}, programs_attached=0,
        skipped={}, manifest_problems=0, frontends=0, frontends_failed=0, source_synced=True,
    )))
    got = exposition.parse(text)
    name = "kubeproxy_network_programming_duration_seconds"
    assert got[f"{name}_count"][()] == 1
    assert got[f"{name}_bucket"][(("le", "1"),)] == 0
    assert got[f"{name}_bucket"][(("le", "2"),)] == 1
    assert f"# HELP {name} In Cluster Network Programming Latency in seconds" in text
