"""EbpfDatapath._layout: how a frontend's backend slots change.

Invariants: the new slots hold exactly the wanted backends, once each; a
backend that stays keeps its slot unless it was the tail moved into a hole;
the number of rewritten slots never exceeds what the change needs.
"""

from __future__ import annotations

import random

import pytest

from agent.datapath.ebpf.backend import EbpfDatapath

layout = EbpfDatapath._layout


@pytest.mark.parametrize(
    ("old", "wanted", "new"),
    [
        ([], [1, 2, 3], [1, 2, 3]),
        ([1, 2, 3], [1, 2, 3], [1, 2, 3]),
        ([1, 2, 3], [1, 3], [1, 3]),  # tail moves into the hole
        ([1, 2, 3], [2, 3], [3, 2]),
        ([1, 2, 3], [1, 2], [1, 2]),
        ([1, 2, 3], [1, 3, 4], [1, 4, 3]),  # the newcomer fills the hole
        ([1, 2, 3], [], []),
        ([1, 2, 3, 4, 5], [5], [5]),
        ([1, 2, 3, 4, 5], [2, 4], [4, 2]),
        ([0, 2], [2, 7], [7, 2]),  # 0 marks a slot missing in the kernel
        # A table (a backend in many slots) that is no longer wanted: each
        # backend keeps its first slot only.
        ([2, 2, 1, 2, 1, 1], [1, 2], [2, 1]),
        ([2, 2, 1, 2, 1, 1], [1, 2, 3], [2, 3, 1]),
    ],
)
def test_layout_cases(old: list[int], wanted: list[int], new: list[int]) -> None:
    assert layout(old, wanted) == new


def test_layout_properties_on_random_changes() -> None:
    rng = random.Random(7)
    for _ in range(2000):
        pool = list(range(1, 20))
        old = rng.sample(pool, rng.randint(0, 10))
        wanted = rng.sample(pool, rng.randint(0, 10))
        new = layout(old, wanted)
        assert sorted(new) == sorted(wanted)
        kept = set(old) & set(wanted)
        rewritten = sum(1 for i, b in enumerate(new) if i >= len(old) or old[i] != b)
        # Every slot that changed serves a backend that is new to the frontend,
        # or a survivor moved once from the tail into a hole.
        assert rewritten <= len(set(wanted) - set(old)) + len(set(old) - set(wanted))
        for i, b in enumerate(new):
            if b in kept and i < len(old) and old[i] != b and old[i] in kept:
                pytest.fail(f"{old} -> {wanted}: survivor {b} moved onto a live slot {i}")
