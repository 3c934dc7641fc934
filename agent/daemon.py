"""The agent process: wires a source, compute, the reconciler and a datapath.

    Source ──> Store ──(wake)──> BoundedFrequencyRunner ──> Reconciler ──> Datapath
                                          compute_desired(snapshot) ─┘

The source is a manifest directory (agent/sources/manifests.py) or the
Kubernetes API server (agent/kube/), handed in as a factory of the Store.

Nothing is programmed until the source has delivered one complete view, so a
restart never prunes state from a partial picture. SIGTERM/SIGINT stop the
agent and leave the datapath in place; the kernel keeps serving with it.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType

from agent import __version__
from agent.compute import ComputeConfig, DesiredState, NodeIdentity, compute_desired
from agent.compute.desired import ComputeCache
from agent.compute.node import identity_of
from agent.compute.types import L4Addr
from agent.config import AgentConfig
from agent.datapath.flows import FlowHub, ServiceNames
from agent.datapath.interface import Datapath
from agent.errors import ConfigError, VeerError
from agent.health.service_checks import ServiceHealthServers
from agent.model.snapshot import Store
from agent.reconcile.reconciler import Reconciler, SyncResult
from agent.reconcile.runner import BoundedFrequencyRunner
from agent.serve import ServeOptions, Servers
from agent.sources import Source
from agent.sources.manifests import ManifestSource
from agent.status import StatusFile
from agent.telemetry import Telemetry

log = logging.getLogger("veer.agent")

RETRY_AFTER_FAILURE = 1.0
# Passes that may run back to back before --min-sync-interval paces them.
# kube-proxy allows 2, because each of its passes rewrites a whole ruleset;
# an incremental pass here costs what it changes. A new Service is two
# changes (the Service, then its EndpointSlice), so with 2 a Service created
# within a second of any other change waited a whole interval for its
# endpoints. With 4 it is programmed at once after an isolated change, and a
# steady stream of changes still gets one pass per interval. Right after a
# busy spell the bucket is empty whatever its size: there the interval itself
# decides (the chart's 0.1 s; with 1 s, make bench still printed 766-874 ms
# for one more Service at N = 1,000, compare-20261126-082733).
SYNC_BURST = 4
STATUS_INTERVAL = 0.5  # the status file is rewritten at most this often
STATUS_MAX_INTERVAL = 3600.0  # (and then only when a pass asked for it)


@dataclass(frozen=True)
class ModeChoice:
    """The datapath mode, why, and what the kernel probe found (empty when no
    probe ran: --mode tproxy needs none)."""

    mode: str
    why: str
    found: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()
    # sockmap acceleration: (usable on this kernel, why)
    sockmap: tuple[bool, str] = (False, "not probed")


def choose_mode(config: AgentConfig, hidden_features: tuple[str, ...] = ()) -> ModeChoice:
    """The mode, from the mode asked for and a probe of the kernel.

    eBPF mode needs every program type, map type and helper listed in
    agent/datapath/ebpf/probe.py. `auto` falls back to TPROXY mode (nftables
    tproxy and a proxy in the agent, agent/datapath/tproxy/) on a kernel that
    lacks one, naming it; `ebpf` on such a kernel fails at start.
    """
    if config.mode == "tproxy":
        return ModeChoice("tproxy", "requested with --mode tproxy")
    from agent.datapath.ebpf.probe import probe, sockmap_verdict

    features = probe(hidden_features)
    found, lacking = features.found, features.missing
    accel = sockmap_verdict(features, os.uname().release)
    if not features.ebpf_ready:
        missing = ", ".join(features.missing)
        if config.mode == "ebpf":
            raise ConfigError(f"--mode ebpf: this kernel lacks {missing}")
        if config.nodeport_mode == "dsr":
            # The other nodes send this one DSR flows: falling back to TPROXY
            # would leave their replies unrestored.
            raise ConfigError(f"--nodeport-mode dsr needs eBPF mode: this kernel lacks "
                              f"{missing}")
        return ModeChoice(
            "tproxy", f"auto: this kernel lacks {missing}, which eBPF mode needs; using the "
            "TPROXY fallback (nftables tproxy and a proxy in the agent)", found, lacking,
            (False, "TPROXY mode"))
    checked = len(features.found)
    if config.mode == "ebpf":
        return ModeChoice("ebpf", f"requested with --mode ebpf; the kernel has all {checked} "
                          "features it needs", found, lacking, accel)
    return ModeChoice("ebpf", f"auto: the kernel has all {checked} features eBPF mode needs",
                      found, lacking, accel)


def open_datapath(config: AgentConfig, mode: str,
                  sockmap: tuple[bool, str] = (False, "not probed")) -> Datapath:
    """The datapath of the chosen mode."""
    if mode == "tproxy":
        from agent.datapath.tproxy.backend import TproxyDatapath

        return TproxyDatapath(devices=config.devices)
    return open_ebpf_datapath(config, sockmap)


def open_ebpf_datapath(config: AgentConfig,
                       sockmap: tuple[bool, str] = (False, "not probed")) -> Datapath:
    # Imported here: only the datapath package may load BCC.
    from agent.datapath.ebpf.backend import EbpfDatapath
    from agent.datapath.ebpf.env import cgroup2_root, check_bpffs, check_root
    from agent.datapath.ebpf.maps import SockLbMaps
    from agent.datapath.ebpf.programs import SockLbPrograms

    check_root()
    check_bpffs(config.bpffs)
    cgroup = config.cgroup or cgroup2_root()
    # sockmap acceleration is compiled in wherever the probe allows it, so a
    # policy can ask for it without a restart.
    programs = SockLbPrograms(config.bpffs, sockmap=sockmap[0],
                              dsr=config.nodeport_mode == "dsr")
    programs.load()
    programs.attach(cgroup)
    return EbpfDatapath(SockLbMaps.open(config.bpffs), programs, config.proxy_uid, sockmap)


class Agent:
    def __init__(
        self,
        config: AgentConfig,
        datapath: Datapath,
        status_file: str | None = None,
        mode: tuple[str, str] | None = None,
        serve: ServeOptions | None = None,
        source: Callable[[Store], Source] | None = None,
        kernel_features: tuple[tuple[str, ...], tuple[str, ...]] = ((), ()),
    ):
        self.config = config
        self.datapath = datapath
        self.status_file = status_file
        self._status = StatusFile(status_file) if status_file else None
        # What the status file should say: set after every pass, written by
        # the status runner (its own thread) at most every STATUS_INTERVAL;
        # the first write after a quiet spell is immediate, the last of a
        # stream always comes. A write lists every frontend, so a write per
        # pass would cost O(N) per event while Services stream in.
        self._status_lock = threading.Lock()
        self._status_due: tuple[SyncResult, DesiredState, frozenset[L4Addr]] | None = None
        self.status_runner = BoundedFrequencyRunner(
            "status", self._write_status, min_interval=STATUS_INTERVAL,
            max_interval=STATUS_MAX_INTERVAL, burst=1)
        self.store = Store()
        self.source: Source
        if source is not None:
            self.source = source(self.store)
        elif config.manifests:
            self.source = ManifestSource(config.manifests, self.store, config.scan_interval)
        else:
            raise ConfigError("--manifests DIR or --kubernetes is required")
        # Called after every reconcile pass (with its result), from the runner's thread.
        self.sync_listeners: list[Callable[[SyncResult], None]] = []
        self.compute_config = ComputeConfig(
            sockmap=config.sockmap,
            service_proxy_name=config.service_proxy_name,
            service_cidrs=config.service_cidrs,
            nodeport_addresses=config.nodeport_addresses,
            cluster_cidrs=config.cluster_cidrs,
            agent_ports=config.agent_ports,
        )
        # A change to one Service recomputes that Service only (the runner's
        # thread is the only caller).
        self._compute_cache = ComputeCache()
        self.reconciler = Reconciler(datapath, self._desired)
        self.runner = BoundedFrequencyRunner(
            "sync",
            self._sync,
            min_interval=config.min_sync_interval,
            max_interval=config.max_sync_interval,
            burst=SYNC_BURST,
        )
        self.last_desired = DesiredState()
        self._stopped = threading.Event()
        # What `veer status` and the metrics report, and where they are served.
        self.mode = mode or (datapath.name, "")  # (mode, why it was chosen)
        # (found, missing): what the kernel probe said, for `veer status`.
        self.kernel_features = kernel_features
        self.telemetry = Telemetry()
        # Flow events from the kernel, for `veer observe` and the flow metrics.
        self.flows = FlowHub(ServiceNames(lambda: self.last_desired, datapath.frontend_of),
                             trace=datapath.trace_translations)
        self.store.subscribe_queued(self.telemetry.note_queued)
        self.store.subscribe_changes(self.telemetry.note_changes)
        # Woken after telemetry heard of the change (the Store calls its
        # listeners in that order): a change is noted before the pass it
        # wakes reads it (the network programming latency counts it in that
        # pass).
        self.store.subscribe(self.runner.run)
        self.servers = Servers(self, serve or ServeOptions())
        # healthCheckNodePort servers; "proxy healthy" once a first pass is done.
        self.health_checks = ServiceHealthServers(
            lambda: self.reconciler.last_result is not None
        )

    def node_identity(self) -> NodeIdentity:
        """This node as its Node object describes it: zone and addresses."""
        return identity_of(self.store.snapshot(), self.config.node_name)

    def _desired(self) -> DesiredState:
        self.last_desired = compute_desired(
            self.store.snapshot(), self.node_identity(), self.compute_config, self._compute_cache
        )
        return self.last_desired

    def _sync(self, periodic: bool) -> bool:
        """One reconcile pass; False if it found nothing to do (the runner
        then does not count it against --min-sync-interval)."""
        if not self.store.synced:
            return False
        result = self.reconciler.sync(full=periodic)
        try:
            self.datapath.serve_devices(list(self.config.devices),
                                        self.last_desired.node_addresses)
        except VeerError as err:
            result.errors.append(f"per-packet path: {err}")
        for problem in self.health_checks.sync(self.last_desired.health_checks):
            log.warning("%s", problem)
        self.telemetry.record_sync(result)
        for listener in self.sync_listeners:
            listener(result)
        if not result.ok:
            self.runner.retry_after(RETRY_AFTER_FAILURE)
        if self._status is not None:
            with self._status_lock:
                self._status_due = (result, self.last_desired,
                                    frozenset(self.reconciler.failed_frontends))
            self.status_runner.run()
        # Only an incremental pass that wrote nothing is free: a full pass
        # reads every map, and a failed one is retried on its own schedule.
        return result.full or result.changed > 0 or not result.ok

    def _write_status(self, _periodic: bool = False) -> None:
        with self._status_lock:
            due, self._status_due = self._status_due, None
        if self._status is None or due is None:
            return
        result, desired, failed = due
        self._status.write({
            "version": __version__,
            "node": self.config.node_name,
            "datapath": self.datapath.name,
            "mode": self.mode[0],
            "mode_reason": self.mode[1],
            "nodeport_mode": self.config.nodeport_mode,
            "time": time.time(),
            "full": result.full,
            "ok": result.ok,
            "errors": result.errors,
            "problems": [str(p) for p in desired.problems],
            # TrafficPolicies in force, with the features each uses.
            "policies": {name: sorted(f) for name, f in desired.policies.items()},
            "manifest_problems": list(self.source.last_report.problems),
            "counters": dict(self.datapath.counters()),
        }, desired.frontends, failed)
        # "frontends" and "external_frontends" (NodePort/ExternalIP/LB:
        # backends for traffic from outside) are added by StatusFile.

    def start(self) -> None:
        self.datapath.start_flow_events(self.flows.publish)
        self.servers.start()
        self.runner.start()
        if self._status is not None:
            self.status_runner.start()
        self.source.start()

    def stop(self) -> None:
        self.health_checks.stop()
        self.servers.stop()
        self._stopped.set()
        self.source.stop()
        self.runner.stop()
        self.status_runner.stop()
        self._write_status()  # what the last pass did, if not written yet
        self.datapath.close()

    def run_forever(self) -> None:
        def on_signal(signum: int, _frame: FrameType | None) -> None:
            log.info("received %s; stopping (the datapath stays in place)",
                     signal.Signals(signum).name)
            self._stopped.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        self.start()
        log.info("veer %s agent running for node %s", __version__, self.config.node_name)
        while not self._stopped.wait(1.0):
            pass
        self.stop()
