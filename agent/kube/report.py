"""This node's report: the VeerNode object named after the node.

    VeerNode (veer.dev/v1alpha1, cluster-scoped, name = node name; crds/veernodes.veer.dev.yaml)
      status:
        nodeUID, podName, agentVersion
        mode: EBPF, modeReason          the datapath the agent runs, and why
        services: 12                    Service frontends programmed
        conditions: [Ready]             the first complete view is programmed,
                                        and the last pass succeeded
        trafficPolicies:                the TrafficPolicies in force on this node
        - {namespace, name, uid, generation, mode, programmed, reason, message}
        heartbeatTime, heartbeatSeconds

The operator aggregates the trafficPolicies entries into each policy's
Programmed condition ("n/m"). A policy is listed when it is accepted and its
Services exist in this node's view (agent/operator/conditions.py decides, as
the operator does). The datapath does not act on TrafficPolicies yet, so
each listed policy says whether this node's last reconcile pass put it in
force (programmed: true), and if not why: a feature this node's datapath
does not implement (reason Unsupported, naming it), a failed pass
(SyncFailed), or no pass since the policy appeared (Pending). The report says
what the node does, not what it was asked to do.

The report is written once the source has delivered its first complete view:
the object is created if missing (owned by the Node, so it goes when the Node
goes), then its status is patched when its content changes (at most once a
second: changes in between are written together), and at least every
heartbeatSeconds (heartbeatTime only), so a stale report can be told from a
quiet one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from agent import __version__
from agent.defaults import DEFAULT_AGENT_PORTS
from agent.errors import KubeApiError
from agent.kube.client import VEER_NODES, Api, Obj
from agent.model.snapshot import ClusterSnapshot, Store
from agent.operator.conditions import AGENT_PORTS, PolicyInput, ServiceInfo, evaluate

log = logging.getLogger(__name__)

PENDING = "Pending"
PENDING_MESSAGE = "no reconcile pass has programmed this generation yet"
HEARTBEAT_SECONDS = 60
# At most one report per this long: while Services stream in, every pass
# changes the frontend count, and a report per pass cost a status PATCH (and
# an evaluation of every Service) per pass; the wakes in between coalesce.
PACE_SECONDS = 1.0


@dataclass(frozen=True)
class AgentFacts:
    """What the agent's last reconcile pass left programmed."""

    services: int = 0  # frontends programmed
    ready: bool = False
    reason: str = "WaitingForInitialList"
    message: str = "no reconcile pass has run yet"
    # "namespace/name" -> (programmed, reason, message), per policy in force
    policies: Mapping[str, tuple[bool, str, str]] = field(default_factory=dict)


@dataclass(frozen=True)
class Identity:
    """Who writes the report."""

    mode: str  # the agent's datapath mode, as `veer agent --mode` says it (ebpf, tproxy)
    mode_reason: str = ""
    pod_name: str = ""
    version: str = __version__
    # The agent's own ports (ComputeConfig.agent_ports), for policy verdicts.
    agent_ports: tuple[tuple[int, str], ...] = DEFAULT_AGENT_PORTS


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def policy_entries(snapshot: ClusterSnapshot, mode: str,
                   programmed: Mapping[str, tuple[bool, str, str]] | None = None,
                   agent: Mapping[int, str] = AGENT_PORTS,
                   ) -> list[dict[str, Any]]:
    """The trafficPolicies of a report (pure): every policy in force here."""
    if not snapshot.traffic_policies:
        return []  # without evaluating every Service: the reporter runs this per pass
    policies = {(p.meta.namespace, p.meta.name): p for p in snapshot.traffic_policies.values()}
    inputs = [PolicyInput.of(p) for p in policies.values()]
    verdicts = evaluate(inputs, (ServiceInfo.of(s) for s in snapshot.services.values()), agent)
    out = []
    for p in sorted(inputs, key=lambda p: p.key):
        if not verdicts[p.key].in_force:
            continue
        entry: dict[str, Any] = {"namespace": p.namespace, "name": p.name}
        if policies[p.key].meta.uid:
            entry["uid"] = policies[p.key].meta.uid
        done, reason, message = (programmed or {}).get(
            f"{p.namespace}/{p.name}", (False, PENDING, PENDING_MESSAGE))
        entry.update({
            "generation": p.generation,
            "mode": mode.upper(),
            "programmed": done,
            "reason": reason,
            "message": message[:1024],
        })
        out.append(entry)
    return out


