"""Typed, immutable Kubernetes objects: the fields kube-proxy (and veer) use.

Every class is a frozen dataclass of tuples and frozen mappings, so a
snapshot can be shared between threads and compared by value. Objects are
built by `agent.model.parse`, never by hand outside tests.

Semantics that Kubernetes leaves implicit are made explicit here, once:
- an endpoint whose `ready` condition is absent is ready (API contract);
- `serving` absent means the same as `ready`; `terminating` absent is false;
- a Service whose clusterIP is "None" is headless.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from types import MappingProxyType

IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network

EMPTY_MAP: Mapping[str, str] = MappingProxyType({})


class Protocol(enum.StrEnum):
    TCP = "TCP"
    UDP = "UDP"
    SCTP = "SCTP"


class IPFamily(enum.StrEnum):
    IPV4 = "IPv4"
    IPV6 = "IPv6"

    @staticmethod
    def of(address: IPAddress | IPNetwork) -> IPFamily:
        return IPFamily.IPV4 if address.version == 4 else IPFamily.IPV6


class ServiceType(enum.StrEnum):
    CLUSTER_IP = "ClusterIP"
    NODE_PORT = "NodePort"
    LOAD_BALANCER = "LoadBalancer"
    EXTERNAL_NAME = "ExternalName"


class TrafficPolicyKind(enum.StrEnum):
    """externalTrafficPolicy / internalTrafficPolicy values."""

    CLUSTER = "Cluster"
    LOCAL = "Local"


class SessionAffinity(enum.StrEnum):
    NONE = "None"
    CLIENT_IP = "ClientIP"


# Kubernetes' default ClientIP affinity timeout (3 hours).
DEFAULT_AFFINITY_TIMEOUT_SECONDS = 10800


@dataclass(frozen=True, order=True, slots=True)
class ObjectRef:
    """kind/namespace/name of an object; namespace is "" for cluster-scoped kinds."""

    kind: str
    namespace: str
    name: str

    def __str__(self) -> str:
        if self.namespace:
            return f"{self.kind}/{self.namespace}/{self.name}"
        return f"{self.kind}/{self.name}"


@dataclass(frozen=True, slots=True)
class ObjectMeta:
    name: str
    namespace: str = ""
    uid: str = ""
    resource_version: str = ""
    generation: int = 0
    creation_timestamp: str = ""
    labels: Mapping[str, str] = field(default_factory=lambda: EMPTY_MAP)
    annotations: Mapping[str, str] = field(default_factory=lambda: EMPTY_MAP)


@dataclass(frozen=True, slots=True)
class ServicePort:
    name: str
    protocol: Protocol
    port: int
    # An int port number, or the name of a container port resolved through
    # the EndpointSlice ports.
    target_port: int | str
    node_port: int = 0
    app_protocol: str = ""


@dataclass(frozen=True, slots=True)
class Service:
    meta: ObjectMeta
    type: ServiceType
    cluster_ips: tuple[IPAddress, ...]  # empty for headless and ExternalName
    headless: bool
    ip_families: tuple[IPFamily, ...]
    ip_family_policy: str
    ports: tuple[ServicePort, ...]
    external_ips: tuple[IPAddress, ...] = ()
    load_balancer_ips: tuple[IPAddress, ...] = ()  # status.loadBalancer.ingress[].ip
    load_balancer_source_ranges: tuple[IPNetwork, ...] = ()
    external_traffic_policy: TrafficPolicyKind = TrafficPolicyKind.CLUSTER
    internal_traffic_policy: TrafficPolicyKind = TrafficPolicyKind.CLUSTER
    health_check_node_port: int = 0
    session_affinity: SessionAffinity = SessionAffinity.NONE
    session_affinity_timeout: int = DEFAULT_AFFINITY_TIMEOUT_SECONDS
    traffic_distribution: str = ""
    external_name: str = ""
    publish_not_ready_addresses: bool = False

    @property
    def ref(self) -> ObjectRef:
        return ObjectRef("Service", self.meta.namespace, self.meta.name)


@dataclass(frozen=True, slots=True)
class EndpointHints:
    for_zones: tuple[str, ...] = ()
    for_nodes: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Endpoint:
    addresses: tuple[IPAddress, ...]
    ready: bool
    serving: bool
    terminating: bool
    node_name: str = ""
    zone: str = ""
    hostname: str = ""
    hints: EndpointHints | None = None


@dataclass(frozen=True, slots=True)
class EndpointPort:
    name: str
    port: int | None  # None: "all ports" (unused by Services, kept for fidelity)
    protocol: Protocol
    app_protocol: str = ""


@dataclass(frozen=True, slots=True)
class EndpointSlice:
    meta: ObjectMeta
    service_name: str  # from the kubernetes.io/service-name label; "" if absent
    address_type: str  # IPv4, IPv6 or FQDN
    endpoints: tuple[Endpoint, ...]
    ports: tuple[EndpointPort, ...]

    @property
    def ref(self) -> ObjectRef:
        return ObjectRef("EndpointSlice", self.meta.namespace, self.meta.name)


@dataclass(frozen=True, slots=True)
class NodeAddress:
    type: str  # InternalIP, ExternalIP, Hostname, ...
    address: str


@dataclass(frozen=True, slots=True)
class Node:
    meta: ObjectMeta
    addresses: tuple[NodeAddress, ...]
    pod_cidrs: tuple[IPNetwork, ...] = ()

    @property
    def zone(self) -> str:
        return self.meta.labels.get("topology.kubernetes.io/zone", "")

    @property
    def ref(self) -> ObjectRef:
        return ObjectRef("Node", "", self.meta.name)


# ---- TrafficPolicy (veer.dev/v1alpha1) -------------------------------------


class Algorithm(enum.StrEnum):
    RANDOM = "Random"
    ROUND_ROBIN = "RoundRobin"
    MAGLEV = "Maglev"
    LEAST_CONNECTIONS = "LeastConnections"


class AccessAction(enum.StrEnum):
    ALLOW = "Allow"
    DENY = "Deny"


class RedirectMode(enum.StrEnum):
    AUTO = "Auto"
    EBPF = "EBPF"
    TPROXY = "TPROXY"


@dataclass(frozen=True, slots=True)
class AffinityOverride:
    type: SessionAffinity
    timeout_seconds: int


@dataclass(frozen=True, slots=True)
class SplitEntry:
    service: str
    weight: int


@dataclass(frozen=True, slots=True)
class AccessRule:
    action: AccessAction
    sources: tuple[IPNetwork, ...]


@dataclass(frozen=True, slots=True)
class AccessPolicy:
    default_action: AccessAction
    rules: tuple[AccessRule, ...]


@dataclass(frozen=True, slots=True)
class Redirect:
    port: int
    mode: RedirectMode


@dataclass(frozen=True, slots=True)
class TrafficPolicy:
    meta: ObjectMeta
    target_refs: tuple[str, ...]
    algorithm: Algorithm = Algorithm.RANDOM
    session_affinity: AffinityOverride | None = None
    split: tuple[SplitEntry, ...] = ()
    access: AccessPolicy | None = None
    redirect: Redirect | None = None
    sockmap: bool = False

    @property
    def ref(self) -> ObjectRef:
        return ObjectRef("TrafficPolicy", self.meta.namespace, self.meta.name)
