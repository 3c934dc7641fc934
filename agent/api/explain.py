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
      VEER_SVC_F_ACCESS      the TrafficPolicy's rules deny the client  -> refuse (access_denied)
                             (evaluated when the request names the client's address)
      VEER_SVC_F_REDIRECT    not the proxy's own connection             -> the node-local proxy
      VEER_SVC_F_AFFINITY    a live entry for the client's netns        -> that backend
                             (known when the request names the client's netns cookie)
      slot by the algorithm (veer_pick): Random, RoundRobin, Maglev (flow hash), LeastConnections
                             veer_services[..., slot] missing           -> refuse (inconsistent)
      veer_backends[id] missing or of another family                    -> refuse (inconsistent)
                                                                        -> translate

When a change to sock_lb.c changes this order, this module changes with it.
The source address the request names plays a part only where the programs
learn one from the client's network namespace: access rules (and Maglev's
hash, whose port is not known before connect()).
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


_ALGORITHM_STEP = {
    "Random": "slot = 1 + random % count",
    "RoundRobin": "slot = 1 + (the frontend's cursor, advanced per connection) % count",
    "Maglev": "slot = 1 + hash(client address, client port, protocol) % count "
              "(Maglev: a flow always gets the same slot)",
    "LeastConnections": "the slot whose backend has the fewest open connections through this "
                        "node (its sockets and the flows it translates) per unit of weight "
                        "(veer_backend_conns), among up to 16 slots",
}
_ALGORITHM_SUMMARY = {
    "Random": "chosen at random",
    "RoundRobin": "in turn (RoundRobin)",
    "Maglev": "by the flow's hash (Maglev)",
    "LeastConnections": "the least loaded from this node (LeastConnections)",
}


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
    source: IPAddress | None = None,
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
    if entry.access:
        spec = want.access if want is not None else None
        if source is None or spec is None:
            steps.append(
                "TrafficPolicy access rules: the client's address (from its network "
                "namespace) decides; name the client (--from) to see the verdict")
        else:
            action, rule = spec.verdict(source)
            decided = f"access.rules[{rule}]" if rule is not None else "access.defaultAction"
            steps.append(f"TrafficPolicy access rules ({want.policy if want else '?'}): "
                         f"{source} -> {action.value} by {decided}")
            if action.value == "Deny":
                out.verdict, out.reason = REFUSE, "access_denied"
                out.counter, out.errno = "access_denied", "ECONNREFUSED"
                out.summary = (f"{dialled}{owner}: the TrafficPolicy {want.policy if want else ''}"
                               f" denies {source} ({decided}): refused at once with "
                               "ECONNREFUSED")
                return out
    if entry.redirect:
        proxy = want.redirect if want is not None else None
        steps.append(f"redirect: connections go to the node-local proxy "
                     f"{proxy or '(see veer_redirects)'}, except the proxy's own "
                     "(its uid, --proxy-uid), which are balanced as below")
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
    seen: dict[int, Candidate] = {}  # backend id -> candidate (a table repeats backends)
    for slot in range(1, entry.count + 1):
        backend_id = reader.slot(key, slot)
        if backend_id is None:
            broken.append(f"slot {slot}: missing")
            continue
        backend = reader.backend(backend_id)
        if backend is None or backend.address.version != destination.version:
            broken.append(f"slot {slot}: backend {backend_id} missing or of another family")
            continue
        held = seen.get(backend_id)
        seen[backend_id] = Candidate(held.slot if held else slot, backend_id, backend,
                                     (held.probability if held else 0.0) + 1.0 / entry.count)
    out.candidates = sorted(seen.values(), key=lambda c: c.slot)
    listed = ", ".join(
        f"slot {c.slot} -> backend {c.backend_id} {c.backend}"
        + (f" ({c.probability:.1%} of the slots)" if len(seen) != entry.count else "")
        for c in out.candidates)
    steps.append(
        f"{_ALGORITHM_STEP.get(entry.algorithm, 'slot by ' + entry.algorithm)} "
        f"(of {entry.count}): " + listed
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
    how = _ALGORITHM_SUMMARY.get(entry.algorithm, f"chosen by {entry.algorithm}")
    out.summary = (
        f"{dialled}{owner} is translated at connect() to one of {len(out.candidates)} "
        f"backend(s), {how}: {chosen}"
    )
    if entry.redirect:
        out.summary = (f"{dialled}{owner} is redirected at connect() to the node-local proxy "
                       f"{want.redirect if want else ''}; the proxy's own connections go to "
                       f"one of {len(out.candidates)} backend(s), {how}: {chosen}")
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
