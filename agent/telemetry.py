"""What the agent records about its own work, for the API, metrics and health.

    Store change queued ──> note_queued()    last queued time (a change
                                              recorded at once is queued too)
    Store change recorded ──> note_changes(changes)
                                              Service and EndpointSlice
                                              objects changed
    Reconciler pass ──> record_sync(result)  durations (full / partial),
                                              last (successful) pass, errors

Network programming latency is kube-proxy's: an EndpointSlice carrying the
annotation endpoints.kubernetes.io/last-change-trigger-time (the
EndpointSlice controller sets it to when the change that caused it happened,
e.g. a Pod turning ready) is noted with that time when the Store changes;
when a successful pass that read it ends, now - trigger time is observed.
Trigger times from before the agent started are skipped, as kube-proxy does.

Health follows kube-proxy's proxier health: the agent is unhealthy when a
change has waited longer than a timeout without a successful pass (the
initial sync counts as a change queued at start).

kube-proxy's sync metrics are defined over the same events, so the names
carry over (see agent/metrics/collect.py). Changes are counted as the agent
sees them: each object the Store records as added, updated (to a different
value) or removed. A source that coalesces several edits of one object
into one Store change counts one change, as kube-proxy's change trackers
merge pending changes of one object.

Thread-safe: the Store's listener, the runner's thread and the API/metrics
threads all call in.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from agent.model.objects import EndpointSlice, Service
from agent.model.snapshot import Change
from agent.reconcile.reconciler import SyncResult

# kube-proxy's buckets for its sync duration histograms:
# metrics.ExponentialBuckets(0.001, 2, 15), i.e. 1 ms .. 16.384 s.
SYNC_BUCKETS: tuple[float, ...] = tuple(0.001 * 2**i for i in range(15))

# kube-proxy's buckets for network programming latency: 0.25 s .. 5 min.
PROGRAMMING_BUCKETS: tuple[float, ...] = (
    0.25, 0.5, *range(1, 60), *range(60, 120, 5), *range(120, 301, 30)
)
TRIGGER_TIME_ANNOTATION = "endpoints.kubernetes.io/last-change-trigger-time"
MAX_PENDING_TRIGGERS = 10000  # while passes fail; the oldest are dropped beyond


@dataclass
class Histogram:
    """Cumulative-bucket histogram, as Prometheus exposes one."""

    buckets: tuple[float, ...] = SYNC_BUCKETS
    counts: list[int] = field(default_factory=list)  # per bucket, cumulative at render
    count: int = 0
    sum: float = 0.0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * len(self.buckets)

    def observe(self, value: float) -> None:
        self.count += 1
        self.sum += value
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
                break

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations <= bound) per bucket, then (+Inf, count)."""
        out, running = [], 0
        for bound, n in zip(self.buckets, self.counts, strict=True):
            running += n
            out.append((bound, running))
        out.append((float("inf"), self.count))
        return out

    def copy(self) -> Histogram:
        return Histogram(self.buckets, list(self.counts), self.count, self.sum)


@dataclass(frozen=True)
class SyncRecord:
    """One finished reconcile pass."""

    end_time: float  # Unix seconds
    duration: float
    full: bool
    changes: int
    errors: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.errors


@dataclass
class TelemetrySnapshot:
    """A consistent copy of everything recorded, for one API answer or scrape."""

    start_time: float
    last: SyncRecord | None
    last_success_time: float
    last_full_time: float
    last_queued_time: float
    # The oldest change (or the start, before the first successful pass)
    # that no successful pass has covered yet; 0 when none is pending.
    oldest_pending_time: float
    passes: int
    failed_passes: int
    sync_errors: int
    service_changes: int
    endpoint_changes: int
    all_syncs: Histogram
    full_syncs: Histogram
    partial_syncs: Histogram
    network_programming: Histogram = field(
        default_factory=lambda: Histogram(PROGRAMMING_BUCKETS))


