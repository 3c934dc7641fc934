"""Flow events without a kernel: decoding ring-buffer records, naming their
Service, filtering, and the hub's fan-out to followers (bounded queues, lost
events counted, the kernel's translation switch), with made-up events.

Addresses are the sandbox's (tests/datapath/conftest.py): default/web
10.96.0.10 :80 "http" over 10.244.1.2-4:8080, default/empty 10.96.0.99:80
without endpoints, Service CIDR 10.96.0.0/16.
"""

from __future__ import annotations

import ctypes
import ipaddress
import threading
import time
from dataclasses import replace

import pytest

from agent.compute.types import DesiredState, Frontend, FrontendKind, L4Addr, ServicePortName
from agent.datapath.ebpf import events
from agent.datapath.ebpf.structs import (
    COUNTER_NAMES,
    EV_F_AFFINITY,
    EV_F_SNAT,
    Event,
    addr_bytes,
    port_be,
)
from agent.datapath.flows import (
    FlowEvent,
    FlowFilter,
    FlowHub,
    ServiceNames,
    TooManySubscribers,
)
from agent.metrics.collect import flow_families
from agent.metrics.exposition import parse, render
from agent.model.objects import Protocol

ip = ipaddress.ip_address
WEB = L4Addr(ip("10.96.0.10"), 80, Protocol.TCP)
EMPTY = L4Addr(ip("10.96.0.99"), 80, Protocol.TCP)
WEB_A = L4Addr(ip("10.244.1.2"), 8080, Protocol.TCP)


def record(**fields: object) -> bytes:
    ev = Event()
    for name, value in fields.items():
        setattr(ev, name, value)
    return bytes(ev)


def reason(name: str) -> int:
    return COUNTER_NAMES.index(name)


# ---- decoding -------------------------------------------------------------------------


def test_decode_a_refusal_at_connect4() -> None:
    raw = record(time_ns=5_000_000_000, cookie=77, netns=4026531840, pid=4242,
                 comm=b"curl", reason=reason("refused_no_backend"), hook=1, proto=6, family=4,
                 daddr=addr_bytes(ip("10.96.0.99")), dport=port_be(80), service_id=6)
    e = events.decode(raw, wall_offset=1_000.0)
    assert e == FlowEvent(
        time=1_005.0, reason="refused_no_backend", hook="connect4", protocol="TCP",
        destination=ip("10.96.0.99"), port=80, source=None, source_port=0, backend=None,
        service_id=6, cookie=77, netns=4026531840, pid=4242, comm="curl", flags=(),
    )
    assert (e.verdict, e.errno) == ("refuse", "ECONNREFUSED")


def test_decode_a_translation_on_the_per_packet_path_over_ipv6() -> None:
    raw = record(reason=reason("nat_new"), hook=5, proto=17, family=6,
                 saddr=addr_bytes(ip("2001:db8::7")), sport=port_be(40000),
                 daddr=addr_bytes(ip("fd00::1")), dport=port_be(30053),
                 baddr=addr_bytes(ip("fd00:10:244:1::2")), bport=port_be(9053),
                 service_id=3, flags=EV_F_SNAT | EV_F_AFFINITY)
    e = events.decode(raw, 0.0)
    assert (e.hook, e.protocol, e.source, e.source_port) == (
        "tc-ingress", "UDP", ip("2001:db8::7"), 40000)
    assert (e.destination, e.port) == (ip("fd00::1"), 30053)
    assert e.backend == L4Addr(ip("fd00:10:244:1::2"), 9053, Protocol.UDP)
    assert e.flags == ("affinity", "snat")
    assert (e.verdict, e.errno, e.cookie, e.pid) == ("translate", "", 0, 0)


def test_a_socket_verdict_on_the_per_packet_path_is_a_drop() -> None:
    e = events.decode(record(reason=reason("inconsistent"), hook=5, proto=6, family=4), 0.0)
    assert (e.verdict, e.errno) == ("drop", "")
    e = events.decode(record(reason=reason("inconsistent"), hook=2, proto=6, family=6), 0.0)
    assert (e.verdict, e.errno) == ("refuse", "ECONNREFUSED")


def test_decode_unknown_values_and_short_records() -> None:
    e = events.decode(record(reason=200, hook=99, proto=132, family=4), 0.0)
    assert (e.reason, e.hook, e.protocol, e.verdict) == ("#200", "hook 99", "132", "drop")
    with pytest.raises(ValueError, match="expected 112"):
        events.decode(b"\0" * 40, 0.0)
    assert ctypes.sizeof(Event) == 112


# ---- naming and filtering ------------------------------------------------------------


def desired() -> DesiredState:
    return DesiredState(frontends={
        WEB: Frontend(WEB, ServicePortName("default", "web", "http"), FrontendKind.CLUSTER_IP,
                      (WEB_A,)),
        EMPTY: Frontend(EMPTY, ServicePortName("default", "empty", "http"),
                        FrontendKind.CLUSTER_IP, ()),
    })


