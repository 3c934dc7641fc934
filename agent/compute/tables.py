"""Backend selection tables and the choice itself, shared by every datapath.

A frontend's backends, their weights and its algorithm become one *slot
table*: the list of backend positions a choice indexes into. The eBPF
datapath writes it into slots 1..count of the frontend; the TPROXY proxy and
`veer explain` index into the same list, so every path agrees. Every reader
indexes by the table's own length, which is therefore free to vary.

- Equal weights, Random / RoundRobin / LeastConnections: no table (the
  backends themselves, once each, are the slots).
- Unequal weights, Random / RoundRobin: a table in which each backend
  appears in proportion to its weight (`apportion`), in an interleaved order
  (each backend's entries evenly spread), so that a round-robin walk
  interleaves backends instead of sending bursts.
- Maglev: the Maglev lookup table (Eisenbud et al., NSDI 2016) of a prime
  size. Weighted, each backend takes as many turns as `apportion` gives it
  slots, its turns spread evenly over the population. While the size stays
  the same, removing one of N backends moves only about 1/N of the flows.
- LeastConnections keeps one slot per backend; weights are carried beside
  them (the kernel compares connections/weight).

What a table promises (`apportion`): with S slots and weights w (total W),
  - each group of backends (by default: the backends of one weight, which is
    what one TrafficPolicy split entry gives its endpoints, unless two
    entries happen to give theirs the same weight) holds its quota S*W_g/W
    rounded up or down, so its share of traffic is within 1/S of its weight
    share, however many backends it has;
  - each backend holds its own quota S*w/W rounded up or down, so its share
    is within 1/S of its weight share (2/S in an explicit group whose
    members' weights differ).
  The size is chosen (`weighted_size`, `maglev_size_for`) so that the
  lightest backend's quota is at least 1 (every backend is reachable)
  whenever the slot budget allows it; beyond the budget, light backends may
  hold no slot while their group's share stays within 1/S.

`flow_hash` is the kernel's veer_flow_hash (bpf/veer_helpers.c), bit for bit:
Maglev indexes its table with it, and tests predict choices with it.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Hashable, Sequence
from functools import reduce

from agent.model.objects import Algorithm, IPNetwork

# The least size of a weighted Random/RoundRobin table when its weights are
# not represented exactly by fewer slots: groups are honoured to 0.1%.
TABLE_SLOTS = 1000
# A table holds at most this many slots: veer_service_value.count, which
# numbers them (slots 1..count), is 16 bits.
MAX_TABLE_SLOTS = 0xFFFF
# The slot budget of a weighted table, spent to give its lightest backends
# at least one slot each: SLOTS_PER_BACKEND per backend, at least
# BUDGET_SLOTS, at most MAX_TABLE_SLOTS (map usage stays in proportion to the
# backends).
SLOTS_PER_BACKEND = 16
BUDGET_SLOTS = 4 * TABLE_SLOTS
# Maglev table sizes the agent accepts (primes; Cilium offers the same range).
# A table grows to the next of them when its backends need more slots.
MAGLEV_SIZES = (251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521)
DEFAULT_MAGLEV_SIZE = 1021
# Weights as the kernel holds them (LeastConnections slots): 16 bits.
MAX_SLOT_WEIGHT = 0xFFFF

_MASK = 0xFFFFFFFF


def normalized(weights: Sequence[int]) -> tuple[int, ...]:
    """Weights divided by their greatest common divisor; () when all are equal
    (the plain case needs no weights at all)."""
    if not weights or len(set(weights)) == 1:
        return ()
    divisor = reduce(math.gcd, weights)
    return tuple(w // divisor for w in weights)


def _largest_remainder(weights: Sequence[int], total: int) -> list[int]:
    """`total` slots in proportion to `weights` (positive, not all zero): each
    gets its quota total*w/W rounded down, and the slots left over go to the
    largest remainders (ties: the first). Exact integer arithmetic."""
    whole = sum(weights)
    counts = [w * total // whole for w in weights]
    left = total - sum(counts)
    if left:
        remainders = [w * total % whole for w in weights]
        for i in sorted(range(len(weights)), key=lambda i: (-remainders[i], i))[:left]:
            counts[i] += 1
    return counts


def apportion(weights: Sequence[int], total: int,
              groups: Sequence[Hashable] | None = None) -> list[int]:
    """Slots per backend: `total` slots shared in proportion to `weights`.

    Two levels, so that a group's share does not drift with its size: the
    slots go first to the groups (largest remainder over the groups' weights),
    then within each group to its members (largest remainder again). Groups
    are `groups[i]` (e.g. the split entry a backend came from); by default
    backends of the same weight form a group. A group's count is its quota
    rounded up or down; a member of a group of equal weights, likewise (the
    quota of k members rounded, then divided by k and rounded, is never
    further than its own quota's rounding). A weight of 0 or less gets no
    slot.
    """
    labels: Sequence[Hashable] = weights if groups is None else groups
    if len(labels) != len(weights):
        raise ValueError(f"{len(labels)} groups for {len(weights)} weights")
    members: dict[Hashable, list[int]] = {}
    for i, w in enumerate(weights):
        if w > 0:
            members.setdefault(labels[i], []).append(i)
    counts = [0] * len(weights)
    if not members or total <= 0:
        return counts
    order = list(members.values())
    per_group = _largest_remainder([sum(weights[i] for i in m) for m in order], total)
    for m, slots in zip(order, per_group, strict=True):
        for i, c in zip(m, _largest_remainder([weights[i] for i in m], slots), strict=True):
            counts[i] = c
    return counts


def _budget(backends: int) -> int:
    return min(MAX_TABLE_SLOTS, max(BUDGET_SLOTS, SLOTS_PER_BACKEND * backends))


def _wanted_slots(weights: Sequence[int]) -> tuple[int, int, int]:
    """(total weight, the least size giving the lightest backend a quota of
    at least one slot, the slot budget) of positive weights."""
    positive = [w for w in weights if w > 0]
    whole = sum(positive)
    need = -(-whole // min(positive)) if positive else 0
    budget = _budget(len(positive))
    return whole, need, budget


def weighted_size(weights: Sequence[int]) -> int:
    """Slots of a weighted Random/RoundRobin table.

    The total weight itself when that is no more than needed (the table is
    then exact: each backend holds exactly its weight in slots); else enough
    for the lightest backend to hold a slot, at least TABLE_SLOTS, within
    the budget (`_budget`).
    """
    whole, need, budget = _wanted_slots(weights)
    size = min(max(TABLE_SLOTS, need), budget)
    return whole if whole <= size else size


def maglev_size_for(weights: Sequence[int], backends: int, configured: int) -> int:
    """Slots of a Maglev table: the configured prime, or when the backends
    need more (more backends than slots, or weights whose lightest would get
    no slot), the least of MAGLEV_SIZES holding the slots wanted, these
    capped by the budget (as for `weighted_size`; the largest size at most).
    Crossing to a larger size remaps most flows, as any change of size does;
    the size depends only on the backend count and weights, so it changes
    rarely (never while the configured size suffices)."""
    if any(w > 0 for w in weights):
        _, need, budget = _wanted_slots(weights)
    else:
        need = backends
        budget = _budget(backends)
    want = min(need, budget)
    if want <= configured:
        return configured
    i = bisect.bisect_left(MAGLEV_SIZES, want)
    return MAGLEV_SIZES[min(i, len(MAGLEV_SIZES) - 1)]


def _interleaved(counts: Sequence[int]) -> list[int]:
    """Each position i repeated counts[i] times, every position's entries
    spread evenly: entry k of i stands at (k + 1/2) / counts[i] of the way
    (ties: the lower position first). Distinct such fractions with
    denominators below 2**17 differ by far more than a double's rounding, so
    the order is exact and the same everywhere."""
    marks = sorted(((2 * k + 1) / (2 * c), i)
                   for i, c in enumerate(counts) for k in range(c))
    return [i for _, i in marks]


def _unequal(weights: Sequence[int]) -> bool:
    return len(set(weights)) > 1 and any(w > 0 for w in weights)


def weighted_table(weights: Sequence[int], *,
                   groups: Sequence[Hashable] | None = None) -> tuple[int, ...]:
    """Backend positions for a weighted Random/RoundRobin frontend: each
    backend's share is within 1/len(table) of its weight share, and so is each
    group's (see `apportion`)."""
    if not _unequal(weights):
        return tuple(range(len(weights)))
    return tuple(_interleaved(apportion(weights, weighted_size(weights), groups)))


def _fnv1a(data: bytes) -> int:
    h = 0x811C9DC5
    for byte in data:
        h = ((h ^ byte) * 0x01000193) & _MASK
    return h


def maglev_table(names: Sequence[bytes], weights: Sequence[int], size: int, *,
                 groups: Sequence[Hashable] | None = None) -> tuple[int, ...]:
    """The Maglev lookup table: entry -> backend position.

    Each backend walks its own permutation of the table (offset and skip from
    two hashes of its name, the backend's address and port, so a backend keeps
    its preferences whatever else changes) and claims the first free entry on
    its turn. Equal weights take turns in order, one each per round. Unequal
    weights: each backend takes exactly as many turns as `apportion` gives
    it entries, spread evenly over the population (weighted stride
    scheduling), so light backends take their turns throughout instead of
    after the heavy ones filled the table; every share is then within 1/size
    of its weight share, and each group's too.

    `size` is the configured size (a prime); the table is larger when the
    backends need it (`maglev_size_for`). Index it by its own length.
    """
    n = len(names)
    if n == 0:
        return ()
    weighted = len(weights) == n and _unequal(weights)
    size = maglev_size_for(weights if weighted else (), n, size)
    offsets = [_fnv1a(b"o" + name) % size for name in names]
    skips = [_fnv1a(b"s" + name) % (size - 1) + 1 for name in names]
    nexts = [0] * n
    table = [-1] * size
    if weighted:
        turns = _interleaved(apportion(weights, size, groups))
    else:
        turns = [i % n for i in range(size)]
    for i in turns:
        while True:
            slot = (offsets[i] + nexts[i] * skips[i]) % size
            nexts[i] += 1
            if table[slot] < 0:
                break
        table[slot] = i
    return tuple(table)


def slot_table(
    algorithm: Algorithm, names: Sequence[bytes], weights: Sequence[int], maglev_size: int,
    *, groups: Sequence[Hashable] | None = None,
) -> tuple[int, ...] | None:
    """The slot table of a frontend, as backend positions, or None when the
    backends themselves (once each, in the datapath's own stable order) are
    the slots. `groups` (optional, parallel to `weights`): which backends
    share a weight (a split entry); by default, those of equal weight."""
    if algorithm is Algorithm.MAGLEV and names:
        return maglev_table(names, weights, maglev_size or DEFAULT_MAGLEV_SIZE, groups=groups)
    # Equal weights (a split whose Services' shares match their endpoint
    # counts) need no table: a table of each backend once would only flag the
    # frontend as holding one.
    if algorithm is Algorithm.LEAST_CONNECTIONS or not _unequal(weights):
        return None
    return weighted_table(weights, groups=groups)


# ---- the flow hash (bpf/veer_helpers.c: veer_flow_hash) ---------------------


def _rotl(x: int, r: int) -> int:
    return ((x << r) | (x >> (32 - r))) & _MASK


def flow_hash(words: Sequence[int], seed: int = 0x5EE2) -> int:
    """murmur3's 32-bit body and finalizer over 32-bit words."""
    h = seed
    for w in words:
        k = (w * 0xCC9E2D51) & _MASK
        k = _rotl(k, 15)
        k = (k * 0x1B873593) & _MASK
        h ^= k
        h = _rotl(h, 13)
        h = (h * 5 + 0xE6546B64) & _MASK
    h ^= len(words) * 4
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _MASK
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _MASK
    h ^= h >> 16
    return h


def flow_words(client: bytes, port_be: int, proto: int) -> list[int]:
    """The words veer_flow_hash reads: the client's 16 address bytes as four
    little-endian words (the kernel loads them as such), then the client port
    as the kernel holds it (network order, in the low 16 bits) and the protocol."""
    assert len(client) == 16
    words = [int.from_bytes(client[i:i + 4], "little") for i in range(0, 16, 4)]
    return [*words, port_be & 0xFFFF, proto]


def backend_name(address_packed: bytes, port: int) -> bytes:
    """A backend's identity for Maglev's permutations: its address (16 bytes,
    IPv4 in the first 4) and port (network order)."""
    return address_packed.ljust(16, b"\0") + port.to_bytes(2, "big")


def slot_weights(weights: Sequence[int]) -> tuple[int, ...]:
    """Weights as LeastConnections slots hold them (1..MAX_SLOT_WEIGHT), in
    proportion; () when all are equal."""
    if not weights:
        return ()
    top = max(weights)
    if top <= MAX_SLOT_WEIGHT:
        return tuple(weights)
    return tuple(max(1, w * MAX_SLOT_WEIGHT // top) for w in weights)


def compile_access(
    rules: Sequence[tuple[int, bool, Sequence[IPNetwork]]],
) -> dict[IPNetwork, tuple[int, bool]]:
    """First-match rules -> longest-prefix-match entries.

    `rules` are (index, allow, source ranges) in policy order. Each range
    becomes one entry whose verdict is that of the first rule with a range
    containing it. For any address, the ranges containing it are nested, and
    the longest of them (what an LPM lookup finds) is contained in every
    other; so the first rule containing the longest is the first rule
    containing the address: first match, by longest-prefix lookup.
    """
    entries: dict[IPNetwork, tuple[int, bool]] = {}
    for _, _, ranges in rules:
        for cidr in ranges:
            if cidr in entries:
                continue
            for index, allow, others in rules:
                if any(o.version == cidr.version and cidr.subnet_of(o)  # type: ignore[arg-type]
                       for o in others):
                    entries[cidr] = (index, allow)
                    break
    return entries