def trigger_time(annotations: Mapping[str, str]) -> float | None:
    """The last-change-trigger-time annotation as Unix seconds, if valid."""
    value = annotations.get(TRIGGER_TIME_ANNOTATION)
    if not value:
        return None
    try:
        return datetime.fromisoformat(value).timestamp()
    except ValueError:
        return None


class Telemetry:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._cond = threading.Condition()
        self._start = clock()
        self._last: SyncRecord | None = None
        self._last_success = 0.0
        self._last_full = 0.0
        self._last_queued = 0.0
        self._oldest_pending = self._start  # the first sync is pending from the start
        self._passes = 0
        self._failed = 0
        self._errors = 0
        self._service_changes = 0
        self._endpoint_changes = 0
        self._all = Histogram()
        self._full = Histogram()
        self._partial = Histogram()
        self._programming = Histogram(PROGRAMMING_BUCKETS)
        # (when noted, trigger time) of EndpointSlice changes no pass has covered yet
        self._triggers: list[tuple[float, float]] = []

    def note_queued(self) -> None:
        """A change reached the Store (or was queued for it): a sync is due."""
        with self._cond:
            self._last_queued = self._clock()
            if not self._oldest_pending:
                self._oldest_pending = self._last_queued

    def note_changes(self, changes: Sequence[Change]) -> None:
        """The Store recorded these changes, queued no later than the last
        note_queued. Count them (O(changes)). A trigger time is noted as of
        that last queueing: a pass that started before it did not read the
        change, and does not count it."""
        with self._cond:
            for change in changes:
                obj = change.new if change.new is not None else change.old
                if isinstance(obj, Service):
                    self._service_changes += 1
                elif isinstance(obj, EndpointSlice):
                    self._endpoint_changes += 1
                    if isinstance(change.new, EndpointSlice):
                        self._note_trigger(change.new)
            del self._triggers[:-MAX_PENDING_TRIGGERS]

    def _note_trigger(self, eps: EndpointSlice) -> None:
        when = trigger_time(eps.meta.annotations)
        if when is not None and when >= self._start:
            self._triggers.append((self._last_queued, when))

    def record_sync(self, result: SyncResult) -> None:
        """A reconcile pass finished."""
        with self._cond:
            now = self._clock()
            record = SyncRecord(now, result.duration, result.full, result.changed,
                                tuple(result.errors))
            self._last = record
            self._passes += 1
            self._all.observe(result.duration)
            (self._full if result.full else self._partial).observe(result.duration)
            if record.ok:
                self._last_success = now
                if result.full:
                    self._last_full = now
                # The pass read the snapshot when it started: changes queued
                # since then are still pending (the start bounds them from below).
                started = now - result.duration
                self._oldest_pending = started if self._last_queued > started else 0.0
                pending = []
                for noted, when in self._triggers:
                    if noted <= started:
                        self._programming.observe(max(0.0, now - when))
                    else:
                        pending.append((noted, when))
                self._triggers = pending
            else:
                self._failed += 1
                self._errors += len(result.errors)
            self._cond.notify_all()

    @property
    def passes(self) -> int:
        with self._cond:
            return self._passes

    def wait_for_pass(self, after: int, timeout: float) -> SyncRecord | None:
        """Wait until more than `after` passes have finished; the last one, or
        None on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._passes <= after:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)
            return self._last

    def snapshot(self) -> TelemetrySnapshot:
        with self._cond:
            return TelemetrySnapshot(
                start_time=self._start,
                last=self._last,
                last_success_time=self._last_success,
                last_full_time=self._last_full,
                last_queued_time=self._last_queued,
                oldest_pending_time=self._oldest_pending,
                passes=self._passes,
                failed_passes=self._failed,
                sync_errors=self._errors,
                service_changes=self._service_changes,
                endpoint_changes=self._endpoint_changes,
                all_syncs=self._all.copy(),
                full_syncs=self._full.copy(),
                partial_syncs=self._partial.copy(),
                network_programming=self._programming.copy(),
            )
