"""DesiredState -> stable, human-readable text.

This is the format of the golden files under tests/unit/golden/ and the
format a live node's dump should share, so one diff tool serves both:

    10.96.0.10:80/TCP  ClusterIP  default/web:http  -> 10.244.1.2:8080/TCP 10.244.1.3:8080/TCP
    10.96.0.99:80/TCP  ClusterIP  default/empty:http  -> (none: refuse)
    vip 10.96.0.10
    cidr 10.96.0.0/16
    problem Service/default/sig: UnsupportedProtocol: ...

Frontends, VIPs and CIDRs are sorted (IPv4 before IPv6, then by address,
port and protocol); problems keep compute's order, which is itself stable
(Services by namespace/name) and says which of two conflicting Services won.
"""

from __future__ import annotations

from agent.compute.types import DesiredState, addr_sort_key
from agent.model.objects import IPNetwork

NO_BACKENDS = "(none: refuse)"


def _cidr_sort_key(cidr: IPNetwork) -> tuple[int, int, int]:
    return (*addr_sort_key(cidr.network_address), cidr.prefixlen)


def render_desired(state: DesiredState) -> str:
    """One line per frontend, VIP, CIDR and problem; "" for an empty state."""
    lines = []
    for key in sorted(state.frontends):
        frontend = state.frontends[key]
        backends = " ".join(str(b) for b in frontend.backends) or NO_BACKENDS
        lines.append(f"{key}  {frontend.kind.value}  {frontend.service}  -> {backends}")
    lines.extend(f"vip {vip}" for vip in sorted(state.vips, key=addr_sort_key))
    lines.extend(f"cidr {cidr}" for cidr in sorted(state.service_cidrs, key=_cidr_sort_key))
    lines.extend(f"problem {problem}" for problem in state.problems)
    return "".join(f"{line}\n" for line in lines)
