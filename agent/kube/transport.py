"""HTTP/1.1 to one API server, on the standard library (http.client, ssl).

    Transport(access)          builds the TLS context now: ConfigError if the
                               CA or the client certificate does not load
    request(what, method, target, body, content_type, timeout)
                               -> Answer(status, body), the body read whole
    stream(what, target, timeout)
                               -> Stream: the body's lines as they come, on a
                               connection of its own, closable from any thread

Ordinary requests share a few kept-alive connections: one is taken by one
request at a time and given back once its answer has been read whole, so
threads never interleave on a connection. A stream (a watch) holds its
connection until it ends and never returns it.

Failures with no HTTP answer (refused, reset, timed out, TLS) leave as
KubeApiError(what, 0, message); an answer of any status is the caller's to
judge. The API server closes connections that sat idle: a request that
finds its kept-alive connection closed (before any answer) is sent once more
on a new one, unless it is a POST, which the server may have acted on before
closing: that one fails, and its caller retries on its own terms.
"""

from __future__ import annotations

import contextlib
import errno
import http.client
import os
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

from agent import __version__
from agent.errors import ConfigError, KubeApiError
from agent.kube.kubeconfig import Access, Pem

# Idle connections kept for reuse, and how long one may sit idle: below the
# API server's own idle timeout, so most are reused before it closes them.
POOL_SIZE = 4
IDLE_MAX = 30.0
READ_SIZE = 64 * 1024
# (connect, read) seconds.
Timeout = tuple[float, float]
# TCP keepalive on every connection: (idle seconds before the first probe,
# seconds between probes, unanswered probes before the kernel gives up). A
# server gone without a word (its host down, a partition, a NAT or load
# balancer that forgot the connection) then breaks a watch within about a
# minute of its last byte; without it a watch's read timeout (its
# timeoutSeconds plus 30 s, up to 6.5 min) would pass first, the agent
# hearing no change meanwhile.
KEEPALIVE = (30, 10, 3)


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes


def _describe(err: BaseException) -> str:
    if isinstance(err, TimeoutError):
        if err.errno == errno.ETIMEDOUT:  # the kernel gave up, not our read timeout
            return "the server stopped answering (connection timed out)"
        return "timed out"
    if isinstance(err, http.client.RemoteDisconnected):
        return "the server closed the connection"
    return str(err) or type(err).__name__


# ---- TLS ---------------------------------------------------------------------

def tls_context(access: Access) -> ssl.SSLContext | None:
    """The TLS context of `access` (None for http://), every file loaded now."""
    if not access.server.startswith("https://"):
        return None
    ca = access.ca
    try:
        context = ssl.create_default_context(cafile=ca.path if ca else None,
                                             cadata=ca.data if ca else None)
    except (OSError, ValueError) as err:  # ssl.SSLError is an OSError
        what = ca.source if ca else "the system's CA certificates"
        raise ConfigError(f"{access.origin}: {what}: cannot load: {err}") from None
    if access.insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if access.certificate is not None and access.private_key is not None:
        _load_client_certificate(context, access.certificate, access.private_key, access.origin)
    return context


def _load_client_certificate(context: ssl.SSLContext, certificate: Pem, key: Pem,
                             origin: str) -> None:
    """ssl loads a certificate and key only from files: text from a kubeconfig
    goes to a private directory for the moment it takes, and is removed."""
    with contextlib.ExitStack() as stack:
        paths: list[str] = []
        for pem in (certificate, key):
            if pem.path is not None:
                paths.append(pem.path)
                continue
            directory = stack.enter_context(tempfile.TemporaryDirectory(prefix="veer-tls-"))
            path = os.path.join(directory, f"{len(paths)}.pem")
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(pem.data or "")
            paths.append(path)
        try:
            context.load_cert_chain(paths[0], paths[1])
        except (OSError, ValueError) as err:
            raise ConfigError(f"{origin}: {certificate.source} and {key.source}: cannot load "
                              f"the client certificate: {err}") from None


# ---- connections ---------------------------------------------------------------

class _Connection(http.client.HTTPConnection):
    """One connection; connect() waits the connect timeout (TCP and TLS
    handshake), and the caller then sets the read timeout on `sock`."""

    def __init__(self, host: str, port: int, tls: ssl.SSLContext | None,
                 server_name: str | None, connect_timeout: float) -> None:
        super().__init__(host, port, timeout=connect_timeout)
        self._tls = tls
        self._server_name = server_name
        self.idle_since = 0.0

    def connect(self) -> None:
        super().connect()
        idle, interval, probes = KEEPALIVE
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, probes)
        if self._tls is not None:
            self.sock = self._tls.wrap_socket(self.sock,
                                              server_hostname=self._server_name or self.host)


