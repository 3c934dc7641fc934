"""TCP: accept what nftables hands over, connect to the chosen backend, and
move bytes between the two sockets with splice(2) through a pipe per
direction, so no byte is ever copied into Python.

One connection, two directions (client -> upstream, upstream -> client). A
direction reads from its source socket into its pipe and writes the pipe
into its destination socket. While its pipe holds bytes the destination did
not take (its send buffer is full), the direction stops reading until the
destination is writable again: back-pressure, as a kernel path would have.
When a source reaches end of file and its pipe is empty, the destination is
shut down for writing (half-close travels through); when both directions
are done, the connection is closed. A reset or an error on either side
resets the other (SO_LINGER 0).

Both sockets are watched edge-triggered, each registered once: no epoll_ctl
per state change, and none at the end (closing a socket leaves the epoll
set by itself). The price of edges is that a direction must read until the
kernel says EAGAIN, and must read again after a blocked write clears (no new
edge announces data that was already waiting).

What cannot be as on the eBPF path: the client's handshake completes with the
proxy before the backend is reached, so a backend that refuses shows up as a
reset after connect() succeeded, not as ECONNREFUSED. What it allows instead,
as kube-proxy's userspace proxy did: nothing of the client's has gone
anywhere before the backend answers, so a backend that refuses, or does not
answer within CONNECT_TIMEOUTS while the frontend has another, is replaced
by another (up to CONNECT_ATTEMPTS backends); the client is reset only when
none is left.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import select
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

from agent.datapath.tproxy import sockets
from agent.datapath.tproxy.layout import Role

if TYPE_CHECKING:
    from agent.compute.types import L4Addr
    from agent.datapath.tproxy.choice import Chooser
    from agent.datapath.tproxy.engine import Engine

log = logging.getLogger(__name__)

EPOLLIN = select.EPOLLIN
EPOLLOUT = select.EPOLLOUT
_WATCH = select.EPOLLIN | select.EPOLLOUT | select.EPOLLET
_FAILED = select.EPOLLERR | select.EPOLLHUP
_SPLICE = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
# Bytes a pipe holds; also the most one splice() moves. A pipe starts at the
# kernel's default (64 KiB) and grows to PIPE_SIZE the first time a read
# fills it: a bulk transfer then needs few system calls and wake-ups per
# megabyte (bench/tproxy.py, single-stream throughput: 0.722 of direct with
# fixed 256 KiB pipes, 0.837 with these; bench/reports/tproxy-*), while the
# many connections that carry a request and a response keep small pipes
# (the kernel allocates a pipe's slot array, one slot per page of capacity,
# when the pipe is sized). 1 MiB is also the default /proc/sys/fs/pipe-max-size.
PIPE_SIZE = 1 << 20
# Pipe-fulls one direction moves before other connections get their turn.
TURN = 16
# Backends one connection tries before its client is reset, and how long each
# attempt but the last may take while the frontend has a backend not tried
# yet (kube-proxy's userspace proxy tried up to 4, within 0.25 to 2 s). The
# last attempt, or one with no other backend to go to, waits as long as the
# kernel retries its SYN: a slow backend is better than none.
CONNECT_ATTEMPTS = 3
CONNECT_TIMEOUTS = (1.0, 2.0)
_RESET = (errno.ECONNRESET, errno.EPIPE, errno.ETIMEDOUT, errno.EHOSTUNREACH,
          errno.ENETUNREACH, errno.ECONNABORTED, errno.ECONNREFUSED)


class PipePool:
    """Pipes of the default size are reused: making one costs two system calls."""

    def __init__(self, keep: int = 256) -> None:
        self._free: list[tuple[int, int]] = []
        self._keep = keep
        # The kernel's default size, read from a first pipe, which is pooled.
        r, w = self._new()
        try:
            self.default_size: int = fcntl.fcntl(w, fcntl.F_GETPIPE_SZ)
        except OSError:
            os.close(r)
            os.close(w)
            raise
        self.put((r, w), empty=True, size=self.default_size)

    @staticmethod
    def _new() -> tuple[int, int]:
        return os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def get(self) -> tuple[int, int]:
        """A pipe of `default_size`."""
        return self._free.pop() if self._free else self._new()

    def put(self, pipe: tuple[int, int], empty: bool, size: int) -> None:
        """Take back a pipe of `size` bytes; only empty pipes of the default
        size are kept."""
        if empty and size == self.default_size and len(self._free) < self._keep:
            self._free.append(pipe)
        else:
            os.close(pipe[0])
            os.close(pipe[1])

    def close(self) -> None:
        for r, w in self._free:
            os.close(r)
            os.close(w)
        self._free.clear()


class _Direction:
    __slots__ = ("done", "dst", "dst_sock", "eof", "growable", "pending", "pipe", "size",
                 "src")

    def __init__(self, src: int, dst_sock: socket.socket, pipe: tuple[int, int],
                 size: int) -> None:
        self.src = src
        self.dst_sock = dst_sock
        self.dst = dst_sock.fileno()
        self.pipe = pipe
        self.size = size  # the pipe's capacity: the most one read moves
        self.growable = size < PIPE_SIZE
        self.pending = 0  # bytes in the pipe, not yet written to dst
        self.eof = False  # src reached end of file
        self.done = False  # dst was shut down for writing


class Origin(NamedTuple):
    """What a connection's backend was chosen for: enough to choose again."""

    role: Role
    target: tuple[str, int]  # the frontend (Service address, port)
    client: str
    family: int


