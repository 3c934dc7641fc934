"""UDP: a flow per client address and port and Service address and port.

The first datagram of a flow reaches a listener (nftables' tproxy), which
reads the Service address it was sent to from IP(V6)_ORIGDSTADDR. The flow
then gets two sockets of its own:
- upstream: towards the chosen backend (from the client's address when it
  may keep it, as for TCP), marked so nothing intercepts it;
- downstream: bound (transparently) to the Service address and connected to
  the client. Replies leave from the Service address, so an unconnected
  client's recvfrom() shows the address it sent to; and the kernel delivers
  the client's next datagrams straight to this socket, its most specific
  match, without the listener.

A flow idle for longer than `idle_limit` says is closed: conntrack's
timeouts (30 s; 120 s once a datagram came after the flow's first reply and
2 s after its start), except 5 s for a flow whose client sent a single
datagram, as a DNS query does (layout.py says why). A flow whose backend left its
frontend moves at once to a backend the frontend still has (the reconciler
says so), where kube-proxy's conntrack entry would keep sending into the
void until it expired: its next datagram goes to the new backend, and for
DRAIN_TIME the old upstream socket still relays late replies, so the switch
loses nothing that was already on its way. A flow whose frontend has no
backend left is closed.
"""

from __future__ import annotations

import errno
import logging
import select
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING

from agent.datapath.tproxy import sockets
from agent.datapath.tproxy.layout import (
    UDP_IDLE_TIMEOUT,
    UDP_ONESHOT_TIMEOUT,
    UDP_STREAM_AFTER,
    UDP_STREAM_TIMEOUT,
    Role,
)

if TYPE_CHECKING:
    from agent.compute.types import L4Addr
    from agent.datapath.tproxy.engine import Engine

log = logging.getLogger(__name__)

MAX_DATAGRAM = 65535
DRAIN_TIME = 2.0
_CMSG_SPACE = socket.CMSG_SPACE(28)  # a sockaddr_in6 (the larger origdst)
FlowKey = tuple[str, int, str, int]  # client address, port, Service address, port
Bind = tuple[str, int, "L4Addr"]  # an upstream's client address and port, and its backend
_GONE = (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EPIPE)


def idle_limit(sent: int, stream: bool) -> float:
    """How long a flow may stay idle, given the datagrams its client sent and
    whether it became a stream (Flow.seen)."""
    if sent <= 1:
        return UDP_ONESHOT_TIMEOUT
    return UDP_STREAM_TIMEOUT if stream else UDP_IDLE_TIMEOUT


class _Upstream:
    """One socket towards one backend."""

    __slots__ = ("backend", "bind", "fd", "sock")

    def __init__(self, sock: socket.socket, backend: L4Addr, bind: Bind | None) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.backend = backend
        self.bind = bind


def _open_upstream(engine: Engine, key: FlowKey, role: Role, family: int) -> _Upstream | None:
    """Choose a backend for the flow and connect a socket to it; None if the
    frontend has none or the socket cannot be made."""
    route = engine.route(socket.SOCK_DGRAM, role, (key[2], key[3]), key[0], key[1])
    if route is None:
        return None
    backend, target, transparent = route
    client: tuple[str, int] | None = None
    bind: Bind | None = None
    keep = False
    if transparent:
        client = (key[0], key[1])
        # Two flows of one client port (to two Services, or one moving) that
        # chose the same backend must not share a 4-tuple: the second one
        # gets another port.
        bind = (key[0], key[1], backend)
        keep = bind not in engine.udp_binds
        if not keep:
            bind = None
    try:
        sock = sockets.upstream(family, socket.SOCK_DGRAM, client, keep_port=keep)
        try:
            sock.connect(target)
        except OSError:
            sock.close()
            raise
    except OSError as err:
        log.debug("proxy: cannot open UDP flow %s -> %s: %s", key, backend, err)
        engine.count("upstream_failed")
        return None
    if bind is not None:
        engine.udp_binds.add(bind)
    engine.counts.add(backend)
    return _Upstream(sock, backend, bind)


def _close_upstream(engine: Engine, up: _Upstream) -> None:
    engine.loop.unregister(up.fd)
    up.sock.close()
    if up.bind is not None:
        engine.udp_binds.discard(up.bind)
    engine.counts.remove(up.backend)


