"""`veer agent --cleanup` for TPROXY mode: everything layout.py lists, and
nothing else: the table, the rules and routes, and TCP early demux back to
the kernel's default if TPROXY mode ran here. Idempotent; acts on the
network namespace it runs in."""

from __future__ import annotations

from agent.datapath.tproxy import routing
from agent.datapath.tproxy.layout import NFT_COPY_FAMILIES, NFT_FAMILY, NFT_TABLE
from agent.datapath.tproxy.nft import Nft
from agent.errors import DatapathError, EnvironmentProblem


def cleanup() -> list[str]:
    """Remove tables inet, ip and ip6 veer, veer's routing rules and tables.
    Returns what was removed, for the log."""
    removed: list[str] = []
    try:
        nft = Nft()
    except EnvironmentProblem:
        nft = None  # without the binding no agent could have made the tables
    if nft is None:
        removed.extend(routing.remove_all())
        return removed
    had_main = False
    for family in (*NFT_COPY_FAMILIES.values(), NFT_FAMILY):
        table = {"family": family, "name": NFT_TABLE}
        if nft.query({"list": {"table": table}}):
            nft.run([{"delete": {"table": table}}], f"removing table {family} {NFT_TABLE}")
            removed.append(f"removed nftables table {family} {NFT_TABLE}")
            had_main = had_main or family == NFT_FAMILY
    if had_main:
        # TPROXY mode ran here and turned it off (routing.early_demux_off).
        try:
            routing.early_demux_on()
            removed.append("turned TCP early demux back on (net.ipv4.tcp_early_demux=1)")
        except DatapathError as err:
            removed.append(f"left TCP early demux as it is: {err}")
    removed.extend(routing.remove_all())
    return removed
