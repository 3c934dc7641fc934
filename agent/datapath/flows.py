"""Flow events: what the kernel programs decided, one connection (or packet) at a time.

    BPF programs ──veer_report()──> ring buffer ──> consumer thread (datapath/ebpf/events.py)
        decode ──> FlowEvent ──> FlowHub.publish(batch)
                                   ├── names each event's Service (ServiceNames)
                                   ├── counts per Service port and verdict (metrics)
                                   ├── keeps the last RECENT events (Observe, follow=false)
                                   └── hands each to the subscribers whose filter it passes
                                       (Observe, follow=true), through bounded queues

Cost control. Refusals, drops and denials are always reported by the
kernel: they are rare and they are what the person on call needs.
Translations (every connect() to a Service) are reported only while at
least one subscriber wants them; the hub tells the datapath when that
changes (`trace`), so a node nobody observes pays nothing for them.

Back-pressure. The consumer never blocks: a subscriber whose queue is full
loses the event, which is counted (for it and in `veer_flow_events_lost_total`)
and reported to it with the next event it does receive.

No I/O and no BCC here: the eBPF backend feeds the hub, the API and metrics
read it, and the unit tests drive it with made-up events.
"""

from __future__ import annotations

import collections
import heapq
import logging
import queue
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from agent.compute.types import DesiredState, L4Addr
from agent.model.objects import IPAddress

log = logging.getLogger(__name__)

RECENT = 1000  # events kept for Observe without follow (and as many translations)
SUBSCRIBER_QUEUE = 4096  # events a follower may fall behind by before it loses some
MAX_SUBSCRIBERS = 8

# Verdict classes (the API's Verdict enum, lower case, without the prefix).
TRANSLATE = "translate"
REFUSE = "refuse"
UNREACHABLE = "unreachable"
DROP = "drop"
DENY = "deny"
VERDICTS = (TRANSLATE, REFUSE, UNREACHABLE, DROP, DENY)


@dataclass(frozen=True)
class Reason:
    """One kind of verdict the kernel reports: its counter name (enum
    veer_counter), its verdict class, the errno the application sees, and
    what it means in words."""

    name: str
    verdict: str
    errno: str
    text: str


# Keyed by the counter name the kernel reports (veer_event.reason).
REASONS: Mapping[str, Reason] = MappingProxyType({r.name: r for r in (
    Reason("translated", TRANSLATE, "",
           "translated at the socket to a backend"),
    Reason("refused_no_backend", REFUSE, "ECONNREFUSED",
           "the Service has no endpoints: refused at once"),
    Reason("refused_unknown_port", REFUSE, "ECONNREFUSED",
           "the Service does not expose this port: refused at once"),
    Reason("refused_no_service", REFUSE, "ECONNREFUSED",
           "no Service has this address (inside a Service CIDR): refused at once"),
    Reason("dropped_no_local", UNREACHABLE, "EHOSTUNREACH",
           "no endpoint on this node under a Local traffic policy: failed at once"),
    Reason("inconsistent", REFUSE, "ECONNREFUSED",
           "the maps are inconsistent (a slot or backend is missing): refused; "
           "`veer maps --diff` shows what"),
    Reason("nat_new", TRANSLATE, "",
           "new flow from outside the node translated to a backend"),
    Reason("nat_drop", DROP, "",
           "no endpoint on this node for traffic from outside under a Local policy: "
           "packet dropped"),
    Reason("nat_reject", REFUSE, "ECONNREFUSED",
           "the Service has no endpoints: the client outside was sent ICMP port "
           "unreachable, as kube-proxy's REJECT does"),
    Reason("nat_denied_source", DENY, "",
           "client outside the Service's loadBalancerSourceRanges: packet dropped"),
    Reason("access_denied", DENY, "ECONNREFUSED",
           "the Service's TrafficPolicy access rules deny this client: refused at once"),
    Reason("access_unknown", DENY, "ECONNREFUSED",
           "the Service has access rules and the client's network namespace has no "
           "address known to the agent yet: refused at once (the agent looks again)"),
    Reason("nat_access_denied", DENY, "",
           "the Service's TrafficPolicy access rules deny this client outside the node: "
           "packet dropped"),
    Reason("nat_fail", DROP, "",
           "the flow could not be set up (no route, no source port for SNAT, a NAT "
           "map is full, or a DSR flow whose replies would not leave by the device it "
           "came in on): packet dropped"),
)})
# Verdicts taken by access rules: their events name the deciding rule.
ACCESS_REASONS = frozenset({"access_denied", "nat_access_denied"})
UNKNOWN_REASON = Reason("unknown", DROP, "", "a verdict this agent does not know")

