"""Python mirrors of the structs in bpf/veer_structs.h, one class per C struct.

Each class names the C struct it must match (`C_NAME`). The test
tests/unit/test_struct_layout.py compiles the header and checks every size
and offset, so a change on one side alone fails CI.

Helpers here convert between the model's addresses/ports and the wire
layout: addresses as 16 network-order bytes (IPv4 in the first four), ports
in network order.
"""

from __future__ import annotations

import ctypes
import ipaddress
import socket
from typing import TYPE_CHECKING

from agent.model.objects import IPAddress, IPNetwork, Protocol

if TYPE_CHECKING:
    from agent.compute.types import L4Addr

FAMILY_IPV4 = 4
FAMILY_IPV6 = 6

IPPROTO = {Protocol.TCP: socket.IPPROTO_TCP, Protocol.UDP: socket.IPPROTO_UDP}
PROTOCOL_OF = {v: k for k, v in IPPROTO.items()}

Addr16 = ctypes.c_uint8 * 16


class ServiceKey(ctypes.Structure):
    C_NAME = "veer_service_key"
    _fields_ = [
        ("addr", Addr16),
        ("port", ctypes.c_uint16),  # network order
        ("proto", ctypes.c_uint8),
        ("family", ctypes.c_uint8),
        ("slot", ctypes.c_uint16),
        ("scope", ctypes.c_uint8),
        ("pad", ctypes.c_uint8),
    ]


# veer_service_key.scope
SCOPE_SOCKET = 0
SCOPE_EXTERNAL = 1


class ServiceValue(ctypes.Structure):
    C_NAME = "veer_service_value"
    _fields_ = [
        ("backend_id", ctypes.c_uint32),
        ("count", ctypes.c_uint16),
        ("flags", ctypes.c_uint16),
        ("service_id", ctypes.c_uint32),
        ("affinity_timeout", ctypes.c_uint32),
    ]


# veer_service_value.flags
SVC_F_AFFINITY = 1 << 0
SVC_F_DROP_EMPTY = 1 << 1
SVC_F_EXT_LOCAL = 1 << 2
SVC_F_SOURCE_RANGES = 1 << 3
SVC_F_TABLE = 1 << 4
SVC_F_ACCESS = 1 << 5
SVC_F_ACCESS_DENY = 1 << 6
SVC_F_REDIRECT = 1 << 7
SVC_F_SOCKMAP = 1 << 10
SVC_F_PASS = 1 << 11
SVC_ALG_SHIFT = 8
SVC_ALG_MASK = 3 << SVC_ALG_SHIFT
# VEER_ALG_*, by the TrafficPolicy's name for them.
ALGORITHM_CODES: dict[str, int] = {
    "Random": 0,
    "RoundRobin": 1,
    "Maglev": 2,
    "LeastConnections": 3,
}
ALGORITHM_OF_CODE: dict[int, str] = {v: k for k, v in ALGORITHM_CODES.items()}


class BackendKey(ctypes.Structure):
    C_NAME = "veer_backend_key"
    _fields_ = [("backend_id", ctypes.c_uint32)]


class BackendValue(ctypes.Structure):
    C_NAME = "veer_backend_value"
    _fields_ = [
        ("addr", Addr16),
        ("port", ctypes.c_uint16),
        ("proto", ctypes.c_uint8),
        ("family", ctypes.c_uint8),
        ("flags", ctypes.c_uint32),
    ]


class VipKey(ctypes.Structure):
    C_NAME = "veer_vip_key"
    _fields_ = [("addr", Addr16), ("family", ctypes.c_uint8), ("pad", ctypes.c_uint8 * 3)]


class VipValue(ctypes.Structure):
    C_NAME = "veer_vip_value"
    _fields_ = [("flags", ctypes.c_uint32)]


# veer_tc_addrs' flags (VEER_TC_ADDR_*).
TC_ADDR_FRONTEND = 1
TC_ADDR_BACKEND = 2
TC_ADDR_SNAT = 4


