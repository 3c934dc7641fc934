"""make_copy_tables: tables ip veer / ip6 veer are optional, so a kernel
whose nftables lacks `dup` serves TPROXY mode without them, with a warning
that says what is lost."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import pytest

from agent.datapath.tproxy.backend import make_copy_tables
from agent.errors import DatapathError


class FakeNft:
    def __init__(self, refuse: bool) -> None:
        self.refuse = refuse
        self.ran: list[tuple[list[Any], str]] = []

    def run(self, commands: Sequence[Any], what: str) -> None:
        self.ran.append((list(commands), what))
        if self.refuse:
            raise DatapathError(f"nftables refused {what}: Error: Could not process rule")


def test_made_when_the_kernel_has_dup() -> None:
    nft = FakeNft(refuse=False)
    assert make_copy_tables(nft, (4, 6))  # type: ignore[arg-type]
    (commands, _), = nft.ran
    assert {c["add"]["table"]["family"] for c in commands if "table" in c.get("add", {})} \
        == {"ip", "ip6"}


def test_a_kernel_without_dup_gets_a_warning_not_a_failure(
    caplog: pytest.LogCaptureFixture,
) -> None:
    nft = FakeNft(refuse=True)
    with caplog.at_level(logging.WARNING):
        assert not make_copy_tables(nft, (4,))  # type: ignore[arg-type]
    assert "Could not process rule" in caplog.text
    assert "retries for about two minutes" in caplog.text