# The per-packet hook. A socket-hook reason reported there (inconsistent)
# means a dropped packet: there is no connect() to fail.
TC_HOOK = "tc-ingress"
SOCKET_REASONS_DROPPED_ON_TC = frozenset({"inconsistent"})


@dataclass(frozen=True)
class FlowEvent:
    """One verdict of a kernel program, decoded, with its Service named.

    For the socket hooks (connect4/6, sendmsg4/6) the source address is not
    known: they run before the socket is bound. They carry the socket's
    cookie and the calling process instead. The per-packet hook
    (tc-ingress) knows the client's address and port and nothing of its
    process.
    """

    time: float  # Unix seconds
    reason: str  # a REASONS key (the kernel counter name)
    hook: str  # connect4, connect6, sendmsg4, sendmsg6, tc-ingress
    protocol: str  # TCP or UDP
    destination: IPAddress  # the address dialled: the Service's (or the node's)
    port: int
    source: IPAddress | None = None  # None: not known (socket hooks)
    source_port: int = 0
    backend: L4Addr | None = None  # the backend chosen, if any
    service_id: int = 0  # the frontend's id in the maps; 0: none matched
    cookie: int = 0  # socket hooks: the socket's cookie (as in `veer conntrack`)
    netns: int = 0  # socket hooks: the caller's network namespace cookie
    pid: int = 0  # socket hooks: the calling process
    comm: str = ""  # socket hooks: its name
    flags: tuple[str, ...] = ()  # affinity, snat, short_circuit, ipv4_mapped, redirect, dsr
    # Access verdicts: the deciding rule's position in the policy, or
    # access_default when no rule matched and the default decided.
    rule: int | None = None
    access_default: bool = False
    # Filled by the hub from the agent's view (ServiceNames):
    service_port: str = ""  # namespace/name:port, or namespace/name for an unexposed port
    namespace: str = ""
    name: str = ""

    @property
    def info(self) -> Reason:
        return REASONS.get(self.reason, UNKNOWN_REASON)

    @property
    def _dropped_on_tc(self) -> bool:
        return self.hook == TC_HOOK and self.reason in SOCKET_REASONS_DROPPED_ON_TC

    @property
    def verdict(self) -> str:
        return DROP if self._dropped_on_tc else self.info.verdict

    @property
    def errno(self) -> str:
        return "" if self._dropped_on_tc else self.info.errno


@dataclass(frozen=True)
class FlowFilter:
    """Which events a client wants. Empty fields match everything.

    `service` is NAME, NAMESPACE/NAME, or either with `:PORT` (the Service
    port's name) appended. `verdicts` holds verdict classes (refuse, drop,
    ...) and/or reason names (refused_no_backend, nat_drop, ...): an event
    passes if its verdict or its reason is listed.
    """

    namespace: str = ""
    service: str = ""
    verdicts: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        unknown = self.verdicts - set(VERDICTS) - set(REASONS)
        if unknown:
            raise ValueError(
                f"unknown verdict {', '.join(sorted(unknown))}: expected one of "
                f"{', '.join(VERDICTS)} or a reason ({', '.join(REASONS)})"
            )

    def _service_parts(self) -> tuple[str, str, str | None]:
        ref, sep, port = self.service.partition(":")
        namespace, slash, name = ref.rpartition("/")
        return (namespace if slash else ""), name, (port if sep else None)

    def matches(self, event: FlowEvent) -> bool:
        if self.verdicts and not ({event.verdict, event.reason} & self.verdicts):
            return False
        if self.namespace and event.namespace != self.namespace:
            return False
        if self.service:
            namespace, name, port = self._service_parts()
            if namespace and event.namespace != namespace:
                return False
            if name and event.name != name:
                return False
            if port is not None and event.service_port.partition(":")[2] != port:
                return False
        return True

    @property
    def wants_translations(self) -> bool:
        """Whether this filter can pass a translation (so the kernel must report them)."""
        if not self.verdicts:
            return True
        translations = {TRANSLATE} | {n for n, r in REASONS.items() if r.verdict == TRANSLATE}
        return bool(self.verdicts & translations)


