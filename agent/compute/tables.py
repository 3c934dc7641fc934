"""Backend selection tables and the choice itself, shared by every datapath.

A frontend's backends, their weights and its algorithm become one *slot
table*: the list of backend positions a choice indexes into. The eBPF
datapath writes it into slots 1..count of the frontend; the TPROXY proxy and
`veer explain` index into the same list, so every path agrees.

- Equal weights, Random / RoundRobin / LeastConnections: no table (the
  backends themselves, once each, are the slots).
- Unequal weights, Random / RoundRobin: a table of TABLE_SLOTS entries in
  which each backend appears in proportion to its weight (largest
  remainder), in smooth weighted round-robin order (nginx's), so that a
  round-robin walk interleaves backends instead of sending bursts.
- Maglev: the Maglev lookup table (Eisenbud et al., NSDI 2016) of a fixed
  prime size, weighted by giving each backend turns in proportion to its
  weight. Because the size never changes, removing one of N backends moves
  only about 1/N of the flows.
- LeastConnections keeps one slot per backend; weights are carried beside
  them (the kernel compares connections/weight).

`flow_hash` is the kernel's veer_flow_hash (bpf/veer_helpers.c), bit for bit:
Maglev indexes its table with it, and tests predict choices with it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import reduce

from agent.model.objects import Algorithm, IPNetwork

# Slots of a weighted Random/RoundRobin table: weights are honoured to 0.1%.
TABLE_SLOTS = 1000
# Maglev table sizes the agent accepts (primes; Cilium offers the same range).
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


def _apportion(weights: Sequence[int], total: int) -> list[int]:
    """Largest-remainder apportionment of `total` slots; every positive weight
    gets at least one slot so that no backend silently disappears."""
    whole = sum(weights)
    shares = [w * total / whole for w in weights]
    counts = [max(1, math.floor(s)) if w > 0 else 0 for s, w in zip(shares, weights, strict=True)]
    order = sorted(range(len(weights)), key=lambda i: (-(shares[i] - math.floor(shares[i])), i))
    for i in order:
        if sum(counts) >= total:
            break
        if weights[i] > 0:
            counts[i] += 1
    return counts


def _smooth_order(counts: Sequence[int]) -> list[int]:
    """Positions in smooth weighted round-robin order: each step every entry
    gains its count, the richest is emitted and pays the total."""
    total = sum(counts)
    current = [0] * len(counts)
    out: list[int] = []
    for _ in range(total):
        for i, c in enumerate(counts):
            current[i] += c
        best = max(range(len(counts)), key=lambda i: (current[i], -i))
        current[best] -= total
        out.append(best)
    return out


def weighted_table(weights: Sequence[int]) -> tuple[int, ...]:
    """Backend positions for a weighted Random/RoundRobin frontend."""
    return tuple(_smooth_order(_apportion(weights, TABLE_SLOTS)))


def _fnv1a(data: bytes) -> int:
    h = 0x811C9DC5
    for byte in data:
        h = ((h ^ byte) * 0x01000193) & _MASK
    return h


def maglev_table(names: Sequence[bytes], weights: Sequence[int], size: int) -> tuple[int, ...]:
    """The Maglev lookup table: entry -> backend position.

    Each backend walks its own permutation of the table (offset and skip from
    two hashes of its name, the backend's address and port, so a backend keeps
    its preferences whatever else changes) and claims the first free entry on
    its turn. A backend of weight w takes w turns per round of the heaviest.
    """
    n = len(names)
    if n == 0:
        return ()
    offsets = [_fnv1a(b"o" + name) % size for name in names]
    skips = [_fnv1a(b"s" + name) % (size - 1) + 1 for name in names]
    nexts = [0] * n
    ws = list(weights) if weights else [1] * n
    top = max(ws)
    credit = [0] * n
    table = [-1] * size
    filled = 0
    while True:
        for i in range(n):
            credit[i] += ws[i]
            while credit[i] >= top:
                credit[i] -= top
                while True:
                    slot = (offsets[i] + nexts[i] * skips[i]) % size
                    nexts[i] += 1
                    if table[slot] < 0:
                        break
                table[slot] = i
                filled += 1
                if filled == size:
                    return tuple(table)


def slot_table(
    algorithm: Algorithm, names: Sequence[bytes], weights: Sequence[int], maglev_size: int
) -> tuple[int, ...] | None:
    """The slot table of a frontend, as backend positions, or None when the
    backends themselves (once each, in the datapath's own stable order) are
    the slots."""
    if algorithm is Algorithm.MAGLEV and names:
        return maglev_table(names, weights, maglev_size or DEFAULT_MAGLEV_SIZE)
    if algorithm is Algorithm.LEAST_CONNECTIONS or not weights:
        return None
    return weighted_table(weights)


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