class Connection:
    __slots__ = ("attempt", "backend", "cfd", "client", "down", "engine", "failed", "origin",
                 "state", "ufd", "up", "upstream")

    CONNECTING, OPEN, CLOSED = 0, 1, 2

    def __init__(self, engine: Engine, client: socket.socket, upstream: socket.socket,
                 backend: L4Addr, origin: Origin | None = None,
                 failed: set[L4Addr] | None = None) -> None:
        self.engine = engine
        self.client = client
        self.upstream = upstream
        self.backend = backend
        self.origin = origin  # None: never another backend
        self.failed = failed  # the backends that failed it (None: none yet)
        self.attempt = 1 + (len(failed) if failed else 0)
        self.cfd = client.fileno()
        self.ufd = upstream.fileno()
        self.state = Connection.CONNECTING
        pipes = engine.pipes
        up_pipe = pipes.get()
        try:
            down_pipe = pipes.get()
        except OSError:
            pipes.put(up_pipe, True, pipes.default_size)  # out of descriptors: give it back
            raise
        self.up = _Direction(self.cfd, upstream, up_pipe, pipes.default_size)
        self.down = _Direction(self.ufd, client, down_pipe, pipes.default_size)
        engine.counts.add(backend)
        engine.open_connections += 1
        loop = engine.loop
        loop.register(self.ufd, _WATCH, self._on_upstream)
        loop.register(self.cfd, _WATCH, self._on_client)
        self.arm()

    # ---- another backend -----------------------------------------------------

    def arm(self) -> None:
        """Give this attempt a deadline, if it is not the last and another
        backend is there to go to."""
        origin = self.origin
        if origin is None or self.attempt > len(CONNECT_TIMEOUTS):
            return
        engine = self.engine
        tried = {self.backend} if self.failed is None else self.failed | {self.backend}
        if not engine.has_other(origin.role, origin.target, tried):
            return
        engine.connect_deadlines[self.attempt - 1].append(
            (engine.now + CONNECT_TIMEOUTS[self.attempt - 1], self))

    def timed_out(self, attempt: int) -> None:
        """A deadline came: if this attempt is still connecting, go on to
        another backend (or, if none is left now, keep waiting)."""
        if self.state == Connection.CONNECTING and self.attempt == attempt:
            self.engine.count("upstream_timeout")
            self.next_backend()

    def next_backend(self) -> bool:
        """Replace the backend that failed with another; False if none is
        left (or no attempt). The client's bytes wait in its socket
        meanwhile: nothing is read from it before the backend answered. A
        backend whose connect fails at once counts as an attempt too."""
        origin = self.origin
        if origin is None:
            return False
        engine = self.engine
        failed = self.failed = self.failed or set()
        failed.add(self.backend)
        found = _connect_another(engine, origin, failed, CONNECT_ATTEMPTS - self.attempt)
        if found is None:
            return False
        chooser, backend, upstream = found
        self.attempt = len(failed) + 1
        ufd = upstream.fileno()
        try:
            # Registered while the old socket is still open: the two
            # descriptors differ, and the old one's events are not taken
            # for the new one's.
            engine.loop.register(ufd, _WATCH, self._on_upstream)
        except OSError as exc:
            log.warning("proxy: cannot watch a connection to %s: %s", backend, exc)
            upstream.close()
            return False
        engine.loop.forget(self.ufd)
        self.upstream.close()
        engine.counts.remove(self.backend)
        engine.counts.add(backend)
        self.upstream, self.ufd, self.backend = upstream, ufd, backend
        self.up.dst_sock, self.up.dst = upstream, ufd
        self.down.src = ufd
        chooser.stick(origin.client, backend)
        engine.count("upstream_retried")
        self.arm()
        return True

    # ---- events --------------------------------------------------------------

    def _on_upstream(self, events: int) -> None:
        if self.state == Connection.CONNECTING:
            # A connect() that failed says so with EPOLLERR (refused, timed
            # out, unreachable); only then is SO_ERROR worth a system call.
            if events & _FAILED:
                err = self.upstream.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    self.engine.count("upstream_failed")
                    log.debug("proxy: %s: connect failed: %s", self.backend, os.strerror(err))
                    if not self.next_backend():
                        self.engine.count("upstream_gave_up")
                        self.abort()
                    return
                if not events & EPOLLOUT:
                    return  # no error after all: still connecting
            elif not events & EPOLLOUT:
                return  # not connected yet
            self.state = Connection.OPEN
            # The client may have written while we connected: its edge is gone.
            if not self._run(self.up):
                return
            # A backend that speaks first (or closed at once) did so within
            # this event: it reports EPOLLIN (or HUP) beside EPOLLOUT. Without
            # them, a read would only hit EAGAIN.
            if events & ~EPOLLOUT and not self._run(self.down):
                return
            self._maybe_close()
            return
        self._on_event(events, self.down, self.up, self.upstream)

    def _on_client(self, events: int) -> None:
        if self.state == Connection.OPEN:
            self._on_event(events, self.up, self.down, self.client)
        elif self.state == Connection.CONNECTING and events & select.EPOLLERR \
                and _failed(self.client):
            self.abort()  # the client reset before the backend answered: stop there

    def _on_event(self, events: int, reading: _Direction, writing: _Direction,
                  sock: socket.socket) -> None:
        """An event on `sock`, which `reading` reads from and `writing` writes to."""
        # A reset is news even to a direction whose reading is over: a client
        # that half-closed and then reset (or gave up) would otherwise hold
        # the backend's connection until the backend writes, perhaps never.
        if events & select.EPOLLERR and _failed(sock):
            self.abort()
            return
        if events & ~EPOLLOUT and not reading.done and not self._run(reading):
            return
        # Writable again: only news to a direction that was blocked on it.
        if events & EPOLLOUT and writing.pending and not self._run(writing):
            return
        self._maybe_close()

    # ---- moving bytes --------------------------------------------------------

    def _run(self, d: _Direction) -> bool:
        """Move what can be moved in one direction: drain the pipe, then read
        and write until the source has nothing (EAGAIN), ends, or the
        destination is full; or, after TURN pipe-fulls, let other connections
        have their turn and go on right after them (with edge-triggered
        events, nothing else would say that data is still waiting). False if
        the connection was aborted."""
        splice = os.splice
        pr, pw = d.pipe
        turns = TURN
        try:
            while True:
                while d.pending:
                    try:
                        d.pending -= splice(pr, d.dst, d.pending, flags=_SPLICE)
                    except BlockingIOError:
                        return True  # the destination is full: wait for its edge
                if d.eof:
                    if not d.done:
                        d.done = True
                        # A peer that is gone already is noticed by the other direction.
                        with contextlib.suppress(OSError):
                            d.dst_sock.shutdown(socket.SHUT_WR)
                    return True
                turns -= 1
                if not turns:
                    self.engine.loop.defer(lambda: self._resume(d))
                    return True
                try:
                    n = splice(d.src, pw, d.size, flags=_SPLICE)
                except BlockingIOError:
                    return True  # nothing more to read: wait for the next edge
                if n == 0:
                    d.eof = True
                else:
                    d.pending = n
                    if n == d.size and d.growable:
                        _grow(d)
        except OSError as err:
            if err.errno not in _RESET:
                log.debug("proxy: splice for %s: %s", self.backend, err)
            self.abort()
            return False

    def _resume(self, d: _Direction) -> None:
        if self.state == Connection.OPEN and not d.done and self._run(d):
            self._maybe_close()

    def _maybe_close(self) -> None:
        if self.up.done and self.down.done:
            self.close()

    # ---- ending --------------------------------------------------------------

    def _release(self) -> None:
        self.state = Connection.CLOSED
        engine = self.engine
        # Closing the sockets takes them out of the epoll set.
        engine.loop.forget(self.cfd)
        engine.loop.forget(self.ufd)
        engine.pipes.put(self.up.pipe, self.up.pending == 0, self.up.size)
        engine.pipes.put(self.down.pipe, self.down.pending == 0, self.down.size)
        engine.counts.remove(self.backend)
        engine.open_connections -= 1

    def close(self) -> None:
        if self.state == Connection.CLOSED:
            return
        self._release()
        self.client.close()
        self.upstream.close()

    def abort(self) -> None:
        """Reset both sides."""
        if self.state == Connection.CLOSED:
            return
        self._release()
        sockets.abort(self.client)
        sockets.abort(self.upstream)