def node_status(
    snapshot: ClusterSnapshot,
    node_name: str,
    identity: Identity,
    facts: AgentFacts,
    previous: dict[str, Any] | None = None,
    now: str = "",
) -> dict[str, Any]:
    """The VeerNode status, without heartbeatTime (pure). Ready keeps the
    lastTransitionTime of `previous` while its status stays the same."""
    now = now or _now()
    ready_status = "True" if facts.ready else "False"
    since = now
    for c in (previous or {}).get("conditions") or []:
        if isinstance(c, dict) and c.get("type") == "Ready" and c.get("status") == ready_status:
            since = str(c.get("lastTransitionTime") or now)
    status: dict[str, Any] = {}
    node = snapshot.nodes.get(node_name)
    if node is not None and node.meta.uid:
        status["nodeUID"] = node.meta.uid
    if identity.pod_name:
        status["podName"] = identity.pod_name
    status.update({
        "agentVersion": identity.version,
        "mode": identity.mode.upper(),
        "modeReason": identity.mode_reason[:1024],
        "heartbeatSeconds": HEARTBEAT_SECONDS,
        "services": facts.services,
        "trafficPolicies": policy_entries(snapshot, identity.mode, facts.policies,
                                          dict(identity.agent_ports)),
        "conditions": [{
            "type": "Ready",
            "status": ready_status,
            "lastTransitionTime": since,
            "reason": facts.reason,
            "message": facts.message[:4096],
        }],
    })
    return status


def _content(status: dict[str, Any] | None) -> dict[str, Any] | None:
    if status is None:
        return None
    return {k: v for k, v in status.items() if k != "heartbeatTime"}


class NodeReporter:
    """Keeps this node's VeerNode status current (see the module doc)."""

    def __init__(
        self,
        api: Api,
        store: Store,
        node_name: str,
        identity: Identity,
        facts: Callable[[], AgentFacts] = AgentFacts,
        heartbeat: float = HEARTBEAT_SECONDS,
        retry: float = 5.0,
        pace: float = PACE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.api = api
        self.store = store
        self.node_name = node_name
        self.identity = identity
        self.facts = facts
        self.heartbeat = heartbeat
        self.retry = retry
        self.pace = pace
        self._clock = clock
        self._written: dict[str, Any] | None = None  # content last known on the server
        self._last_write = 0.0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.writes = 0  # creations and status patches
        store.subscribe(self._wake.set)

    def wake(self) -> None:
        """Something the report shows may have changed (cheap; any thread)."""
        self._wake.set()

    def _body(self) -> Obj:
        meta: dict[str, Any] = {
            "name": self.node_name,
            "labels": {"app.kubernetes.io/name": "veer", "app.kubernetes.io/component": "agent"},
        }
        node = self.store.snapshot().nodes.get(self.node_name)
        if node is not None and node.meta.uid:  # garbage-collected with the Node
            meta["ownerReferences"] = [{
                "apiVersion": "v1", "kind": "Node", "name": self.node_name,
                "uid": node.meta.uid,
            }]
        return {"apiVersion": VEER_NODES.api_version, "kind": VEER_NODES.kind,
                "metadata": meta, "spec": {}}

    def report(self) -> bool:
        """Write the report if its content changed or a heartbeat is due;
        True if anything was written. Raises KubeApiError (the caller retries)."""
        if not self.store.synced:
            return False
        created = False
        if self._written is None:
            try:
                current = self.api.get(VEER_NODES.path(name=self.node_name))
            except KubeApiError as err:
                if err.status != 404:
                    raise
                # The status subresource ignores a status given at creation.
                current = self.api.create(VEER_NODES.path(), self._body())
                created = True
                self.writes += 1
                log.info("created VeerNode %s", self.node_name)
            self._written = _content(current.get("status") or {})
        content = node_status(self.store.snapshot(), self.node_name, self.identity,
                              self.facts(), self._written)
        heartbeat_due = self._clock() - self._last_write >= self.heartbeat
        if content == self._written and not heartbeat_due:
            return created
        try:
            self.api.patch(VEER_NODES.path(name=self.node_name, subresource="status"),
                           {"status": {**content, "heartbeatTime": _now()}})
        except KubeApiError:
            self._written = None  # read it back (or make it again) first
            raise
        self.writes += 1
        self._last_write = self._clock()
        if content != self._written:
            log.info("VeerNode %s: Ready=%s, %d Service frontends, %d TrafficPolicies in force "
                     "(%d programmed)", self.node_name,
                     content["conditions"][0]["status"], content["services"],
                     len(content["trafficPolicies"]),
                     sum(1 for p in content["trafficPolicies"] if p["programmed"]))
        self._written = content
        return True

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(max(1.0, self.heartbeat - (self._clock() - self._last_write)))
            if self._stop.is_set():
                return
            self._wake.clear()
            try:
                self.report()
                self._stop.wait(self.pace)
            except Exception as err:  # never let the report stop: retry
                if isinstance(err, KubeApiError):
                    log.warning("writing VeerNode %s failed (retrying in %.0fs): %s",
                                self.node_name, self.retry, err)
                else:
                    log.exception("writing VeerNode %s failed", self.node_name)
                self._stop.wait(self.retry)
                self._wake.set()

    def start(self) -> None:
        self._wake.set()
        self._thread = threading.Thread(target=self._loop, name="veernode", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(5)