class ServiceNames:
    """Names the Service of an event from the agent's view.

    By service id: the datapath says which frontend holds the id
    (`frontend_of`), the desired state which Service port that frontend is.
    Without one (a port the Service does not expose), by address: the
    Service that owns the address dialled, without a port name. Looked up
    when the event arrives, a few milliseconds after the verdict.
    """

    def __init__(self, desired: Callable[[], DesiredState],
                 frontend_of: Callable[[int], L4Addr | None]) -> None:
        self._desired = desired
        self._frontend_of = frontend_of
        self._index_of: DesiredState | None = None
        self._by_address: dict[IPAddress, tuple[str, str]] = {}

    def _owners(self, desired: DesiredState) -> dict[IPAddress, tuple[str, str]]:
        if desired is not self._index_of:  # rebuilt once per desired state
            owners: dict[IPAddress, tuple[str, str]] = {}
            for fe in desired.frontends.values():
                owners.setdefault(fe.key.address, (fe.service.namespace, fe.service.name))
            self._by_address, self._index_of = owners, desired
        return self._by_address

    def name(self, event: FlowEvent) -> FlowEvent:
        desired = self._desired()
        if event.service_id:
            key = self._frontend_of(event.service_id)
            fe = desired.frontends.get(key) if key is not None else None
            if fe is not None:
                return replace(event, service_port=str(fe.service),
                               namespace=fe.service.namespace, name=fe.service.name)
        owner = self._owners(desired).get(event.destination)
        if owner is not None:
            return replace(event, service_port=f"{owner[0]}/{owner[1]}",
                           namespace=owner[0], name=owner[1])
        return event


@dataclass(frozen=True)
class Delivery:
    """What a subscriber gets: events, and how many it lost before them."""

    events: tuple[FlowEvent, ...]
    lost: int = 0


class Subscription:
    """One follower: a bounded queue the hub fills and the follower drains."""

    def __init__(self, hub: FlowHub, flow_filter: FlowFilter, size: int) -> None:
        self.hub = hub
        self.filter = flow_filter
        self.translations = flow_filter.wants_translations
        self._queue: queue.Queue[FlowEvent] = queue.Queue(maxsize=size)
        self._lost = 0
        self._lock = threading.Lock()

    def offer(self, event: FlowEvent) -> bool:
        """Called by the hub; never blocks. False if the event was lost."""
        try:
            self._queue.put_nowait(event)
        except queue.Full:
            with self._lock:
                self._lost += 1
            return False
        return True

    def get(self, timeout: float, limit: int = 256) -> Delivery:
        """The events queued (at least one unless `timeout` passes), at most `limit`."""
        events: list[FlowEvent] = []
        try:
            events.append(self._queue.get(timeout=timeout))
            while len(events) < limit:
                events.append(self._queue.get_nowait())
        except queue.Empty:
            pass
        if not events:
            return Delivery(())  # what was lost is told with the next event
        with self._lock:
            lost, self._lost = self._lost, 0
        return Delivery(tuple(events), lost)

    def close(self) -> None:
        self.hub.unsubscribe(self)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class TooManySubscribers(Exception):
    """MAX_SUBSCRIBERS followers are connected already."""


@dataclass(frozen=True)
class FlowStats:
    """The hub's aggregates, for metrics."""

    counts: Mapping[tuple[str, str], int]  # (service port, reason) -> events
    received: int  # events received from the datapath
    lost_slow_subscriber: int  # events subscribers lost because they fell behind
    subscribers: int
    tracing: bool  # whether the kernel is asked to report translations


@dataclass
class _Aggregates:
    counts: collections.Counter[tuple[str, str]] = field(default_factory=collections.Counter)
    received: int = 0
    lost: int = 0