def event(reason: str = "refused_no_backend", dst: L4Addr = EMPTY, service_id: int = 6,
          **kw: object) -> FlowEvent:
    return replace(FlowEvent(time=1.0, reason=reason, hook="connect4",
                             protocol=dst.protocol.value, destination=dst.address,
                             port=dst.port, service_id=service_id), **kw)  # type: ignore[arg-type]


def names() -> ServiceNames:
    state = desired()
    return ServiceNames(lambda: state, {1: WEB, 6: EMPTY}.get)


def test_events_are_named_by_service_id_then_by_address() -> None:
    n = names()
    assert n.name(event()).service_port == "default/empty:http"
    unexposed = n.name(event("refused_unknown_port", L4Addr(WEB.address, 9999, Protocol.TCP), 0))
    assert (unexposed.service_port, unexposed.namespace, unexposed.name) == (
        "default/web", "default", "web")
    nowhere = n.name(event("refused_no_service", L4Addr(ip("10.96.200.1"), 80, Protocol.TCP), 0))
    assert (nowhere.service_port, nowhere.namespace) == ("", "")
    gone = n.name(event(service_id=42, dst=L4Addr(ip("10.96.0.42"), 80, Protocol.TCP)))
    assert gone.service_port == ""


@pytest.mark.parametrize(("flt", "passes"), [
    (FlowFilter(), True),
    (FlowFilter(namespace="default"), True),
    (FlowFilter(namespace="kube-system"), False),
    (FlowFilter(service="empty"), True),
    (FlowFilter(service="default/empty"), True),
    (FlowFilter(service="default/empty:http"), True),
    (FlowFilter(service="empty:admin"), False),
    (FlowFilter(service="other/empty"), False),
    (FlowFilter(service="web"), False),
    (FlowFilter(verdicts=frozenset({"refuse"})), True),
    (FlowFilter(verdicts=frozenset({"refused_no_backend"})), True),
    (FlowFilter(verdicts=frozenset({"drop", "translate"})), False),
])
def test_filters(flt: FlowFilter, passes: bool) -> None:
    assert flt.matches(names().name(event())) is passes


def test_filters_say_whether_they_want_translations() -> None:
    assert FlowFilter().wants_translations
    assert FlowFilter(verdicts=frozenset({"translate"})).wants_translations
    assert FlowFilter(verdicts=frozenset({"nat_new", "refuse"})).wants_translations
    assert not FlowFilter(verdicts=frozenset({"refuse", "drop"})).wants_translations
    with pytest.raises(ValueError, match="unknown verdict bogus"):
        FlowFilter(verdicts=frozenset({"bogus"}))


# ---- the hub ---------------------------------------------------------------------------


class Switch:
    def __init__(self) -> None:
        self.calls: list[bool] = []

    def __call__(self, on: bool) -> None:
        self.calls.append(on)


def test_recent_events_are_bounded_and_counted_per_service_and_verdict() -> None:
    hub = FlowHub(names(), recent=3)
    hub.publish([event(time=float(i)) for i in range(5)])
    hub.publish([event("refused_unknown_port", L4Addr(WEB.address, 9999, Protocol.TCP), 0)])
    kept = hub.recent(FlowFilter())
    assert [e.time for e in kept] == [3.0, 4.0, 1.0]
    assert hub.recent(FlowFilter(service="web")) == kept[-1:]
    assert hub.recent(FlowFilter(), last=1) == kept[-1:]
    stats = hub.stats()
    assert stats.counts == {("default/empty:http", "refused_no_backend"): 5,
                            ("default/web", "refused_unknown_port"): 1}
    assert (stats.received, stats.lost_slow_subscriber, stats.subscribers) == (6, 0, 0)


def test_translations_never_push_refusals_out() -> None:
    hub = FlowHub(names(), recent=2)
    hub.publish([event(time=1.0), event(time=2.0)])
    hub.publish([event("translated", WEB, 1, backend=WEB_A, time=float(t)) for t in (1.5, 3, 4)])
    assert [(e.time, e.reason) for e in hub.recent(FlowFilter())] == [
        (1.0, "refused_no_backend"), (2.0, "refused_no_backend"),
        (3.0, "translated"), (4.0, "translated")]
    assert [e.time for e in hub.recent(FlowFilter(verdicts=frozenset({"refuse"})))] == [1.0, 2.0]


def test_followers_get_what_their_filter_passes() -> None:
    hub = FlowHub(names())
    with hub.subscribe(FlowFilter(service="web")) as web, hub.subscribe(FlowFilter()) as every:
        hub.publish([event(), event("translated", WEB, 1, backend=WEB_A)])
        got = web.get(timeout=1)
        assert [(e.reason, e.service_port) for e in got.events] == [
            ("translated", "default/web:http")]
        assert [e.reason for e in every.get(timeout=1).events] == [
            "refused_no_backend", "translated"]
        assert web.get(timeout=0.01).events == ()


