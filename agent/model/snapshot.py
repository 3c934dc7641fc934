"""ClusterSnapshot: one consistent, immutable view of everything veer consumes,
and Store: the thread-safe place where sources record changes.

Sources (a manifest directory, Kubernetes) only write to a Store; the
reconciler reads snapshots from it. A snapshot never changes once taken.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from types import MappingProxyType

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


class Store:
    """Thread-safe holder of the latest snapshot; notifies a listener on change.

    `replace` swaps in a whole new view (the manifest source re-reads files);
    `apply` records individual upserts and deletions (event-driven sources).
    The listener is called outside the lock and must be cheap (it wakes the
    reconciler's runner).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._objects: dict[ObjectRef, Model] = {}
        self._snapshot = ClusterSnapshot()
        self._synced = False
        self._listeners: list[Callable[[], None]] = []

    def subscribe(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def replace(self, objects: Iterable[Model]) -> bool:
        """Make `objects` the whole state. Returns True if anything changed."""
        new = {obj.ref: obj for obj in objects}
        with self._lock:
            changed = new != self._objects or not self._synced
            if changed:
                self._objects = new
                self._snapshot = ClusterSnapshot.of(new.values())
            self._synced = True
        if changed:
            self._notify()
        return changed

    def apply(self, upserts: Iterable[Model] = (), deletes: Iterable[ObjectRef] = ()) -> bool:
        changed = False
        with self._lock:
            for obj in upserts:
                if self._objects.get(obj.ref) != obj:
                    self._objects[obj.ref] = obj
                    changed = True
            for ref in deletes:
                if self._objects.pop(ref, None) is not None:
                    changed = True
            if changed:
                self._snapshot = ClusterSnapshot.of(self._objects.values())
        if changed:
            self._notify()
        return changed

    def mark_synced(self) -> None:
        """Record that the source has delivered a complete view at least once."""
        with self._lock:
            was = self._synced
            self._synced = True
        if not was:
            self._notify()

    @property
    def synced(self) -> bool:
        with self._lock:
            return self._synced

    def snapshot(self) -> ClusterSnapshot:
        with self._lock:
            return self._snapshot

    def _notify(self) -> None:
        for listener in self._listeners:
            listener()
