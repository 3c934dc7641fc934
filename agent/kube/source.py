"""The Kubernetes source: Services, EndpointSlices, this node's Node and
TrafficPolicies, from the API server into the agent's Store.

One reflector thread per kind does what client-go's reflector does:

    list ──> replace this kind in the Store: upsert what is listed, delete
      │      what is known but no longer listed (a Store change only when
      │      something differs, so a relist of the same objects is a no-op)
      │      ── every kind listed once ──> Store.mark_synced(): programming starts
      v
    watch from the list's resourceVersion ──> queue each event for the Store
      │  the server ends the watch (its timeout)  ──> watch again from the last version
      │  410 Gone                                 ──> list again at once
      │  an ERROR event, a broken connection, the
      │  API server restarting, a watch ended at
      │  once without an event                    ──> back off, then list again
      v
    (the delay doubles up to Backoff.maximum, and only a watch that worked
     resets it: a kind whose lists work and whose watches fail is not
     listed again every half second)

Nothing is programmed until the first list of every kind has arrived, so a
restarted agent never prunes the pinned state from a partial view; while the
API server is away, the Store (and so the datapath) stays exactly as it was.

- A watch event is queued, not parsed, on arrival: the Store hears at once
  that something changed (the reconciler wakes), and the queue is parsed
  and recorded when the next snapshot is taken (`flush`), in one batch, on
  the thread that takes it. Parsing a batch costs markedly less per object
  than parsing each event as it comes, with the thread idle in between;
  and an object edited several times between two passes is parsed once,
  in its latest version. A list is parsed as it arrives, as before (it is
  one batch already); queued events of that kind are older than the list,
  and are dropped.
- Objects are parsed by agent/model/parse.py. A malformed one is logged with
  its name and field and skipped: an update that does not parse leaves the
  last good version in force (as a manifest file that turns bad does), a new
  object that does not parse is not recorded, and neither is kept one of
  another uid: the object was deleted and made again, malformed. `last_report.problems` lists
  them until they are fixed or deleted. A list item that cannot even be
  named (not an object, no metadata.name) is skipped and reported until the
  next list of its kind; a watch event like it is logged and ignored.
- Only this node's Node is watched (a field selector, as kube-proxy does):
  the agent needs its own addresses and zone, not every Node's heartbeats.
- TrafficPolicies are optional: while the CRD trafficpolicies.veer.dev is not
  installed (404), the kind counts as listed and empty, it is reported as a
  problem, and the list is retried every `crd_retry` seconds. Once listed, a
  404 is a failed list like any other (an API server that is starting can
  answer 404 for a custom resource for a moment) until it has lasted
  `crd_retry`: the policies, access rules among them, stay in force.

Why this is not kopf (the issue names kopf; the operator, agent/operator/,
uses it): kopf 1.45's watcher (kopf/_cogs/clients/watching.py) relists after
a 410 or a broken stream by re-delivering every listed object, but delivers
nothing for the objects deleted while the watch was down, so an index would
keep a deleted Service programmed until the agent restarts; the end of the
first list is only an internal bookmark (no handler sees it, and an empty
kind calls no handler at all), so "every kind listed" cannot be observed;
and a watch ERROR other than 410 ends the operator. A node agent must get
all three right, and a list+watch loop per kind is the smallest thing that
does. kopf's per-object workers, progress annotations and peering are not
needed here either: every node acts on every event.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from agent.errors import KubeApiError, ModelError
from agent.kube.client import (
    ENDPOINT_SLICES,
    NODES,
    SERVICES,
    TRAFFIC_POLICIES,
    Api,
    Obj,
    Resource,
    WatchStream,
)
from agent.model.objects import ObjectRef
from agent.model.parse import Model, object_name, parse_object
from agent.model.snapshot import Store
from agent.sources import SourceReport

log = logging.getLogger(__name__)

KINDS: tuple[Resource, ...] = (SERVICES, ENDPOINT_SLICES, NODES, TRAFFIC_POLICIES)
# Kinds whose absence (no CRD: 404 on the list) means "none of them".
OPTIONAL: frozenset[Resource] = frozenset({TRAFFIC_POLICIES})


class Expired(Exception):
    """The watch's resourceVersion is too old (410 Gone): list again."""


@dataclass
class Backoff:
    """Exponential delay between failed attempts, reset by a success."""

    initial: float = 0.5
    maximum: float = 10.0
    _next: float = field(default=0.0, init=False)

    def next(self) -> float:
        delay = self._next or self.initial
        self._next = min(delay * 2, self.maximum)
        return delay

    def reset(self) -> None:
        self._next = 0.0


# A watch the server ends sooner than this without a single event is taken
# for a failure (client-go's reflector does the same): a server that ends
# every watch at once would otherwise be asked again in a tight loop.
SHORT_WATCH_S = 1.0


