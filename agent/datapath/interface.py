"""The one interface every datapath backend implements.

Contract (after Cilium's statedb reconciler):
- `upsert_frontend` is idempotent and returns whether anything changed. It
  writes in an order that never lets a packet or socket see a half-written
  frontend: new backends first, then the frontend that points at them.
- `delete_frontend` of an absent frontend is fine (returns False). It removes
  the frontend before the backends it pointed at.
- `dump` reads the real state back from the kernel; the reconciler's full
  pass diffs it against the desired state and prunes what nobody wants.
- Errors are raised as `agent.errors.DatapathError` naming the object.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from agent.compute.tables import backend_name, compile_access, slot_table, slot_weights
from agent.compute.types import EmptyVerdict, Frontend, L4Addr
from agent.model.objects import AccessAction, Algorithm, IPAddress, IPNetwork

# One compiled access entry: (source range, deciding rule, allow).
AccessEntry = tuple[IPNetwork, int, bool]


def _table(frontend: Frontend, backends: tuple[L4Addr, ...],
           weights: tuple[int, ...]) -> tuple[L4Addr, ...]:
    """The slot table the datapath must hold, or () when the backends
    themselves are the slots (agent/compute/tables.py)."""
    if frontend.algorithm is not Algorithm.MAGLEV and not weights:
        return ()
    names = [backend_name(b.address.packed, b.port) for b in backends]
    table = slot_table(frontend.algorithm, names, weights, frontend.maglev_size)
    return tuple(backends[i] for i in table) if table is not None else ()


def _lc_weights(frontend: Frontend, weights: tuple[int, ...]) -> tuple[int, ...]:
    if frontend.algorithm is not Algorithm.LEAST_CONNECTIONS:
        return ()
    return slot_weights(weights)

if TYPE_CHECKING:
    from agent.datapath.flows import FlowEvent


@dataclass(frozen=True)
class ProgrammedFrontend:
    """What the datapath holds for one frontend: the projection of a Frontend
    onto the fields it programs. The reconciler compares these, so a change
    to any of them (and only to them) rewrites the frontend."""

    backends: tuple[L4Addr, ...]
    drop_when_empty: bool = False
    affinity_timeout: int = 0
    # The per-packet (external) side, for NodePort/ExternalIP/LoadBalancer.
    external: bool = False
    external_backends: tuple[L4Addr, ...] = ()
    external_drop_when_empty: bool = False
    external_local: bool = False
    external_sources: tuple[IPNetwork, ...] = ()
    # What a TrafficPolicy adds. `table`: the slots when they form a table
    # (weights, Maglev), in order; `weights`: LeastConnections weights
    # parallel to `backends`; `access`: the compiled rules, sorted, with the
    # default ("" without access rules).
    algorithm: str = Algorithm.RANDOM.value
    table: tuple[L4Addr, ...] = ()
    weights: tuple[int, ...] = ()
    external_table: tuple[L4Addr, ...] = ()
    external_weights: tuple[int, ...] = ()
    access: tuple[AccessEntry, ...] = ()
    access_default: str = ""
    redirect: L4Addr | None = None  # the node-local proxy (socket path, TCP)
    sockmap: bool = False  # same-node connections are spliced (sockmap acceleration)
    redirect_tproxy: int = 0  # connections left to nftables' tproxy to this port

    @staticmethod
    def of(frontend: Frontend) -> ProgrammedFrontend:
        external = frontend.kind.external
        access: tuple[AccessEntry, ...] = ()
        if frontend.access is not None:
            compiled = compile_access([
                (r.index, r.action is AccessAction.ALLOW, r.sources)
                for r in frontend.access.rules
            ])
            access = tuple(sorted(
                ((cidr, rule, allow) for cidr, (rule, allow) in compiled.items()),
                key=lambda e: (e[0].version, int(e[0].network_address), e[0].prefixlen),
            ))
        return ProgrammedFrontend(
            backends=frontend.backends,
            drop_when_empty=frontend.on_empty is EmptyVerdict.DROP,
            affinity_timeout=frontend.affinity_timeout,
            external=external,
            external_backends=frontend.external_backends if external else (),
            external_drop_when_empty=external
            and frontend.external_on_empty is EmptyVerdict.DROP,
            external_local=external and frontend.external_local,
            external_sources=tuple(sorted(
                frontend.source_ranges,
                key=lambda c: (c.version, int(c.network_address), c.prefixlen),
            )) if external else (),
            algorithm=frontend.algorithm.value,
            table=_table(frontend, frontend.backends, frontend.weights),
            weights=_lc_weights(frontend, frontend.weights),
            external_table=_table(frontend, frontend.external_backends,
                                  frontend.external_weights) if external else (),
            external_weights=_lc_weights(frontend, frontend.external_weights)
            if external else (),
            access=access,
            access_default=frontend.access.default_action.value if frontend.access else "",
            redirect=frontend.redirect,
            sockmap=frontend.sockmap and frontend.key.protocol.value == "TCP",
            redirect_tproxy=frontend.redirect_tproxy,
        )


@dataclass
class DatapathState:
    """What a datapath actually holds, in DesiredState's vocabulary."""

    frontends: dict[L4Addr, ProgrammedFrontend] = field(default_factory=dict)
    vips: set[IPAddress] = field(default_factory=set)
    service_cidrs: set[IPNetwork] = field(default_factory=set)


