"""Leader election on a coordination.k8s.io/v1 Lease, as client-go does it.

The chart runs two operator replicas; one leads, the other waits. Why a
Lease and not kopf's peering: kopf's peering needs its own CRDs
(KopfPeering) installed and pauses operators of *equal* priority all
together, so two identical replicas would both stop; a Lease is what every
Kubernetes controller uses, needs no CRD, and its state is readable with
`kubectl get lease`.

    spec.holderIdentity         who leads ("" after a clean release)
    spec.renewTime              the leader writes it every `retry_period` s
    spec.leaseDurationSeconds   how long others wait after the last renewal
                                they saw before taking over

- A candidate takes the Lease when it is free, or when the holder's record
  has not changed for `lease_duration` seconds *of the candidate's own clock*
  (it measures since it observed the last change, so clock skew between
  nodes does not matter).
- Every write is an update with the resourceVersion read (409 Conflict:
  someone else wrote first, try again), so two candidates never both win.
- The leader renews every `retry_period`; if it cannot for `renew_deadline`
  (< lease_duration), it has lost: it must stop acting before another
  candidate may take over.
- On a clean stop the leader releases the Lease (empty holder), so the
  other replica takes over at once instead of after `lease_duration`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from agent.errors import KubeApiError
from agent.kube.client import LEASES, Api

log = logging.getLogger(__name__)


def micro_time() -> str:
    """metav1.MicroTime: RFC 3339 with microseconds, in UTC."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElector:
    def __init__(
        self,
        api: Api,
        namespace: str,
        name: str,
        identity: str,
        lease_duration: float = 15.0,
        renew_deadline: float = 10.0,
        retry_period: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], str] = micro_time,
    ) -> None:
        if not renew_deadline < lease_duration:
            raise ValueError("renew_deadline must be shorter than lease_duration")
        self.api = api
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self.lease_duration = lease_duration
        self.renew_deadline = renew_deadline
        self.retry_period = retry_period
        self._clock = clock
        self._wall = wall
        self._observed: dict[str, Any] | None = None  # the holder's last spec seen
        self._observed_at = 0.0
        self._renewed_at: float | None = None  # when we last wrote the Lease as holder
        self.holder = ""  # the holder last seen

    @property
    def path(self) -> str:
        return LEASES.path(self.namespace, self.name)

    @property
    def leading(self) -> bool:
        return self._renewed_at is not None

    def _spec(self, old: dict[str, Any]) -> dict[str, Any]:
        now = self._wall()
        mine = old.get("holderIdentity") == self.identity
        transitions = int(old.get("leaseTransitions") or 0)
        return {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": max(1, round(self.lease_duration)),
            "acquireTime": old.get("acquireTime") if mine and old.get("acquireTime") else now,
            "renewTime": now,
            "leaseTransitions": transitions if mine else transitions + 1,
        }

    def try_acquire_or_renew(self) -> bool:
        """One attempt; True if this candidate holds the Lease afterwards."""
        try:
            lease = self.api.get(self.path)
        except KubeApiError as err:
            if err.status != 404:
                log.warning("reading Lease %s/%s: %s", self.namespace, self.name, err)
                return False
            try:
                self.api.create(LEASES.path(self.namespace), {
                    "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": self.name, "namespace": self.namespace},
                    "spec": {**self._spec({}), "leaseTransitions": 0},
                })
            except KubeApiError as err2:
                log.info("creating Lease %s/%s: %s", self.namespace, self.name, err2)
                return False
            self._won()
            return True
        spec = dict(lease.get("spec") or {})
        now = self._clock()
        if spec != self._observed:
            self._observed, self._observed_at = spec, now
        holder = str(spec.get("holderIdentity") or "")
        self.holder = holder
        if holder and holder != self.identity:
            duration = float(spec.get("leaseDurationSeconds") or self.lease_duration)
            if now - self._observed_at < duration:
                return False  # held by another, and alive as far as we can tell
        body = dict(lease)
        body["spec"] = self._spec(spec)
        try:
            self.api.replace(self.path, body)  # carries metadata.resourceVersion
        except KubeApiError as err:
            if err.status != 409:
                log.warning("updating Lease %s/%s: %s", self.namespace, self.name, err)
            return False
        if holder != self.identity:
            log.info("took over Lease %s/%s from %r", self.namespace, self.name, holder)
        self._won()
        return True

    def _won(self) -> None:
        self._renewed_at = self._clock()
        self.holder = self.identity

    def acquire(self, stop: threading.Event) -> bool:
        """Block until this candidate leads (True) or `stop` is set (False)."""
        logged = False
        while not stop.is_set():
            if self.try_acquire_or_renew():
                log.info("leading: Lease %s/%s held by %s", self.namespace, self.name,
                         self.identity)
                return True
            if not logged and self.holder:
                log.info("waiting: Lease %s/%s is held by %s", self.namespace, self.name,
                         self.holder)
                logged = True
            stop.wait(self.retry_period)
        return False

    def renew(self) -> bool:
        """Renew once; False once leadership is lost (not renewed within
        renew_deadline, or someone else holds the Lease)."""
        if self._renewed_at is None:
            return False
        if self.try_acquire_or_renew():
            return True
        if self.holder and self.holder != self.identity:
            log.error("lost Lease %s/%s to %s", self.namespace, self.name, self.holder)
            self._renewed_at = None
            return False
        if self._clock() - self._renewed_at >= self.renew_deadline:
            log.error("could not renew Lease %s/%s for %.0fs: leadership lost",
                      self.namespace, self.name, self.renew_deadline)
            self._renewed_at = None
            return False
        return True

    def release(self) -> None:
        """Give the Lease up (best effort), so another candidate leads at once."""
        if self._renewed_at is None:
            return
        self._renewed_at = None
        try:
            lease = self.api.get(self.path)
            spec = dict(lease.get("spec") or {})
            if spec.get("holderIdentity") != self.identity:
                log.info("not releasing Lease %s/%s: %s holds it", self.namespace, self.name,
                         spec.get("holderIdentity"))
                return
            now = self._wall()
            spec.update(holderIdentity="", leaseDurationSeconds=1, renewTime=now,
                        acquireTime=now)
            self.api.replace(self.path, {**lease, "spec": spec})
            log.info("released Lease %s/%s", self.namespace, self.name)
        except KubeApiError as err:
            log.warning("releasing Lease %s/%s: %s", self.namespace, self.name, err)
