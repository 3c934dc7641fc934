"""The vocabulary of compute's output: what the datapath should hold.

DesiredState is what every datapath backend (eBPF, TPROXY, fake) programs,
and what `veer maps` prints. It is independent of any map layout: the eBPF
backend turns a Frontend into slots and backend ids, the fake keeps dicts.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from agent.defaults import DEFAULT_AGENT_PORTS
from agent.model.objects import AccessAction, Algorithm, IPAddress, IPNetwork, Protocol


def addr_sort_key(address: IPAddress) -> tuple[int, int]:
    """Order addresses IPv4 before IPv6 (ipaddress refuses to compare across families)."""
    return (address.version, int(address))


class _HashSlot:
    """L4Addr's cached hash: a slot outside the dataclass fields, so equality,
    repr and pickling (fields only, as dataclass writes them for slots) do
    not see it. Hashes of str and enums differ between processes, so a
    pickled hash would be wrong in another."""

    __slots__ = ("_hash",)
    _hash: int


@dataclass(frozen=True, slots=True)
class L4Addr(_HashSlot):
    """An address, port and protocol: a frontend or a backend.

    Slotted: a Service holds one per backend, and an instance dict would
    cost more than the fields."""

    address: IPAddress
    port: int
    protocol: Protocol

    def sort_key(self) -> tuple[int, int, int, str]:
        return (*addr_sort_key(self.address), self.port, self.protocol.value)

    def __lt__(self, other: L4Addr) -> bool:
        return self.sort_key() < other.sort_key()

    def __str__(self) -> str:
        host = f"[{self.address}]" if self.address.version == 6 else str(self.address)
        return f"{host}:{self.port}/{self.protocol.value}"

    def __hash__(self) -> int:
        # Computed once: an L4Addr is a dict key in every pass over every
        # frontend, and ipaddress hashes through hex(int(address)) each time.
        try:
            return self._hash
        except AttributeError:
            value = hash((self.address, self.port, self.protocol))
            object.__setattr__(self, "_hash", value)
            return value


class FrontendKind(enum.StrEnum):
    CLUSTER_IP = "ClusterIP"
    NODE_PORT = "NodePort"
    EXTERNAL_IP = "ExternalIP"
    LOAD_BALANCER = "LoadBalancer"

    @property
    def external(self) -> bool:
        """Reachable from outside the cluster (subject to externalTrafficPolicy)."""
        return self is not FrontendKind.CLUSTER_IP


class EmptyVerdict(enum.StrEnum):
    """What a frontend with no usable backend does with a new connection.

    kube-proxy REJECTs when the Service has no usable endpoint anywhere, and
    DROPs when endpoints exist but the traffic policy is Local and none is on
    this node (the client must not be told "refused" for a Service that works
    elsewhere; a load balancer's health check steers it away instead).
    """

    REFUSE = "refuse"
    DROP = "drop"


@dataclass(frozen=True, slots=True)
class ServicePortName:
    """namespace/name:port of a Service port, as kube-proxy names it."""

    namespace: str
    name: str
    port: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}" + (f":{self.port}" if self.port else "")


@dataclass(frozen=True, slots=True)
class AccessRuleSpec:
    """One access rule of a frontend: its position in the policy (for counters
    and events), its action, and its source ranges."""

    index: int
    action: AccessAction
    sources: tuple[IPNetwork, ...]


@dataclass(frozen=True, slots=True)
class AccessSpec:
    """A TrafficPolicy's access rules as a frontend carries them: the first rule
    whose sources contain the client decides; none matching, `default_action`."""

    default_action: AccessAction
    rules: tuple[AccessRuleSpec, ...]

    def verdict(self, client: IPAddress) -> tuple[AccessAction, int | None]:
        """(action, index of the deciding rule or None for the default)."""
        for rule in self.rules:
            if any(client.version == s.version and client in s for s in rule.sources):
                return rule.action, rule.index
        return self.default_action, None


@dataclass(frozen=True, slots=True)
class Frontend:
    """One Service port on one address, with the backends it spreads over.

    Two backend sets, because kube-proxy treats traffic by where it starts:
    - `backends`: connections that start on this node (pods, host processes:
      the socket hooks). For a ClusterIP this honours internalTrafficPolicy;
      for NodePort/ExternalIP/LoadBalancer frontends it is the cluster-wide
      set ("short-circuit": local clients of an externalTrafficPolicy=Local
      Service still reach every endpoint).
    - `external_backends`: connections arriving from outside the node (the
      per-packet path), honouring externalTrafficPolicy. Empty for ClusterIP.
    Both are sorted and free of duplicates; when one is empty, `on_empty` /
    `external_on_empty` says whether to refuse or drop.
    """

    key: L4Addr
    service: ServicePortName
    kind: FrontendKind
    backends: tuple[L4Addr, ...]
    on_empty: EmptyVerdict = EmptyVerdict.REFUSE
    external_backends: tuple[L4Addr, ...] = ()
    external_on_empty: EmptyVerdict = EmptyVerdict.REFUSE
    # externalTrafficPolicy: Local — external clients keep their address (no SNAT).
    external_local: bool = False
    # sessionAffinity: ClientIP timeout in seconds; 0 means no affinity.
    affinity_timeout: int = 0
    # loadBalancerSourceRanges (LoadBalancer frontends only); empty = everyone.
    source_ranges: tuple[IPNetwork, ...] = ()
    # ---- what a TrafficPolicy adds (agent/compute/policy.py) ----
    # "namespace/name" of the TrafficPolicy in force, "" for none.
    policy: str = ""
    algorithm: Algorithm = Algorithm.RANDOM
    # Relative weights parallel to `backends` / `external_backends` (a split
    # gives each backend its Service's weight divided among its endpoints).
    # Empty: all backends weigh the same.
    weights: tuple[int, ...] = ()
    external_weights: tuple[int, ...] = ()
    access: AccessSpec | None = None
    # Slots of the Maglev lookup table (a prime), with Algorithm.MAGLEV only.
    maglev_size: int = 0
    # A TrafficPolicy's redirect: connections made on this node go to this
    # node-local proxy instead (TCP, socket path), which learns the original
    # destination with SO_ORIGINAL_DST.
    redirect: L4Addr | None = None
    # A redirect with mode TPROXY: the proxy's transparent listener port on
    # this node (TCP frontends; 0: none). Connections keep their Service
    # destination and nftables hands them to the proxy.
    redirect_tproxy: int = 0
    # sockmap acceleration asked for (a policy's acceleration.sockmap, or the
    # agent's --sockmap): same-node TCP connections are spliced where the
    # kernel allows it, and take the normal path elsewhere.
    sockmap: bool = False


@dataclass(frozen=True, slots=True)
class HealthCheck:
    """kube-proxy's healthCheckNodePort for an externalTrafficPolicy=Local Service:
    answers 200 while this node has local endpoints, 503 otherwise."""

    port: int
    namespace: str
    name: str
    local_endpoints: int


@dataclass(frozen=True, slots=True)
class ServiceProblem:
    """A Service (or one of its ports) that the datapath cannot serve, and why."""

    namespace: str
    name: str
    reason: str
    message: str

    def __str__(self) -> str:
        return f"Service/{self.namespace}/{self.name}: {self.reason}: {self.message}"


@dataclass(frozen=True, slots=True)
class DesiredState:
    frontends: Mapping[L4Addr, Frontend] = field(default_factory=lambda: MappingProxyType({}))
    vips: frozenset[IPAddress] = frozenset()
    service_cidrs: frozenset[IPNetwork] = frozenset()
    problems: tuple[ServiceProblem, ...] = ()
    health_checks: tuple[HealthCheck, ...] = ()
    # This node's own addresses (from its Node object): NodePorts answer on
    # them, and the per-packet path source-NATs to them.
    node_addresses: tuple[IPAddress, ...] = ()
    # The cluster's pod ranges (--cluster-cidr): what is "from a pod".
    cluster_cidrs: frozenset[IPNetwork] = frozenset()
    # TrafficPolicies in force ("namespace/name"), each with the features it
    # uses (POLICY_FEATURES), so a datapath can say whether it serves them all.
    policies: Mapping[str, frozenset[str]] = field(
        default_factory=lambda: MappingProxyType({})
    )
    # Which ComputeCache call made it (0: a call without a cache), and when
    # known, the generation it follows with the frontend keys that differ
    # from it (added, changed or removed), so that the reconciler can visit
    # those only. Not part of the state: equal states may differ here.
    generation: int = field(default=0, compare=False)
    follows: tuple[int, frozenset[L4Addr]] | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class NodeIdentity:
    """Who "this node" is; compute's only input besides the snapshot and config.

    `addresses` are the node's own addresses (its Node object's InternalIP and
    ExternalIP), where NodePorts answer.
    """

    name: str
    zone: str = ""
    addresses: tuple[IPAddress, ...] = ()


@dataclass(frozen=True, slots=True)
class ComputeConfig:
    """Agent options that change what compute produces."""

    # The value of service.kubernetes.io/service-proxy-name veer serves; Services
    # with another value are left to another proxy. None: serve only unlabelled.
    service_proxy_name: str | None = None
    # Addresses in these ranges that carry no Service are refused.
    service_cidrs: frozenset[IPNetwork] = frozenset()
    # Protocols the datapath can serve; others are reported and skipped.
    protocols: frozenset[Protocol] = frozenset({Protocol.TCP, Protocol.UDP})
    # kube-proxy's --nodeport-addresses: NodePorts answer only on node addresses
    # inside these ranges. Empty: on all of the node's addresses.
    nodeport_addresses: frozenset[IPNetwork] = frozenset()
    # kube-proxy's --cluster-cidr: sources in these ranges are pods.
    cluster_cidrs: frozenset[IPNetwork] = frozenset()
    # Slots of a Maglev lookup table, at least (a prime; the size stays put,
    # so that removing one of N backends moves only ~1/N of the flows, unless
    # the backends need more slots: agent/compute/tables.py).
    maglev_table_size: int = 1021
    # --sockmap: ask for sockmap acceleration on every Service.
    sockmap: bool = False
    # The agent's own ports (port, what it serves): a redirect proxy cannot
    # have them (agent/operator/conditions.py).
    agent_ports: tuple[tuple[int, str], ...] = DEFAULT_AGENT_PORTS
