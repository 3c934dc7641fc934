"""FakeApi: an in-memory API server implementing agent.kube.client.Api.

Objects live per Resource; every write bumps a resourceVersion. Watches are
queues the test feeds (`emit`, `end`, `send`); failures are scripted per
method and path (`fail`). Every call is recorded in `calls`.
"""

from __future__ import annotations

import copy
import queue
import threading
from collections.abc import Iterator, Mapping
from typing import Any

from agent.errors import KubeApiError
from agent.kube.client import (
    DAEMON_SETS,
    ENDPOINT_SLICES,
    LEASES,
    NODES,
    PODS,
    SERVICES,
    TRAFFIC_POLICIES,
    VEER_NODES,
    Obj,
    Resource,
)

RESOURCES = (SERVICES, ENDPOINT_SLICES, NODES, PODS, DAEMON_SETS, LEASES, TRAFFIC_POLICIES,
             VEER_NODES)
_END = object()


class FakeWatch:
    def __init__(self, resource: Resource, version: str, field_selector: str) -> None:
        self.resource = resource
        self.version = version
        self.field_selector = field_selector
        self.events: queue.Queue[Any] = queue.Queue()
        self.closed = threading.Event()

    def __iter__(self) -> Iterator[Obj]:
        while not self.closed.is_set():
            try:
                item = self.events.get(timeout=0.05)
            except queue.Empty:
                continue
            if item is _END:
                return
            if isinstance(item, KubeApiError):
                raise item
            yield item

    def close(self) -> None:
        self.closed.set()


