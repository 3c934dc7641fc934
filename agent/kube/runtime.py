"""The agent's Kubernetes side, as one Source the Agent starts and stops.

    KubeRuntime(api, store, ...)   what `Agent(source=...)` builds
    .attach(agent)                 the report learns what each pass programmed
    .start() / .stop()             the reflectors (source.py), the VeerNode
                                   report (report.py) and, with
                                   --cleanup-on-uninstall, the watch of the
                                   agent's DaemonSet (uninstall.py); stop never
                                   touches the datapath
    .finish(cleanup)               after the agent stopped: if that DaemonSet
                                   is being deleted, run the cleanup
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from agent.compute.types import DesiredState, L4Addr
from agent.kube.client import Api
from agent.kube.report import AgentFacts, Identity, NodeReporter
from agent.kube.source import KubeSource
from agent.kube.uninstall import Decision, OwnerState, OwnerWatch, decide, owner_of
from agent.model.snapshot import Store
from agent.reconcile.reconciler import SyncResult
from agent.sources import SourceReport

if TYPE_CHECKING:
    from agent.daemon import Agent

log = logging.getLogger(__name__)


def agent_facts(agent: Agent) -> AgentFacts:
    """What the agent's last pass left programmed, for its VeerNode."""
    result = agent.reconciler.last_result
    if result is None:
        return AgentFacts()
    failed = agent.reconciler.failed_frontends
    desired = agent.last_desired
    # Counted without a pass over every frontend: this runs after every pass.
    services = len(desired.frontends) - sum(1 for k in failed if k in desired.frontends)
    policies = policy_facts(desired, failed, agent.datapath.policy_features,
                            agent.datapath.name)
    if not result.ok:
        return AgentFacts(services, False, "SyncFailed", "; ".join(result.errors[:5]),
                          policies)
    return AgentFacts(services, True, "Synced",
                      f"the cluster state is programmed ({services} Service frontends)",
                      policies)


def policy_facts(desired: DesiredState, failed: Collection[L4Addr],
                 supported: frozenset[str], mode: str) -> dict[str, tuple[bool, str, str]]:
    """Whether each TrafficPolicy in force is programmed on this node, and why not."""
    out: dict[str, tuple[bool, str, str]] = {}
    for name, features in desired.policies.items():
        missing = sorted(features - supported)
        frontends = [k for k, fe in desired.frontends.items() if fe.policy == name]
        broken = [k for k in frontends if k in failed]
        if missing:
            out[name] = (False, "Unsupported",
                         f"the {mode} datapath of this node does not implement "
                         f"{', '.join(missing)} yet")
        elif broken:
            out[name] = (False, "SyncFailed",
                         f"{len(broken)} of its {len(frontends)} frontends failed to program "
                         f"(first: {broken[0]})")
        else:
            out[name] = (True, "Programmed",
                         f"in force on {len(frontends)} frontends of this node")
    return out


@dataclass(frozen=True)
class Uninstall:
    """How to tell an uninstall (--cleanup-on-uninstall)."""

    owner: tuple[str, str] | None = None  # --owner-daemonset NS/NAME
    pod_namespace: str = ""  # else: the owner of this Pod
    pod_name: str = ""


class KubeRuntime:
    kind = "kubernetes"

    def __init__(self, api: Api, store: Store, node_name: str, identity: Identity,
                 uninstall: Uninstall | None = None) -> None:
        self.api = api
        self.source = KubeSource(api, store, node_name)
        self.reporter = NodeReporter(api, store, node_name, identity)
        self.uninstall = uninstall
        self.owner: OwnerWatch | None = None
        self._unknown_owner = ""

    def attach(self, agent: Agent) -> None:
        self.reporter.facts = lambda: agent_facts(agent)
        agent.sync_listeners.append(self._synced)

    def _synced(self, _result: SyncResult) -> None:
        self.reporter.wake()

    @property
    def location(self) -> str:
        return self.source.location

    @property
    def last_report(self) -> SourceReport:
        return self.source.last_report

    def _watch_owner(self, uninstall: Uninstall) -> None:
        owner = uninstall.owner or owner_of(self.api, uninstall.pod_namespace,
                                            uninstall.pod_name)
        if isinstance(owner, str):
            self._unknown_owner = owner
            log.warning("--cleanup-on-uninstall: %s; an uninstall will leave the datapath "
                        "in place", owner)
            return
        self.owner = OwnerWatch(self.api, OwnerState(*owner))
        self.owner.start()
        log.info("following DaemonSet %s/%s: the datapath is removed if it is deleted",
                 *owner)

    def start(self) -> None:
        self.source.start()
        self.reporter.start()
        if self.uninstall is not None:
            self._watch_owner(self.uninstall)

    def stop(self) -> None:
        if self.owner is not None:
            self.owner.stop()
        self.reporter.stop()
        self.source.stop()

    def finish(self, cleanup: Callable[[], Iterable[str]]) -> Decision:
        """Decide whether veer is being uninstalled; if so, run `cleanup`."""
        if self.uninstall is None:
            return Decision(False, "--cleanup-on-uninstall is off")
        state = self.owner.snapshot() if self.owner is not None else None
        decision = decide(self.api, state, self._unknown_owner)
        if not decision.uninstalling:
            log.info("leaving the datapath in place: %s", decision.why)
            return decision
        log.info("veer is being uninstalled (%s): removing its programs, pins and rules",
                 decision.why)
        for line in cleanup():
            log.info("%s", line)
        return decision