def test_a_slow_follower_loses_events_counted_and_never_blocks_the_consumer() -> None:
    hub = FlowHub(names(), queue_size=2)
    with hub.subscribe(FlowFilter()) as slow, hub.subscribe(FlowFilter()) as other:
        start = time.monotonic()
        hub.publish([event(time=float(i)) for i in range(5)])
        assert time.monotonic() - start < 1.0  # nothing waited for the full queues
        first = slow.get(timeout=1)
        assert [e.time for e in first.events] == [0.0, 1.0] and first.lost == 3
        assert slow.get(timeout=0.01).lost == 0  # told once, with the next events
        hub.publish([event(time=9.0)])
        assert slow.get(timeout=1).events[0].time == 9.0
        assert other.get(timeout=1).lost == 4  # 2.0-4.0 and 9.0: it read nothing meanwhile
    assert hub.stats().lost_slow_subscriber == 7


def test_lost_events_are_told_with_the_next_event_not_dropped_by_an_empty_poll() -> None:
    hub = FlowHub(names(), queue_size=1)
    with hub.subscribe(FlowFilter()) as sub:
        hub.publish([event(time=1.0), event(time=2.0)])
        assert sub.get(timeout=1).lost == 1
        hub.publish([event(time=3.0), event(time=4.0)])
        sub._queue.get_nowait()  # the queued event went elsewhere: an empty poll follows
        assert sub.get(timeout=0.01) == sub.get(timeout=0.01)  # nothing, lost kept
        hub.publish([event(time=5.0)])
        assert sub.get(timeout=1).lost == 1


def test_translations_are_traced_while_some_follower_wants_them() -> None:
    switch = Switch()
    hub = FlowHub(names(), trace=switch)
    refusals = hub.subscribe(FlowFilter(verdicts=frozenset({"refuse"})))
    assert switch.calls == [] and not hub.tracing
    first = hub.subscribe(FlowFilter(namespace="default"))
    second = hub.subscribe(FlowFilter(verdicts=frozenset({"translate"})))
    assert switch.calls == [True] and hub.tracing and hub.stats().subscribers == 3
    first.close()
    assert switch.calls == [True]
    second.close()
    assert switch.calls == [True, False] and not hub.tracing
    refusals.close()
    refusals.close()  # twice is fine
    assert switch.calls == [True, False] and hub.stats().subscribers == 0


def test_a_failing_switch_is_retried_by_the_next_change() -> None:
    calls: list[bool] = []

    def broken(on: bool) -> None:
        calls.append(on)
        raise OSError("map write failed")

    hub = FlowHub(names(), trace=broken)
    sub = hub.subscribe(FlowFilter())
    assert calls == [True] and not hub.tracing
    sub.close()
    assert calls == [True]  # off already, as far as anyone knows


def test_followers_are_limited() -> None:
    hub = FlowHub(names(), max_subscribers=2)
    subs = [hub.subscribe(FlowFilter()), hub.subscribe(FlowFilter())]
    with pytest.raises(TooManySubscribers):
        hub.subscribe(FlowFilter())
    subs[0].close()
    hub.subscribe(FlowFilter()).close()


def test_publish_from_a_thread_while_followers_come_and_go() -> None:
    hub = FlowHub(names(), queue_size=100000)
    done = threading.Event()

    def produce() -> None:
        while not done.is_set():
            hub.publish([event()] * 50)

    producer = threading.Thread(target=produce)
    producer.start()
    try:
        for _ in range(50):
            with hub.subscribe(FlowFilter()) as sub:
                sub.get(timeout=1)
    finally:
        done.set()
        producer.join(5)
    assert hub.stats().subscribers == 0


def test_a_naming_failure_keeps_the_event() -> None:
    def broken() -> DesiredState:
        raise RuntimeError("no view")

    hub = FlowHub(ServiceNames(broken, {}.get))
    hub.publish([event()])
    assert [e.service_port for e in hub.recent(FlowFilter())] == [""]


# ---- metrics ---------------------------------------------------------------------------


def test_flow_metrics() -> None:
    hub = FlowHub(names(), trace=Switch())
    hub.publish([event(), event(), event("translated", WEB, 1, backend=WEB_A)])
    sub = hub.subscribe(FlowFilter())
    samples = parse(render(flow_families(hub.stats(), ring_buffer_lost=7)))
    assert samples["veer_flow_events_total"] == {
        (("service", "default/empty:http"), ("verdict", "refused_no_backend")): 2.0,
        (("service", "default/web:http"), ("verdict", "translated")): 1.0,
    }
    assert samples["veer_flow_events_lost_total"] == {
        (("reason", "ring_buffer_full"),): 7.0, (("reason", "slow_follower"),): 0.0}
    assert samples["veer_flow_followers"] == {(): 1.0}
    assert samples["veer_flow_translations_traced"] == {(): 1.0}
    sub.close()
