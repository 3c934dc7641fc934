"""Explain: what the socket programs would do with a connection, replayed on
the real maps.

`explain()` makes the lookups bpf/sock_lb.c makes, in the same order, through
a DatapathReader (for the eBPF datapath: BPF_MAP_LOOKUP_ELEM on the pinned
maps the programs read), and says at each step what it found. The order
mirrors sock_lb.c exactly:

    veer_translate4/6      protocol not TCP/UDP (veer_proto_handled)  -> pass
    veer_flow6             ::ffff:a.b.c.d is treated as IPv4 a.b.c.d
    veer_forward           veer_services[addr, port, proto, family, slot 0]
      miss -> veer_miss      veer_vips[addr, family]                    -> refuse (unknown port)
                             veer_service_cidrs, longest prefix match   -> refuse (no Service)
                             otherwise                                  -> pass
      count == 0             VEER_SVC_F_DROP_EMPTY set                  -> EHOSTUNREACH
                             otherwise                                  -> refuse (no backends)
      VEER_SVC_F_AFFINITY    a live entry for the client's netns        -> that backend
                             (known when the request names the client's netns cookie)
      slot = 1 + random % count: veer_services[..., slot] missing       -> refuse (inconsistent)
      veer_backends[id] missing or of another family                    -> refuse (inconsistent)
                                                                        -> translate

When a change to sock_lb.c changes this order, this module changes with it.
The source address plays no part: the programs run at connect()/sendmsg(),
before a source is chosen.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field

from agent.compute.types import Frontend, L4Addr
from agent.datapath.inspect import DatapathReader
from agent.model.objects import IPAddress, IPNetwork, Protocol

TRANSLATE, REFUSE, UNREACHABLE, PASS = "translate", "refuse", "unreachable", "pass"


@dataclass(frozen=True)
class Candidate:
    slot: int
    backend_id: int
    backend: L4Addr
    probability: float


@dataclass(frozen=True)
class MatchedFrontend:
    key: L4Addr
    service_id: int
    count: int
    service_port: str  # from the desired state; "" if the agent does not want it
    kind: str
    affinity_timeout: int
    drop_when_empty: bool


@dataclass
class Explanation:
    verdict: str
    reason: str
    summary: str
    program: str
    steps: list[str] = field(default_factory=list)
    frontend: MatchedFrontend | None = None
    candidates: list[Candidate] = field(default_factory=list)
    counter: str = ""
    errno: str = ""
    service_cidr: str = ""
    served_ports: list[str] = field(default_factory=list)


def _program(destination: IPAddress, protocol: str) -> str:
    family = "6" if destination.version == 6 else "4"
    if protocol == "UDP":
        return f"veer_connect{family} (connected UDP) or veer_sendmsg{family} (sendto)"
    return f"veer_connect{family}"


def _longest_prefix(address: IPAddress, cidrs: set[IPNetwork]) -> IPNetwork | None:
    matching = [c for c in cidrs if c.version == address.version and address in c]
    return max(matching, key=lambda c: c.prefixlen, default=None)


def explain(
    reader: DatapathReader,
    destination: IPAddress,
    port: int,
    protocol: str,
    desired: Mapping[L4Addr, Frontend],
    client_netns_cookie: int = 0,
) -> Explanation:
    """What a connect()/sendmsg() to destination:port/protocol would meet; for
    a frontend with ClientIP affinity and a known client (network namespace
    cookie), the backend that client's live affinity entry will pick."""
    protocol = protocol.upper() or "TCP"
    program = _program(destination, protocol)
    host = f"[{destination}]" if destination.version == 6 else str(destination)
    dialled = f"{host}:{port}/{protocol}"
    if protocol not in (Protocol.TCP.value, Protocol.UDP.value):
        return Explanation(
            PASS, "protocol_not_handled",
            f"{dialled} is left alone: the socket programs act on TCP and UDP only",
            program, [f"protocol {protocol}: not TCP or UDP (veer_proto_handled) -> pass"],
        )
    out = Explanation("", "", "", program)
    steps = out.steps
    steps.append(f"protocol {protocol}: handled")

    # veer_flow6: an IPv4-mapped IPv6 destination is looked up as IPv4.
    if isinstance(destination, ipaddress.IPv6Address) and destination.ipv4_mapped:
        destination = destination.ipv4_mapped
        steps.append(f"IPv4-mapped destination: looked up as {destination}")
    key = L4Addr(destination, port, Protocol(protocol))

    entry = reader.frontend(key)
    if entry is None:
        steps.append(f"veer_services[{key} slot 0]: no entry")
        return _miss(reader, key, out)

    want = desired.get(key)
    out.frontend = MatchedFrontend(
        key, entry.service_id, entry.count,
        str(want.service) if want else "", want.kind.value if want else "",
        entry.affinity_timeout, entry.drop_when_empty,
    )
    owner = f" ({want.service})" if want else " (not in the agent's desired state)"
    steps.append(
        f"veer_services[{key} slot 0]: frontend{owner}, service id {entry.service_id}, "
        f"{entry.count} backend slot(s)"
    )
    if entry.count == 0:
        if entry.drop_when_empty:
            steps.append("count 0 with VEER_SVC_F_DROP_EMPTY -> fail with EHOSTUNREACH")
            out.verdict, out.reason = UNREACHABLE, "no_local_backends"
            out.counter, out.errno = "dropped_no_local", "EHOSTUNREACH"
            out.summary = (
                f"{dialled}{owner} has no backend for traffic from this node while it has "
                "endpoints elsewhere (Local traffic policy): the call fails with EHOSTUNREACH, "
                "as kube-proxy's DROP"
            )
            return out
        steps.append("count 0 -> fail with ECONNREFUSED")
        out.verdict, out.reason = REFUSE, "no_backends"
        out.counter, out.errno = "refused_no_backend", "ECONNREFUSED"
        out.summary = f"{dialled}{owner} has no backends: refused at once with ECONNREFUSED"
        return out

    if entry.affinity_timeout:
        steps.append(
            f"sessionAffinity ClientIP ({entry.affinity_timeout}s): a client network namespace "
            "with a live affinity entry keeps its backend (counter affinity_hit); "
            "the others get a random slot, as below"
        )
    broken: list[str] = []
    for slot in range(1, entry.count + 1):
        backend_id = reader.slot(key, slot)
        if backend_id is None:
            broken.append(f"slot {slot}: missing")
            continue
        backend = reader.backend(backend_id)
        if backend is None or backend.address.version != destination.version:
            broken.append(f"slot {slot}: backend {backend_id} missing or of another family")
            continue
        out.candidates.append(Candidate(slot, backend_id, backend, 1.0 / entry.count))
    steps.append(
        f"slot = 1 + random % {entry.count}: "
        + ", ".join(f"slot {c.slot} -> backend {c.backend_id} {c.backend}" for c in out.candidates)
        + ("" if not broken else ("; " if out.candidates else "") + "; ".join(broken))
    )
    if broken:
        steps.append(
            "a pick of a broken slot is refused (counter inconsistent); the agent's next "
            "full pass repairs it (veer resync)"
        )
    if not out.candidates:
        out.verdict, out.reason = REFUSE, "inconsistent"
        out.counter, out.errno = "inconsistent", "ECONNREFUSED"
        out.summary = f"{dialled}{owner}: every slot is broken; refused (inconsistent maps)"
        return out
    out.verdict, out.reason, out.counter = TRANSLATE, "translated", "translated"
    if entry.affinity_timeout and client_netns_cookie:
        sticky = reader.affinity(client_netns_cookie, entry.service_id)
        kept = next((c for c in out.candidates if sticky and c.backend_id == sticky[0]), None)
        if sticky is not None and kept is not None and sticky[1] <= entry.affinity_timeout:
            steps.append(
                f"veer_affinity[client netns {client_netns_cookie}, service "
                f"{entry.service_id}]: backend {kept.backend_id} {kept.backend}, last used "
                f"{sticky[1]:.1f}s ago (< {entry.affinity_timeout}s), still serving -> kept"
            )
            out.candidates = [Candidate(kept.slot, kept.backend_id, kept.backend, 1.0)]
            out.counter = "affinity_hit"
            out.summary = (
                f"{dialled}{owner} is translated at connect() to {kept.backend}: this "
                f"client's ClientIP affinity entry names it (last used {sticky[1]:.1f}s ago)"
            )
            return out
        steps.append(
            f"veer_affinity[client netns {client_netns_cookie}, service {entry.service_id}]: "
            + ("expired" if sticky is not None else "no live entry")
            + " -> a random slot, which becomes the client's entry"
        )
    chosen = ", ".join(str(c.backend) for c in out.candidates)
    out.summary = (
        f"{dialled}{owner} is translated at connect() to one of {len(out.candidates)} "
        f"backend(s), chosen at random: {chosen}"
    )
    if broken:
        out.summary += (
            f"; but {len(broken)} of {entry.count} slot(s) are broken, and a connection that "
            "picks one is refused (counter inconsistent)"
        )
    if entry.affinity_timeout:
        out.summary += (
            f" (with ClientIP affinity: a client's later connections within "
            f"{entry.affinity_timeout}s keep its first choice)"
        )
    return out