class CidrKey(ctypes.Structure):
    C_NAME = "veer_cidr_key"
    _fields_ = [
        ("prefixlen", ctypes.c_uint32),
        ("family", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 3),
        ("addr", Addr16),
    ]


class CidrValue(ctypes.Structure):
    C_NAME = "veer_cidr_value"
    _fields_ = [("flags", ctypes.c_uint32)]


class SockRevnatKey(ctypes.Structure):
    C_NAME = "veer_sock_revnat_key"
    _fields_ = [
        ("cookie", ctypes.c_uint64),
        ("addr", Addr16),
        ("port", ctypes.c_uint16),
        ("family", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 5),
    ]


class SockRevnatValue(ctypes.Structure):
    C_NAME = "veer_sock_revnat_value"
    _fields_ = [
        ("addr", Addr16),
        ("port", ctypes.c_uint16),
        ("pad", ctypes.c_uint16),
        ("service_id", ctypes.c_uint32),
    ]


class SockPeer(ctypes.Structure):
    """A slot of veer_sock_peers: veer_sock_revnat's key and value of a
    connected TCP socket (key.cookie 0: empty)."""

    C_NAME = "veer_sock_peer"
    _fields_ = [("key", SockRevnatKey), ("svc", SockRevnatValue)]


SOCK_PEER_BUSY = (1 << 64) - 1  # VEER_SOCK_PEER_BUSY: a connect() is writing the slot


