"""The agent's configuration, built from the command line and checked once."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from agent.defaults import DEFAULT_AGENT_PORTS
from agent.errors import ConfigError
from agent.model.objects import IPNetwork

DEFAULT_BPFFS = "/sys/fs/bpf/veer"
MODES = ("auto", "ebpf", "tproxy")
NODEPORT_MODES = ("snat", "dsr")


@dataclass(frozen=True)
class AgentConfig:
    node_name: str
    manifests: str | None = None
    cgroup: str | None = None  # None: the root of the cgroup2 hierarchy
    bpffs: str = DEFAULT_BPFFS
    mode: str = "auto"
    service_cidrs: frozenset[IPNetwork] = field(default_factory=frozenset)
    nodeport_addresses: frozenset[IPNetwork] = field(default_factory=frozenset)
    cluster_cidrs: frozenset[IPNetwork] = field(default_factory=frozenset)
    # Devices that get the per-packet programs; empty: those holding the node's addresses.
    devices: tuple[str, ...] = ()
    # How a flow from outside reaches a backend on another node: source-NATed to
    # this node ("snat"), or sent on with its frontend so that the backend's node
    # answers the client itself ("dsr", direct server return). Every node must
    # run the same mode.
    nodeport_mode: str = "snat"
    service_proxy_name: str | None = None
    min_sync_interval: float = 0.0
    max_sync_interval: float = 60.0
    scan_interval: float = 0.5
    # The source: a manifest directory, or the API server (--kubernetes).
    kubernetes: bool = False
    kubeconfig: str | None = None  # None: the in-cluster ServiceAccount
    # On SIGTERM, clean up if the chart's DaemonSet is being deleted (agent/kube/uninstall.py).
    cleanup_on_uninstall: bool = False
    # The uid the node-local proxy of TrafficPolicy redirects runs as: its own
    # connections are balanced, never redirected. None: no redirects.
    proxy_uid: int | None = None
    # --sockmap: sockmap acceleration for every Service (where the kernel allows).
    sockmap: bool = False
    # The agent's own ports (port, what it serves), from --metrics-bind-address
    # and --healthz-bind-address: a redirect proxy cannot have them.
    agent_ports: tuple[tuple[int, str], ...] = DEFAULT_AGENT_PORTS

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"--mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        if self.nodeport_mode not in NODEPORT_MODES:
            raise ConfigError(f"--nodeport-mode must be one of {', '.join(NODEPORT_MODES)}, "
                              f"not {self.nodeport_mode!r}")
        if self.nodeport_mode == "dsr" and self.mode == "tproxy":
            raise ConfigError("--nodeport-mode dsr is done by the eBPF datapath's "
                              "per-packet programs, not by --mode tproxy")
        if self.nodeport_mode == "dsr" and not self.cluster_cidrs:
            raise ConfigError("--nodeport-mode dsr needs --cluster-cidr: a pod's connection "
                              "must not go by DSR (its replies would not pass a device veer "
                              "serves), and the pod ranges say which clients are pods")
        if not self.node_name:
            raise ConfigError("--node-name is required")
        if self.max_sync_interval <= 0 or self.min_sync_interval < 0:
            raise ConfigError("sync intervals must be positive")
        if self.min_sync_interval > self.max_sync_interval:
            raise ConfigError("--min-sync-interval must not exceed --max-sync-interval")
        if self.kubernetes and self.manifests:
            raise ConfigError("--manifests and --kubernetes are two sources: give one")
        if not self.kubernetes and (self.kubeconfig or self.cleanup_on_uninstall):
            raise ConfigError("--kubeconfig and --cleanup-on-uninstall need --kubernetes")


def parse_cidrs(value: str, flag: str) -> frozenset[IPNetwork]:
    out = set()
    for part in filter(None, (p.strip() for p in value.split(","))):
        try:
            out.add(ipaddress.ip_network(part, strict=True))
        except ValueError as err:
            raise ConfigError(f"{flag}: {part!r} is not a CIDR ({err})") from None
    return frozenset(out)