class FlowHub:
    """Fan-out of flow events to the API and metrics (see the module docstring)."""

    def __init__(self, names: ServiceNames | None = None,
                 trace: Callable[[bool], None] | None = None,
                 recent: int = RECENT, queue_size: int = SUBSCRIBER_QUEUE,
                 max_subscribers: int = MAX_SUBSCRIBERS) -> None:
        self._names = names
        self._trace = trace
        self._queue_size = queue_size
        self._max = max_subscribers
        self._lock = threading.Lock()
        self._switch = threading.Lock()  # serializes changes of the kernel switch
        # Kept for Observe without follow, translations apart: a follower's
        # flood of translations must not push the last refusals out.
        self._recent: collections.deque[FlowEvent] = collections.deque(maxlen=recent)
        self._recent_translations: collections.deque[FlowEvent] = collections.deque(
            maxlen=recent)
        self._subscribers: list[Subscription] = []
        self._agg = _Aggregates()
        self._tracing = False

    # ---- the datapath's side -------------------------------------------------

    def publish(self, events: Iterable[FlowEvent]) -> None:
        """Take a batch from the datapath's consumer; never blocks on subscribers."""
        named = [self._name(e) for e in events]
        if not named:
            return
        with self._lock:
            subscribers = list(self._subscribers)
            agg = self._agg
            agg.received += len(named)
            for event in named:
                agg.counts[(event.service_port, event.reason)] += 1
                if event.verdict == TRANSLATE:
                    self._recent_translations.append(event)
                else:
                    self._recent.append(event)
        lost = 0
        for sub in subscribers:
            for event in named:
                if sub.filter.matches(event) and not sub.offer(event):
                    lost += 1
        if lost:
            with self._lock:
                self._agg.lost += lost

    def _name(self, event: FlowEvent) -> FlowEvent:
        if self._names is None:
            return event
        try:
            return self._names.name(event)
        except Exception:  # naming is best effort; the event matters more
            log.exception("naming the Service of a flow event failed")
            return event

    # ---- the API's side ------------------------------------------------------

    def recent(self, flow_filter: FlowFilter, last: int = 0) -> list[FlowEvent]:
        """The kept events that pass `flow_filter`, oldest first; the last `last` if > 0.

        The last RECENT refusals, drops and denials, and the last RECENT
        translations (kept while someone followed them), merged by time."""
        with self._lock:
            kept = list(heapq.merge(self._recent, self._recent_translations,
                                    key=lambda e: e.time))
        out = [e for e in kept if flow_filter.matches(e)]
        return out[-last:] if last > 0 else out

    def subscribe(self, flow_filter: FlowFilter) -> Subscription:
        """A follower; close it (or use it as a context manager) when done."""
        sub = Subscription(self, flow_filter, self._queue_size)
        with self._switch:
            with self._lock:
                if len(self._subscribers) >= self._max:
                    raise TooManySubscribers(
                        f"{self._max} clients follow flow events already; try again later"
                    )
                self._subscribers.append(sub)
            self._update_tracing()
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        with self._switch:
            with self._lock:
                if sub in self._subscribers:
                    self._subscribers.remove(sub)
            self._update_tracing()

    def _update_tracing(self) -> None:
        """Turn the kernel's translation reports on while some follower wants them
        (called with the switch lock held, so changes apply in order)."""
        with self._lock:
            wanted = any(s.translations for s in self._subscribers)
            followers = len(self._subscribers)
        if wanted == self._tracing:
            return
        if self._trace is not None:
            try:
                self._trace(wanted)
            except Exception:
                log.exception("turning translation events %s failed",
                              "on" if wanted else "off")
                return
        self._tracing = wanted
        log.info("translation events %s (%d follower(s))", "on" if wanted else "off",
                 followers)

    @property
    def tracing(self) -> bool:
        return self._tracing

    def stats(self) -> FlowStats:
        with self._lock:
            return FlowStats(
                counts=dict(self._agg.counts),
                received=self._agg.received,
                lost_slow_subscriber=self._agg.lost,
                subscribers=len(self._subscribers),
                tracing=self._tracing,
            )

