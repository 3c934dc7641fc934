"""The names and numbers TPROXY mode owns in the node's network namespace.

Everything veer adds to the kernel in this mode is listed here once, so that
the agent, `veer agent --cleanup` and the tests agree on what is veer's:

    nftables   table `inet veer` (sets, maps, counters, chains: all of it)
               tables `ip veer`, `ip6 veer` (an output chain each: `dup`,
               which copies the node's own "host unreachable" to lo, exists
               only in single-family tables; ruleset.copy_tables)
    routing    rule  pref 9337  fwmark MARK_LOCAL/MARK_LOCAL  lookup 8337
               rule  pref 9338                                lookup 8338
               table 8337: `local default dev lo` (IPv4 and IPv6)
               table 8338: `local <Service address or CIDR> dev lo`
    sockets    the proxy's listeners on 127.0.0.1 and ::1, kernel-chosen ports
    sysctl     net.ipv4.tcp_early_demux=0 (routing.early_demux_off says why)

Marks (bits no other common node agent uses: kube-proxy takes 0x4000 and
0x8000, Cilium 0x0f00 and 0x0200 area, Calico the top 16 bits by default):
- MARK_LOCAL: "deliver this packet to a local socket". Set on packets that
  nftables hands to the proxy and on replies that backends send to the
  proxy's transparent upstream sockets; rule 9337 routes them to `lo`.
- MARK_PROXY: the mark (SO_MARK) of every socket of the proxy's. Packets
  they send carry it, so nothing of veer's intercepts the proxy's own
  upstream connections; and nftables' `socket mark` recognises packets for
  them (replies from backends, addressed to the client), live sockets only.
"""

from __future__ import annotations

import enum

NFT_FAMILY = "inet"
NFT_TABLE = "veer"
# The tables `ip veer` and `ip6 veer`, by IP version.
NFT_COPY_FAMILIES = {4: "ip", 6: "ip6"}

MARK_LOCAL = 0x0040_0000
MARK_PROXY = 0x0080_0000

ROUTE_TABLE_DIVERT = 8337  # local default dev lo: marked packets stay on this host
ROUTE_TABLE_SERVICES = 8338  # local routes for Service addresses and Service CIDRs
RULE_PREF_DIVERT = 9337
RULE_PREF_SERVICES = 9338

LOOPBACK = {4: "127.0.0.1", 6: "::1"}

# A UDP flow (one client address and port to one frontend) that carries no
# datagram for this long is forgotten; its next datagram picks again. These
# are conntrack's timeouts (nf_conntrack_udp_timeout and _timeout_stream),
# so a flow keeps its backend through the same quiet spells as through
# kube-proxy: UDP_IDLE_TIMEOUT, until a datagram comes (either way) after
# the flow's first reply and at least UDP_STREAM_AFTER after its start; the
# flow is then a stream, and keeps UDP_STREAM_TIMEOUT (udp.Flow.seen).
UDP_IDLE_TIMEOUT = 30.0
UDP_STREAM_TIMEOUT = 120.0
UDP_STREAM_AFTER = 2.0
# ... except a flow whose client sent one datagram only (a DNS query from a
# fresh port, the common case): each flow holds two sockets of the agent's,
# and a resolver sending 1,000 queries a second would otherwise hold 60,000.
# (conntrack keeps it 30 s: a reply later than 5 s is lost here.)
UDP_ONESHOT_TIMEOUT = 5.0


class Role(enum.Enum):
    """Where a connection came from, as nftables tells the proxy by the
    listener it hands the connection to (one listener per role, family and
    protocol). The role decides the backend set and whether the upstream
    connection may keep the client's address."""

    NODE = "node"  # a process of this node (arrived on lo)
    POD = "pod"  # a pod of this node (any device but lo and the node's devices)
    OUTSIDE = "outside"  # through the node's devices: externalTrafficPolicy applies
    SHORTCUT = "shortcut"  # a pod of another node reaching a Local frontend: every endpoint

    @property
    def external(self) -> bool:
        """Served from the frontend's external backends (the per-packet scope)."""
        return self is Role.OUTSIDE

    @property
    def from_outside(self) -> bool:
        return self in (Role.OUTSIDE, Role.SHORTCUT)


class Locality(enum.Enum):
    """Where a backend's address is, seen from this node; it decides whether an
    upstream connection may carry the client's address (its replies must come
    back through this node, to the proxy's socket)."""

    HERE = "here"  # behind a device of this node that is not one of its node devices: a pod
    NODE = "node"  # one of this node's own addresses (a host-network endpoint)
    REMOTE = "remote"  # behind one of the node's devices: another node
