"""Metrics: the text exposition, what telemetry records, the families the
agent exposes under kube-proxy's and veer's names, and the health verdict."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
from builders import ep, eport, eps, models, port, service

from agent.datapath.interface import MapUsage
from agent.metrics import exposition
from agent.metrics.collect import MetricsInput, families
from agent.metrics.exposition import MetricFamily
from agent.metrics.http import health, parse_bind_address
from agent.model.snapshot import Change, Store
from agent.reconcile.reconciler import SyncResult
from agent.telemetry import SYNC_BUCKETS, Histogram, Telemetry


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_exposition_counter_gauge_and_labels() -> None:
    text = exposition.render([
        MetricFamily("veer_x_total", "counter", "Things\\done\nhere").add(3),
        MetricFamily("veer_y", "gauge", "Y").add(1.5, {"map": 'a"b\\c'}).add(0, {"map": "d"}),
    ])
    assert text == (
        "# HELP veer_x_total Things\\\\done\\nhere\n"
        "# TYPE veer_x_total counter\n"
        "veer_x_total 3\n"
        "# HELP veer_y Y\n"
        "# TYPE veer_y gauge\n"
        'veer_y{map="a\\"b\\\\c"} 1.5\n'
        'veer_y{map="d"} 0\n'
    )


def test_exposition_histogram_is_cumulative_with_inf() -> None:
    h = Histogram(buckets=(0.1, 1.0))
    for v in (0.05, 0.5, 0.7, 3.0):
        h.observe(v)
    text = exposition.render([MetricFamily("h_seconds", "histogram", "H")
                              .add_histogram(h.cumulative(), h.sum)])
    assert text.splitlines()[2:] == [
        'h_seconds_bucket{le="0.1"} 1',
        'h_seconds_bucket{le="1"} 3',
        'h_seconds_bucket{le="+Inf"} 4',
        "h_seconds_sum 4.25",
        "h_seconds_count 4",
    ]
    assert exposition.parse(text)["h_seconds_bucket"][(("le", "+Inf"),)] == 4


def test_kube_proxy_buckets() -> None:
    assert SYNC_BUCKETS[0] == 0.001 and len(SYNC_BUCKETS) == 15
    assert math.isclose(SYNC_BUCKETS[-1], 16.384)


def test_telemetry_counts_changed_objects_and_passes() -> None:
    clock = Clock()
    t = Telemetry(clock)
    store = Store()
    store.subscribe_queued(t.note_queued)
    store.subscribe_changes(t.note_changes)
    web = service("web", port("http", 80, 8080), ips="10.96.0.10")
    web_eps = eps("web-1", "web", ep("10.244.1.2", ready=True), ports=[eport("http", 8080)])
    store.replace(models(web, web_eps))
    clock.now = 1001
    store.replace(models(web, web_eps))  # same objects: nothing changed
    other = service("web", port("http", 81, 8080), ips="10.96.0.10")
    store.replace(models(other))  # web updated, its slice removed
    t.record_sync(SyncResult(full=True, changed=4, duration=0.002))
    clock.now = 1002
    t.record_sync(SyncResult(full=False, errors=["boom", "bang"], duration=0.5))
    s = t.snapshot()
    assert (s.service_changes, s.endpoint_changes) == (2, 2)
    assert s.last_queued_time == 1001
    assert (s.passes, s.failed_passes, s.sync_errors) == (2, 1, 2)
    assert s.last_success_time == s.last_full_time == 1001
    assert (s.full_syncs.count, s.partial_syncs.count, s.all_syncs.count) == (1, 1, 2)
    assert s.all_syncs.sum == pytest.approx(0.502)


def _agent(t: Telemetry) -> SimpleNamespace:
    return SimpleNamespace(telemetry=t)


def test_health_follows_pending_changes() -> None:
    clock = Clock(1000)
    t = Telemetry(clock)
    # Before the first pass: healthy within the timeout of the start, then not.
    assert health(_agent(t), timeout=120, now=1100)[0] == 200
    assert health(_agent(t), timeout=120, now=1130)[0] == 503
    clock.now = 1131
    t.record_sync(SyncResult(full=True, duration=0.01))
    status, ctype, body = health(_agent(t), timeout=120, now=5000)
    assert status == 200 and ctype == "application/json" and '"lastUpdated": "' in body
    clock.now = 5000
    t.note_queued()  # a change queued (whatever it was)
    assert health(_agent(t), timeout=120, now=5100)[0] == 200
    assert health(_agent(t), timeout=120, now=5121)[0] == 503
    clock.now = 5122
    t.record_sync(SyncResult(full=False, errors=["x"], duration=0.01))  # a failure covers nothing
    assert health(_agent(t), timeout=120, now=5200)[0] == 503
    clock.now = 5201
    t.record_sync(SyncResult(full=False, duration=0.01))
    assert health(_agent(t), timeout=120, now=5202)[0] == 200


def test_families_carry_kube_proxy_and_veer_names() -> None:
    clock = Clock()
    t = Telemetry(clock)
    t.note_queued()
    t.note_changes([Change(None, models(service("web", port("http", 80), ips="10.96.0.10"))[0])])
    t.record_sync(SyncResult(full=True, changed=3, duration=0.003))
    text = exposition.render(families(MetricsInput(
        telemetry=t.snapshot(), mode="ebpf",
        maps=[MapUsage("veer_services", 7, 262144)],
        counters={"translated": 5, "refused_no_backend": 1},
        programs_attached=8, skipped={"UnsupportedProtocol": 1}, manifest_problems=0,
        frontends=3, frontends_failed=0, source_synced=True,
        access_hits={("demo/acl", "rules[0]"): 4, ("demo/acl", "defaultAction"): 2},
        thread_cpu={"sync": 1.5, "kube-services": 0.25},
    )))
    got = exposition.parse(text)
    assert got["veer_access_rule_hits_total"] == {
        (("policy", "demo/acl"), ("rule", "rules[0]")): 4,
        (("policy", "demo/acl"), ("rule", "defaultAction")): 2}
    assert got["kubeproxy_sync_proxy_rules_duration_seconds_count"][()] == 1
    assert got["kubeproxy_sync_full_proxy_rules_duration_seconds_count"][()] == 1
    assert got["kubeproxy_sync_partial_proxy_rules_duration_seconds_count"][()] == 0
    assert got["kubeproxy_sync_proxy_rules_last_timestamp_seconds"][()] == 1000
    assert got["kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds"][()] == 1000
    assert got["kubeproxy_sync_proxy_rules_service_changes_total"][()] == 1
    assert got["kubeproxy_sync_proxy_rules_endpoint_changes_total"][()] == 0
    assert got["veer_map_entries"][(("map", "veer_services"),)] == 7
    assert got["veer_map_capacity"][(("map", "veer_services"),)] == 262144
    assert got["veer_datapath_mode"] == {(("mode", "ebpf"),): 1, (("mode", "tproxy"),): 0}
    assert got["veer_programs_attached"][()] == 8
    assert got["veer_socket_lb_events_total"][(("event", "translated"),)] == 5
    assert got["veer_services_skipped"][(("reason", "UnsupportedProtocol"),)] == 1
    assert got["veer_manifest_problems"][()] == 0
    assert got["veer_sync_errors_total"][()] == 0
    assert got["veer_thread_cpu_seconds_total"] == {
        (("thread", "sync"),): 1.5, (("thread", "kube-services"),): 0.25}
    for line in text.splitlines():  # every family is documented and typed
        if not line.startswith("#"):
            continue
        assert line.startswith(("# HELP ", "# TYPE ")), line


@pytest.mark.parametrize(("value", "want"), [
    ("0.0.0.0:10249", ("0.0.0.0", 10249)),
    (":10249", ("0.0.0.0", 10249)),
    ("[::1]:9", ("::1", 9)),
])
def test_bind_address(value: str, want: tuple[str, int]) -> None:
    assert parse_bind_address(value, "--x") == want


@pytest.mark.parametrize("value", ["10249", "host:1", "1.2.3.4:99999"])
def test_bad_bind_address(value: str) -> None:
    from agent.errors import ConfigError

    with pytest.raises(ConfigError, match="--x"):
        parse_bind_address(value, "--x")


def test_access_hits_are_summed_per_policy_and_rule() -> None:
    import ipaddress

    from agent.compute.types import DesiredState, Frontend, FrontendKind, L4Addr, ServicePortName
    from agent.metrics.collect import access_hits_by_policy
    from agent.model.objects import Protocol

    def fe(ip: str) -> Frontend:
        return Frontend(L4Addr(ipaddress.ip_address(ip), 80, Protocol.TCP),
                        ServicePortName("demo", "acl", "http"), FrontendKind.CLUSTER_IP, (),
                        policy="demo/acl")

    a, b = fe("10.96.0.1"), fe("10.96.0.2")
    desired = DesiredState(frontends={a.key: a, b.key: b})
    ids = {1: a.key, 2: b.key}
    got = access_hits_by_policy({(1, 0): 3, (2, 0): 2, (2, 0xFFFF): 5, (9, 0): 7},
                                ids.get, desired)
    # Both frontends of the policy add up; an id no frontend holds is ignored.
    assert got == {("demo/acl", "rules[0]"): 5, ("demo/acl", "defaultAction"): 5}
