"""Which backend a new connection or UDP flow gets: the proxy's choice, made
from the same compute output and the same tables as the eBPF programs'.

- The slots: `agent.compute.tables.slot_table()` over the backends (each
  named by its address, 16 bytes with IPv4 in the first 4, and its port in
  network order), or the backends themselves when it returns None.
- Random: a random slot. RoundRobin: the frontend's cursor, kept across
  updates of the frontend as the kernel keeps veer_rr_cursor. Maglev: slot
  `flow_hash(flow_words(client address, client port as the kernel holds it,
  protocol)) % table size`, so a client's flow lands where the kernel's would.
  LeastConnections: the backend with the fewest open proxied connections per
  unit of weight, scanning at most 16 backends from a random one (so ties
  spread), as veer_least_conn does.
- ClientIP affinity: a live entry (younger than the timeout since its last
  use) of this client's address wins while its backend still serves the
  frontend; the proxy keeps one table per frontend and scope, carried across
  updates.

A Chooser is built by the reconciler's thread and used by the proxy's
thread; once built only `pick` (proxy thread) mutates it.
"""

from __future__ import annotations

import random
import socket
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from agent.compute.tables import backend_name, flow_hash, flow_words, slot_table
from agent.compute.types import L4Addr
from agent.model.objects import Algorithm, Protocol

LC_SCAN = 16  # the kernel's VEER_LC_SCAN
_IPPROTO = {Protocol.TCP: 6, Protocol.UDP: 17}


def client_bytes(address: str) -> bytes:
    """A client's address as the kernel's flow hash reads it: 16 bytes, IPv4
    in the first 4."""
    if ":" in address:
        return socket.inet_pton(socket.AF_INET6, address)
    return socket.inet_aton(address).ljust(16, b"\0")


class OpenCounts:
    """Open proxied connections and UDP flows per backend, across frontends
    (the kernel's veer_backend_conns). Proxy thread only."""

    def __init__(self) -> None:
        self.open: Counter[L4Addr] = Counter()

    def add(self, backend: L4Addr) -> None:
        self.open[backend] += 1

    def remove(self, backend: L4Addr) -> None:
        left = self.open[backend] - 1
        if left > 0:
            self.open[backend] = left
        else:
            del self.open[backend]


@dataclass
class ChooserState:
    """What survives an update of the frontend: the round-robin cursor and the
    affinity table (client address -> backend, last use)."""

    cursor: int = field(default_factory=lambda: random.getrandbits(32))
    affinity: dict[str, tuple[L4Addr, float]] = field(default_factory=dict)