def _uid(raw: Obj) -> str:
    meta = raw.get("metadata")
    return str(meta.get("uid") or "") if isinstance(meta, dict) else ""


def _same_object(known: Model, raw: Obj) -> bool:
    """Whether a malformed `raw` may be the next version of `known`: the
    same uid (or one of them unknown). A new uid is a new object: the old
    one was deleted, and its last good version must not stay in force."""
    uid = _uid(raw)
    return not uid or not known.meta.uid or uid == known.meta.uid


def _type_name(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _ref(resource: Resource, raw: object) -> ObjectRef | str:
    """The object's ref, or why it has none.

    The API server's JSON is not trusted to be shaped like an object: an item
    that is not a mapping, or has no usable metadata.name, cannot be recorded
    (nor its problem reported under its name, nor cleared when it goes), so
    its callers skip it instead of failing the whole list or watch.
    """
    if not isinstance(raw, dict):
        return f"expected an object, got {_type_name(raw)}"
    meta = raw.get("metadata")
    if not isinstance(meta, dict):
        return f"metadata: expected an object, got {_type_name(meta)}"
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        return ("metadata.name: is required" if name in (None, "")
                else f"metadata.name: expected a string, got {_type_name(name)}")
    if not resource.namespaced:
        return ObjectRef(resource.kind, "", name)
    namespace = meta.get("namespace")
    if namespace is not None and not isinstance(namespace, str):
        return f"metadata.namespace: expected a string, got {_type_name(namespace)}"
    return ObjectRef(resource.kind, namespace or "default", name)


def _resource_version(raw: object) -> str:
    """metadata.resourceVersion, "" if absent or not a string: a made-up
    version would make the next watch request fail."""
    meta = raw.get("metadata") if isinstance(raw, dict) else None
    version = meta.get("resourceVersion") if isinstance(meta, dict) else None
    return version if isinstance(version, str) else ""


def _status_code(raw: object) -> int:
    """The HTTP code of a watch ERROR event's Status, 0 (unknown) when it has
    no integer one (bool is an int to Python, not to the API)."""
    code = raw.get("code") if isinstance(raw, dict) else None
    return code if isinstance(code, int) and not isinstance(code, bool) else 0


class KubeSource:
    """Keeps a Store equal to what the API server holds (see the module doc)."""

    kind = "kubernetes"

    def __init__(
        self,
        api: Api,
        store: Store,
        node_name: str,
        kinds: Sequence[Resource] = KINDS,
        watch_timeout: Callable[[], int] = lambda: random.randint(240, 360),
        crd_retry: float = 30.0,
        backoff: Callable[[], Backoff] = Backoff,
    ) -> None:
        self.api = api
        self.store = store
        self.node_name = node_name
        self.kinds = tuple(kinds)
        self._watch_timeout = watch_timeout
        self._crd_retry = crd_retry
        self._backoff = backoff
        self._lock = threading.Lock()
        # Held while queued events or a list are being recorded: one at a
        # time, so that an older version never lands after a newer one.
        # Taken before _lock and before the Store's lock, never after them.
        self._recording = threading.Lock()
        # Watch events not recorded yet, the latest per object (None: deleted).
        self._queued: dict[ObjectRef, tuple[Resource, Obj | None]] = {}
        self._known: dict[Resource, dict[ObjectRef, Model]] = {k: {} for k in self.kinds}
        self._listed: set[Resource] = set()
        # Optional kinds listed with their CRD installed, and when a list of
        # one first answered 404 since (see relist).
        self._installed: set[Resource] = set()
        self._missing_since: dict[Resource, float] = {}
        self._problems: dict[ObjectRef, str] = {}
        # Per kind, the items of its last list that could not even be named
        # (see _ref): replaced by each list, so they go when the items do.
        self._unnamed: dict[Resource, tuple[str, ...]] = {}
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._watches: set[WatchStream] = set()
        store.add_flusher(self.flush)

    # ---- what the agent reads ------------------------------------------------

    @property
    def location(self) -> str:
        return self.api.server

    @property
    def last_report(self) -> SourceReport:
        """As of the last flush: every reconcile pass starts with one."""
        with self._lock:
            objects = sum(len(known) for known in self._known.values())
            problems = tuple(self._problems[ref] for ref in sorted(self._problems))
            problems += tuple(p for k in self.kinds for p in self._unnamed.get(k, ()))
        return SourceReport(0, objects, problems)

    @property
    def listed(self) -> frozenset[Resource]:
        with self._lock:
            return frozenset(self._listed)

    # ---- one list, one event ---------------------------------------------

    def _selector(self, resource: Resource) -> str:
        return f"metadata.name={self.node_name}" if resource == NODES else ""

    def _parse(self, resource: Resource, ref: ObjectRef, raw: Obj) -> Model | None:
        """The model object, or None (logged, recorded under `ref`, what _ref
        named it) if it is malformed."""
        # List items carry no apiVersion/kind; watch events do.
        doc = {"apiVersion": resource.api_version, "kind": resource.kind, **raw}
        try:
            obj = parse_object(doc)
        except ModelError as err:
            self._problem(ref, str(err))
            return None
        except Exception as err:  # a parser bug: skip this object, not the batch it is in
            log.exception("parsing %s failed", ref)
            self._problem(ref, f"{ref}: cannot be parsed ({type(err).__name__}: {err})")
            return None
        self._problem(ref, "")
        return obj

    def _problem(self, ref: ObjectRef, message: str) -> None:
        with self._lock:
            before = self._problems.get(ref, "")
            if message:
                self._problems[ref] = message
            else:
                self._problems.pop(ref, None)
        if message and message != before:
            log.error("%s (skipped; the last good version, if any, stays in force)", message)
        elif before and not message:
            log.info("resolved: %s", before)

    def relist(self, resource: Resource) -> str:
        """List one kind and make the Store hold exactly that. Returns the
        list's resourceVersion ("" when an optional kind is not installed)."""
        try:
            items, version = self.api.list(resource.path(), self._selector(resource))
        except KubeApiError as err:
            if resource not in OPTIONAL or err.status != 404:
                raise
            # A kind that was installed may answer 404 for a moment (an API
            # server starting up, before its custom resource handlers are
            # ready): its objects stay in force, as for any failed list, until
            # the 404 has lasted crd_retry. Only then is the CRD taken for gone.
            if resource in self._installed:
                since = self._missing_since.setdefault(resource, time.monotonic())
                if time.monotonic() - since < self._crd_retry:
                    raise
                self._installed.discard(resource)
            items, version = [], ""
            self._problem(
                ObjectRef(resource.kind, "", ""),
                f"{resource.kind}: the CRD {resource} is not installed; treating it as none "
                f"(checking again every {self._crd_retry:.0f}s)",
            )
        else:
            self._problem(ObjectRef(resource.kind, "", ""), "")
            if resource in OPTIONAL:
                self._installed.add(resource)
                self._missing_since.pop(resource, None)
        parsed: list[tuple[ObjectRef, Obj, Model | None]] = []
        unnamed: list[str] = []
        for index, raw in enumerate(items):
            ref = _ref(resource, raw)
            if isinstance(ref, str):
                unnamed.append(f"{resource.kind} list item {index}: {ref} (skipped)")
            else:
                parsed.append((ref, raw, self._parse(resource, ref, raw)))
        self._unnamed_problems(resource, tuple(unnamed))
        listed = {ref for ref, _, _ in parsed}
        with self._recording:
            with self._lock:
                # Queued events of this kind predate the list: it supersedes them.
                self._queued = {ref: q for ref, q in self._queued.items() if q[0] != resource}
                known = self._known[resource]
                fresh: dict[ObjectRef, Model] = {}
                for ref, raw, obj in parsed:
                    if obj is not None:
                        fresh[obj.ref] = obj
                    elif ref in known and _same_object(known[ref], raw):
                        fresh[ref] = known[ref]  # keep the last good version
                gone = [ref for ref in known if ref not in fresh]
                stale = [ref for ref in self._problems
                         if ref.kind == resource.kind and ref.name and ref not in listed]
                self._known[resource] = fresh
            for ref in stale:  # malformed once, gone now
                self._problem(ref, "")
            self.store.apply(fresh.values(), gone)
        self._mark_listed(resource)
        return version

    def _unnamed_problems(self, resource: Resource, problems: tuple[str, ...]) -> None:
        with self._lock:
            before = self._unnamed.get(resource, ())
            self._unnamed[resource] = problems
        for message in problems:
            if message not in before:
                log.error("%s", message)

    def _mark_listed(self, resource: Resource) -> None:
        with self._lock:
            first = resource not in self._listed
            self._listed.add(resource)
            complete = len(self._listed) == len(self.kinds)
        if first:
            log.info("listed %s%s", resource,
                     "; every kind is listed, programming starts" if complete else "")
        if complete:
            self.store.mark_synced()

    def apply_event(self, resource: Resource, event: Obj, version: str) -> str:
        """Queue one watch event for the next flush; returns the
        resourceVersion to watch from.

        Raises Expired on 410 Gone and KubeApiError on any other ERROR event.
        Any other event that cannot be used (an unknown type, an object that
        is not one or has no name) is logged and ignored: one odd event is no
        reason to list the whole kind again.
        """
        kind = event.get("type")
        raw = event.get("object")
        if kind == "ERROR":
            status = raw if isinstance(raw, dict) else {}
            code = _status_code(status)
            if code == 410:
                raise Expired(str(status.get("message") or "resource version too old"))
            raise KubeApiError(f"watch {resource}", code, str(status.get("message") or raw),
                               str(status.get("reason") or ""))
        version = _resource_version(raw) or version
        if kind == "BOOKMARK":
            return version
        named = _ref(resource, raw)
        if kind not in ("ADDED", "MODIFIED", "DELETED"):
            log.warning("ignoring a watch event of type %r for %s", kind,
                        object_name(raw) if isinstance(raw, dict) else resource)
        elif isinstance(named, str):
            # Not recorded as a problem: with no name to file it under, nothing
            # could ever clear it. The next list reports such items, if any.
            log.warning("ignoring a %s event for %s: %s", kind, resource, named)
        else:
            assert isinstance(raw, dict)  # _ref named it
            with self._lock:
                self._queued[named] = (resource, None if kind == "DELETED" else raw)
            self.store.note_queued()
        return version

    def flush(self) -> None:
        """Parse and record the queued events (the Store calls this before it
        takes a snapshot; any thread may)."""
        with self._recording:
            with self._lock:
                queued, self._queued = self._queued, {}
            if not queued:
                return
            upserts: list[Model] = []
            deletes: list[ObjectRef] = []
            for ref, (resource, raw) in queued.items():
                obj = self._parse(resource, ref, raw) if raw is not None else None
                with self._lock:
                    known = self._known[resource].get(ref)
                    # A malformed object that is not the next version of the
                    # one known (a DELETED and a new ADDED, coalesced) ends it.
                    replaced = (raw is not None and obj is None and known is not None
                                and not _same_object(known, raw))
                    if raw is None or replaced:
                        self._known[resource].pop(ref, None)
                    elif obj is not None:
                        self._known[resource][obj.ref] = obj
                if raw is None:
                    self._problem(ref, "")
                    deletes.append(ref)
                elif replaced:
                    deletes.append(ref)
                elif obj is not None:
                    upserts.append(obj)
            self.store.apply(upserts, deletes, queued=True)

    # ---- the loops -------------------------------------------------------

    def _watch(self, resource: Resource, version: str) -> tuple[str, int]:
        """One watch request, applied until the server ends it. Returns the
        version to go on from, and how many events it brought."""
        stream = self.api.watch(resource.path(), version, self._watch_timeout(),
                                self._selector(resource))
        events = 0
        with self._lock:
            self._watches.add(stream)
        try:
            if self._stop.is_set():
                return version, events
            for event in stream:
                events += 1
                version = self.apply_event(resource, event, version)
                if self._stop.is_set():
                    break
        finally:
            with self._lock:
                self._watches.discard(stream)
            stream.close()
        return version, events

    def run_kind(self, resource: Resource) -> None:
        """List, then watch, until stopped; never raises."""
        backoff = self._backoff()
        while not self._stop.is_set():
            try:
                version = self.relist(resource)
                if not version:  # an optional kind that is not installed
                    backoff.reset()
                    self._stop.wait(self._crd_retry)
                    continue
                # The delay is reset by a watch that worked, not by a list: a
                # kind whose lists succeed and whose watches fail (a Role
                # without watch, a proxy that cuts long requests) must not
                # be listed again every half second by every node.
                while not self._stop.is_set():
                    started = time.monotonic()
                    version, events = self._watch(resource, version)
                    if events == 0 and time.monotonic() - started < SHORT_WATCH_S \
                            and not self._stop.is_set():
                        raise KubeApiError(f"watch {resource}", 0,
                                           "the server ended the watch at once, with no event")
                    backoff.reset()
            except Expired as err:
                log.info("watch of %s expired (%s); listing again", resource, err)
                continue
            except KubeApiError as err:
                if err.status == 410:  # the watch request itself was too old
                    log.info("watch of %s expired (%s); listing again", resource, err)
                    continue
                delay = backoff.next()
                if err.status == 403:
                    log.error("%s; the agent's ClusterRole must allow list and watch on %s "
                              "(retrying in %.1fs)", err, resource, delay)
                else:
                    log.warning("%s: %s; listing again in %.1fs", resource, err, delay)
                self._stop.wait(delay)
            except Exception:  # a source must survive anything the server sends
                delay = backoff.next()
                log.exception("following %s failed; listing again in %.1fs", resource, delay)
                self._stop.wait(delay)

    def start(self) -> None:
        log.info("following %s from %s for node %s",
                 ", ".join(str(k) for k in self.kinds), self.api.server, self.node_name)
        for resource in self.kinds:
            thread = threading.Thread(target=self.run_kind, args=(resource,),
                                      name=f"kube-{resource.plural}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            watches = list(self._watches)
        for stream in watches:
            stream.close()
        for thread in self._threads:
            thread.join(5)
        self._threads.clear()

