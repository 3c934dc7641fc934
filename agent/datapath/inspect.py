"""Read-only views of what a datapath holds, for the API and the CLI.

Two kinds of reads:
- point lookups, one per map access a kernel program makes (`frontend`,
  `slot`, `backend`, `is_vip`, `in_service_cidr`), so that `Explain` can
  replay a program's decision on the real maps, step by step;
- whole-table reads (`read`, `sockets`) for `veer maps`, `veer services`
  and `veer conntrack`.

A reader never writes and never touches the reconciler's caches: in
particular it must not call `Datapath.dump()` on the eBPF backend, which
rebuilds id allocators and deletes garbage. Reads race with the reconciler's
writes; each lookup is atomic, a whole-table read is not (good enough for
debugging, and the write order keeps every published frontend complete).

`reader_for(datapath)` picks the reader: the pinned maps for the eBPF
backend, the backend's own `dump()` for the others (the fake in tests).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

from agent.compute.types import L4Addr
from agent.datapath.interface import Datapath, DatapathState
from agent.model.objects import IPAddress, IPNetwork


@dataclass(frozen=True)
class FrontendEntry:
    """A frontend's slot-0 entry: how many slots it uses, its id, and its flags."""

    count: int
    service_id: int
    drop_when_empty: bool = False  # count 0 fails with EHOSTUNREACH, not ECONNREFUSED
    affinity_timeout: int = 0  # ClientIP affinity, seconds; 0: none
    algorithm: str = "Random"  # a TrafficPolicy's loadBalancing.algorithm
    access: bool = False  # a TrafficPolicy's access rules apply
    redirect: bool = False  # connections go to the node-local proxy


@dataclass(frozen=True)
class SlotView:
    slot: int
    backend_id: int  # 0: the slot entry is missing
    backend: L4Addr | None  # None: missing slot, or no such backend entry


@dataclass(frozen=True)
class FrontendView:
    key: L4Addr
    service_id: int
    slots: tuple[SlotView, ...]  # slots 1..count, in order
    drop_when_empty: bool = False
    affinity_timeout: int = 0
    external_local: bool = False  # external scope: externalTrafficPolicy Local (no SNAT)

    @property
    def count(self) -> int:
        return len(self.slots)

    @property
    def backends(self) -> tuple[L4Addr, ...]:
        """The backends the slots reach, sorted and once each (as DesiredState
        lists them; a weighted or Maglev table repeats them)."""
        return tuple(sorted({s.backend for s in self.slots if s.backend is not None}))

    @property
    def complete(self) -> bool:
        return all(s.backend is not None for s in self.slots)


@dataclass
class ActualState:
    """The tables as read. A frontend has a socket scope (read by the socket
    programs) and, for NodePort/ExternalIP/LoadBalancer, an external scope
    (read by the TC programs for packets from outside); both share its id."""

    frontends: dict[L4Addr, FrontendView] = field(default_factory=dict)  # socket scope
    external: dict[L4Addr, FrontendView] = field(default_factory=dict)  # external scope
    vips: set[IPAddress] = field(default_factory=set)
    service_cidrs: set[IPNetwork] = field(default_factory=set)

    def by_service_id(self) -> dict[int, FrontendView]:
        return {fe.service_id: fe for fe in self.frontends.values()}


@dataclass(frozen=True)
class SocketEntry:
    """A socket's reverse translation (veer_sock_peers or veer_sock_revnat)."""

    cookie: int
    backend_address: IPAddress
    backend_port: int
    service_address: IPAddress
    service_port: int
    service_id: int


@dataclass(frozen=True)
class NatFlow:
    """A per-packet flow (a veer_nat_fwd entry): the tuple its packets arrive
    with, and the one they leave with."""

    protocol: str  # TCP or UDP
    client_address: IPAddress
    client_port: int
    frontend_address: IPAddress  # where the client sent it
    frontend_port: int
    source_address: IPAddress  # after translation: the node's when source-NATed
    source_port: int
    backend_address: IPAddress
    backend_port: int
    service_id: int  # 0: the node's own connection, moved (see tc_nat.c)
    # At most one of closing / half-closed; dsr; expired (the programs take
    # the flow for over: its next packet starts a new one).
    flags: tuple[str, ...]
    idle_seconds: float

    def matches(self, address: IPAddress | None, port: int) -> bool:
        """`address` (None: any) among its addresses, `port` (0: any) among its ports."""
        return ((address is None or address in (self.client_address, self.frontend_address,
                                                self.source_address, self.backend_address))
                and (not port or port in (self.client_port, self.frontend_port,
                                          self.source_port, self.backend_port)))


