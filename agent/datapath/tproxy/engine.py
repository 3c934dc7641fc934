"""The transparent proxy: its listeners, the frontends it serves, the choice
of a backend for each new connection or UDP flow, and the thread it runs in.

Listeners. One per address family (127.0.0.1, ::1), protocol and Role, on a
port the kernel picks; nftables' tproxy rules name those ports, so the
listener a connection arrives on tells the proxy where it came from (the
node itself, a pod of this node, outside, or a pod of another node under a
Local policy), which no socket option could say.

Frontends. `update()` (the reconciler's thread) builds a Chooser per scope
and swaps it into a dict the proxy thread reads; no lock is needed because
each swap is one dict assignment. UDP flows whose backend left move to a
live one (udp.py), done by the proxy thread, which `update()` asks through
the loop.

Keeping the client's address. A connection keeps it (the upstream socket
binds it with IP_TRANSPARENT) only where the backend's replies are sure to
come back through this node, to the proxy's socket:
- from a pod of this node: yes (the pod's address is routed to this node),
  unless the backend is an address of this node (a host-network endpoint:
  its replies would go straight to the pod) or the pod itself (hairpin: a
  packet from its own address is a martian to it);
- from outside (a client, or a pod of another node): only to a pod of this
  node; another node's backend would answer the client directly, so the
  proxy connects from this node's address (source NAT, as kube-proxy's
  masquerade and the eBPF path's SNAT do);
- from the node itself: never (its address is this node's already).
"""

from __future__ import annotations

import collections
import logging
import resource
import select
import socket
import threading
import time
from collections import Counter
from collections.abc import Mapping

from agent.compute.types import Frontend, L4Addr
from agent.datapath.tproxy import icmp, sockets, tcp, udp
from agent.datapath.tproxy.choice import Chooser, ChooserState, OpenCounts
from agent.datapath.tproxy.layout import Locality, Role
from agent.datapath.tproxy.loop import Loop, start_thread
from agent.errors import DatapathError
from agent.model.objects import Protocol

log = logging.getLogger(__name__)

# (Service address as the socket API prints it, port)
Target = tuple[str, int]
_KIND = {Protocol.TCP: socket.SOCK_STREAM, Protocol.UDP: socket.SOCK_DGRAM}
_PROTO_OF_KIND = {socket.SOCK_STREAM: Protocol.TCP, socket.SOCK_DGRAM: Protocol.UDP}
SWEEP_INTERVAL = 2.0
# How often connects that outlived their timeout (tcp.CONNECT_TIMEOUTS) are
# looked for: the timeouts are kept to within this.
CONNECT_CHECK_INTERVAL = 0.1


