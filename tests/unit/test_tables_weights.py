"""TrafficPolicy split weights as slot tables (agent/compute/tables.py).

A split gives each endpoint its entry's weight divided by the entry's
endpoint count (agent/compute/policy.py merge_split); the slot table must
then send each entry its weight share of traffic, whatever the endpoint
counts. A table of S slots can do so to within 1/S: each entry (and each
backend) holds its quota of slots rounded up or down. These cases check
that bound for the weighted-random table and for Maglev, each entry's share
computed from the table itself (a slot is 1/S of the traffic: Random picks
a slot uniformly, Maglev hashes flows uniformly onto slots).

Backend conventions: entry number p, endpoint i -> 10.p.(i/250).(i%250+1):8080.
"""

from __future__ import annotations

import ipaddress
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import pytest

from agent.compute import tables
from agent.compute.policy import merge_split
from agent.compute.tables import DEFAULT_MAGLEV_SIZE, backend_name, maglev_table, slot_table
from agent.compute.types import L4Addr
from agent.model.objects import Algorithm, Protocol


def endpoints(entry: int, count: int) -> list[L4Addr]:
    return [L4Addr(ipaddress.ip_address(f"10.{entry}.{i // 250}.{i % 250 + 1}"), 8080,
                   Protocol.TCP) for i in range(count)]


def name(b: L4Addr) -> bytes:
    return backend_name(b.address.packed, b.port)


@dataclass(frozen=True)
class Split:
    """(weight, endpoint count) per split entry."""

    label: str
    entries: tuple[tuple[int, int], ...]
    # Whether the slot budget lets every endpoint hold a slot.
    all_reachable: bool = True


SPLITS = [
    Split("1 endpoint vs 1000, 50/50", ((1, 1), (1, 1000))),
    Split("canary 90/10, 2000 web pods, 1 canary", ((90, 2000), (10, 1))),
    Split("canary 90/10, 2000 web pods, 50 canary", ((90, 2000), (10, 50))),
    Split("canary 90/10, 3 web pods, 1 canary", ((90, 3), (10, 1))),
    Split("four equal weights, 3/7/11/13 endpoints", ((1, 3), (1, 7), (1, 11), (1, 13))),
    Split("70/20/10 over 5/200/1", ((70, 5), (20, 200), (10, 1))),
    Split("a drained entry", ((3, 4), (0, 5), (1, 2))),
    # The lightest endpoints would need 100,000 slots: beyond the budget
    # some hold none, but the entry as a whole keeps its 1%.
    Split("99/1 over 1/1000", ((99, 1), (1, 1000)), all_reachable=False),
]


def built(split: Split) -> tuple[tuple[L4Addr, ...], tuple[int, ...], dict[L4Addr, int]]:
    parts = [(w, endpoints(p + 1, n)) for p, (w, n) in enumerate(split.entries)]
    entry_of = {b: p for p, (_, bs) in enumerate(parts) for b in bs}
    weighted = merge_split(parts)
    return weighted.backends, weighted.weights, entry_of


def table_of(algorithm: Algorithm, backends: Sequence[L4Addr],
             weights: tuple[int, ...]) -> tuple[int, ...]:
    table = slot_table(algorithm, [name(b) for b in backends], weights, DEFAULT_MAGLEV_SIZE)
    if table is None:  # equal weights: the backends themselves are the slots
        return tuple(range(len(backends)))
    return table


def check_shares(split: Split, algorithm: Algorithm) -> tuple[float, int]:
    """Assert each entry's share within 1/size of its weight share and each
    backend's within 1/size of its own; return (worst entry error, size)."""
    backends, weights, entry_of = built(split)
    table = table_of(algorithm, backends, weights)
    size = len(table)
    whole = sum(w for w, _ in split.entries)
    per_entry = Counter(entry_of[backends[i]] for i in table)
    worst = 0.0
    for p, (w, _) in enumerate(split.entries):
        error = abs(per_entry[p] / size - w / whole)
        worst = max(worst, error)
        assert error <= 1 / size, (
            f"{split.label} {algorithm.value}: entry {p} (weight {w}/{whole}) has "
            f"{per_entry[p]}/{size} slots = {100 * per_entry[p] / size:.2f}%")
    per_backend = Counter(table)
    ws = weights or (1,) * len(backends)
    for i, w in enumerate(ws):
        assert abs(per_backend[i] / size - w / sum(ws)) <= 1 / size, (split.label, i)
    if split.all_reachable:
        assert len(per_backend) == len(backends), (
            f"{split.label} {algorithm.value}: {len(backends) - len(per_backend)} "
            "backends hold no slot")
    return worst, size


@pytest.mark.parametrize("split", SPLITS, ids=lambda s: s.label)
@pytest.mark.parametrize("algorithm", [Algorithm.RANDOM, Algorithm.MAGLEV],
                         ids=lambda a: a.value)
def test_each_split_entry_gets_its_weight_share(split: Split, algorithm: Algorithm) -> None:
    check_shares(split, algorithm)


def test_round_robin_uses_the_random_table() -> None:
    backends, weights, _ = built(SPLITS[0])
    names = [name(b) for b in backends]
    assert slot_table(Algorithm.ROUND_ROBIN, names, weights, 0) == \
        slot_table(Algorithm.RANDOM, names, weights, 0)


# ---- weights as they may reach the tables directly --------------------------


