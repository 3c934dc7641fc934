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

A flow idle for UDP_IDLE_TIMEOUT is closed, and so is a flow whose backend
left its frontend (the reconciler says so): its next datagram reaches the
listener again and picks a live backend, where kube-proxy's conntrack entry
would keep sending into the void until it expired.
"""

from __future__ import annotations

import errno
import logging
import select
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING

from agent.datapath.tproxy import sockets
from agent.datapath.tproxy.layout import UDP_IDLE_TIMEOUT, Role

if TYPE_CHECKING:
    from agent.compute.types import L4Addr
    from agent.datapath.tproxy.engine import Engine

log = logging.getLogger(__name__)

MAX_DATAGRAM = 65535
_CMSG_SPACE = socket.CMSG_SPACE(28)  # a sockaddr_in6 (the larger origdst)
FlowKey = tuple[str, int, str, int]  # client address, port, Service address, port
_GONE = (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EPIPE)


class Flow:
    __slots__ = ("backend", "dfd", "downstream", "engine", "frontend", "key", "last",
                 "ufd", "upstream", "upstream_bind")

    def __init__(self, engine: Engine, key: FlowKey, frontend: tuple[str, int],
                 backend: L4Addr, upstream: socket.socket, downstream: socket.socket,
                 upstream_bind: tuple[str, int, L4Addr] | None) -> None:
        self.engine = engine
        self.key = key
        self.frontend = frontend
        self.backend = backend
        self.upstream = upstream
        self.downstream = downstream
        self.upstream_bind = upstream_bind
        self.ufd = upstream.fileno()
        self.dfd = downstream.fileno()
        self.last = engine.now
        engine.counts.add(backend)
        engine.flows[key] = self
        engine.loop.register(self.ufd, select.EPOLLIN, self._from_backend)
        engine.loop.register(self.dfd, select.EPOLLIN, self._from_client)

    def to_backend(self, data: bytes) -> None:
        self.last = self.engine.now
        try:
            self.upstream.send(data)
        except BlockingIOError:
            self.engine.count("udp_dropped")  # the socket's buffer is full: as a NIC would
        except OSError as err:
            self._failed(err)

    def _from_client(self, _events: int) -> None:
        for _ in range(64):
            try:
                data = self.downstream.recv(MAX_DATAGRAM)
            except BlockingIOError:
                return
            except OSError as err:
                self._failed(err)
                return
            self.to_backend(data)

    def _from_backend(self, _events: int) -> None:
        for _ in range(64):
            try:
                data = self.upstream.recv(MAX_DATAGRAM)
            except BlockingIOError:
                return
            except OSError as err:
                self._failed(err)
                return
            self.last = self.engine.now
            try:
                self.downstream.send(data)
            except BlockingIOError:
                self.engine.count("udp_dropped")
            except OSError as err:
                self._failed(err)
                return

    def _failed(self, err: OSError) -> None:
        """The backend (or the client) answered with an ICMP error: end the
        flow, so the client's next datagram picks again."""
        if err.errno not in _GONE:
            log.debug("proxy: UDP flow %s -> %s: %s", self.key, self.backend, err)
        self.engine.count("udp_flow_errors")
        self.close()

    def close(self) -> None:
        engine = self.engine
        if engine.flows.get(self.key) is not self:
            return
        del engine.flows[self.key]
        if self.upstream_bind is not None:
            engine.udp_binds.discard(self.upstream_bind)
        engine.loop.unregister(self.ufd)
        engine.loop.unregister(self.dfd)
        self.upstream.close()
        self.downstream.close()
        engine.counts.remove(self.backend)


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
    client = (key[0], key[1])
    frontend = (key[2], key[3])
    route = engine.route(socket.SOCK_DGRAM, role, frontend, key[0], key[1])
    if route is None:
        return None
    backend, target, transparent = route
    bind = None
    upstream_bind: tuple[str, int, L4Addr] | None = None
    if transparent:
        # Two flows of one client port (to two Services) that chose the same
        # backend must not share a 4-tuple: the second gets another port.
        upstream_bind = (key[0], key[1], backend)
        keep = upstream_bind not in engine.udp_binds
        bind = client
        if not keep:
            upstream_bind = None
    try:
        upstream = sockets.upstream(family, socket.SOCK_DGRAM, bind,
                                    keep_port=upstream_bind is not None)
        try:
            upstream.connect(target)
            downstream = sockets.downstream(family, frontend, client)
        except OSError:
            upstream.close()
            raise
    except OSError as err:
        log.debug("proxy: cannot open UDP flow %s -> %s: %s", key, backend, err)
        engine.count("upstream_failed")
        return None
    if upstream_bind is not None:
        engine.udp_binds.add(upstream_bind)
    return Flow(engine, key, frontend, backend, upstream, downstream, upstream_bind)


def sweep(engine: Engine, now: float) -> None:
    """Close flows idle for longer than the timeout."""
    idle = [f for f in engine.flows.values() if now - f.last >= UDP_IDLE_TIMEOUT]
    for flow in idle:
        flow.close()