class Engine:
    def __init__(self, families: tuple[int, ...]) -> None:
        self.families = families
        self.loop = Loop()
        self.pipes = tcp.PipePool()
        self.counts = OpenCounts()
        self.flows: dict[udp.FlowKey, udp.Flow] = {}
        self.flows_of: dict[Target, set[udp.Flow]] = {}  # by frontend
        self.udp_binds: set[tuple[str, int, L4Addr]] = set()
        self.open_connections = 0
        # (protocol, external scope?) -> frontend (address, port) -> chooser
        self.tables: dict[tuple[Protocol, bool], dict[Target, Chooser]] = {
            (p, ext): {} for p in _KIND for ext in (False, True)
        }
        # Backend address -> where it is; filled by the reconciler's thread.
        self.locality: dict[str, Locality] = {}
        self._counters: Counter[str] = Counter()
        self._listeners: list[socket.socket] = []
        self.ports: dict[tuple[int, Protocol, Role], int] = {}
        self._thread: threading.Thread | None = None
        self.notifier: icmp.Notifier | None = None  # opened by start()
        # Connects to give up on for another backend (tcp.Connection.arm),
        # one queue per attempt: each attempt's timeout is fixed, so every
        # queue is in deadline order. Entries of connections that went on
        # are dropped as they come due.
        self.connect_deadlines: tuple[collections.deque[tuple[float, tcp.Connection]], ...] = \
            tuple(collections.deque() for _ in tcp.CONNECT_TIMEOUTS)

    @property
    def now(self) -> float:
        return time.monotonic()

    def count(self, name: str, n: int = 1) -> None:
        self._counters[name] += n

    # ---- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        """Open every listener, then run the loop in a thread of its own."""
        _raise_open_files_limit()
        self.notifier = icmp.Notifier(self.families)
        try:
            for family in self.families:
                for protocol, kind in _KIND.items():
                    for role in Role:
                        sock = sockets.listener(family, kind)
                        self._listeners.append(sock)
                        self.ports[(family, protocol, role)] = sock.getsockname()[1]
                        handler = (tcp.accept_all if protocol is Protocol.TCP
                                   else udp.receive_all)(self, sock, role)
                        self.loop.register(sock.fileno(), select.EPOLLIN, handler)
        except OSError as err:
            self._close_listeners()
            self.notifier.close()
            raise DatapathError(f"the proxy cannot open its listeners: {err}") from err
        self.loop.every(SWEEP_INTERVAL, self._sweep)
        self.loop.every(CONNECT_CHECK_INTERVAL, self._connect_timeouts)
        self._thread = start_thread(self.loop, "veer-tproxy")

    def close(self) -> None:
        if self._thread is not None:
            self.loop.stop()
            self._thread.join(10)
            self._thread = None
        self._close_listeners()
        if self.notifier is not None:
            self.notifier.close()
        self.pipes.close()
        self.loop.close()

    def _close_listeners(self) -> None:
        for sock in self._listeners:
            sock.close()
        self._listeners.clear()

    def _connect_timeouts(self, now: float) -> None:
        for attempt, queue in enumerate(self.connect_deadlines, start=1):
            while queue and queue[0][0] <= now:
                queue.popleft()[1].timed_out(attempt)

    def _sweep(self, now: float) -> None:
        udp.sweep(self, now)
        for table in self.tables.values():
            for chooser in list(table.values()):
                chooser.expire_affinity(now)

    # ---- frontends (the reconciler's thread) ----------------------------------

    def update(self, frontend: Frontend) -> None:
        """Serve `frontend` as given (both scopes)."""
        key = frontend.key
        target = (str(key.address), key.port)
        scopes = [(False, frontend.backends, frontend.weights)]
        if frontend.kind.external:
            scopes.append((True, frontend.external_backends, frontend.external_weights))
        for external in (False, True):
            table = self.tables[(key.protocol, external)]
            if external and not frontend.kind.external:
                table.pop(target, None)
        for external, backends, weights in scopes:
            table = self.tables[(key.protocol, external)]
            old = table.get(target)
            state = old.state if old is not None else ChooserState()
            table[target] = Chooser(
                key.protocol, backends, weights, frontend.algorithm, frontend.maglev_size,
                frontend.affinity_timeout, self.counts, state,
            )
        if key.protocol is Protocol.UDP:
            self._close_flows_to_gone(target)

    def remove(self, key: L4Addr) -> None:
        target = (str(key.address), key.port)
        for external in (False, True):
            self.tables[(key.protocol, external)].pop(target, None)
        if key.protocol is Protocol.UDP:
            self._close_flows_to_gone(target)

    def _close_flows_to_gone(self, target: Target) -> None:
        """UDP flows of `target` whose backend left their scope move to a live
        backend (or end, if none is left); the proxy's thread does it."""

        def move_flows() -> None:
            for flow in list(self.flows_of.get(target, ())):
                chooser = self.tables[(Protocol.UDP, flow.role.external)].get(target)
                if chooser is None or not chooser.members:
                    flow.close()
                elif flow.backend not in chooser.members:
                    flow.move()

        self.loop.call_soon_threadsafe(move_flows)

    # ---- the choice (the proxy's thread) ---------------------------------------

    def route(self, kind: socket.SocketKind, role: Role, target: Target, client: str,
              client_port: int) -> tuple[L4Addr, Target, bool] | None:
        """(backend, its address, whether the upstream keeps the client's
        address) for a new connection or flow; None to refuse it."""
        protocol = _PROTO_OF_KIND[kind]
        chooser = self.tables[(protocol, role.external)].get(target)
        if chooser is None:
            # nftables still sent it while the frontend was being removed.
            self.count("proxy_no_frontend")
            return None
        hits = chooser.affinity_hits
        backend = chooser.pick(client, client_port)
        if backend is None:
            self.count("proxy_no_backend")  # (nftables refuses; a race with an update)
            return None
        if chooser.affinity_hits != hits:
            self.count("affinity_hit")
        target, transparent = self._way_to(chooser, backend, role, client)
        self.count("translated")
        if role.from_outside:
            self.count("nat_new")
            if not transparent:
                self.count("nat_snat")
            if role is Role.SHORTCUT:
                self.count("nat_short_circuit")
        return backend, target, transparent

    def reroute(self, role: Role, target: Target, client: str,
                failed: set[L4Addr]) -> tuple[Chooser, L4Addr, Target, bool] | None:
        """Another backend for a TCP connection whose `failed` ones refused or
        did not answer (tcp.Connection.next_backend), with its chooser; None
        if none is left or the frontend is gone."""
        chooser = self.tables[(Protocol.TCP, role.external)].get(target)
        if chooser is None:
            return None
        backend = chooser.pick_other(failed)
        if backend is None:
            return None
        way, transparent = self._way_to(chooser, backend, role, client)
        return chooser, backend, way, transparent

    def has_other(self, role: Role, target: Target, tried: set[L4Addr]) -> bool:
        """Whether the frontend has a TCP backend outside `tried`."""
        chooser = self.tables[(Protocol.TCP, role.external)].get(target)
        return chooser is not None and chooser.has_other(tried)

    def _way_to(self, chooser: Chooser, backend: L4Addr, role: Role,
                client: str) -> tuple[Target, bool]:
        """The backend's address, and whether the upstream keeps the client's
        address (the module's docstring says when)."""
        target = chooser.targets[backend]
        address = target[0]
        where = self.locality.get(address)
        if role is Role.NODE:
            transparent = False
        elif role is Role.POD:
            transparent = where in (Locality.HERE, Locality.REMOTE) and address != client
        else:
            transparent = where is Locality.HERE
        return target, transparent

    # ---- introspection ---------------------------------------------------------

    def counters(self) -> Mapping[str, int]:
        out = dict(self._counters)
        out["open_connections"] = self.open_connections
        out["udp_flows"] = len(self.flows)
        return out


def _raise_open_files_limit() -> None:
    """Each proxied TCP connection holds six descriptors (two sockets, two
    pipes), each UDP flow two: the soft limit of 1,024 many systems start
    processes with would cap the proxy at ~170 connections. Raise it to the
    hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (OSError, ValueError) as err:
            log.warning("TPROXY: cannot raise the open files limit from %d: %s", soft, err)
            return
    if hard < 65536:
        log.warning("TPROXY: at most %d open files: about %d proxied connections at once",
                    hard, hard // 6)