class Chooser:
    """One scope (socket or external) of one frontend."""

    def __init__(
        self,
        protocol: Protocol,
        backends: Sequence[L4Addr],
        weights: Sequence[int],
        algorithm: Algorithm,
        maglev_size: int,
        affinity_timeout: int,
        counts: OpenCounts,
        state: ChooserState | None = None,
    ) -> None:
        self.backends = tuple(backends)
        self.members = frozenset(self.backends)
        self.algorithm = algorithm
        self.affinity_timeout = float(affinity_timeout)
        self.proto = _IPPROTO[protocol]
        self.counts = counts
        self.state = state or ChooserState()
        weights = tuple(weights) if len(weights) == len(self.backends) else ()
        names = [backend_name(b.address.packed, b.port) for b in self.backends]
        table = slot_table(algorithm, names, weights, maglev_size) if self.backends else None
        self.slots: tuple[L4Addr, ...] = (
            tuple(self.backends[i] for i in table) if table is not None else self.backends
        )
        # LeastConnections compares open/weight; the kernel holds weights scaled
        # to 16 bits, which keeps their ratios, so the raw weights compare alike.
        self.lc_weights = weights if algorithm is Algorithm.LEAST_CONNECTIONS else ()
        # The backends a connection can be given (a weight of 0 gives none):
        # what pick_other chooses among, and what has_other looks at.
        self.choosable = (frozenset(b for b, w in zip(self.backends, weights, strict=True) if w > 0)
                          if weights and 0 in weights else self.members)
        self.affinity_hits = 0
        # Each backend as the socket API takes it, made once here rather than
        # per connection on the proxy's thread.
        self.targets: dict[L4Addr, tuple[str, int]] = {
            b: (str(b.address), b.port) for b in self.backends}

    def pick(self, client: str, client_port: int, now: float | None = None) -> L4Addr | None:
        """The backend for a new flow from `client`:`client_port`; None if the
        frontend has none."""
        if not self.slots:
            return None
        if self.affinity_timeout:
            now = time.monotonic() if now is None else now
            held = self.state.affinity.get(client)
            if held is not None and now - held[1] < self.affinity_timeout \
                    and held[0] in self.members:
                self.state.affinity[client] = (held[0], now)
                self.affinity_hits += 1
                return held[0]
            chosen = self._choose(client, client_port)
            self.state.affinity[client] = (chosen, now)
            return chosen
        return self._choose(client, client_port)

    def pick_other(self, failed: set[L4Addr]) -> L4Addr | None:
        """A backend outside `failed`, for a connection whose backend refused
        or did not answer; None if none is left. Uniform over the slots left,
        so a slot table's weights still count (LeastConnections' slots are
        its backends: uniform over them): a few random slots are tried
        first, and only if they all failed is the table scanned, so a large
        Maglev table costs little while backends fail."""
        slots, choosable = self.slots, self.choosable
        if not slots:
            return None
        for _ in range(8):
            backend = slots[random.randrange(len(slots))]
            if backend not in failed and backend in choosable:
                return backend
        left = [b for b in slots if b not in failed and b in choosable]
        return random.choice(left) if left else None

    def has_other(self, tried: set[L4Addr]) -> bool:
        """Whether a backend outside `tried` can be given."""
        return not self.choosable <= tried

    def stick(self, client: str, backend: L4Addr) -> None:
        """A client with ClientIP affinity goes on with `backend`, which
        replaced a failed one (kube-proxy's userspace proxy reset a failed
        backend's affinity too)."""
        if self.affinity_timeout:
            self.state.affinity[client] = (backend, time.monotonic())

    def _choose(self, client: str, client_port: int) -> L4Addr:
        slots = self.slots
        algorithm = self.algorithm
        if algorithm is Algorithm.LEAST_CONNECTIONS:
            return self._least(slots)
        if algorithm is Algorithm.MAGLEV:
            port_be = socket.htons(client_port)
            h = flow_hash(flow_words(client_bytes(client), port_be, self.proto))
            return slots[h % len(slots)]
        if algorithm is Algorithm.ROUND_ROBIN:
            pos = self.state.cursor
            self.state.cursor = (pos + 1) & 0xFFFFFFFF
            return slots[pos % len(slots)]
        return slots[random.randrange(len(slots))]

    def _least(self, slots: tuple[L4Addr, ...]) -> L4Addr:
        count = len(slots)
        start = random.randrange(count)
        best = slots[start]
        best_open, best_weight = -1, 1
        open_of = self.counts.open
        weights = self.lc_weights
        for i in range(min(LC_SCAN, count)):
            pos = (start + i) % count
            backend = slots[pos]
            open_now = open_of.get(backend, 0)
            weight = weights[pos] if weights else 1
            if best_open < 0 or open_now * best_weight < best_open * weight:
                best, best_open, best_weight = backend, open_now, weight
        return best

    def expire_affinity(self, now: float) -> None:
        """Forget entries older than the timeout (the proxy calls this now and then)."""
        if not self.affinity_timeout:
            return
        stale = [c for c, (_, last) in self.state.affinity.items()
                 if now - last >= self.affinity_timeout]
        for client in stale:
            del self.state.affinity[client]