@dataclass(frozen=True)
class MapUsage:
    name: str
    entries: int
    capacity: int


class Datapath(ABC):
    """A place where Services are programmed."""

    #: a short name for logs and status ("ebpf", "fake", ...)
    name: str = "datapath"
    #: the TrafficPolicy features this datapath acts on (agent/compute/policy.py
    #: FEATURE_*); a policy using any other is reported as not programmed here
    policy_features: frozenset[str] = frozenset()

    @abstractmethod
    def dump(self) -> DatapathState:
        """Read the actual state back."""

    @abstractmethod
    def upsert_frontend(self, frontend: Frontend) -> bool:
        """Make `frontend` hold exactly its backends. Returns True if anything changed."""

    @abstractmethod
    def delete_frontend(self, key: L4Addr) -> bool:
        """Remove a frontend; absent is fine. Returns True if it existed."""

    @abstractmethod
    def upsert_vip(self, address: IPAddress) -> bool: ...

    @abstractmethod
    def delete_vip(self, address: IPAddress) -> bool: ...

    @abstractmethod
    def upsert_service_cidr(self, cidr: IPNetwork) -> bool: ...

    @abstractmethod
    def delete_service_cidr(self, cidr: IPNetwork) -> bool: ...

    def set_node_addresses(self, addresses: tuple[IPAddress, ...]) -> bool:
        """Tell the datapath this node's addresses (the per-packet path's SNAT
        source). Returns True if anything changed. Default: not needed."""
        del addresses
        return False

    def set_cluster_cidrs(self, cidrs: frozenset[IPNetwork]) -> bool:
        """The cluster's pod ranges, for the per-packet path. Returns True if
        anything changed. Default: not needed."""
        del cidrs
        return False

    def serve_devices(self, devices: list[str], node_addresses: tuple[IPAddress, ...]) -> None:
        """Serve packets arriving on network devices (the per-packet path):
        `devices` if given, else those holding one of `node_addresses`.
        Idempotent. Default: the backend has no per-packet path."""
        del devices, node_addresses

    def finish_pass(self) -> list[str]:
        """Called once at the end of every reconciler pass, for work that is
        best batched (clearing flows of removed backends). Returns notes for
        the log. Default: nothing to do."""
        return []

    def programmed_of(self, frontend: Frontend) -> ProgrammedFrontend:
        """What this datapath holds for `frontend` once programmed: the
        reconciler compares it with dump(). A datapath that serves a feature
        without programming it (an acceleration that is off here, a redirect
        without its proxy) leaves that feature out. Default: everything."""
        return ProgrammedFrontend.of(frontend)

    def usage(self) -> list[MapUsage]:
        """Fill levels of the backend's tables, for status and metrics."""
        return []

    def counters(self) -> Mapping[str, int]:
        """Event counters kept by the datapath (translations, refusals, ...)."""
        return {}

    def access_hits(self) -> Mapping[tuple[int, int], int]:
        """TrafficPolicy access rule hits by (frontend service id, rule number;
        0xffff: the default action). Default: none kept."""
        return {}

    def start_flow_events(self, sink: Callable[[list[FlowEvent]], None]) -> bool:
        """Deliver the kernel's flow events, in batches, to `sink` from a thread
        of the datapath's own until close(). False if this backend has none."""
        del sink
        return False

    def trace_translations(self, on: bool) -> None:
        """Whether translations are reported as flow events too (refusals and
        drops always are). Default: nothing to switch."""
        del on

    def frontend_of(self, service_id: int) -> L4Addr | None:
        """The frontend that a service id in flow events stands for, if any."""
        del service_id
        return None

    def close(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Release user-space resources. Never removes kernel state."""
