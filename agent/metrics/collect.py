"""The agent's metrics.

kube-proxy's names where the meaning is the same, so dashboards and alerts
written for kube-proxy keep working (their help text is kube-proxy's):

    kubeproxy_sync_proxy_rules_duration_seconds                histogram, every pass
    kubeproxy_sync_full_proxy_rules_duration_seconds           histogram, full passes
    kubeproxy_sync_partial_proxy_rules_duration_seconds        histogram, incremental passes
    kubeproxy_sync_proxy_rules_last_timestamp_seconds          end of the last successful pass
    kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds   last change that asked for a pass
    kubeproxy_sync_proxy_rules_service_changes_total           Service objects changed
    kubeproxy_sync_proxy_rules_endpoint_changes_total          EndpointSlice objects changed
    kubeproxy_network_programming_duration_seconds             histogram, EndpointSlice
                                                               trigger time to programmed

and veer's own (veer_*), listed in docs/debugging.md. `gather(agent)` reads
the agent (cheap: counters, map sizes, the last desired state; no compute);
`families(inputs)` is pure, so the exposition is unit-tested.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from agent import __version__
from agent.compute.types import DesiredState, L4Addr
from agent.datapath.flows import FlowStats
from agent.datapath.interface import MapUsage
from agent.metrics.exposition import MetricFamily
from agent.metrics.threads import thread_cpu_seconds
from agent.telemetry import Histogram, TelemetrySnapshot

# The kernel's rule number for "no rule matched: the default action decided"
# (VEER_RULE_DEFAULT in bpf/veer_structs.h).
RULE_DEFAULT = 0xFFFF

if TYPE_CHECKING:
    from agent.daemon import Agent


@dataclass
class MetricsInput:
    telemetry: TelemetrySnapshot
    mode: str
    maps: Sequence[MapUsage]
    counters: Mapping[str, int]
    programs_attached: int
    skipped: Mapping[str, int]  # reason -> Services (ports) skipped
    manifest_problems: int
    frontends: int
    frontends_failed: int
    source_synced: bool
    version: str = __version__
    flows: FlowStats | None = None  # the flow hub's aggregates (flow events)
    modes: Sequence[str] = ("ebpf", "tproxy")
    # (policy, rule) -> hits of TrafficPolicy access rules; rule is
    # "rules[N]" or "defaultAction".
    access_hits: Mapping[tuple[str, str], int] = field(default_factory=dict)
    thread_cpu: Mapping[str, float] = field(default_factory=dict)  # thread name -> seconds


def _histogram(name: str, help_text: str, h: Histogram) -> MetricFamily:
    return MetricFamily(name, "histogram", help_text).add_histogram(h.cumulative(), h.sum)


def families(m: MetricsInput) -> list[MetricFamily]:
    t = m.telemetry
    out = [
        _histogram("kubeproxy_sync_proxy_rules_duration_seconds",
                   "SyncProxyRules latency in seconds", t.all_syncs),
        _histogram("kubeproxy_sync_full_proxy_rules_duration_seconds",
                   "SyncProxyRules latency in seconds for full resyncs", t.full_syncs),
        _histogram("kubeproxy_sync_partial_proxy_rules_duration_seconds",
                   "SyncProxyRules latency in seconds for partial resyncs", t.partial_syncs),
        MetricFamily("kubeproxy_sync_proxy_rules_last_timestamp_seconds", "gauge",
                     "The last time proxy rules were successfully synced")
        .add(t.last_success_time),
        MetricFamily("kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds", "gauge",
                     "The last time a sync of proxy rules was queued").add(t.last_queued_time),
        MetricFamily("kubeproxy_sync_proxy_rules_service_changes_total", "counter",
                     "Cumulative proxy rules Service changes").add(t.service_changes),
        MetricFamily("kubeproxy_sync_proxy_rules_endpoint_changes_total", "counter",
                     "Cumulative proxy rules Endpoint changes").add(t.endpoint_changes),
        _histogram("kubeproxy_network_programming_duration_seconds",
                   "In Cluster Network Programming Latency in seconds", t.network_programming),
        MetricFamily("veer_build_info", "gauge", "The running veer version (always 1)")
        .add(1, {"version": m.version}),
    ]
    mode = MetricFamily("veer_datapath_mode", "gauge",
                        "1 for the datapath mode the agent runs in, 0 for the others")
    for name in sorted({*m.modes, m.mode}):
        mode.add(1 if name == m.mode else 0, {"mode": name})
    out.append(mode)
    out.append(MetricFamily("veer_programs_attached", "gauge",
                            "BPF programs attached at veer's hooks, read from the kernel")
               .add(m.programs_attached))
    entries = MetricFamily("veer_map_entries", "gauge", "Entries in each BPF map")
    capacity = MetricFamily("veer_map_capacity", "gauge", "Maximum entries of each BPF map")
    for usage in m.maps:
        entries.add(usage.entries, {"map": usage.name})
        capacity.add(usage.capacity, {"map": usage.name})
    out += [entries, capacity]
    events = MetricFamily("veer_socket_lb_events_total", "counter",
                          "Verdicts counted by veer's BPF programs, by event (the "
                          "veer_counters map, summed over CPUs, since it was created)")
    for name, value in m.counters.items():
        events.add(value, {"event": name})
    out.append(events)
    skipped = MetricFamily("veer_services_skipped", "gauge",
                           "Services (or ports of them) the datapath cannot serve, by reason")
    for reason, n in sorted(m.skipped.items()):
        skipped.add(n, {"reason": reason})
    out.append(skipped)
    out += [
        MetricFamily("veer_manifest_problems", "gauge",
                     "Manifest files or objects that could not be used").add(m.manifest_problems),
        MetricFamily("veer_frontends", "gauge", "Frontends in the desired state")
        .add(m.frontends),
        MetricFamily("veer_frontends_failed", "gauge",
                     "Frontends whose last write to the datapath failed").add(m.frontends_failed),
        MetricFamily("veer_sync_passes_total", "counter", "Reconcile passes run").add(t.passes),
        MetricFamily("veer_sync_errors_total", "counter",
                     "Datapath operations that failed during reconcile passes")
        .add(t.sync_errors),
        MetricFamily("veer_source_synced", "gauge",
                     "1 once the source has delivered a complete view").add(int(m.source_synced)),
    ]
    hits = MetricFamily("veer_access_rule_hits_total", "counter",
                        "Connections (socket path) and new flows (per-packet path) decided "
                        "by each TrafficPolicy access rule, or by its default action")
    for (policy, rule), n in sorted(m.access_hits.items()):
        hits.add(n, {"policy": policy, "rule": rule})
    out.append(hits)
    threads = MetricFamily("veer_thread_cpu_seconds_total", "counter",
                           "CPU seconds (user and system) of the agent's threads alive now, "
                           "by thread name")
    for name, seconds in sorted(m.thread_cpu.items()):
        threads.add(seconds, {"thread": name})
    out.append(threads)
    if m.flows is not None:
        out += flow_families(m.flows, m.counters.get("events_lost", 0))
    return out


def access_hits_by_policy(
    hits: Mapping[tuple[int, int], int],
    frontend_of: Callable[[int], L4Addr | None],
    desired: DesiredState,
) -> dict[tuple[str, str], int]:
    """The kernel's (service id, rule) hit counts summed per (policy, rule)."""
    out: dict[tuple[str, str], int] = {}
    for (service_id, rule), n in hits.items():
        key = frontend_of(service_id)
        frontend = desired.frontends.get(key) if key is not None else None
        if frontend is None or not frontend.policy:
            continue
        label = "defaultAction" if rule == RULE_DEFAULT else f"rules[{rule}]"
        out[(frontend.policy, label)] = out.get((frontend.policy, label), 0) + n
    return out