def _miss(reader: DatapathReader, key: L4Addr, out: Explanation) -> Explanation:
    """veer_miss: refuse if the address is a Service address or in a Service CIDR."""
    dialled = str(key)
    address = key.address
    if reader.is_vip(address):
        served = sorted(k for k in reader.read().frontends if k.address == address)
        out.served_ports = [f"{k.port}/{k.protocol.value}" for k in served]
        out.steps.append(f"veer_vips[{address}]: a Service address -> fail with ECONNREFUSED")
        out.verdict, out.reason = REFUSE, "unknown_port"
        out.counter, out.errno = "refused_unknown_port", "ECONNREFUSED"
        ports = ", ".join(out.served_ports) or "none"
        out.summary = (
            f"{dialled}: {address} is a Service address but port {key.port}/"
            f"{key.protocol.value} is not one of its ports ({ports}): refused with ECONNREFUSED"
        )
        return out
    out.steps.append(f"veer_vips[{address}]: not a Service address")
    if reader.in_service_cidr(address):
        cidr = _longest_prefix(address, reader.read().service_cidrs)
        out.service_cidr = str(cidr) if cidr else ""
        out.steps.append(
            f"veer_service_cidrs: {address} is inside {out.service_cidr or 'a Service CIDR'} "
            "-> fail with ECONNREFUSED"
        )
        out.verdict, out.reason = REFUSE, "no_service"
        out.counter, out.errno = "refused_no_service", "ECONNREFUSED"
        out.summary = (
            f"{dialled}: no Service has address {address}, which lies in the Service CIDR "
            f"{out.service_cidr}: refused with ECONNREFUSED instead of a routing timeout"
        )
        return out
    out.steps.append(f"veer_service_cidrs: {address} is in no Service CIDR -> leave the call alone")
    out.verdict, out.reason = PASS, "not_a_service"
    out.summary = f"{dialled} is not a Service address: the call goes out unchanged"
    return out
