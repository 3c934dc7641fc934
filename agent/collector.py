"""The cyclic garbage collector's pace for the long-running agent.

CPython runs a young-generation collection after every 700 net new
container objects. The agent holds its whole state in container objects
(parsed objects, the snapshot's per-kind mappings, the computed frontends),
so every pass leaves new N-sized mappings among the young objects and each
of those collections traverses them; every tenth one also traverses the
middle generation, and now and then the whole heap is. With 10,000
Services this was the largest single cost of a pass
(`bench/agentcpu.py --services 10000 --rate 110 --min-sync-interval 0.1
--gc-threshold 700` against the same without `--gc-threshold`; the
README's performance section quotes both).

Nearly all of the agent's garbage is freed by reference counting the moment
it is dropped; only reference cycles wait for the collector. So collecting
less often costs at most the cycles made in between, a bounded amount, and
the thresholds of the older generations (every tenth collection of the one
below, and a full one only when a quarter of the heap is new) keep their
meaning.
"""

from __future__ import annotations

import gc

# Net new container objects between two young collections (CPython: 700).
YOUNG_COLLECTION_THRESHOLD = 20_000


def pace_for_agent(young: int = YOUNG_COLLECTION_THRESHOLD) -> None:
    """Collect the young generation after `young` net allocations instead of
    CPython's default; the older generations' ratios stay as they are."""
    _, middle, old = gc.get_threshold()
    gc.set_threshold(young, middle, old)
