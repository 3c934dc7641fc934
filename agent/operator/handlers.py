"""The operator's kopf handlers: indexes in, TrafficPolicy status and Events out.

    @kopf.index   trafficpolicies ─┐
    @kopf.index   services        ─┼─> StatusWriter (one task): evaluate every
    @kopf.index   veernodes       ─┘   policy (conditions.py), patch the status
    @kopf.on.event on each kind ──poke──>  of those that differ, post the Events
                                           of their transitions

- Level-triggered: any change of a policy, a Service or a VeerNode recomputes
  every policy's status from the indexes, so a Service that appears clears its
  policies' TargetNotFound without touching them, a deleted policy releases
  the Services it won, and a new VeerNode report moves "n/m". Bursts (the
  initial listing) are coalesced into one pass; a pass also runs every
  `period` seconds, so a VeerNode whose heartbeat goes stale is noticed.
- kopf does not run the event handlers before every index is filled, so the
  first pass sees the whole cluster, never a partial one.
- Only `status` is written (the status subresource, a JSON merge patch), and
  only when it differs from what the policy holds (or from what this
  operator wrote and has not seen come back yet). @kopf.on.event handlers
  leave no finalizers or annotations on users' objects: policy deletion
  needs no cleanup, the next pass simply no longer sees it.
- Events are posted with kopf.event on the policy (kopf's poster, with its
  retries): Normal Accepted / ResolvedRefs / Programmed, Warning Conflicted /
  Invalid / TargetNotFound / BackendNotFound (conditions.transitions).

A known limit, kopf's (1.45): when a watch breaks and kopf lists again, it
re-delivers what exists but nothing for what was deleted meanwhile, so an
object deleted while the operator's watch was down stays in its index (a
Service so deleted still resolves its policies) until the operator
restarts. The agent, which must not keep a deleted Service programmed, uses
its own list+watch for that reason (agent/kube/source.py); for the operator,
a status that lags such a deletion is the lesser cost.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, TypeVar, cast

import kopf

from agent.errors import KubeApiError, ModelError
from agent.kube.client import TRAFFIC_POLICIES, Api
from agent.model.objects import TrafficPolicy
from agent.model.parse import parse_object, parse_service
from agent.operator.conditions import (
    AGENT_PORTS,
    Event,
    NodeReport,
    PolicyInput,
    ServiceInfo,
    aggregate,
    evaluate,
    policy_status,
    transitions,
)

log = logging.getLogger(__name__)

GROUP, VERSION = "veer.dev", "v1alpha1"
K = TypeVar("K")
V = TypeVar("V")
Index = Mapping[K, Iterable[V]]  # what kopf.Index offers: key -> the values stored
PERIOD = 30.0  # seconds between passes without any change (stale heartbeats)
COALESCE = 0.2  # seconds to gather a burst of changes into one pass


def policy_input(body: Mapping[str, Any]) -> PolicyInput:
    """A TrafficPolicy body as the API server holds it, parsed or why not."""
    meta = body.get("metadata") or {}
    namespace, name = str(meta.get("namespace") or ""), str(meta.get("name") or "")
    generation = int(meta.get("generation") or 0)
    created = str(meta.get("creationTimestamp") or "")
    uid = str(meta.get("uid") or "")
    try:
        obj = parse_object(body)
    except ModelError as err:
        return PolicyInput(namespace, name, generation, created, None, str(err), uid)
    assert isinstance(obj, TrafficPolicy)
    return PolicyInput.of(obj)


def service_info(body: Mapping[str, Any]) -> ServiceInfo:
    meta = body.get("metadata") or {}
    try:
        return ServiceInfo.of(parse_service(body))
    except ModelError:
        # A Service the API server accepted exists, whatever veer makes of it.
        return ServiceInfo(str(meta.get("namespace") or ""), str(meta.get("name") or ""))


def merge_patch(current: Mapping[str, Any], desired: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON merge patch (RFC 7386) that turns `current` into `desired`:
    keys absent from `desired` are removed (null), lists replaced."""
    patch: dict[str, Any] = {k: None for k in current if k not in desired}
    for key, value in desired.items():
        old = current.get(key)
        if isinstance(value, Mapping) and isinstance(old, Mapping):
            if old != value:
                patch[key] = merge_patch(old, value)
        elif old != value:
            patch[key] = value
    return patch


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def kopf_event(body: Mapping[str, Any], event: Event) -> None:
    """Post an Event on the object through kopf's poster (from kopf's context)."""
    kopf.event(kopf.Body(cast(kopf.RawBody, body)), type=event.type, reason=event.reason,
               message=event.message)


