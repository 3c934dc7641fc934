"""DesiredState -> stable, human-readable text.

This is the format of the golden files under tests/unit/golden/ and the
format a live node's dump should share, so one diff tool serves both:

    10.96.0.10:80/TCP  ClusterIP  default/web:http  -> 10.244.1.2:8080/TCP 10.244.1.3:8080/TCP
    10.96.0.99:80/TCP  ClusterIP  default/empty:http  -> (none: refuse)
    10.0.0.1:30080/TCP  NodePort  default/web:http  -> 10.244.2.2:8080/TCP  external(Local) ->
        (none: drop)        <- one line in the file; wrapped here
    vip 10.96.0.10
    cidr 10.96.0.0/16
    problem Service/default/sig: UnsupportedProtocol: ...

Frontends, VIPs and CIDRs are sorted (IPv4 before IPv6, then by address,
port and protocol); problems keep compute's order, which is itself stable
(Services by namespace/name) and says which of two conflicting Services won.
"""

from __future__ import annotations

from agent.compute.types import (
    AccessSpec,
    DesiredState,
    EmptyVerdict,
    Frontend,
    L4Addr,
    addr_sort_key,
)
from agent.model.objects import IPNetwork

NO_BACKENDS = "(none: refuse)"


def _backends(
    backends: tuple[L4Addr, ...], on_empty: EmptyVerdict, weights: tuple[int, ...] = ()
) -> str:
    if weights:
        return " ".join(f"{b}*{w}" for b, w in zip(backends, weights, strict=True))
    return " ".join(str(b) for b in backends) or f"(none: {on_empty.value})"


def _access(access: AccessSpec) -> str:
    rules = ",".join(
        f"{r.action.value}:" + "+".join(str(s) for s in r.sources) for r in access.rules
    )
    return f"  access {rules + ',' if rules else ''}default:{access.default_action.value}"


def render_frontend(frontend: Frontend) -> str:
    """`addr:port/proto  Kind  ns/name:port  -> backends` and, where they apply,
    `  external[(Local)] -> backends`, `  affinity Ns`, `  sources CIDR,...`."""
    line = (
        f"{frontend.key}  {frontend.kind.value}  {frontend.service}  -> "
        f"{_backends(frontend.backends, frontend.on_empty, frontend.weights)}"
    )
    if frontend.kind.external:
        policy = "(Local)" if frontend.external_local else ""
        line += (
            f"  external{policy} -> "
            + _backends(frontend.external_backends, frontend.external_on_empty,
                        frontend.external_weights)
        )
    if frontend.affinity_timeout:
        line += f"  affinity {frontend.affinity_timeout}s"
    if frontend.source_ranges:
        line += "  sources " + ",".join(str(r) for r in frontend.source_ranges)
    if frontend.policy:
        line += f"  policy {frontend.policy} {frontend.algorithm.value}"
        if frontend.maglev_size:
            line += f"/{frontend.maglev_size}"
    if frontend.access is not None:
        line += _access(frontend.access)
    if frontend.redirect is not None:
        line += f"  redirect {frontend.redirect}"
    if frontend.redirect_tproxy:
        line += f"  redirect-tproxy :{frontend.redirect_tproxy}"
    if frontend.sockmap:
        line += "  sockmap"
    return line


def _cidr_sort_key(cidr: IPNetwork) -> tuple[int, int, int]:
    return (*addr_sort_key(cidr.network_address), cidr.prefixlen)


def render_desired(state: DesiredState) -> str:
    """One line per frontend, VIP, CIDR and problem; "" for an empty state."""
    lines = []
    for key in sorted(state.frontends):
        lines.append(render_frontend(state.frontends[key]))
    lines.extend(f"vip {vip}" for vip in sorted(state.vips, key=addr_sort_key))
    lines.extend(f"cidr {cidr}" for cidr in sorted(state.service_cidrs, key=_cidr_sort_key))
    lines.extend(f"problem {problem}" for problem in state.problems)
    lines.extend(
        f"policy {name} " + ",".join(sorted(features))
        for name, features in sorted(state.policies.items())
    )
    lines.extend(
        f"healthcheck {h.port} {h.namespace}/{h.name} local-endpoints={h.local_endpoints}"
        for h in state.health_checks
    )
    return "".join(f"{line}\n" for line in lines)
