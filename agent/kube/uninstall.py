"""Is this agent stopping because veer is being uninstalled?

An agent that stops normally leaves the datapath in place: the kernel keeps
serving with the last state and the next agent adopts it (a restart, an
upgrade, an eviction). Only when the chart is uninstalled must every program,
pin and rule go, and the only process left on the node to do it is the
stopping agent. What tells the two apart is the agent's DaemonSet: an
uninstall deletes it, a restart does not.

    the DaemonSet: --owner-daemonset NS/NAME (the chart passes it), or the
                   ownerReference of this Pod (POD_NAMESPACE/POD_NAME)
    OwnerWatch     list+watch of that one DaemonSet from the start:
                     deletionTimestamp set, or DELETED  ──> deleting
    decide()       on SIGTERM: deleting, or a last GET says 404 /
                   deletionTimestamp for the same uid  ──> clean up;
                   a new uid (deleted and made again)   ──> leave it (the new
                                                            agent adopts it);
                   present, or anything in doubt        ──> leave it

Why watch, not only ask at SIGTERM: `helm uninstall` deletes the DaemonSet
and, milliseconds later, the agent's RBAC and ServiceAccount; the Pods get
SIGTERM only after that, when their token no longer works. A watch opened
while the token was good still delivers the DaemonSet's deletion.

Every doubt leaves the datapath in place: a datapath left behind keeps
serving and `veer agent --cleanup` removes it; one removed by mistake drops
the node's Service traffic.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from agent.errors import KubeApiError
from agent.kube.client import DAEMON_SETS, PODS, Api, Obj, WatchStream
from agent.kube.source import Backoff

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Decision:
    uninstalling: bool
    why: str


@dataclass
class OwnerState:
    """What the agent has seen of its DaemonSet."""

    namespace: str
    name: str
    uid: str = ""  # when first seen
    deleting: str = ""  # why it is known to be going, if it is

    @property
    def ref(self) -> str:
        return f"DaemonSet {self.namespace}/{self.name}"

    def observe(self, kind: str, obj: Obj) -> None:
        """Record a listed object (kind "LISTED") or a watch event."""
        meta = obj.get("metadata") or {}
        uid = str(meta.get("uid") or "")
        if kind != "DELETED" and uid and not self.uid:
            self.uid = uid
        if uid and self.uid and uid != self.uid:
            return  # another DaemonSet of the same name: not ours
        if kind == "DELETED":
            self.deleting = f"{self.ref} was deleted"
        elif meta.get("deletionTimestamp"):
            self.deleting = f"{self.ref} is being deleted"

    def vanished(self) -> None:
        """A relist did not find it (the deletion happened while not watching)."""
        if self.uid:
            self.deleting = f"{self.ref} is gone"


def owner_of(api: Api, pod_namespace: str, pod_name: str) -> tuple[str, str] | str:
    """(namespace, name) of the DaemonSet owning this Pod, or why not."""
    if not pod_namespace or not pod_name:
        return "POD_NAMESPACE and POD_NAME are not set and no --owner-daemonset was given"
    try:
        pod = api.get(PODS.path(pod_namespace, pod_name))
    except KubeApiError as err:
        return f"cannot read Pod {pod_namespace}/{pod_name} (give --owner-daemonset): {err}"
    for owner in (pod.get("metadata") or {}).get("ownerReferences") or []:
        if (isinstance(owner, dict) and owner.get("kind") == "DaemonSet"
                and str(owner.get("apiVersion", "")).startswith("apps/") and owner.get("name")):
            return pod_namespace, str(owner["name"])
    return f"Pod {pod_namespace}/{pod_name} is not owned by a DaemonSet"


def decide(api: Api, state: OwnerState | None, unknown: str = "") -> Decision:
    """On SIGTERM: clean up or not (see the module doc)."""
    if state is None:
        return Decision(False, unknown or "the agent's DaemonSet is unknown")
    if state.deleting:
        return Decision(True, state.deleting)
    try:
        ds = api.get(DAEMON_SETS.path(state.namespace, state.name))
    except KubeApiError as err:
        if err.status == 404 and state.uid:
            return Decision(True, f"{state.ref} is gone")
        return Decision(False, f"cannot tell whether {state.ref} is being deleted: {err}")
    meta = ds.get("metadata") or {}
    if state.uid and meta.get("uid") != state.uid:
        return Decision(False, f"{state.ref} was deleted and made again; the new one's agent "
                               "adopts the datapath")
    if meta.get("deletionTimestamp"):
        return Decision(True, f"{state.ref} is being deleted")
    return Decision(False, f"{state.ref} is in place (a restart, an upgrade or an eviction)")


class OwnerWatch:
    """Follows one DaemonSet (list+watch with a field selector), recording
    into an OwnerState; never raises, retries with backoff."""

    def __init__(self, api: Api, state: OwnerState, watch_timeout: int = 300) -> None:
        self.api = api
        self.state = state
        self.watch_timeout = watch_timeout
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._stream: WatchStream | None = None
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        path = DAEMON_SETS.path(self.state.namespace)
        selector = f"metadata.name={self.state.name}"
        backoff = Backoff(1.0, 30.0)
        while not self._stop.is_set():
            try:
                items, version = self.api.list(path, selector)
                for item in items:
                    self._observe("LISTED", item)
                if not items:
                    self._observe("VANISHED", {})
                backoff.reset()
                while not self._stop.is_set():
                    stream = self.api.watch(path, version, self.watch_timeout, selector)
                    with self._lock:
                        self._stream = stream
                    try:
                        for event in stream:
                            if event.get("type") == "ERROR":
                                raise KubeApiError(f"watch {self.state.ref}",
                                                   int((event.get("object") or {}).get("code")
                                                       or 0), "watch error")
                            obj = event.get("object") or {}
                            version = str((obj.get("metadata") or {}).get("resourceVersion")
                                          or version)
                            if event.get("type") in ("ADDED", "MODIFIED", "DELETED"):
                                self._observe(str(event["type"]), obj)
                    finally:
                        stream.close()
            except KubeApiError as err:
                delay = backoff.next()
                log.debug("following %s: %s; again in %.0fs", self.state.ref, err, delay)
                self._stop.wait(delay)
            except Exception:
                delay = backoff.next()
                log.exception("following %s failed; again in %.0fs", self.state.ref, delay)
                self._stop.wait(delay)

    def _observe(self, kind: str, obj: Obj) -> None:
        with self._lock:
            before = self.state.deleting
            if kind == "VANISHED":
                self.state.vanished()
            else:
                self.state.observe(kind, obj)
            now = self.state.deleting
        if now and not before:
            log.info("%s: veer is being uninstalled; the datapath is removed when this agent "
                     "stops", now)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="owner-daemonset", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            stream = self._stream
        if stream is not None:
            stream.close()
        if self._thread is not None:
            self._thread.join(5)

    def snapshot(self) -> OwnerState:
        with self._lock:
            return OwnerState(self.state.namespace, self.state.name, self.state.uid,
                              self.state.deleting)