def _failed(sock: socket.socket) -> bool:
    """Whether the socket holds an error (a reset, a timeout); reading it
    clears it, so only an EPOLLERR is worth this system call."""
    try:
        return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != 0
    except OSError:
        return True


def _grow(d: _Direction) -> None:
    """A read filled the pipe: a bulk transfer. Give it PIPE_SIZE (a pipe
    grows with its bytes in it); if the kernel refuses (memory, or the
    per-user pipe limits), the pipe keeps working at its size."""
    d.growable = False  # asked once per direction, granted or not
    with contextlib.suppress(OSError):
        d.size = fcntl.fcntl(d.pipe[1], fcntl.F_SETPIPE_SZ, PIPE_SIZE)


def _connect(family: int, backend: L4Addr, target: tuple[str, int],
             client: str | None) -> socket.socket | None:
    """A socket connecting (non-blocking) to `target`, from `client`'s address
    if given; None if the connect failed at once."""
    try:
        # From the client's address, but on a port the kernel picks: the
        # client's own port would make this socket's TIME_WAIT (after a client
        # that closes first) collide with the client's next direct connection
        # to the same backend from that port.
        upstream = sockets.upstream(family, socket.SOCK_STREAM,
                                    (client, 0) if client is not None else None,
                                    keep_port=False)
    except OSError as exc:
        log.debug("proxy: cannot open a connection to %s: %s", backend, exc)
        return None
    try:
        err = upstream.connect_ex(target)
    except OSError as exc:
        err = exc.errno or errno.EINVAL
    if err not in (0, errno.EINPROGRESS):
        log.debug("proxy: connect to %s failed: %s", backend, os.strerror(err))
        upstream.close()
        return None
    return upstream


