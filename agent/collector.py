"""The cyclic garbage collector's pace for the long-running agent.

CPython (3.11 to 3.13) collects its young generation once 700 more
container objects have been allocated than freed, the middle one at every
11th young collection, and the whole heap when the middle one has been
collected 11 times and the objects moved to the old generation since the
last full collection number at least a quarter of those that survived it. The agent
holds its whole state in container objects (parsed objects, the snapshot's
per-kind mappings, the computed frontends), so every pass leaves new
N-sized mappings among the young objects, and each collection traverses
them. With 10,000 Services that was the largest single cost of a pass.

`pace_for_agent` raises the young threshold to 20,000 and keeps the older
ratios. Measured with `bench/agentcpu.py --services 10000 --rate 110
--min-sync-interval 0.1`, with and without `--gc-threshold 700` (the
README's performance section quotes both reports): collector CPU 11.03 of
39.15 s before, 2.07 of 30.35 s after.

What it costs, from the same two reports:
- Longer, rarer pauses. A collection holds the GIL, so it stalls every
  thread, the TPROXY proxy's loop included. A middle collection averaged
  about 4 ms before and 110 ms after (244 of them, then 8); a young one
  about 2 ms, then 9 ms. Full collections cost about 0.4 s either way,
  and fell from 12 to 1.
- Cycles live longer. Nearly all of the agent's garbage is freed by
  reference counting the moment it is dropped; only reference cycles wait
  for the collector, now for up to 20,000 net allocations in the young
  generation and about 11 times that once moved to the middle one (an idle
  agent allocates little, so that can be a long time). The bound is in
  objects, not bytes. The proxy's sockets and pipes are closed explicitly,
  never left to the collector.

CPython 3.14's incremental collector reads the thresholds differently;
this pace was measured on 3.11 only.
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