class AffinityKey(ctypes.Structure):
    C_NAME = "veer_affinity_key"
    _fields_ = [
        ("client", ctypes.c_uint64),
        ("service_id", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
    ]


class AffinityValue(ctypes.Structure):
    C_NAME = "veer_affinity_value"
    _fields_ = [
        ("backend_id", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("last_used_ns", ctypes.c_uint64),
    ]


class AffinityMatchKey(ctypes.Structure):
    C_NAME = "veer_affinity_match_key"
    _fields_ = [("backend_id", ctypes.c_uint32), ("service_id", ctypes.c_uint32),
                ("scope", ctypes.c_uint32)]


class AffinityMatchValue(ctypes.Structure):
    C_NAME = "veer_affinity_match_value"
    _fields_ = [("flags", ctypes.c_uint32)]


class SourceKey(ctypes.Structure):
    C_NAME = "veer_source_key"
    _fields_ = [
        ("prefixlen", ctypes.c_uint32),
        ("service_id", ctypes.c_uint32),
        ("family", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 3),
        ("addr", Addr16),
    ]


# Bits of a SourceKey before the address: service id, family and padding.
SOURCE_KEY_PREFIX_BITS = 64


class ExtAffinityKey(ctypes.Structure):
    C_NAME = "veer_ext_affinity_key"
    _fields_ = [
        ("addr", Addr16),
        ("family", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 3),
        ("service_id", ctypes.c_uint32),
    ]


class Tuple(ctypes.Structure):
    C_NAME = "veer_tuple"
    _fields_ = [
        ("saddr", Addr16),
        ("daddr", Addr16),
        ("sport", ctypes.c_uint16),
        ("dport", ctypes.c_uint16),
        ("proto", ctypes.c_uint8),
        ("family", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 2),
    ]


class NatValue(ctypes.Structure):
    C_NAME = "veer_nat_value"
    _fields_ = [
        ("saddr", Addr16),
        ("daddr", Addr16),
        ("sport", ctypes.c_uint16),
        ("dport", ctypes.c_uint16),
        ("service_id", ctypes.c_uint32),
        ("last_seen_ns", ctypes.c_uint64),
    ]


class AccessValue(ctypes.Structure):
    C_NAME = "veer_access_value"
    _fields_ = [("rule", ctypes.c_uint32), ("action", ctypes.c_uint32)]


ACCESS_ALLOW = 0
ACCESS_DENY = 1
RULE_DEFAULT = 0xFFFF


class RuleKey(ctypes.Structure):
    C_NAME = "veer_rule_key"
    _fields_ = [("service_id", ctypes.c_uint32), ("rule", ctypes.c_uint32)]


class ConnsValue(ctypes.Structure):
    C_NAME = "veer_conns_value"
    _fields_ = [("open", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


class ConnsSweptValue(ctypes.Structure):
    C_NAME = "veer_conns_swept_value"
    _fields_ = [("swept", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


class LcSockValue(ctypes.Structure):
    C_NAME = "veer_lc_sock_value"
    _fields_ = [("backend_id", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


class ProxyValue(ctypes.Structure):
    C_NAME = "veer_proxy_value"
    _fields_ = [("uid", ctypes.c_uint32), ("set", ctypes.c_uint32)]


class OrigKey(ctypes.Structure):
    C_NAME = "veer_orig_key"
    _fields_ = [("addr", Addr16), ("port", ctypes.c_uint16), ("family", ctypes.c_uint8),
                ("pad", ctypes.c_uint8 * 5)]


class OrigValue(ctypes.Structure):
    C_NAME = "veer_orig_value"
    _fields_ = [("addr", Addr16), ("port", ctypes.c_uint16), ("family", ctypes.c_uint8),
                ("pad", ctypes.c_uint8 * 5)]


class SockKey(ctypes.Structure):
    C_NAME = "veer_sock_key"
    _fields_ = [("local", Addr16), ("remote", Addr16), ("lport", ctypes.c_uint16),
                ("rport", ctypes.c_uint16), ("family", ctypes.c_uint8),
                ("pad", ctypes.c_uint8 * 3)]


class NodeValue(ctypes.Structure):
    C_NAME = "veer_node_value"
    _fields_ = [("addr4", Addr16), ("addr6", Addr16)]


class Event(ctypes.Structure):
    """A flow event from the veer_events ring buffer."""

    C_NAME = "veer_event"
    _fields_ = [
        ("time_ns", ctypes.c_uint64),  # CLOCK_MONOTONIC
        ("cookie", ctypes.c_uint64),
        ("netns", ctypes.c_uint64),
        ("saddr", Addr16),
        ("daddr", Addr16),
        ("baddr", Addr16),
        ("sport", ctypes.c_uint16),  # network order, as every port here
        ("dport", ctypes.c_uint16),
        ("bport", ctypes.c_uint16),
        ("proto", ctypes.c_uint8),
        ("family", ctypes.c_uint8),
        ("service_id", ctypes.c_uint32),
        ("pid", ctypes.c_uint32),
        ("reason", ctypes.c_uint16),  # index into COUNTER_NAMES
        ("hook", ctypes.c_uint8),
        ("flags", ctypes.c_uint8),
        ("comm", ctypes.c_char * 16),
        ("rule", ctypes.c_uint16),  # access verdicts: the deciding rule (RULE_DEFAULT)
        ("pad", ctypes.c_uint8 * 2),
    ]


# veer_event.hook
HOOK_NAMES: dict[int, str] = {
    1: "connect4",
    2: "connect6",
    3: "sendmsg4",
    4: "sendmsg6",
    5: "tc-ingress",
}
HOOK_TC_INGRESS = 5

# veer_event.flags
EV_F_AFFINITY = 1 << 0
EV_F_SNAT = 1 << 1
EV_F_SHORT_CIRCUIT = 1 << 2
EV_F_MAPPED = 1 << 3
EV_F_REDIRECT = 1 << 4
EV_F_DSR = 1 << 5


class ConfigValue(ctypes.Structure):
    """The runtime switches (veer_config, key 0)."""

    C_NAME = "veer_config"
    _fields_ = [("trace_translations", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


class CookieKey(ctypes.Structure):
    """The __u64 key of veer_netns_addrs and veer_lc_socks (a cookie)."""

    _fields_ = [("cookie", ctypes.c_uint64)]


class IndexKey(ctypes.Structure):
    """The __u32 key of an array map (no C struct of its own)."""

    _fields_ = [("index", ctypes.c_uint32)]


MIRRORS: tuple[type[ctypes.Structure], ...] = (
    ServiceKey,
    ServiceValue,
    BackendKey,
    BackendValue,
    VipKey,
    VipValue,
    CidrKey,
    CidrValue,
    SockRevnatKey,
    SockRevnatValue,
    SockPeer,
    AffinityKey,
    AffinityValue,
    AffinityMatchKey,
    AffinityMatchValue,
    Tuple,
    NatValue,
    NodeValue,
    SourceKey,
    ExtAffinityKey,
    Event,
    ConfigValue,
    AccessValue,
    RuleKey,
    ConnsValue,
    ConnsSweptValue,
    LcSockValue,
    ProxyValue,
    OrigKey,
    OrigValue,
    SockKey,
)

# How tc_nat.c stamps and ages its NAT entries (veer_nat_value.last_seen_ns):
# the top bits are flags, the rest bpf_ktime_get_ns(); checked against the C
# by tests/unit/test_struct_layout.py.
NAT_CLOSING = 1 << 63
NAT_DSR = 1 << 62
NAT_FIN = 1 << 61
NAT_FLAGS = NAT_CLOSING | NAT_DSR | NAT_FIN
UDP_IDLE_NS = 180_000_000_000
TCP_CLOSED_NS = 10_000_000_000
TCP_HALF_CLOSED_NS = 120_000_000_000

# enum veer_counter, in order.
COUNTER_NAMES: tuple[str, ...] = (
    "translated",
    "refused_no_backend",
    "refused_unknown_port",
    "refused_no_service",
    "inconsistent",
    "revnat",
    "dropped_no_local",
    "affinity_hit",
    "nat_new",
    "nat_snat",
    "nat_drop",
    "nat_reply",
    "nat_fail",
    "nat_denied_source",
    "nat_short_circuit",
    "events_sent",
    "events_lost",
    "nat_reject",
    "access_denied",
    "nat_access_denied",
    "access_unknown",
    "redirected",
    "orig_dst",
    "accel_sockets",
    "accel_spliced",
    "accel_tcp",
    "nat_dsr",
    "nat_dsr_in",
    "nat_host_moved",
)

# LPM trie keys carry family + padding (32 bits) before the address.
CIDR_KEY_PREFIX_BITS = 32


def family_of(address: IPAddress | IPNetwork) -> int:
    return FAMILY_IPV4 if address.version == 4 else FAMILY_IPV6


def addr_bytes(address: IPAddress) -> ctypes.Array[ctypes.c_uint8]:
    raw = address.packed
    return Addr16(*raw.ljust(16, b"\0"))


def addr_from(raw: ctypes.Array[ctypes.c_uint8], family: int) -> IPAddress:
    data = bytes(raw)
    if family == FAMILY_IPV4:
        return ipaddress.IPv4Address(data[:4])
    return ipaddress.IPv6Address(data)


def port_be(port: int) -> int:
    """A host-order port as the u16 whose memory holds it in network order."""
    return socket.htons(port)


def port_host(port: int) -> int:
    return socket.ntohs(port)


def service_key(frontend: L4Addr, slot: int = 0, scope: int = SCOPE_SOCKET) -> ServiceKey:
    """The veer_services key of one slot of a frontend, as the programs build it."""
    return ServiceKey(
        addr=addr_bytes(frontend.address),
        port=port_be(frontend.port),
        proto=IPPROTO[frontend.protocol],
        family=family_of(frontend.address),
        slot=slot,
        scope=scope,
    )


def service_slot_keys(frontend: L4Addr, slots: list[int], scope: int) -> ctypes.Array[ServiceKey]:
    """The veer_services keys of several slots of one frontend, as one array
    (for a batch write). They differ in the slot only: one key is built and
    copied, since building the address bytes is what a key costs."""
    base = service_key(frontend, 0, scope)
    keys = (ServiceKey * len(slots))(*([base] * len(slots)))
    for key, slot in zip(keys, slots, strict=True):
        key.slot = slot
    return keys
