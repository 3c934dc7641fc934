"""Give back LeastConnections counts of per-packet flows that ended unseen.

The TC program counts each flow it places for a LeastConnections frontend
(veer_lc_flows, veer_backend_conns) and gives the count back when a FIN or RST
passes. A flow can end without one passing it: its client vanished, or its
NAT entry was evicted. Such a flow would weigh on its backend for ever, so the
agent looks, now and then, for counted flows whose forward NAT entry is gone
or expired, deletes them and adds them to veer_backend_conns_swept.

Invariants: the agent never writes veer_backend_conns (its writes could not be
atomic with the kernel's adds); a count is given back by whoever deletes the
flow's veer_lc_flows entry, the kernel or this sweep, so exactly once.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable

from agent.datapath.ebpf.maps import SockLbMaps
from agent.datapath.ebpf.structs import (
    IPPROTO,
    NAT_CLOSING,
    NAT_FIN,
    NAT_FLAGS,
    TCP_CLOSED_NS,
    TCP_HALF_CLOSED_NS,
    UDP_IDLE_NS,
    ConnsSweptValue,
    IndexKey,
    NatValue,
    Tuple,
)
from agent.model.objects import Protocol

# How often the sweep may run, in seconds: flows that ended unseen are rare,
# and a sweep reads every counted flow. It runs at the end of a pass, so with
# no changes at all it waits for the periodic pass (--max-sync-interval).
SWEEP_INTERVAL = 10.0


def _stale(proto: int, nat: NatValue, now_ns: int) -> bool:
    """Whether one NAT entry, on its own, outlived its flow (veer_nat_stale)."""
    stamp = int(nat.last_seen_ns)
    idle = now_ns - (stamp & ~NAT_FLAGS)
    if proto == IPPROTO[Protocol.UDP]:  # no end but silence
        return idle > UDP_IDLE_NS
    if stamp & NAT_CLOSING:
        return idle > TCP_CLOSED_NS
    return bool(stamp & NAT_FIN) and idle > TCP_HALF_CLOSED_NS


def _reply_key(key: Tuple, nat: NatValue) -> Tuple:
    """The reverse entry's key of a flow: its rewritten tuple reversed."""
    return Tuple(saddr=nat.daddr, daddr=nat.saddr, sport=nat.dport, dport=nat.sport,
                 proto=key.proto, family=key.family)


def _ended(key: Tuple, nat: NatValue | None, reverse: Callable[[Tuple], NatValue | None],
           now_ns: int) -> bool:
    """Whether a counted flow is over, judged as the TC program judges it
    (veer_flow_stale): by its forward NAT entry, or its absence; a UDP flow
    lives while either direction's entry does (each is refreshed by its own
    packets only)."""
    if nat is None:
        return True
    proto = int(key.proto)
    if not _stale(proto, nat, now_ns):
        return False
    if proto != IPPROTO[Protocol.UDP]:
        return True
    other = reverse(_reply_key(key, nat))
    return other is None or _stale(proto, other, now_ns)


class LeastConnSweeper:
    def __init__(self, maps: SockLbMaps, interval: float = SWEEP_INTERVAL) -> None:
        self.maps = maps
        self.interval = interval
        self._last = 0.0

    def due(self) -> bool:
        return time.monotonic() - self._last >= self.interval

    def sweep(self) -> int:
        """Give back the counts of ended flows; how many were given back."""
        self._last = time.monotonic()
        # bpf_ktime_get_ns() is CLOCK_MONOTONIC.
        now_ns = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        gone: Counter[int] = Counter()
        for key in self.maps.lc_flows.list_keys():
            if not _ended(key, self.maps.nat_fwd.get(key), self.maps.nat_rev.get, now_ns):
                continue
            # Credit the backend of the entry deleted: the kernel may have
            # replaced it since its flow was judged over (a new flow on the
            # same tuple). Absent: the kernel gave it back itself.
            deleted = self.maps.lc_flows.pop(key)
            if deleted is not None:
                gone[int(deleted.backend_id)] += 1
        for backend_id, n in gone.items():
            current = self.maps.backend_conns_swept.get(IndexKey(backend_id))
            swept = (int(current.swept) if current is not None else 0) + n
            self.maps.backend_conns_swept.put(
                IndexKey(backend_id), ConnsSweptValue(swept=swept & 0xFFFFFFFF)
            )
        return sum(gone.values())


def open_connections(maps: SockLbMaps) -> dict[int, int]:
    """Backend id -> connections LeastConnections counts as open (as the
    kernel scores them: opened and not given back, minus swept)."""
    swept = {int(k.index): int(v.swept) for k, v in maps.backend_conns_swept.items()}
    out = {}
    for key, value in maps.backend_conns.items():
        n = int(value.open) - swept.get(int(key.index), 0)
        if n > 0:
            out[int(key.index)] = n
    return out


def open_count(maps: SockLbMaps, backend_id: int) -> int:
    """open_connections() of one backend id, read by two lookups."""
    opened = maps.backend_conns.get(IndexKey(backend_id))
    if opened is None or not opened.open:
        return 0
    swept = maps.backend_conns_swept.get(IndexKey(backend_id))
    return int(opened.open) - (int(swept.swept) if swept else 0)
