"""The side-by-side bench's goal lines (bench/versus/report.py): a goal is
met only by figures that were measured."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from versus import report


def test_a_goal_that_compared_nothing_is_not_met() -> None:
    # A run with only the bench Service and no series, and no control plane:
    # nothing to compare with kube-proxy nftables.
    lines = report.goals([report.Load(0, None)], [], 10_000)
    datapath = next(line for line in lines if line.startswith("- Datapath"))
    control = next(line for line in lines if line.startswith("- Control plane"))
    assert "(0 comparisons" in datapath and "**not tested**" in datapath
    assert "(0 comparisons)" in control and "**not tested**" in control
    assert not any("**met**" in line for line in lines), lines
