"""TrafficPolicy redirects with `mode: TPROXY`, in eBPF mode.

The socket hooks leave connections to such a frontend alone (VEER_SVC_F_PASS:
no translation, except for the proxy's own, which are balanced as usual), so
a pod's packets leave it addressed to the Service; in the node's namespace
nftables hands them to the proxy's transparent listener with `tproxy`, the
classic design:

    table inet veer
      chain policy_redirect (filter hook prerouting, priority mangle)
        tcp, socket transparent 1   mark |= MARK_LOCAL, accept
            (a packet of a connection a transparent socket of the proxy owns:
             the backend's replies to the proxy's upstream connection, which
             carries the client's address, and the client's later packets)
        ip daddr VIP tcp dport PORT  tproxy to :P, mark |= MARK_LOCAL, accept
            (one per redirected frontend; P is the policy's redirect.port)

and routing rule 9337 (MARK_LOCAL -> table 8337, `local default dev lo`)
delivers the marked packets locally. The proxy sees the client's address as
the peer and the Service as its own address (getsockname); it can connect to
a backend from the client's address (IP_TRANSPARENT, HAProxy's `usesrc
clientip`), and the backend's replies come back to it by the first rule.

Names, marks and tables are TPROXY mode's (agent/datapath/tproxy/layout.py),
so `veer agent --cleanup` removes these too. Clients on the node itself
(host-network processes) do not pass prerouting and are not redirected.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from agent.compute.types import L4Addr
from agent.datapath.tproxy.layout import MARK_LOCAL, NFT_FAMILY, NFT_TABLE
from agent.errors import DatapathError

CHAIN = "policy_redirect"
_TABLE = {"family": NFT_FAMILY, "table": NFT_TABLE}
_MARK = {"meta": {"key": "mark"}}
_SET_LOCAL = {"mangle": {"key": _MARK, "value": {"|": [_MARK, MARK_LOCAL]}}}


def _match(left: Any, right: Any) -> dict[str, Any]:
    return {"match": {"op": "==", "left": left, "right": right}}


def rules(redirects: Mapping[L4Addr, int]) -> list[list[dict[str, Any]]]:
    """The chain's rules for `redirects` (frontend -> proxy port); pure."""
    out: list[list[dict[str, Any]]] = [[
        _match({"meta": {"key": "l4proto"}}, "tcp"),
        _match({"socket": {"key": "transparent"}}, 1),
        _SET_LOCAL, {"accept": None},
    ]]
    for key, port in sorted(redirects.items()):
        ipf = "ip" if key.address.version == 4 else "ip6"
        out.append([
            _match({"payload": {"protocol": ipf, "field": "daddr"}}, str(key.address)),
            _match({"payload": {"protocol": "tcp", "field": "dport"}}, key.port),
            {"tproxy": {"family": ipf, "port": port}},
            _SET_LOCAL, {"accept": None},
        ])
    return out


def commands(redirects: Mapping[L4Addr, int]) -> list[dict[str, Any]]:
    """One transaction that makes the chain hold exactly `redirects`."""
    chain = {**_TABLE, "name": CHAIN}
    out: list[dict[str, Any]] = [
        {"add": {"table": {"family": NFT_FAMILY, "name": NFT_TABLE}}},
        {"add": {"chain": {**chain, "type": "filter", "hook": "prerouting",
                           "prio": -150, "policy": "accept"}}},
        {"flush": {"chain": chain}},
    ]
    out += [{"add": {"rule": {**_TABLE, "chain": CHAIN, "expr": expr}}}
            for expr in rules(redirects)]
    return out


class TproxyRedirects:
    """The chain and the routing rule, kept equal to the frontends that ask."""

    def __init__(self) -> None:
        self._applied: dict[L4Addr, int] | None = None
        self._nft: Any = None
        self._routing: Any = None

    def sync(self, redirects: Mapping[L4Addr, int]) -> bool:
        """Apply `redirects` if they changed. True if anything was written."""
        wanted = dict(redirects)
        if wanted == (self._applied or {}) and (self._applied is not None or not wanted):
            return False
        if self._nft is None:
            from agent.datapath.tproxy.nft import Nft
            from agent.datapath.tproxy.routing import Routing

            self._nft = Nft()
            self._routing = Routing()
        families = {k.address.version for k in wanted} or {4}
        try:
            self._routing.setup_rules(sorted(families))
        except OSError as err:
            raise DatapathError(f"redirect (TPROXY): routing rule: {err}") from err
        self._nft.run(commands(wanted), "the TPROXY redirect chain")
        self._applied = wanted
        return True

    def close(self) -> None:
        if self._routing is not None:
            self._routing.close()
