"""`veer agent --cleanup` for TPROXY mode: everything layout.py lists, and
nothing else. Idempotent; acts on the network namespace it runs in."""

from __future__ import annotations

from agent.datapath.tproxy import routing
from agent.datapath.tproxy.layout import NFT_FAMILY, NFT_TABLE
from agent.datapath.tproxy.nft import Nft
from agent.errors import EnvironmentProblem


def cleanup() -> list[str]:
    """Remove table inet veer, veer's routing rules and tables. Returns what was
    removed, for the log."""
    removed: list[str] = []
    try:
        nft = Nft()
    except EnvironmentProblem:
        nft = None  # without the binding no agent could have made the table
    if nft is not None and nft.query({"list": {"table": {"family": NFT_FAMILY,
                                                          "name": NFT_TABLE}}}):
        nft.run([{"delete": {"table": {"family": NFT_FAMILY, "name": NFT_TABLE}}}],
                "removing table inet veer")
        removed.append(f"removed nftables table {NFT_FAMILY} {NFT_TABLE}")
    removed.extend(routing.remove_all())
    return removed