def _connect_another(engine: Engine, origin: Origin, failed: set[L4Addr],
                     attempts: int) -> tuple[Chooser, L4Addr, socket.socket] | None:
    """Within `attempts`, a backend outside `failed` whose connect started
    (each one that fails at once joins `failed`), with its chooser; None if
    none did."""
    for _ in range(attempts):
        route = engine.reroute(origin.role, origin.target, origin.client, failed)
        if route is None:
            return None
        chooser, backend, target, transparent = route
        upstream = _connect(origin.family, backend, target,
                            origin.client if transparent else None)
        if upstream is not None:
            return chooser, backend, upstream
        engine.count("upstream_failed")
        failed.add(backend)
    return None


def accept_all(engine: Engine, listener: socket.socket, role: Role) -> Callable[[int], None]:
    """The handler of one listener: accept every waiting connection and start it."""
    family = 4 if listener.family == socket.AF_INET else 6

    fd = listener.fileno()

    def resume() -> None:
        engine.loop.modify(fd, select.EPOLLIN)

    def on_ready(_events: int) -> None:
        for _ in range(64):
            try:
                client, peer = listener.accept()
            except BlockingIOError:
                return
            except OSError as err:
                if err.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of descriptors or memory: the waiting connections stay
                    # in the backlog; look again in a moment rather than spin.
                    engine.count("accept_failed")
                    log.warning("proxy: cannot accept: %s; pausing for 100 ms", err)
                    engine.loop.modify(fd, 0)
                    engine.loop.call_later(0.1, resume)
                    return
                continue
            start(engine, client, peer, role, family)

    return on_ready


def start(engine: Engine, client: socket.socket, peer: tuple[str, int], role: Role,
          family: int) -> None:
    """Pick a backend for a connection nftables handed over and connect to it."""
    client.setblocking(False)
    dst = client.getsockname()
    route = engine.route(socket.SOCK_STREAM, role, (dst[0], dst[1]), peer[0], peer[1])
    if route is None:
        sockets.abort(client)
        return
    backend, target, transparent = route
    origin = Origin(role, (dst[0], dst[1]), peer[0], family)
    upstream = _connect(family, backend, target, peer[0] if transparent else None)
    failed = None
    if upstream is None:  # failed at once: another backend, as for a later failure
        engine.count("upstream_failed")
        failed = {backend}
        found = _connect_another(engine, origin, failed, CONNECT_ATTEMPTS - 1)
        if found is None:
            engine.count("upstream_gave_up")
            sockets.abort(client)
            return
        chooser, backend, upstream = found
        chooser.stick(origin.client, backend)
        engine.count("upstream_retried")
    try:
        Connection(engine, client, upstream, backend, origin, failed)
    except OSError as exc:  # no pipe: out of descriptors or memory
        engine.count("accept_failed")
        log.warning("proxy: cannot relay a connection to %s: %s", backend, exc)
        upstream.close()
        sockets.abort(client)