class Stream:
    """One streaming response: `lines()` yields its lines (without the
    newline) until the server ends it; `close()` from any thread ends it.

    Invariant: the connection is closed exactly once, by close() when no
    thread is reading, otherwise by the reader once its read returns, so a
    socket is never closed (its descriptor freed for reuse) under a reader.
    """

    def __init__(self, connection: _Connection, response: http.client.HTTPResponse,
                 what: str) -> None:
        self.status = response.status
        self._connection = connection
        self._response = response
        self._what = what
        self._lock = threading.Lock()
        self._closed = False
        self._reading = False
        self._released = False

    def body(self, limit: int = READ_SIZE) -> bytes:
        """The start of the body (an error's Status), then closed."""
        try:
            return self._response.read(limit)
        except (OSError, http.client.HTTPException):
            return b""
        finally:
            self.close()

    def _read(self) -> bytes:
        with self._lock:
            if self._closed:
                return b""
            self._reading = True
        try:
            return self._response.read1(READ_SIZE)
        finally:
            with self._lock:
                self._reading = False
                closed = self._closed
            if closed:
                self._release()

    def lines(self) -> Iterator[bytes]:
        buffer = bytearray()
        try:
            while chunk := self._read():
                buffer.extend(chunk)
                start = 0
                while (end := buffer.find(b"\n", start)) >= 0:
                    if end > start:
                        yield bytes(buffer[start:end])
                    start = end + 1
                del buffer[:start]
            if buffer.strip() and not self.closed:
                yield bytes(buffer)
        except (OSError, ValueError, http.client.HTTPException) as err:
            # close() from another thread makes the read fail: that is no error.
            if not self.closed:
                raise KubeApiError(self._what, 0, f"stream broken: {_describe(err)}") from None
        finally:
            self.close()

    @property
    def closed(self) -> bool:
        with self._lock:
            return self._closed

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            reading = self._reading
        if not reading:
            self._release()
            return
        sock = self._connection.sock
        if sock is not None:
            # Unblock the reader's recv(). socket.socket.shutdown, not the
            # SSLSocket's: that one also drops the TLS object the reader is
            # using; this acts on the descriptor only.
            with contextlib.suppress(OSError):
                socket.socket.shutdown(sock, socket.SHUT_RDWR)

    def _release(self) -> None:
        with self._lock:
            if self._released:
                return
            self._released = True
        with contextlib.suppress(OSError, http.client.HTTPException):
            self._connection.close()


class Transport:
    """Requests to the API server of one Access (see the module docstring)."""

    def __init__(self, access: Access) -> None:
        parts = urlsplit(access.server)
        https = parts.scheme == "https"
        self.server = access.server
        self._host = parts.hostname or ""
        self._port = parts.port or (443 if https else 80)
        self._prefix = parts.path.rstrip("/")  # a server behind a path
        self._tls = tls_context(access)
        self._server_name = access.tls_server_name
        self._token = access.token
        self._lock = threading.Lock()
        self._idle: list[_Connection] = []
        self._user_agent = f"veer/{__version__}"

    def _headers(self, what: str, content_type: str | None) -> dict[str, str]:
        headers = {"Accept": "application/json", "User-Agent": self._user_agent}
        if content_type:
            headers["Content-Type"] = content_type
        try:
            token = self._token()
        except ConfigError as err:  # a token file gone before it was ever read
            raise KubeApiError(what, 0, str(err)) from None
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return headers

    def _connect(self, what: str, timeout: Timeout) -> _Connection:
        connection = _Connection(self._host, self._port, self._tls, self._server_name,
                                 timeout[0])
        try:
            connection.connect()
        except (OSError, ValueError) as err:
            connection.close()
            raise KubeApiError(what, 0, f"cannot connect to {self.server}: "
                               f"{_describe(err)}") from None
        return connection

    def _take(self, what: str, timeout: Timeout,
              fresh: bool = False) -> tuple[_Connection, bool]:
        """A connection for one request (a new one if `fresh`), and whether it
        was kept from before."""
        stale: list[_Connection] = []
        connection = None
        now = time.monotonic()
        with self._lock:
            while self._idle and not fresh:
                candidate = self._idle.pop()
                if now - candidate.idle_since < IDLE_MAX:
                    connection = candidate
                    break
                stale.append(candidate)
        for old in stale:
            old.close()
        reused = connection is not None
        if connection is None:
            connection = self._connect(what, timeout)
        if connection.sock is not None:
            connection.sock.settimeout(timeout[1])
        return connection, reused

    def _give_back(self, connection: _Connection) -> None:
        connection.idle_since = time.monotonic()
        with self._lock:
            if len(self._idle) < POOL_SIZE:
                self._idle.append(connection)
                return
        connection.close()

    def request(self, what: str, method: str, target: str, body: bytes | None,
                content_type: str | None, timeout: Timeout) -> Answer:
        """One request; its answer read whole, whatever its status."""
        headers = self._headers(what, content_type)
        url = self._prefix + target
        for attempt in (1, 2):
            connection, reused = self._take(what, timeout, fresh=attempt == 2)
            try:
                try:
                    connection.request(method, url, body=body, headers=headers)
                    response = connection.getresponse()
                except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                    if reused and attempt == 1 and method != "POST":  # closed while idle
                        connection.close()
                        # The others kept as long are likely closed too (a
                        # restarted server): drop them; send again on a new one.
                        self.close()
                        continue
                    raise
                data = response.read()
            except (OSError, ValueError, http.client.HTTPException) as err:
                connection.close()
                raise KubeApiError(what, 0, _describe(err)) from None
            if response.will_close:
                connection.close()
            else:
                self._give_back(connection)
            return Answer(response.status, data)
        raise AssertionError("unreachable: the second attempt returns or raises")

    def stream(self, what: str, target: str, timeout: Timeout) -> Stream:
        """A GET whose answer is read as it comes, on a new connection."""
        headers = self._headers(what, None)
        connection = self._connect(what, timeout)
        try:
            if connection.sock is not None:
                connection.sock.settimeout(timeout[1])
            connection.request("GET", self._prefix + target, headers=headers)
            response = connection.getresponse()
        except (OSError, ValueError, http.client.HTTPException) as err:
            connection.close()
            raise KubeApiError(what, 0, _describe(err)) from None
        return Stream(connection, response, what)

    def close(self) -> None:
        """Close the idle connections (streams are their owners' to close)."""
        with self._lock:
            idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()