class StatusWriter:
    """Keeps every TrafficPolicy's status equal to what conditions.py says."""

    def __init__(self, api: Api, period: float = PERIOD,
                 emit: Callable[[Mapping[str, Any], Event], None] = kopf_event,
                 agent: Mapping[int, str] = AGENT_PORTS) -> None:
        self.api = api
        self.agent = agent  # the agents' own ports (conditions.agent_ports)
        self.period = period
        self.emit = emit
        # kopf's indexes (or any mapping of key -> values, in tests)
        self.policies: Index[tuple[str, str], dict[str, Any]] | None = None
        self.services: Index[tuple[str, str], ServiceInfo] | None = None
        self.veernodes: Index[str, NodeReport] | None = None
        self._dirty: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        # (namespace, name) -> (resourceVersion it was computed from, status written)
        self._written: dict[tuple[str, str], tuple[str, dict[str, Any]]] = {}
        self.passes = 0
        self.patches = 0

    def poke(self, policies: Index[tuple[str, str], dict[str, Any]],
             services: Index[tuple[str, str], ServiceInfo],
             veernodes: Index[str, NodeReport]) -> None:
        """Something changed: recompute soon. Called from kopf handlers (the
        first call starts the writer's task, in kopf's context, so that
        kopf.event works from it)."""
        self.policies, self.services, self.veernodes = policies, services, veernodes
        if self._dirty is None:
            self._dirty = asyncio.Event()
        self._dirty.set()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="veer status writer")

    async def _run(self) -> None:
        assert self._dirty is not None
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._dirty.wait(), self.period)
            await asyncio.sleep(COALESCE)
            self._dirty.clear()
            try:
                await self.write_all()
            except Exception:  # keep writing: the next pass retries everything
                log.exception("writing TrafficPolicy statuses failed; retrying")
                await asyncio.sleep(1.0)
                self._dirty.set()

    async def write_all(self) -> None:
        """One pass over every policy."""
        if self.policies is None or self.services is None or self.veernodes is None:
            return
        bodies = {key: body for key, store in self.policies.items() for body in store}
        inputs = [policy_input(body) for body in bodies.values()]
        services = [info for store in self.services.values() for info in store]
        reports = [r for store in self.veernodes.values() for r in store]
        verdicts = evaluate(inputs, services, self.agent)
        now, stamp = time.time(), _now()
        failed = 0
        for p in sorted(inputs, key=lambda p: p.key):
            body = bodies[p.key]
            version = str((body.get("metadata") or {}).get("resourceVersion") or "")
            current: dict[str, Any] = dict(body.get("status") or {})
            written = self._written.get(p.key)
            if written is not None and written[0] == version:
                current = written[1]  # our last patch has not come back through the watch yet
            verdict = verdicts[p.key]
            desired = policy_status(p, verdict, aggregate(p, verdict, reports, now),
                                    current, stamp)
            if desired == current:
                continue
            try:
                await asyncio.to_thread(
                    self.api.patch, TRAFFIC_POLICIES.path(p.namespace, p.name, "status"),
                    {"status": merge_patch(current, desired)})
            except KubeApiError as err:
                if err.status != 404:  # 404: deleted meanwhile, nothing to report
                    failed += 1
                    log.warning("TrafficPolicy %s/%s: writing its status failed: %s",
                                p.namespace, p.name, err)
                continue
            self.patches += 1
            self._written[p.key] = (version, desired)
            for event in transitions(current, desired):
                self.emit(body, event)
            log.info("TrafficPolicy %s/%s: %s", p.namespace, p.name, ", ".join(
                f"{c['type']}={c['status']}/{c['reason']}" for c in desired["conditions"]
            ) + f", programmed {desired['programmed']}")
        for key in list(self._written):
            if key not in bodies:
                del self._written[key]
        self.passes += 1
        if failed and self._dirty is not None:
            await asyncio.sleep(1.0)
            self._dirty.set()


def make_registry(writer: StatusWriter) -> kopf.OperatorRegistry:
    """The operator's handlers, in a registry of their own."""
    registry = kopf.OperatorRegistry()

    # The ids name the indexes in the handlers' keyword arguments.
    @kopf.index(GROUP, VERSION, "trafficpolicies", registry=registry, id="policies")
    def policies(body: kopf.Body, namespace: str | None, name: str | None,
                 **_: Any) -> dict[tuple[str, str], dict[str, Any]]:
        return {(namespace or "", name or ""): copy.deepcopy(dict(body))}

    @kopf.index("v1", "services", registry=registry, id="services")
    def services(body: kopf.Body, namespace: str | None, name: str | None,
                 **_: Any) -> dict[tuple[str, str], ServiceInfo]:
        raw = {"apiVersion": "v1", "kind": "Service", **copy.deepcopy(dict(body))}
        return {(namespace or "", name or ""): service_info(raw)}

    @kopf.index(GROUP, VERSION, "veernodes", registry=registry, id="veernodes")
    def veernodes(name: str | None, status: kopf.Status, **_: Any) -> dict[str, NodeReport]:
        return {name or "": NodeReport.of(name or "", copy.deepcopy(dict(status)))}

    def changed(policies: kopf.Index[tuple[str, str], dict[str, Any]],
                services: kopf.Index[tuple[str, str], ServiceInfo],
                veernodes: kopf.Index[str, NodeReport], **_: Any) -> None:
        writer.poke(policies, services, veernodes)

    async def on_change(**kwargs: Any) -> None:
        changed(**kwargs)

    kopf.on.event(GROUP, VERSION, "trafficpolicies", registry=registry,
                  id="trafficpolicy-changed")(on_change)
    kopf.on.event("v1", "services", registry=registry, id="service-changed")(on_change)
    kopf.on.event(GROUP, VERSION, "veernodes", registry=registry,
                  id="veernode-changed")(on_change)
    return registry
