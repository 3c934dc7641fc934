"""The few rtnetlink requests the eBPF datapath makes, over a raw socket.

What it does: list links and addresses, add a clsact qdisc, and replace,
list and delete cls_bpf filters. Why not pyroute2: importing it costs the
agent about 21 MiB of resident memory for its whole life (its package loads
NDB, IPDB, conntrack and hundreds of message classes), for these six
requests. TPROXY mode still uses pyroute2 for its policy routing.

Wire format (uapi/linux/netlink.h, rtnetlink.h, pkt_sched.h, pkt_cls.h):
nlmsghdr (len, type, flags, seq, pid), a fixed family header (ifinfomsg,
ifaddrmsg or tcmsg), then attributes (u16 len, u16 type, value), each padded
to 4 bytes. Errors come back as NLMSG_ERROR with a negative errno, raised
here as NetlinkError (an OSError with that errno).
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass

NETLINK_ROUTE = 0
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_ACK = 0x4
NLM_F_DUMP = 0x300
NLM_F_REPLACE = 0x100
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400

RTM_GETLINK = 18
RTM_GETADDR = 22
RTM_NEWQDISC = 36
RTM_NEWTFILTER = 44
RTM_DELTFILTER = 45
RTM_GETTFILTER = 46

IFLA_IFNAME = 3
IFA_ADDRESS = 1
IFA_LOCAL = 2
TCA_KIND = 1
TCA_OPTIONS = 2
TCA_BPF_CLASSID = 3
TCA_BPF_FD = 6
TCA_BPF_NAME = 7
TCA_BPF_FLAGS = 8
TCA_BPF_FLAG_ACT_DIRECT = 1
NLA_F_NESTED = 1 << 15
NLA_TYPE_MASK = 0x3FFF

TC_H_CLSACT = 0xFFFFFFF1
CLSACT_HANDLE = 0xFFFF0000
ETH_P_ALL_BE = 0x0300  # htons(ETH_P_ALL): a filter's protocol, in tcmsg.info's low half

_NLMSGHDR = struct.Struct("=IHHII")
_IFINFOMSG = struct.Struct("=BxHiII")
_IFADDRMSG = struct.Struct("=BBBBI")
_TCMSG = struct.Struct("=BxxxiIII")
_NLATTR = struct.Struct("=HH")
_RECV_SIZE = 1 << 16


class NetlinkError(OSError):
    """The kernel answered a request with an error (errno in .errno)."""


@dataclass(frozen=True)
class Filter:
    prio: int
    kind: str
    name: str  # the BPF program's name (TCA_BPF_NAME), "" when absent


def _attr(kind: int, value: bytes) -> bytes:
    raw = _NLATTR.pack(_NLATTR.size + len(value), kind) + value
    return raw + b"\0" * (-len(raw) % 4)


def _u32(kind: int, value: int) -> bytes:
    return _attr(kind, struct.pack("=I", value))


def _string(kind: int, value: str) -> bytes:
    return _attr(kind, value.encode() + b"\0")


def attributes(data: bytes | memoryview) -> dict[int, bytes]:
    """Attribute type -> value of a run of attributes (the last of a type wins)."""
    out: dict[int, bytes] = {}
    offset = 0
    while offset + _NLATTR.size <= len(data):
        length, kind = _NLATTR.unpack_from(data, offset)
        if length < _NLATTR.size:
            break
        out[kind & NLA_TYPE_MASK] = bytes(data[offset + _NLATTR.size:offset + length])
        offset += (length + 3) & ~3
    return out


def _text(raw: bytes | None) -> str:
    return raw.split(b"\0", 1)[0].decode(errors="replace") if raw else ""


class Rtnl:
    """One rtnetlink socket in the caller's network namespace; a context manager."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
        self._sock.bind((0, 0))
        self._seq = 0

    def __enter__(self) -> Rtnl:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._sock.close()

    # ---- the exchange ----------------------------------------------------------

    def _request(self, kind: int, flags: int, body: bytes) -> Iterator[tuple[int, memoryview]]:
        """Send one request; yield (type, payload) of each answer until the
        last. Raises NetlinkError for an error answer."""
        self._seq += 1
        seq = self._seq
        self._sock.send(_NLMSGHDR.pack(_NLMSGHDR.size + len(body), kind,
                                       flags | NLM_F_REQUEST, seq, 0) + body)
        while True:
            data = memoryview(self._sock.recv(_RECV_SIZE))
            offset = 0
            while offset + _NLMSGHDR.size <= len(data):
                length, mtype, mflags, mseq, _ = _NLMSGHDR.unpack_from(data, offset)
                if length < _NLMSGHDR.size:
                    return
                payload = data[offset + _NLMSGHDR.size:offset + length]
                offset += (length + 3) & ~3
                if mseq != seq:
                    continue  # an answer to an earlier request we stopped reading
                if mtype == NLMSG_DONE:
                    return
                if mtype == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", payload)[0]
                    if code:
                        raise NetlinkError(code, os.strerror(code))
                    return  # the acknowledgement
                yield mtype, payload
                if not mflags & NLM_F_MULTI:
                    return

    def _do(self, kind: int, flags: int, body: bytes) -> None:
        for _ in self._request(kind, flags | NLM_F_ACK, body):
            pass

    # ---- links and addresses ---------------------------------------------------

    def links(self) -> dict[int, str]:
        """Interface index -> name."""
        out = {}
        for _, payload in self._request(RTM_GETLINK, NLM_F_DUMP,
                                        _IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)):
            index = _IFINFOMSG.unpack_from(payload)[2]
            out[index] = _text(attributes(payload[_IFINFOMSG.size:]).get(IFLA_IFNAME))
        return out

    def link_index(self, name: str) -> int | None:
        return next((i for i, n in self.links().items() if n == name), None)

    def addresses(self) -> list[tuple[int, str]]:
        """(interface index, address) of every address here, IPv4 and IPv6."""
        out = []
        for _, payload in self._request(RTM_GETADDR, NLM_F_DUMP,
                                        _IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)):
            family, _, _, _, index = _IFADDRMSG.unpack_from(payload)
            attrs = attributes(payload[_IFADDRMSG.size:])
            raw = attrs.get(IFA_ADDRESS) or attrs.get(IFA_LOCAL)
            if raw and family in (socket.AF_INET, socket.AF_INET6):
                out.append((index, socket.inet_ntop(family, raw)))
        return out

    # ---- tc ----------------------------------------------------------------------

    def add_clsact(self, index: int) -> bool:
        """Add the clsact qdisc; False if the device already has one."""
        body = _TCMSG.pack(socket.AF_UNSPEC, index, CLSACT_HANDLE, TC_H_CLSACT, 0)
        try:
            self._do(RTM_NEWQDISC, NLM_F_CREATE | NLM_F_EXCL, body + _string(TCA_KIND, "clsact"))
        except NetlinkError as err:
            if err.errno == errno.EEXIST:
                return False
            raise
        return True

    def replace_bpf_filter(self, index: int, parent: int, prio: int, handle: int, fd: int,
                           name: str, classid: int = 1, direct_action: bool = True) -> None:
        """Create or atomically replace the cls_bpf filter (parent, prio, handle)."""
        options = (_u32(TCA_BPF_FD, fd) + _string(TCA_BPF_NAME, name)
                   + _u32(TCA_BPF_CLASSID, classid)
                   + _u32(TCA_BPF_FLAGS, TCA_BPF_FLAG_ACT_DIRECT if direct_action else 0))
        body = (_TCMSG.pack(socket.AF_UNSPEC, index, handle, parent, (prio << 16) | ETH_P_ALL_BE)
                + _string(TCA_KIND, "bpf") + _attr(TCA_OPTIONS | NLA_F_NESTED, options))
        self._do(RTM_NEWTFILTER, NLM_F_CREATE | NLM_F_REPLACE, body)

    def filters(self, index: int, parent: int) -> list[Filter]:
        """The filters of one device's hook (a chain's header entries included,
        with no name)."""
        out = []
        body = _TCMSG.pack(socket.AF_UNSPEC, index, 0, parent, 0)
        for _, payload in self._request(RTM_GETTFILTER, NLM_F_DUMP, body):
            info = _TCMSG.unpack_from(payload)[4]
            attrs = attributes(payload[_TCMSG.size:])
            options = attributes(attrs.get(TCA_OPTIONS, b""))
            out.append(Filter(info >> 16, _text(attrs.get(TCA_KIND)),
                              _text(options.get(TCA_BPF_NAME))))
        return out

    def delete_filter(self, index: int, parent: int, prio: int, handle: int,
                      kind: str = "bpf") -> None:
        body = (_TCMSG.pack(socket.AF_UNSPEC, index, handle, parent, (prio << 16) | ETH_P_ALL_BE)
                + _string(TCA_KIND, kind))
        self._do(RTM_DELTFILTER, 0, body)
