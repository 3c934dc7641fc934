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

from agent.model.objects import IPAddress, IPNetwork, Protocol


def addr_sort_key(address: IPAddress) -> tuple[int, int]:
    """Order addresses IPv4 before IPv6 (ipaddress refuses to compare across families)."""
    return (address.version, int(address))


@dataclass(frozen=True)
class L4Addr:
    """An address, port and protocol: a frontend or a backend."""

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


class FrontendKind(enum.StrEnum):
    CLUSTER_IP = "ClusterIP"


@dataclass(frozen=True)
class ServicePortName:
    """namespace/name:port of a Service port, as kube-proxy names it."""

    namespace: str
    name: str
    port: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}" + (f":{self.port}" if self.port else "")


@dataclass(frozen=True)
class Frontend:
    """One Service port on one address, with the backends it spreads over.

    `backends` is sorted and free of duplicates; empty means refuse.
    """

    key: L4Addr
    service: ServicePortName
    kind: FrontendKind
    backends: tuple[L4Addr, ...]


@dataclass(frozen=True)
class ServiceProblem:
    """A Service (or one of its ports) that the datapath cannot serve, and why."""

    namespace: str
    name: str
    reason: str
    message: str

    def __str__(self) -> str:
        return f"Service/{self.namespace}/{self.name}: {self.reason}: {self.message}"


@dataclass(frozen=True)
class DesiredState:
    frontends: Mapping[L4Addr, Frontend] = field(default_factory=lambda: MappingProxyType({}))
    vips: frozenset[IPAddress] = frozenset()
    service_cidrs: frozenset[IPNetwork] = frozenset()
    problems: tuple[ServiceProblem, ...] = ()


@dataclass(frozen=True)
class NodeIdentity:
    """Who "this node" is; compute's only input besides the snapshot."""

    name: str
    zone: str = ""


@dataclass(frozen=True)
class ComputeConfig:
    """Agent options that change what compute produces."""

    # The value of service.kubernetes.io/service-proxy-name veer serves; Services
    # with another value are left to another proxy. None: serve only unlabelled.
    service_proxy_name: str | None = None
    # Addresses in these ranges that carry no Service are refused.
    service_cidrs: frozenset[IPNetwork] = frozenset()
    # Protocols the datapath can serve; others are reported and skipped.
    protocols: frozenset[Protocol] = frozenset({Protocol.TCP, Protocol.UDP})
