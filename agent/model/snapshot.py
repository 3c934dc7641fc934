"""ClusterSnapshot: one consistent, immutable view of everything veer consumes,
and Store: the thread-safe place where sources record changes.

Sources (a manifest directory, Kubernetes) only write to a Store; the
reconciler reads snapshots from it. A snapshot never changes once taken.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from types import MappingProxyType
from typing import Any

from agent.model.objects import EndpointSlice, Node, ObjectRef, Service, TrafficPolicy

Model = Service | EndpointSlice | Node | TrafficPolicy
NamespacedName = tuple[str, str]


def _empty() -> Mapping[NamespacedName, Service]:
    return MappingProxyType({})


@dataclass(frozen=True)
class ClusterSnapshot:
    services: Mapping[NamespacedName, Service] = field(default_factory=_empty)
    endpoint_slices: Mapping[NamespacedName, EndpointSlice] = field(
        default_factory=lambda: MappingProxyType({})
    )
    nodes: Mapping[str, Node] = field(default_factory=lambda: MappingProxyType({}))
    traffic_policies: Mapping[NamespacedName, TrafficPolicy] = field(
        default_factory=lambda: MappingProxyType({})
    )
    # The EndpointSlices of each Service in name order, when the maker already
    # has them (the Store keeps them per Service); None: built on first use.
    slice_index: Mapping[NamespacedName, tuple[EndpointSlice, ...]] | None = field(
        default=None, compare=False, repr=False
    )
    # Where this snapshot stands in its Store's change log (see touched_since).
    lineage: Lineage | None = field(default=None, compare=False, repr=False)

    @staticmethod
    def of(objects: Iterable[Model]) -> ClusterSnapshot:
        services: dict[NamespacedName, Service] = {}
        slices: dict[NamespacedName, EndpointSlice] = {}
        nodes: dict[str, Node] = {}
        policies: dict[NamespacedName, TrafficPolicy] = {}
        for obj in objects:
            if isinstance(obj, Service):
                services[(obj.meta.namespace, obj.meta.name)] = obj
            elif isinstance(obj, EndpointSlice):
                slices[(obj.meta.namespace, obj.meta.name)] = obj
            elif isinstance(obj, Node):
                nodes[obj.meta.name] = obj
            else:
                policies[(obj.meta.namespace, obj.meta.name)] = obj
        return ClusterSnapshot(
            MappingProxyType(services),
            MappingProxyType(slices),
            MappingProxyType(nodes),
            MappingProxyType(policies),
        )

    @cached_property
    def _slices_by_service(self) -> Mapping[NamespacedName, tuple[EndpointSlice, ...]]:
        if self.slice_index is not None:
            return self.slice_index
        index: dict[NamespacedName, list[EndpointSlice]] = {}
        for (namespace, _), s in sorted(self.endpoint_slices.items()):
            if s.service_name:
                index.setdefault((namespace, s.service_name), []).append(s)
        return MappingProxyType({k: tuple(v) for k, v in index.items()})

    def slices_for(self, namespace: str, service: str) -> tuple[EndpointSlice, ...]:
        """The EndpointSlices of one Service, in a stable (name) order."""
        return self._slices_by_service.get((namespace, service), ())

    def objects(self) -> list[Model]:
        out: list[Model] = []
        out.extend(self.services.values())
        out.extend(self.endpoint_slices.values())
        out.extend(self.nodes.values())
        out.extend(self.traffic_policies.values())
        return out


def ref_of(obj: Model) -> ObjectRef:
    return obj.ref


# A change log entry that names no one Service: a Node or a TrafficPolicy
# changed, which may concern any Service.
EVERYTHING: NamespacedName = ("", "")


@dataclass(frozen=True, eq=False)
class Lineage:
    """A snapshot's place in its Store's change log: the log (a list the
    Store only appends to, under its lock) and its length when the snapshot
    was taken."""

    log: list[NamespacedName]
    end: int


def touched_since(old: ClusterSnapshot, new: ClusterSnapshot) -> set[NamespacedName] | None:
    """The Services whose own objects (the Service or one of its
    EndpointSlices) may differ between `old` and `new`, a later snapshot of
    the same Store, without looking at the others: O(changes). None when
    that is not known (snapshots of different Stores or log generations, or
    made by ClusterSnapshot.of) or when a Node or a TrafficPolicy changed."""
    a, b = old.lineage, new.lineage
    if a is None or b is None or a.log is not b.log or a.end > b.end:
        return None
    touched = set(b.log[a.end:b.end])
    return None if EVERYTHING in touched else touched


@dataclass(frozen=True)
class Change:
    """One object as it was and as it is now (None: absent), old != new."""

    old: Model | None
    new: Model | None


def _key(obj: Model) -> NamespacedName:
    return (obj.meta.namespace, obj.meta.name)


class Store:
    """Thread-safe holder of the latest state; notifies listeners on change.

    `replace` swaps in a whole new view (the manifest source re-reads files);
    `apply` records individual upserts and deletions (event-driven sources).

    A source may also queue changes and hand them over later: `note_queued`
    says that something changed, now, and the source's flusher (see
    `add_flusher`) records it when the next snapshot is taken. This is how
    the Kubernetes source parses watch events in batches, once per
    reconcile pass, and an object edited twice between passes once.

    Listeners are called outside the lock and must be cheap, and must not
    take a snapshot (a flusher may be the caller). In this order:
    `subscribe_queued` ones learn that a change was queued or recorded
    (telemetry's clock), `subscribe_changes` ones are handed what changed
    (telemetry's counts), `subscribe` ones are woken (the reconciler's
    runner). Changes a flusher records were queued, and their woken
    listeners woken, before: recording them calls only the change
    listeners.

    Cost: an event costs O(what it changes). The state is kept per kind and
    per Service (its EndpointSlices), and a snapshot is built only when asked
    for and only if something changed since the last one (the reconciler
    asks once per pass, not once per event): copies of the per-kind dicts,
    which are cheap next to rebuilding them object by object.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._objects: dict[ObjectRef, Model] = {}
        self._services: dict[NamespacedName, Service] = {}
        self._slices: dict[NamespacedName, EndpointSlice] = {}
        self._nodes: dict[str, Node] = {}
        self._policies: dict[NamespacedName, TrafficPolicy] = {}
        # (namespace, Service name) -> its slices in name order.
        self._by_service: dict[NamespacedName, tuple[EndpointSlice, ...]] = {}
        self._snapshot: ClusterSnapshot | None = ClusterSnapshot()  # None: stale
        # Which Service each change concerned, for touched_since(). Started
        # afresh once it outgrows the state, so that it stays bounded (a
        # snapshot from before then just compares as "not known").
        self._log: list[NamespacedName] = []
        self._synced = False
        self._queued_listeners: list[Callable[[], None]] = []
        self._listeners: list[Callable[[], None]] = []
        self._change_listeners: list[Callable[[Sequence[Change]], None]] = []
        self._flushers: list[Callable[[], None]] = []

    def subscribe_queued(self, listener: Callable[[], None]) -> None:
        self._queued_listeners.append(listener)

    def subscribe(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def subscribe_changes(self, listener: Callable[[Sequence[Change]], None]) -> None:
        self._change_listeners.append(listener)

    def add_flusher(self, flush: Callable[[], None]) -> None:
        """`flush` records what its source has queued (with `apply(...,
        queued=True)`); it is called, outside the lock, before every snapshot
        is taken, from whichever thread takes it."""
        self._flushers.append(flush)

    def note_queued(self) -> None:
        """A source queued a change that its flusher will record: tell the
        queued listeners and wake the woken ones now."""
        for on_queued in self._queued_listeners:
            on_queued()
        self._wake()

    def replace(self, objects: Iterable[Model]) -> bool:
        """Make `objects` the whole state. Returns True if anything changed."""
        new = {obj.ref: obj for obj in objects}
        with self._lock:
            changes = [Change(old, new.get(ref)) for ref, old in self._objects.items()
                       if new.get(ref) != old]
            changes += [Change(None, obj) for ref, obj in new.items()
                        if ref not in self._objects]
            for change in changes:
                self._record(change)
            changed = bool(changes) or not self._synced
            self._synced = True
        if changed:
            self._notify(changes, direct=True)
        return changed

    def apply(self, upserts: Iterable[Model] = (), deletes: Iterable[ObjectRef] = (),
              queued: bool = False) -> bool:
        """Record upserts, then deletions. `queued`: a flusher records
        changes that `note_queued` announced, so only the change listeners
        are called."""
        changes: list[Change] = []
        with self._lock:
            for obj in upserts:
                old = self._objects.get(obj.ref)
                if old != obj:
                    changes.append(Change(old, obj))
                    self._record(changes[-1])
            for ref in deletes:
                old = self._objects.get(ref)
                if old is not None:
                    changes.append(Change(old, None))
                    self._record(changes[-1])
        if changes:
            self._notify(changes, direct=not queued)
        return bool(changes)

    def _record(self, change: Change) -> None:
        """Apply one change to every index. Call with the lock held."""
        self._snapshot = None
        old, new = change.old, change.new
        obj = new if new is not None else old
        assert obj is not None
        if new is not None:
            self._objects[new.ref] = new
        else:
            del self._objects[obj.ref]
        if isinstance(obj, Service):
            _put(self._services, _key(obj), new)
            self._log.append(_key(obj))
        elif isinstance(obj, EndpointSlice):
            _put(self._slices, _key(obj), new)
            owners = {_owner(s) for s in (old, new) if isinstance(s, EndpointSlice)}
            for owner in owners - {None}:
                assert owner is not None
                self._reindex(owner, _key(obj), new if isinstance(new, EndpointSlice) else None)
                self._log.append(owner)
        elif isinstance(obj, Node):
            _put(self._nodes, obj.meta.name, new)
            self._log.append(EVERYTHING)
        else:
            _put(self._policies, _key(obj), new)
            self._log.append(EVERYTHING)

    def _reindex(self, owner: NamespacedName, key: NamespacedName,
                 new: EndpointSlice | None) -> None:
        """Drop slice `key` from `owner`'s list and put `new` in its place if
        it belongs there (a Service has a few slices: cheap)."""
        mine = [s for s in self._by_service.get(owner, ()) if _key(s) != key]
        if new is not None and _owner(new) == owner:
            mine.append(new)
        if mine:
            self._by_service[owner] = tuple(sorted(mine, key=lambda s: s.meta.name))
        else:
            self._by_service.pop(owner, None)

    def mark_synced(self) -> None:
        """Record that the source has delivered a complete view at least once."""
        with self._lock:
            was = self._synced
            self._synced = True
        if not was:
            self._wake()

    @property
    def synced(self) -> bool:
        with self._lock:
            return self._synced

    def snapshot(self) -> ClusterSnapshot:
        for flush in self._flushers:
            flush()
        with self._lock:
            if self._snapshot is None:
                if len(self._log) > 4 * len(self._objects) + 4096:
                    self._log = []
                self._snapshot = ClusterSnapshot(
                    MappingProxyType(dict(self._services)),
                    MappingProxyType(dict(self._slices)),
                    MappingProxyType(dict(self._nodes)),
                    MappingProxyType(dict(self._policies)),
                    MappingProxyType(dict(self._by_service)),
                    Lineage(self._log, len(self._log)),
                )
            return self._snapshot

    def _notify(self, changes: Sequence[Change], direct: bool) -> None:
        """`direct`: recorded now, not queued before (see the class doc)."""
        if changes and direct:
            for on_queued in self._queued_listeners:
                on_queued()
        if changes:
            for on_changes in self._change_listeners:
                on_changes(changes)
        if direct:
            self._wake()

    def _wake(self) -> None:
        for listener in self._listeners:
            listener()


def _owner(s: EndpointSlice) -> NamespacedName | None:
    return (s.meta.namespace, s.service_name) if s.service_name else None


def _put(index: dict[Any, Any], key: Any, value: Model | None) -> None:
    if value is None:
        index.pop(key, None)
    else:
        index[key] = value
