"""The ICMP errors TPROXY mode's proxy sends UDP clients (icmp.py): what a
client's kernel reads from them. The kernel's acceptance is tested for real
in tests/datapath/test_tproxy.py."""

from __future__ import annotations

import socket
import struct

from agent.datapath.tproxy.icmp import checksum, unreachable_v4, unreachable_v6


def test_checksum_is_rfc_1071() -> None:
    # RFC 1071's worked example: 0001 f203 f4f5 f6f7 sums to ddf2, checksum 220d.
    assert checksum(bytes.fromhex("0001f203f4f5f6f7")) == 0x220D
    assert checksum(b"\x01") == ~0x0100 & 0xFFFF  # an odd byte is padded with zero


def test_v4_message_quotes_the_clients_datagram_to_the_service() -> None:
    msg = unreachable_v4(3, "10.244.1.100", 40000, "10.96.0.48", 53)
    icmp_type, code, _csum, unused = struct.unpack_from("!BBHI", msg)
    assert (icmp_type, code, unused) == (3, 3, 0)
    assert checksum(msg) == 0  # the ICMP checksum covers the whole message
    inner = msg[8:28]
    assert inner[0] == 0x45 and inner[9] == socket.IPPROTO_UDP
    assert checksum(inner) == 0  # a valid IPv4 header
    assert socket.inet_ntoa(inner[12:16]) == "10.244.1.100"  # source: the client
    assert socket.inet_ntoa(inner[16:20]) == "10.96.0.48"  # destination: the Service
    assert struct.unpack("!HHHH", msg[28:36]) == (40000, 53, 8, 0)
    assert len(msg) == 36  # header, quoted IP header, 8 bytes of the datagram


def test_v6_message_quotes_the_clients_datagram_to_the_service() -> None:
    msg = unreachable_v6(4, "fd00:10:244:1::100", 40000, "fd00:96::48", 53)
    assert struct.unpack_from("!BBHI", msg) == (1, 4, 0, 0)  # checksum: the kernel's
    inner = msg[8:48]
    assert inner[0] >> 4 == 6 and inner[6] == socket.IPPROTO_UDP
    assert socket.inet_ntop(socket.AF_INET6, inner[8:24]) == "fd00:10:244:1::100"
    assert socket.inet_ntop(socket.AF_INET6, inner[24:40]) == "fd00:96::48"
    assert struct.unpack("!HHHH", msg[48:56]) == (40000, 53, 8, 0)