class DatapathReader(ABC):
    """Read-only access to a datapath's tables."""

    # ---- point lookups, as the kernel programs make them -------------------

    @abstractmethod
    def frontend(self, key: L4Addr) -> FrontendEntry | None:
        """The slot-0 entry of `key` in the socket scope (what the socket programs read)."""

    @abstractmethod
    def slot(self, key: L4Addr, slot: int) -> int | None:
        """The backend id in slot `slot` (>= 1) of `key`, socket scope."""

    @abstractmethod
    def backend(self, backend_id: int) -> L4Addr | None: ...

    @abstractmethod
    def is_vip(self, address: IPAddress) -> bool: ...

    @abstractmethod
    def in_service_cidr(self, address: IPAddress) -> bool:
        """A longest-prefix match of `address` in the Service CIDRs."""

    # ---- whole tables ------------------------------------------------------

    @abstractmethod
    def read(self) -> ActualState: ...

    def affinity(self, client: int, service_id: int) -> tuple[int, float] | None:
        """The socket-path affinity entry of a client (network namespace
        cookie) for a frontend: (backend id, seconds since its last use), if
        it exists and its backend still serves the frontend. None for
        datapaths without affinity tables."""
        del client, service_id
        return None

    def sockets(self) -> list[SocketEntry]:
        """Per-socket reverse-translation entries (none for datapaths without them)."""
        return []

    def sockets_capacity(self) -> int:
        return 0

    def nat_flows(self, address: IPAddress | None = None, port: int = 0,
                  limit: int = 0) -> tuple[list[NatFlow], int]:
        """The per-packet path's flows that match (NatFlow.matches), at most
        `limit` of them (0: all), and how many match. None for datapaths
        without them."""
        del address, port, limit
        return [], 0

    def nat_flows_capacity(self) -> int:
        return 0


class StateReader(DatapathReader):
    """A reader over a backend's `dump()`: slots in backend order, ids made up
    (1, 2, ... in sorted order). For datapaths without maps (the fake)."""

    def __init__(self, dump: Callable[[], DatapathState]) -> None:
        self._dump = dump

    def _state(self) -> ActualState:
        state = self._dump()
        every = {b for pf in state.frontends.values()
                 for b in (*pf.backends, *pf.external_backends)}
        backend_ids = {be: ident for ident, be in enumerate(sorted(every), start=1)}

        def slots(backends: tuple[L4Addr, ...]) -> tuple[SlotView, ...]:
            return tuple(SlotView(pos, backend_ids[be], be)
                         for pos, be in enumerate(backends, start=1))

        out = ActualState(vips=set(state.vips), service_cidrs=set(state.service_cidrs))
        for service_id, key in enumerate(sorted(state.frontends), start=1):
            pf = state.frontends[key]
            out.frontends[key] = FrontendView(
                key, service_id, slots(pf.backends), pf.drop_when_empty, pf.affinity_timeout
            )
            if pf.external:
                out.external[key] = FrontendView(
                    key, service_id, slots(pf.external_backends),
                    pf.external_drop_when_empty, 0, pf.external_local,
                )
        return out

    def read(self) -> ActualState:
        return self._state()

    def frontend(self, key: L4Addr) -> FrontendEntry | None:
        fe = self._state().frontends.get(key)
        if fe is None:
            return None
        return FrontendEntry(fe.count, fe.service_id, fe.drop_when_empty, fe.affinity_timeout)

    def slot(self, key: L4Addr, slot: int) -> int | None:
        fe = self._state().frontends.get(key)
        if fe is None or not 1 <= slot <= fe.count:
            return None
        return fe.slots[slot - 1].backend_id

    def backend(self, backend_id: int) -> L4Addr | None:
        for fe in self._state().frontends.values():
            for s in fe.slots:
                if s.backend_id == backend_id:
                    return s.backend
        return None

    def is_vip(self, address: IPAddress) -> bool:
        return address in self._state().vips

    def in_service_cidr(self, address: IPAddress) -> bool:
        return any(address in cidr for cidr in self._state().service_cidrs
                   if cidr.version == address.version)


def reader_for(datapath: Datapath) -> DatapathReader:
    # Imported here: the eBPF modules need a Linux bpf(2) only when used.
    from agent.datapath.ebpf.backend import EbpfDatapath
    from agent.datapath.ebpf.inspect import MapsReader

    if isinstance(datapath, EbpfDatapath):
        return MapsReader(datapath.maps)
    return StateReader(datapath.dump)