class Flow:
    __slots__ = ("dfd", "downstream", "draining", "engine", "family", "frontend", "key",
                 "last", "replied", "role", "sent", "started", "stream", "up")

    def __init__(self, engine: Engine, key: FlowKey, role: Role, family: int,
                 up: _Upstream, downstream: socket.socket) -> None:
        self.engine = engine
        self.key = key
        self.role = role
        self.family = family
        self.frontend = (key[2], key[3])
        self.up = up
        self.downstream = downstream
        self.dfd = downstream.fileno()
        self.draining: list[tuple[_Upstream, float]] = []
        self.started = self.last = engine.now
        self.sent = 0  # datagrams from the client
        self.replied = False  # a datagram came back from a backend
        self.stream = False  # conntrack's "stream": see seen()
        engine.flows[key] = self
        engine.flows_of.setdefault(self.frontend, set()).add(self)
        engine.loop.register(up.fd, select.EPOLLIN, self._replies(up))
        engine.loop.register(self.dfd, select.EPOLLIN, self._from_client)

    @property
    def backend(self) -> L4Addr:
        return self.up.backend

    def seen(self, reply: bool) -> None:
        """A datagram went through, either way, now. As conntrack ages UDP:
        a datagram that comes after the flow's first reply, and at least
        UDP_STREAM_AFTER after its start, makes it a stream (the first reply
        itself does not: conntrack notes a reply only after aging it)."""
        now = self.engine.now
        self.last = now
        if self.replied and now - self.started >= UDP_STREAM_AFTER:
            self.stream = True
        if reply:
            self.replied = True

    def to_backend(self, data: bytes) -> None:
        self.seen(reply=False)
        self.sent += 1
        try:
            self.up.sock.send(data)
        except BlockingIOError:
            self.engine.count("udp_dropped")  # the socket's buffer is full: as a NIC would
        except OSError as err:
            self._failed(err, backend_side=True)

    def _from_client(self, _events: int) -> None:
        for _ in range(64):
            try:
                data = self.downstream.recv(MAX_DATAGRAM)
            except BlockingIOError:
                return
            except OSError as err:
                self._failed(err, backend_side=False)
                return
            self.to_backend(data)
            if self.engine.flows.get(self.key) is not self:
                return

    def _replies(self, up: _Upstream) -> Callable[[int], None]:
        """The handler of an upstream socket: relay what its backend sends."""

        def on_ready(_events: int) -> None:
            for _ in range(64):
                try:
                    data = up.sock.recv(MAX_DATAGRAM)
                except BlockingIOError:
                    return
                except OSError as err:
                    if up is self.up:
                        self._failed(err, backend_side=True)
                    return
                self.seen(reply=True)
                try:
                    self.downstream.send(data)
                except BlockingIOError:
                    self.engine.count("udp_dropped")
                except OSError as err:
                    self._failed(err, backend_side=False)
                    return

        return on_ready

    def move(self) -> None:
        """The backend left: continue with one the frontend still has."""
        up = _open_upstream(self.engine, self.key, self.role, self.family)
        if up is None:
            self.close()
            return
        old, self.up = self.up, up
        self.draining.append((old, self.engine.now + DRAIN_TIME))
        self.engine.loop.register(up.fd, select.EPOLLIN, self._replies(up))
        self.engine.count("udp_flows_moved")

    def expire_draining(self, now: float) -> None:
        while self.draining and self.draining[0][1] <= now:
            old, _ = self.draining.pop(0)
            _close_upstream(self.engine, old)

    def _failed(self, err: OSError, backend_side: bool) -> None:
        """The backend (or the client) answered with an ICMP error: end the
        flow, so the client's next datagram picks again. A backend's error is
        passed on to the client, as conntrack passes it on for kube-proxy:
        after the flow is closed, so that a client that sends again at once
        starts a new flow rather than meeting this one's closing socket.

        Except EMSGSIZE: a router's "fragmentation needed" for the upstream's
        path, which the kernel has noted (it fragments the next datagrams
        that need it); one datagram was lost, the flow goes on."""
        engine = self.engine
        if backend_side and err.errno == errno.EMSGSIZE:
            engine.count("udp_too_big")
            return
        if err.errno not in _GONE:
            log.debug("proxy: UDP flow %s -> %s: %s", self.key, self.backend, err)
        engine.count("udp_flow_errors")
        self.close()
        notifier = engine.notifier
        if backend_side and err.errno is not None and notifier is not None \
                and notifier.unreachable(self.family, err.errno, (self.key[0], self.key[1]),
                                         self.frontend):
            engine.count("udp_errors_relayed")

    def close(self) -> None:
        engine = self.engine
        if engine.flows.get(self.key) is not self:
            return
        del engine.flows[self.key]
        siblings = engine.flows_of.get(self.frontend)
        if siblings is not None:
            siblings.discard(self)
            if not siblings:
                del engine.flows_of[self.frontend]
        for old, _ in self.draining:
            _close_upstream(engine, old)
        self.draining.clear()
        _close_upstream(engine, self.up)
        engine.loop.unregister(self.dfd)
        self.downstream.close()


def receive_all(engine: Engine, listener: socket.socket, role: Role) -> Callable[[int], None]:
    """The handler of one UDP listener: the first datagrams of new flows."""
    family = 4 if listener.family == socket.AF_INET else 6

    def on_ready(_events: int) -> None:
        for _ in range(64):
            try:
                data, ancdata, _flags, peer = listener.recvmsg(MAX_DATAGRAM, _CMSG_SPACE)
            except BlockingIOError:
                return
            except OSError as err:
                log.debug("proxy: UDP listener: %s", err)
                continue
            dst = sockets.original_destination(ancdata)
            if dst is None:
                continue  # sent to the listener's own address: nobody's Service
            key: FlowKey = (peer[0], peer[1], dst[0], dst[1])
            flow = engine.flows.get(key)
            if flow is None:
                flow = start(engine, key, role, family)
            if flow is not None:
                flow.to_backend(data)

    return on_ready


def start(engine: Engine, key: FlowKey, role: Role, family: int) -> Flow | None:
    up = _open_upstream(engine, key, role, family)
    if up is None:
        return None
    try:
        downstream = sockets.downstream(family, (key[2], key[3]), (key[0], key[1]))
    except OSError as err:
        log.debug("proxy: cannot answer UDP flow %s: %s", key, err)
        engine.count("upstream_failed")
        _close_upstream(engine, up)
        return None
    return Flow(engine, key, role, family, up, downstream)


def sweep(engine: Engine, now: float) -> None:
    """Close flows idle for longer than their timeout; end drained upstreams."""
    for flow in list(engine.flows.values()):
        if now - flow.last >= idle_limit(flow.sent, flow.stream):
            flow.close()
        elif flow.draining:
            flow.expire_draining(now)
