"""ICMP errors the proxy sends to UDP clients on behalf of their backends.

Through kube-proxy's DNAT (or veer's socket-level load balancing), a UDP
client sees its backend's ICMP port unreachable: conntrack translates the
error back to the Service address, and a connected socket's next recv()
fails with ECONNREFUSED. Through the proxy, the error reaches the proxy's
upstream socket instead (ruleset.py diverts it there); the flow ends
(udp.py), and `Notifier` tells the client in the backend's stead: an ICMP
destination unreachable whose quoted datagram is the client's own, from its
address and port to the Service's, so the client's kernel finds the socket
that sent it.

The messages are built by pure functions, testable without root; only
`Notifier` opens (raw) sockets.
"""

from __future__ import annotations

import errno
import logging
import socket
import struct

from agent.datapath.tproxy import sockets

log = logging.getLogger(__name__)

_IPPROTO_UDP = 17
_HOP_LIMIT = 64

# errno of the proxy's upstream socket -> the destination-unreachable code
# that the client's kernel turns back into that errno, per family. A connected
# UDP socket without IP_RECVERR (the upstream, and most clients) hears only of
# the codes the kernel calls fatal (icmp_err_convert, icmpv6_err_convert), so
# each errno the upstream can see comes from a fatal code, and is relayed as
# one: host unreachable as "communication administratively prohibited" (13),
# not as code 1, which the client would ignore. IPv6 has no fatal code for
# EHOSTUNREACH or ENETUNREACH, so an upstream never sees them.
CODES: dict[int, dict[int, int]] = {
    4: {
        errno.ECONNREFUSED: 3,  # port unreachable
        errno.EHOSTUNREACH: 13,  # communication administratively prohibited
        errno.ENETUNREACH: 9,  # network administratively prohibited
        errno.ENOPROTOOPT: 2,  # protocol unreachable
        errno.EHOSTDOWN: 7,  # destination host unknown
    },
    6: {
        errno.ECONNREFUSED: 4,  # port unreachable
        errno.EACCES: 1,  # administratively prohibited
    },
}
_ICMP_UNREACH = 3
_ICMP6_UNREACH = 1


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of `data`."""
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _quoted_udp(client_port: int, service_port: int) -> bytes:
    """The first 8 bytes of the client's datagram: its UDP header (the
    checksum left 0; nobody verifies a quoted one)."""
    return struct.pack("!HHHH", client_port, service_port, 8, 0)


def unreachable_v4(code: int, client: str, client_port: int, service: str,
                   service_port: int) -> bytes:
    """ICMP destination unreachable quoting a datagram from client to
    service: what the client's kernel matches against its sockets."""
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28, 0, 0, _HOP_LIMIT, _IPPROTO_UDP, 0,
                         socket.inet_aton(client), socket.inet_aton(service))
    header = header[:10] + struct.pack("!H", checksum(header)) + header[12:]
    body = header + _quoted_udp(client_port, service_port)
    message = struct.pack("!BBHI", _ICMP_UNREACH, code, 0, 0) + body
    return message[:2] + struct.pack("!H", checksum(message)) + message[4:]


def unreachable_v6(code: int, client: str, client_port: int, service: str,
                   service_port: int) -> bytes:
    """ICMPv6 destination unreachable, as unreachable_v4; the checksum is
    left to the kernel (a raw ICMPv6 socket always computes it)."""
    header = struct.pack("!IHBB16s16s", 6 << 28, 8, _IPPROTO_UDP, _HOP_LIMIT,
                         socket.inet_pton(socket.AF_INET6, client),
                         socket.inet_pton(socket.AF_INET6, service))
    return (struct.pack("!BBHI", _ICMP6_UNREACH, code, 0, 0) + header
            + _quoted_udp(client_port, service_port))


class Notifier:
    """Raw ICMP sockets, one per family, opened at start. Without them (no
    CAP_NET_RAW) clients are not told, as before; nothing else depends on it."""

    def __init__(self, families: tuple[int, ...]) -> None:
        self._socks: dict[int, socket.socket] = {}
        for family in families:
            try:
                self._socks[family] = sockets.icmp_sender(family)
            except OSError as err:
                log.warning("TPROXY: cannot open a raw ICMPv%d socket (%s): UDP clients "
                            "will not hear of their backends' ICMP errors", family, err)

    def unreachable(self, family: int, err: int, client: tuple[str, int],
                    service: tuple[str, int]) -> bool:
        """Tell `client` that its datagrams to `service` met `err`; whether a
        message left (False for an errno no ICMP error stands for)."""
        sock = self._socks.get(family)
        code = CODES[family].get(err)
        if sock is None or code is None:
            return False
        build = unreachable_v4 if family == 4 else unreachable_v6
        message = build(code, client[0], client[1], service[0], service[1])
        try:
            sock.sendto(message, (client[0], 0))
        except OSError as error:
            log.debug("proxy: cannot send an ICMP error to %s: %s", client, error)
            return False
        return True

    def close(self) -> None:
        for sock in self._socks.values():
            sock.close()
        self._socks.clear()
