"""Socket options TPROXY mode needs, and the sockets the proxy opens.

Python's socket module does not name every Linux option used here, so the
numbers come from the kernel's uapi headers (they are ABI, never renumbered).
"""

from __future__ import annotations

import contextlib
import errno
import socket
import struct

from agent.datapath.tproxy.layout import LOOPBACK, MARK_PROXY

SOL_IP = 0
SOL_IPV6 = 41
IP_TRANSPARENT = 19
IP_RECVORIGDSTADDR = 20  # also the cmsg type IP_ORIGDSTADDR
IP_BIND_ADDRESS_NO_PORT = 24
IPV6_TRANSPARENT = 75
IPV6_RECVORIGDSTADDR = 74  # also the cmsg type IPV6_ORIGDSTADDR
SO_MARK = 36
# Options that keep a raw ICMP socket's receive queue empty (icmp_sender).
SOL_RAW, ICMP_FILTER = 255, 1
SOL_ICMPV6, ICMP6_FILTER = 58, 1

_AF = {4: socket.AF_INET, 6: socket.AF_INET6}


def family_of(address: str) -> int:
    return 6 if ":" in address else 4


def set_transparent(sock: socket.socket, family: int) -> None:
    """IP_TRANSPARENT: bind to and send from addresses that are not this
    node's, and receive what nftables' tproxy hands over."""
    if family == 4:
        sock.setsockopt(SOL_IP, IP_TRANSPARENT, 1)
    else:
        sock.setsockopt(SOL_IPV6, IPV6_TRANSPARENT, 1)


def listener(family: int, kind: socket.SocketKind, backlog: int = 4096) -> socket.socket:
    """A transparent socket on the loopback address, on a port the kernel picks."""
    sock = socket.socket(_AF[family], kind)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Accepted sockets inherit the mark: nftables knows them by it.
        sock.setsockopt(socket.SOL_SOCKET, SO_MARK, MARK_PROXY)
        set_transparent(sock, family)
        if kind == socket.SOCK_DGRAM:
            level, opt = (SOL_IP, IP_RECVORIGDSTADDR) if family == 4 else \
                (SOL_IPV6, IPV6_RECVORIGDSTADDR)
            sock.setsockopt(level, opt, 1)
        sock.bind((LOOPBACK[family], 0))
        if kind == socket.SOCK_STREAM:
            # Accepted sockets inherit it: one system call less per connection.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def upstream(family: int, kind: socket.SocketKind, client: tuple[str, int] | None,
             keep_port: bool = True) -> socket.socket:
    """A socket towards a backend, marked so nothing of veer's intercepts it.

    With `client`, it is bound (transparently) to the client's address, and
    to its port too when `keep_port` and that port is free; otherwise (TCP)
    the port is chosen at connect(), for the whole 4-tuple, so ports on a
    client's address never run out. Without `client`, the kernel picks this
    node's address (the proxy source-NATs)."""
    sock = socket.socket(_AF[family], kind | socket.SOCK_NONBLOCK)
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_MARK, MARK_PROXY)
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if client is not None:
            set_transparent(sock, family)
            bound = False
            if keep_port and client[1]:
                # Other flows of this client port (to other Services) hold it too.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    sock.bind(client)
                    bound = True
                except OSError as err:
                    if err.errno != errno.EADDRINUSE:
                        raise
            if not bound:
                if kind == socket.SOCK_STREAM:
                    sock.setsockopt(SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                sock.bind((client[0], 0))
    except OSError:
        sock.close()
        raise
    return sock


def downstream(family: int, local: tuple[str, int], client: tuple[str, int]) -> socket.socket:
    """A UDP socket bound to the Service address a client sent to and connected
    to the client: the kernel then delivers that client's next datagrams to it
    (the most specific match), and its replies leave from the Service address."""
    sock = socket.socket(_AF[family], socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, SO_MARK, MARK_PROXY)
        set_transparent(sock, family)
        sock.bind(local)
        sock.connect(client)
    except OSError:
        sock.close()
        raise
    return sock


def icmp_sender(family: int) -> socket.socket:
    """A raw ICMP(v6) socket that only sends: every type is filtered out on
    receive, or the kernel would queue a copy of every ICMP packet of the
    node for it until its buffer filled. Marked as every socket of the
    proxy's, so nothing of veer's intercepts what it sends."""
    af, proto = ((socket.AF_INET, socket.IPPROTO_ICMP) if family == 4
                 else (socket.AF_INET6, socket.IPPROTO_ICMPV6))
    sock = socket.socket(af, socket.SOCK_RAW | socket.SOCK_NONBLOCK, proto)
    try:
        if family == 4:
            sock.setsockopt(SOL_RAW, ICMP_FILTER, struct.pack("I", 0xFFFFFFFF))
        else:
            sock.setsockopt(SOL_ICMPV6, ICMP6_FILTER, b"\xff" * 32)
        sock.setsockopt(socket.SOL_SOCKET, SO_MARK, MARK_PROXY)
    except OSError:
        sock.close()
        raise
    return sock


def original_destination(ancdata: list[tuple[int, int, bytes]]) -> tuple[str, int] | None:
    """The Service address and port a tproxied datagram was sent to, from the
    IP(V6)_ORIGDSTADDR control message (a sockaddr_in / sockaddr_in6)."""
    for level, kind, data in ancdata:
        if level == SOL_IP and kind == IP_RECVORIGDSTADDR and len(data) >= 8:
            port = struct.unpack_from("!H", data, 2)[0]
            return socket.inet_ntop(socket.AF_INET, data[4:8]), port
        if level == SOL_IPV6 and kind == IPV6_RECVORIGDSTADDR and len(data) >= 24:
            port = struct.unpack_from("!H", data, 2)[0]
            return socket.inet_ntop(socket.AF_INET6, data[8:24]), port
    return None


def abort(sock: socket.socket) -> None:
    """Close with a reset (SO_LINGER 0), so the peer learns at once."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