class FakeApi:
    server = "https://fake.invalid:6443"

    def __init__(self) -> None:
        self.objects: dict[Resource, dict[tuple[str, str], Obj]] = {r: {} for r in RESOURCES}
        self.missing: set[Resource] = set()  # kinds whose CRD is not installed (404)
        self.version = 100
        self.calls: list[tuple[str, str]] = []
        self.failures: dict[tuple[str, str], list[KubeApiError]] = {}
        self.watches: list[FakeWatch] = []
        self._lock = threading.Lock()

    # ---- test controls --------------------------------------------------

    def put(self, resource: Resource, obj: Mapping[str, Any]) -> Obj:
        """Store an object as the API server would (bumping resourceVersion)."""
        with self._lock:
            self.version += 1
            stored = copy.deepcopy(dict(obj))
            meta = stored.setdefault("metadata", {})
            meta["resourceVersion"] = str(self.version)
            meta.setdefault("uid", f"uid-{meta['name']}")
            ns = meta.get("namespace", "default") if resource.namespaced else ""
            if resource.namespaced:
                meta["namespace"] = ns
            self.objects[resource][(ns, meta["name"])] = stored
            return copy.deepcopy(stored)

    def remove(self, resource: Resource, namespace: str, name: str) -> None:
        with self._lock:
            self.version += 1
            self.objects[resource].pop((namespace, name), None)

    def fail(self, method: str, path: str, *errors: KubeApiError) -> None:
        """The next calls of `method` on `path` raise these, in order."""
        self.failures.setdefault((method, path), []).extend(errors)

    def emit(self, resource: Resource, kind: str, obj: Mapping[str, Any]) -> None:
        """Send a watch event to every open watch of `resource`."""
        for w in self._open(resource):
            w.events.put({"type": kind, "object": copy.deepcopy(dict(obj))})

    def send(self, resource: Resource, item: Any) -> None:
        """Send a raw item (an event dict, or a KubeApiError to raise)."""
        for w in self._open(resource):
            w.events.put(item)

    def end(self, resource: Resource) -> None:
        """The server ends the open watches of `resource` (its timeout)."""
        for w in self._open(resource):
            w.events.put(_END)

    def _open(self, resource: Resource) -> list[FakeWatch]:
        return [w for w in self.watches if w.resource == resource and not w.closed.is_set()]

    def count(self, method: str, path: str) -> int:
        return sum(1 for c in self.calls if c == (method, path))

    # ---- Api -------------------------------------------------------------

    def _record(self, method: str, path: str) -> None:
        self.calls.append((method, path))
        errors = self.failures.get((method, path))
        if errors:
            raise errors.pop(0)

    def _locate(self, path: str) -> tuple[Resource, str, str]:
        """(resource, namespace, name) of a path ("" name: a collection)."""
        parts = path.strip("/").split("/")
        group, version, rest = ("", parts[1], parts[2:]) if parts[0] == "api" else (
            parts[1], parts[2], parts[3:])
        namespace = ""
        if rest[0] == "namespaces" and len(rest) > 2:
            namespace, rest = rest[1], rest[2:]
        for r in RESOURCES:
            if (r.group, r.version, r.plural) == (group, version, rest[0]):
                return r, namespace, rest[1] if len(rest) > 1 else ""
        raise AssertionError(f"FakeApi: unknown path {path}")

    def _not_found(self, method: str, path: str) -> KubeApiError:
        return KubeApiError(f"{method} {path}", 404, "not found", "NotFound")

    def get(self, path: str) -> Obj:
        self._record("GET", path)
        r, ns, name = self._locate(path)
        with self._lock:
            obj = self.objects[r].get((ns, name))
        if obj is None or r in self.missing:
            raise self._not_found("GET", path)
        return copy.deepcopy(obj)

    def list(self, path: str, field_selector: str = "") -> tuple[list[Obj], str]:
        self._record("LIST", path)
        r, _, _ = self._locate(path)
        if r in self.missing:
            raise KubeApiError(f"GET {path}", 404, "404 page not found")
        with self._lock:
            items = [copy.deepcopy(o) for _, o in sorted(self.objects[r].items())]
            version = str(self.version)
        if field_selector.startswith("metadata.name="):
            wanted = field_selector.split("=", 1)[1]
            items = [o for o in items if o["metadata"]["name"] == wanted]
        for item in items:  # list items carry no apiVersion/kind
            item.pop("apiVersion", None)
            item.pop("kind", None)
        return items, version

    def watch(self, path: str, resource_version: str, timeout_seconds: int,
              field_selector: str = "") -> FakeWatch:
        self._record("WATCH", path)
        r, _, _ = self._locate(path)
        w = FakeWatch(r, resource_version, field_selector)
        self.watches.append(w)
        return w

    def create(self, path: str, body: Mapping[str, Any]) -> Obj:
        self._record("POST", path)
        r, ns, _ = self._locate(path)
        name = (body.get("metadata") or {}).get("name", "")
        with self._lock:
            exists = (ns if r.namespaced else "", name) in self.objects[r]
        if exists:
            raise KubeApiError(f"POST {path}", 409, "already exists", "AlreadyExists")
        obj = copy.deepcopy(dict(body))
        obj.pop("status", None)  # the status subresource ignores it
        return self.put(r, obj)

    def replace(self, path: str, body: Mapping[str, Any]) -> Obj:
        """An update: refused (409) if the body's resourceVersion is not current."""
        self._record("PUT", path)
        r, ns, name = self._locate(path)
        with self._lock:
            current = self.objects[r].get((ns, name))
        if current is None:
            raise self._not_found("PUT", path)
        given = (body.get("metadata") or {}).get("resourceVersion")
        if given and given != current["metadata"]["resourceVersion"]:
            raise KubeApiError(f"PUT {path}", 409, "the object has been modified", "Conflict")
        return self.put(r, body)

    def patch(self, path: str, body: Mapping[str, Any]) -> Obj:
        self._record("PATCH", path)
        r, ns, name = self._locate(path)
        with self._lock:
            current = self.objects[r].get((ns, name))
        if current is None:
            raise self._not_found("PATCH", path)
        merged = _merge(current, body)
        return self.put(r, merged)

    def delete(self, path: str) -> Obj:
        self._record("DELETE", path)
        r, ns, name = self._locate(path)
        with self._lock:
            obj = self.objects[r].pop((ns, name), None)
        if obj is None:
            raise self._not_found("DELETE", path)
        return obj


def _merge(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = _merge(out.get(key), value)
    return out
