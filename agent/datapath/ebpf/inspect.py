"""MapsReader: the eBPF datapath's pinned maps, read-only, for the API.

Each point lookup is one BPF_MAP_LOOKUP_ELEM with the key the kernel program
builds (see bpf/sock_lb.c), so `Explain` replays the program's lookups on
the very maps it reads. The Service CIDR check is a lookup in the LPM trie
with a full-length prefix: the kernel does the longest-prefix match, from
user space as from the program.
"""

from __future__ import annotations

import ipaddress
import itertools
import time

from agent.compute.types import L4Addr
from agent.datapath.ebpf.maps import SockLbMaps
from agent.datapath.ebpf.structs import (
    ALGORITHM_OF_CODE,
    CIDR_KEY_PREFIX_BITS,
    NAT_CLOSING,
    NAT_DSR,
    NAT_FIN,
    NAT_FLAGS,
    PROTOCOL_OF,
    SCOPE_EXTERNAL,
    SCOPE_SOCKET,
    SOCK_PEER_BUSY,
    SVC_ALG_MASK,
    SVC_ALG_SHIFT,
    SVC_F_ACCESS,
    SVC_F_AFFINITY,
    SVC_F_DROP_EMPTY,
    SVC_F_EXT_LOCAL,
    SVC_F_REDIRECT,
    TCP_CLOSED_NS,
    TCP_HALF_CLOSED_NS,
    UDP_IDLE_NS,
    AffinityKey,
    AffinityMatchKey,
    BackendKey,
    CidrKey,
    NatValue,
    ServiceValue,
    Tuple,
    VipKey,
    addr_bytes,
    addr_from,
    family_of,
    port_be,
    port_host,
    service_key,
)
from agent.datapath.inspect import (
    ActualState,
    DatapathReader,
    FrontendEntry,
    FrontendView,
    NatFlow,
    SlotView,
    SocketEntry,
)
from agent.model.objects import IPAddress, IPNetwork

FrontendId = tuple[bytes, int, int, int, int]  # addr, port (be), proto, family, scope


def _entry(value: ServiceValue) -> FrontendEntry:
    """A slot-0 value in the reader's terms (flags decoded)."""
    affinity = bool(value.flags & SVC_F_AFFINITY)
    return FrontendEntry(
        count=value.count,
        service_id=value.service_id,
        drop_when_empty=bool(value.flags & SVC_F_DROP_EMPTY),
        affinity_timeout=value.affinity_timeout if affinity else 0,
        algorithm=ALGORITHM_OF_CODE.get((value.flags & SVC_ALG_MASK) >> SVC_ALG_SHIFT, "?"),
        access=bool(value.flags & SVC_F_ACCESS),
        redirect=bool(value.flags & SVC_F_REDIRECT),
    )


def _view(fe: L4Addr, value: ServiceValue, slots: dict[int, int],
          backends: dict[int, L4Addr]) -> FrontendView:
    entry = _entry(value)
    views = []
    for pos in range(1, entry.count + 1):
        ident = slots.get(pos, 0)
        views.append(SlotView(pos, ident, backends.get(ident) if ident else None))
    return FrontendView(fe, entry.service_id, tuple(views), entry.drop_when_empty,
                        entry.affinity_timeout, bool(value.flags & SVC_F_EXT_LOCAL))


