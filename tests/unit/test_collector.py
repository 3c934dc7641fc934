"""agent/collector.py: the agent's garbage-collector pace."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from agent.collector import YOUNG_COLLECTION_THRESHOLD, pace_for_agent


@pytest.fixture(autouse=True)
def restore_thresholds() -> Iterator[None]:
    before = gc.get_threshold()
    yield
    gc.set_threshold(*before)


def test_only_the_young_generation_is_collected_less_often() -> None:
    gc.set_threshold(700, 7, 9)
    pace_for_agent()
    assert gc.get_threshold() == (YOUNG_COLLECTION_THRESHOLD, 7, 9)
    assert YOUNG_COLLECTION_THRESHOLD > 700


def test_a_cycle_is_still_collected_without_an_explicit_collect() -> None:
    """A slower pace is not no collection: a reference cycle the agent drops
    goes once enough container objects have been allocated. The cycle is
    put in the middle generation first (as one that outlived a young
    collection), which is collected at every 11th young one: 15,000 net
    new objects are enough at a pace of 1,000, and not at 20,000."""
    assert gc.isenabled()
    pace_for_agent(1_000)
    gc.collect()

    class Node:
        def __init__(self) -> None:
            self.me = self

    cycle = Node()
    gone = weakref.ref(cycle)
    gc.collect(0)  # alive: moved to the middle generation
    del cycle
    assert gone() is not None  # reference counting alone cannot free it
    keep = [[] for _ in range(15_000)]  # young container objects, net new
    assert gone() is None
    del keep