@pytest.mark.parametrize("weights", [
    (9, 1, 0),
    (0, 5, 0, 5, 1),
    (1000,) + (1,) * 1000,
    (1,) * 30 + (7,) * 5 + (1000,),
    (3, 5, 7, 11, 13, 17, 19, 23),
], ids=["9-1-0", "zeros", "1000-vs-1000x1", "three-classes", "primes"])
def test_backend_shares_and_zero_weights(weights: tuple[int, ...]) -> None:
    names = [name(b) for b in endpoints(9, len(weights))]
    for table in (tables.weighted_table(weights),
                  maglev_table(names, weights, DEFAULT_MAGLEV_SIZE)):
        size, counts = len(table), Counter(table)
        for i, w in enumerate(weights):
            assert abs(counts[i] - size * w / sum(weights)) < 1, (i, w, counts[i], size)
            assert (counts[i] > 0) == (w > 0), (i, w)


def test_a_single_backend_takes_every_slot() -> None:
    names = [name(b) for b in endpoints(1, 1)]
    assert set(maglev_table(names, (), DEFAULT_MAGLEV_SIZE)) == {0}
    assert set(maglev_table(names, (7,), DEFAULT_MAGLEV_SIZE)) == {0}
    assert set(tables.weighted_table((7, 0))) == {0}


def test_small_weights_make_an_exact_table() -> None:
    # 9:1 needs 10 slots, not 1000; each backend holds exactly its weight.
    assert Counter(tables.weighted_table((9, 1, 0))) == Counter({0: 9, 1: 1})
    # Round robin over the table interleaves: never 2 of the light in a row.
    table = tables.weighted_table((1, 2, 6))
    assert Counter(table) == Counter({0: 1, 1: 2, 2: 6})
    assert all(table[i] != table[i + 1] or table[i] == 2 for i in range(len(table) - 1))


def test_explicit_groups_keep_each_entry_within_one_slot() -> None:
    """Two entries whose endpoints weigh the same share one default group;
    given as groups, each keeps its own quota to within one slot."""
    # Beyond the budget (16 slots per backend): the 1001 light endpoints hold
    # ~159 slots between them, 0 or 1 each. By weight alone those would go
    # to the first 159 (all of entry a); by entry, ~79 to each.
    weights = (1,) * 1001 + (100_000,)
    groups = ["a"] * 500 + ["b"] * 501 + ["c"]
    for table in (tables.weighted_table(weights, groups=groups),
                  maglev_table([name(b) for b in endpoints(3, len(weights))], weights,
                               DEFAULT_MAGLEV_SIZE, groups=groups)):
        size = len(table)
        assert size < sum(weights)  # not exact
        got = Counter(groups[i] for i in table)
        for g, w in (("a", 500), ("b", 501), ("c", 100_000)):
            assert abs(got[g] - size * w / sum(weights)) < 1, (g, got, size)


# ---- sizes ---------------------------------------------------------------------


def test_maglev_keeps_the_configured_size_when_it_suffices() -> None:
    names = [name(b) for b in endpoints(1, 40)]
    assert len(maglev_table(names, (), 1021)) == 1021
    assert len(maglev_table(names, (1, 2) * 20, 1021)) == 1021
    assert len(maglev_table(names[:3], (), 251)) == 251


def test_maglev_grows_to_a_prime_that_holds_every_backend() -> None:
    names = [name(b) for b in endpoints(1, 2000)]
    table = maglev_table(names, (), 1021)
    assert len(table) in tables.MAGLEV_SIZES and len(table) >= 2000
    assert len(set(table)) == 2000


def test_tables_stay_within_the_16_bit_slot_count() -> None:
    weights = (1,) * 5000 + (10**6,)
    names = [name(b) for b in endpoints(4, len(weights))]
    assert len(tables.weighted_table(weights)) <= 0xFFFF
    assert len(maglev_table(names, weights, 1021)) <= 0xFFFF


# ---- Maglev's consistency with weights ----------------------------------------


@pytest.mark.parametrize("weights", [
    (1,) * 12,
    (1, 2, 3, 4) * 3,
    (9,) * 20 + (90,) * 2,
], ids=["equal", "1-to-4", "90-10"])
def test_removing_a_weighted_backend_moves_few_other_flows(weights: tuple[int, ...]) -> None:
    """Entries that the removed backend did not hold mostly stay: fewer than
    10% change (plain Maglev moves a few percent too, as entries' owners
    ripple; a rebuilt table would move most of them)."""
    backends = [name(b) for b in endpoints(5, len(weights))]
    before = [backends[i] for i in maglev_table(backends, weights, DEFAULT_MAGLEV_SIZE)]
    for gone in random.Random(7).sample(range(len(backends)), 4):
        keep = [i for i in range(len(backends)) if i != gone]
        after = maglev_table([backends[i] for i in keep], [weights[i] for i in keep],
                             DEFAULT_MAGLEV_SIZE)
        assert len(after) == len(before)
        after_names = [backends[keep[j]] for j in after]
        stayed = [k for k, b in enumerate(before) if b != backends[gone]]
        moved = sum(1 for k in stayed if after_names[k] != before[k])
        assert moved < len(stayed) / 10, (gone, moved, len(stayed))


@pytest.mark.parametrize("algorithm", [Algorithm.RANDOM, Algorithm.ROUND_ROBIN])
def test_equal_weights_need_no_table(algorithm: Algorithm) -> None:
    """A split whose shares match its endpoint counts gives every endpoint
    the same weight: the backends themselves are the slots, and the frontend
    is not flagged as holding a table."""
    names = [name(b) for b in endpoints(1, 3)]
    assert slot_table(algorithm, names, (40, 40, 40), 0) is None
    assert slot_table(algorithm, names, (40, 40, 20), 0) is not None