def flow_families(f: FlowStats, ring_buffer_lost: int) -> list[MetricFamily]:
    """Flow events received by this agent, by Service port and verdict.

    Refusals, drops and denials are reported by the kernel always, so their
    counts are complete (unless events were lost, which is counted too);
    translations are reported only while someone follows them with
    `veer observe --follow`: veer_socket_lb_events_total counts them all.
    """
    events = MetricFamily("veer_flow_events_total", "counter",
                          "Flow events received from the kernel since the agent started, by "
                          "Service port (namespace/name:port) and verdict (the kernel "
                          "counter's name); translations only while followed")
    for (service, reason), n in sorted(f.counts.items()):
        events.add(n, {"service": service, "verdict": reason})
    lost = MetricFamily("veer_flow_events_lost_total", "counter",
                        "Flow events lost: ring_buffer_full (in the kernel, since the "
                        "counters map was created), slow_follower (an observer fell behind)")
    lost.add(ring_buffer_lost, {"reason": "ring_buffer_full"})
    lost.add(f.lost_slow_subscriber, {"reason": "slow_follower"})
    return [
        events,
        lost,
        MetricFamily("veer_flow_followers", "gauge",
                     "Clients following flow events (veer observe --follow)")
        .add(f.subscribers),
        MetricFamily("veer_flow_translations_traced", "gauge",
                     "1 while the kernel reports translations as flow events (some "
                     "follower wants them), 0 otherwise").add(int(f.tracing)),
    ]


@dataclass
class Gatherer:
    """Reads the agent for one scrape; remembers skip reasons so that a reason
    that no longer applies reads 0 instead of vanishing."""

    agent: Agent
    reasons: set[str] = field(default_factory=set)

    def _programs(self) -> int:
        if self.agent.datapath.name != "ebpf":
            return 0
        from agent.datapath.ebpf.env import cgroup2_root
        from agent.datapath.ebpf.programs import attached_programs

        return len(attached_programs(self.agent.config.cgroup or cgroup2_root()))

    def gather(self) -> MetricsInput:
        agent = self.agent
        desired = agent.last_desired
        skipped: dict[str, int] = dict.fromkeys(self.reasons, 0)
        for problem in desired.problems:
            skipped[problem.reason] = skipped.get(problem.reason, 0) + 1
        self.reasons.update(skipped)
        failed = dict(agent.reconciler.failed_frontends)
        return MetricsInput(
            telemetry=agent.telemetry.snapshot(),
            mode=agent.mode[0],
            maps=agent.datapath.usage(),
            counters=agent.datapath.counters(),
            programs_attached=self._programs(),
            skipped=skipped,
            manifest_problems=len(agent.source.last_report.problems),
            frontends=len(desired.frontends),
            frontends_failed=len([k for k in failed if k in desired.frontends]),
            source_synced=agent.store.synced,
            flows=agent.flows.stats(),
            access_hits=access_hits_by_policy(agent.datapath.access_hits(),
                                              agent.datapath.frontend_of, desired),
            thread_cpu=thread_cpu_seconds(),
        )