class MapsReader(DatapathReader):
    def __init__(self, maps: SockLbMaps) -> None:
        self.maps = maps

    # ---- point lookups ---------------------------------------------------

    def frontend(self, key: L4Addr) -> FrontendEntry | None:
        value = self.maps.services.get(service_key(key, 0))
        return _entry(value) if value is not None else None

    def slot(self, key: L4Addr, slot: int) -> int | None:
        value = self.maps.services.get(service_key(key, slot))
        return value.backend_id if value else None

    def affinity(self, client: int, service_id: int) -> tuple[int, float] | None:
        # The programs compare bpf_ktime_get_ns(), CLOCK_MONOTONIC, as is
        # time.monotonic_ns().
        entry = self.maps.affinity.get(AffinityKey(client=client, service_id=service_id))
        if entry is None:
            return None
        if self.maps.affinity_match.get(
                AffinityMatchKey(entry.backend_id, service_id, SCOPE_SOCKET)) is None:
            return None
        age = (time.monotonic_ns() - entry.last_used_ns) / 1e9
        return entry.backend_id, age

    def backend(self, backend_id: int) -> L4Addr | None:
        value = self.maps.backends.get(BackendKey(backend_id))
        if value is None:
            return None
        protocol = PROTOCOL_OF.get(value.proto)
        if protocol is None:
            return None
        return L4Addr(addr_from(value.addr, value.family), port_host(value.port), protocol)

    def is_vip(self, address: IPAddress) -> bool:
        key = VipKey(addr=addr_bytes(address), family=family_of(address))
        return self.maps.vips.get(key) is not None

    def in_service_cidr(self, address: IPAddress) -> bool:
        key = CidrKey(
            prefixlen=CIDR_KEY_PREFIX_BITS + 128,
            family=family_of(address),
            addr=addr_bytes(address),
        )
        return self.maps.service_cidrs.get(key) is not None

    # ---- whole tables ----------------------------------------------------

    def read(self) -> ActualState:
        backends: dict[int, L4Addr] = {}
        for bkey, bvalue in self.maps.backends.items():
            protocol = PROTOCOL_OF.get(bvalue.proto)
            if protocol is not None:
                backends[bkey.backend_id] = L4Addr(
                    addr_from(bvalue.addr, bvalue.family), port_host(bvalue.port), protocol
                )
        masters: dict[FrontendId, tuple[L4Addr, ServiceValue]] = {}
        slots: dict[FrontendId, dict[int, int]] = {}
        for key, value in self.maps.services.items():
            fid = (bytes(key.addr), key.port, key.proto, key.family, key.scope)
            if key.slot == 0:
                protocol = PROTOCOL_OF.get(key.proto)
                if protocol is not None:
                    fe = L4Addr(addr_from(key.addr, key.family), port_host(key.port), protocol)
                    masters[fid] = (fe, value)
            else:
                slots.setdefault(fid, {})[key.slot] = value.backend_id

        state = ActualState()
        for fid, (fe, value) in masters.items():
            view = _view(fe, value, slots.get(fid, {}), backends)
            (state.external if fid[4] == SCOPE_EXTERNAL else state.frontends)[fe] = view
        for vkey in self.maps.vips.list_keys():
            state.vips.add(addr_from(vkey.addr, vkey.family))
        for ckey in self.maps.service_cidrs.list_keys():
            state.service_cidrs.add(_cidr_of(ckey))
        return state

    def sockets(self) -> list[SocketEntry]:
        """The sockets' reverse translations: connected TCP sockets' slots of
        veer_sock_peers, then veer_sock_revnat's entries (the others)."""
        taken = ((slot.key, slot.svc) for _, slot in self.maps.sock_peers.items()
                 if slot.key.cookie not in (0, SOCK_PEER_BUSY))
        return [
            SocketEntry(
                cookie=int(key.cookie),
                backend_address=addr_from(key.addr, key.family),
                backend_port=port_host(key.port),
                service_address=addr_from(value.addr, key.family),
                service_port=port_host(value.port),
                service_id=int(value.service_id),
            )
            for key, value in itertools.chain(taken, self.maps.sock_revnat.items())
        ]

    def sockets_capacity(self) -> int:
        """Entries each of the two tables holds (the same by construction)."""
        return self.maps.sock_revnat.capacity

    def nat_flows(self, address: IPAddress | None = None, port: int = 0,
                  limit: int = 0) -> tuple[list[NatFlow], int]:
        """veer_nat_fwd's entries that match, decoded. The map holds up to
        262,144 entries (ended flows stay until the LRU evicts them), so the
        filter runs on the raw keys and values and only the first `limit`
        matches are decoded; the count covers them all."""
        want = (bytes(addr_bytes(address)), family_of(address)) if address else None
        want_port = port_be(port) if port else 0
        now = time.monotonic_ns()
        flows: list[NatFlow] = []
        total = 0
        for key, value in self.maps.nat_fwd.items():
            if want is not None and (int(key.family) != want[1] or want[0] not in (
                    bytes(key.saddr), bytes(key.daddr), bytes(value.saddr),
                    bytes(value.daddr))):
                continue
            if want_port and want_port not in (key.sport, key.dport, value.sport, value.dport):
                continue
            protocol = PROTOCOL_OF.get(int(key.proto))
            if protocol is None:
                continue
            total += 1
            if not limit or len(flows) < limit:
                flows.append(self._nat_flow(key, value, protocol.value, now))
        return flows, total

    def _nat_flow(self, key: Tuple, value: NatValue, protocol: str, now: int) -> NatFlow:
        """One flow. Its state is read as tc_nat.c judges it (veer_nat_stale,
        veer_flow_stale): a FIN marks the direction that sent it, a RST or
        both FINs mark both entries closing; a UDP flow lives while either
        direction's entry does. The reverse entry is this flow's replies (a
        DSR flow has none here: its replies bypass this node)."""
        stamp = int(value.last_seen_ns)
        idle = max(0, now - (stamp & ~NAT_FLAGS))
        reply = self.maps.nat_rev.get(Tuple(
            saddr=value.daddr, daddr=value.saddr, sport=value.dport, dport=value.sport,
            proto=key.proto, family=key.family))
        back = int(reply.last_seen_ns) if reply is not None else 0
        back_idle = max(0, now - (back & ~NAT_FLAGS)) if reply is not None else None
        flags: list[str] = []
        if stamp & NAT_CLOSING:
            flags.append("closing")
        elif (stamp | back) & NAT_FIN:
            flags.append("half-closed")
        if stamp & NAT_DSR:
            flags.append("dsr")
        if protocol == "UDP":
            expired = idle > UDP_IDLE_NS and (back_idle is None or back_idle > UDP_IDLE_NS)
        elif stamp & NAT_CLOSING:
            expired = idle > TCP_CLOSED_NS
        else:
            expired = bool(stamp & NAT_FIN) and idle > TCP_HALF_CLOSED_NS
        if expired:
            flags.append("expired")
        return NatFlow(
            protocol=protocol,
            client_address=addr_from(key.saddr, key.family), client_port=port_host(key.sport),
            frontend_address=addr_from(key.daddr, key.family),
            frontend_port=port_host(key.dport),
            source_address=addr_from(value.saddr, key.family),
            source_port=port_host(value.sport),
            backend_address=addr_from(value.daddr, key.family),
            backend_port=port_host(value.dport),
            service_id=int(value.service_id), flags=tuple(flags),
            idle_seconds=idle / 1e9,
        )

    def nat_flows_capacity(self) -> int:
        return self.maps.nat_fwd.capacity


def _cidr_of(key: CidrKey) -> IPNetwork:
    address = addr_from(key.addr, key.family)
    return ipaddress.ip_network(f"{address}/{key.prefixlen - CIDR_KEY_PREFIX_BITS}")
