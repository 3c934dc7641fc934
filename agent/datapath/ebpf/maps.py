"""Typed access to veer's pinned maps: open by path, read, write, iterate.

Works on pinned objects alone (no BCC), so the CLI and `--cleanup` can use it
on a node where an agent runs or once ran.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from agent.datapath.ebpf import syscall
from agent.datapath.ebpf.structs import (
    COUNTER_NAMES,
    AccessValue,
    AffinityKey,
    AffinityMatchKey,
    AffinityMatchValue,
    AffinityValue,
    BackendKey,
    BackendValue,
    CidrKey,
    CidrValue,
    ConnsSweptValue,
    ConnsValue,
    CookieKey,
    ExtAffinityKey,
    IndexKey,
    LcSockValue,
    NatValue,
    NodeValue,
    OrigKey,
    OrigValue,
    ProxyValue,
    RuleKey,
    ServiceKey,
    ServiceValue,
    SockPeer,
    SockRevnatKey,
    SockRevnatValue,
    SourceKey,
    Tuple,
    VipKey,
    VipValue,
)
from agent.errors import DatapathError


class _U64(ctypes.Structure):
    """One CPU's share of a per-CPU __u64 value."""

    _fields_ = [("value", ctypes.c_uint64)]


K = TypeVar("K", bound=ctypes.Structure)
V = TypeVar("V", bound=ctypes.Structure)


# BPF_MAP_TYPE_PERCPU_HASH, _PERCPU_ARRAY, _LRU_PERCPU_HASH (uapi/linux/bpf.h).
PER_CPU_MAP_TYPES = frozenset({5, 6, 10})


class PinnedMap(Generic[K, V]):
    """A pinned hash-like map with ctypes keys and values."""

    def __init__(self, path: str, key_type: type[K], value_type: type[V]) -> None:
        self.path = path
        self.name = os.path.basename(path)
        self.key_type = key_type
        self.value_type = value_type
        try:
            self.fd = syscall.obj_get(path)
        except DatapathError as err:
            raise DatapathError(f"cannot open map {path}: {err}") from err
        info = syscall.map_info(self.fd)
        if info.key_size != ctypes.sizeof(key_type) or info.value_size != ctypes.sizeof(
            value_type
        ):
            os.close(self.fd)
            raise DatapathError(
                f"map {path} has key/value sizes {info.key_size}/{info.value_size}, "
                f"expected {ctypes.sizeof(key_type)}/{ctypes.sizeof(value_type)}: "
                "it was made by another veer version; run `veer agent --cleanup` first"
            )
        self.capacity = int(info.max_entries)
        # Batch reads until the kernel says this map type has none. Never for a
        # per-CPU map: the kernel writes one value per CPU for each key, more
        # than the value buffers hold.
        self._batch = info.type not in PER_CPU_MAP_TYPES
        # Batch writes likewise, on their own flag: a kernel may have batch
        # reads for a map type and not writes.
        self._batch_write = self._batch
        self._pop = True  # lookup-and-delete in one call, until the kernel says no

    def get(self, key: K) -> V | None:
        value = self.value_type()
        return value if syscall.map_lookup(self.fd, key, value) else None

    def put(self, key: K, value: V) -> None:
        syscall.map_update(self.fd, key, value, f"write {self.name}")

    def put_batch(self, keys: ctypes.Array[K], values: ctypes.Array[V]) -> None:
        """Write keys[i] -> values[i] in order: one system call where the map
        type allows it, else one per entry. Either way a failure leaves the
        entries before the failing one written and the rest untouched."""
        if self._batch_write:
            try:
                syscall.map_update_batch(self.fd, keys, values, f"write {self.name}")
                return
            except syscall.BatchUnsupported:
                self._batch_write = False
        for key, value in zip(keys, values, strict=True):
            self.put(key, value)

    def delete(self, key: K) -> bool:
        return syscall.map_delete(self.fd, key, f"delete from {self.name}")

    def pop(self, key: K) -> V | None:
        """Delete `key` and return the value the deleted entry held (None if
        there was none). In one system call where the kernel allows, so that
        the value is that of the entry deleted even if a program replaced it
        meanwhile; else a lookup, then a delete, which may straddle such a
        replacement."""
        value = self.value_type()
        if self._pop:
            try:
                found = syscall.map_lookup_and_delete(self.fd, key, value,
                                                      f"pop from {self.name}")
                return value if found else None
            except syscall.PopUnsupported:
                self._pop = False
        if not syscall.map_lookup(self.fd, key, value):
            return None
        return value if self.delete(key) else None

    def list_keys(self) -> Iterator[K]:
        """All keys, collected before yielding so callers may delete as they go."""
        out = []
        prev: K | None = None
        while True:
            nxt = self.key_type()
            if not syscall.map_next_key(self.fd, prev, nxt):
                break
            out.append(nxt)
            prev = nxt
        return iter(out)

    def items(self) -> Iterator[tuple[K, V]]:
        """All entries: by batch where the map type allows it, else one by one."""
        if self._batch:
            try:
                return iter(list(syscall.map_lookup_batch(
                    self.fd, self.key_type, self.value_type)))
            except syscall.BatchUnsupported:
                self._batch = False
        return self._items_one_by_one()

    def _items_one_by_one(self) -> Iterator[tuple[K, V]]:
        for key in self.list_keys():
            value = self.get(key)
            if value is not None:
                yield key, value

    def __len__(self) -> int:
        """Entries now in the map, as the kernel holds them: by batch where the
        map type allows it, else by walking the keys."""
        if self._batch:
            try:
                return syscall.map_count_batch(self.fd, self.key_type, self.value_type)
            except syscall.BatchUnsupported:
                self._batch = False
        return sum(1 for _ in self.list_keys())

    def empty(self) -> bool:
        return not syscall.map_next_key(self.fd, None, self.key_type())

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass
class SockLbMaps:
    services: PinnedMap[ServiceKey, ServiceValue]
    backends: PinnedMap[BackendKey, BackendValue]
    vips: PinnedMap[VipKey, VipValue]
    tc_addrs: PinnedMap[VipKey, VipValue]  # addresses of external-scope frontends
    service_cidrs: PinnedMap[CidrKey, CidrValue]
    sock_revnat: PinnedMap[SockRevnatKey, SockRevnatValue]
    sock_peers: PinnedMap[IndexKey, SockPeer]  # an array, by socket cookie's low bits
    affinity: PinnedMap[AffinityKey, AffinityValue]
    affinity_match: PinnedMap[AffinityMatchKey, AffinityMatchValue]
    nat_fwd: PinnedMap[Tuple, NatValue]
    nat_rev: PinnedMap[Tuple, NatValue]
    node: PinnedMap[IndexKey, NodeValue]
    lb_sources: PinnedMap[SourceKey, CidrValue]
    ext_affinity: PinnedMap[ExtAffinityKey, AffinityValue]
    cluster_cidrs: PinnedMap[CidrKey, CidrValue]
    access: PinnedMap[SourceKey, AccessValue]
    netns_addrs: PinnedMap[CookieKey, NodeValue]
    backend_conns: PinnedMap[IndexKey, ConnsValue]
    backend_conns_swept: PinnedMap[IndexKey, ConnsSweptValue]
    lc_flows: PinnedMap[Tuple, LcSockValue]
    lc_socks: PinnedMap[CookieKey, LcSockValue]  # sockets LeastConnections counts
    access_hits: PinnedMap[RuleKey, _U64]  # per-CPU: read with access_hit_counts()
    redirects: PinnedMap[IndexKey, BackendValue]
    proxy: PinnedMap[IndexKey, ProxyValue]
    counters_fd: int

    @staticmethod
    def open(bpffs_dir: str) -> SockLbMaps:
        opened: dict[str, PinnedMap[Any, Any]] = {}
        try:
            for attr, name, key_type, value_type in MAP_LAYOUTS:
                opened[attr] = PinnedMap(os.path.join(bpffs_dir, name), key_type, value_type)
            counters_fd = syscall.obj_get(os.path.join(bpffs_dir, "veer_counters"))
        except DatapathError:
            for m in opened.values():
                m.close()
            raise
        return SockLbMaps(counters_fd=counters_fd, **opened)

    def counters(self) -> dict[str, int]:
        """Per-CPU counters summed over CPUs."""
        ncpu = _possible_cpus()
        out = {}
        for index, name in enumerate(COUNTER_NAMES):
            key = ctypes.c_uint32(index)
            values = (ctypes.c_uint64 * ncpu)()
            if syscall.map_lookup(self.counters_fd, key, values):
                out[name] = int(sum(values))
            else:
                out[name] = 0
        return out

    def access_hit_counts(self) -> dict[tuple[int, int], int]:
        """(service id, rule) -> hits, summed over CPUs (rule 0xffff: the default)."""
        ncpu = _possible_cpus()
        out = {}
        for key in self.access_hits.list_keys():
            values = (ctypes.c_uint64 * ncpu)()
            if syscall.map_lookup(self.access_hits.fd, key, values):
                out[(int(key.service_id), int(key.rule))] = int(sum(values))
        return out

    def close(self) -> None:
        for attr, _, _, _ in MAP_LAYOUTS:
            getattr(self, attr).close()
        os.close(self.counters_fd)


# Every pinned map SockLbMaps opens: its attribute, pin name, key and value
# types (the C structs' mirrors, structs.py).
MAP_LAYOUTS: tuple[tuple[str, str, type[ctypes.Structure], type[ctypes.Structure]], ...] = (
    ("services", "veer_services", ServiceKey, ServiceValue),
    ("backends", "veer_backends", BackendKey, BackendValue),
    ("vips", "veer_vips", VipKey, VipValue),
    ("tc_addrs", "veer_tc_addrs", VipKey, VipValue),
    ("service_cidrs", "veer_service_cidrs", CidrKey, CidrValue),
    ("sock_revnat", "veer_sock_revnat", SockRevnatKey, SockRevnatValue),
    ("sock_peers", "veer_sock_peers", IndexKey, SockPeer),
    ("affinity", "veer_affinity", AffinityKey, AffinityValue),
    ("affinity_match", "veer_affinity_match", AffinityMatchKey, AffinityMatchValue),
    ("nat_fwd", "veer_nat_fwd", Tuple, NatValue),
    ("nat_rev", "veer_nat_rev", Tuple, NatValue),
    ("node", "veer_node", IndexKey, NodeValue),
    ("lb_sources", "veer_lb_sources", SourceKey, CidrValue),
    ("ext_affinity", "veer_ext_affinity", ExtAffinityKey, AffinityValue),
    ("cluster_cidrs", "veer_cluster_cidrs", CidrKey, CidrValue),
    ("access", "veer_access", SourceKey, AccessValue),
    ("netns_addrs", "veer_netns_addrs", CookieKey, NodeValue),
    ("backend_conns", "veer_backend_conns", IndexKey, ConnsValue),
    ("backend_conns_swept", "veer_backend_conns_swept", IndexKey, ConnsSweptValue),
    ("lc_flows", "veer_lc_flows", Tuple, LcSockValue),
    ("lc_socks", "veer_lc_socks", CookieKey, LcSockValue),
    ("access_hits", "veer_access_hits", RuleKey, _U64),
    ("redirects", "veer_redirects", IndexKey, BackendValue),
    ("proxy", "veer_proxy", IndexKey, ProxyValue),
)


# Pinned maps the agent does not open, checked all the same.
OTHER_LAYOUTS: tuple[tuple[str, type[ctypes.Structure], type[ctypes.Structure]], ...] = (
    ("veer_rr_cursor", IndexKey, IndexKey),  # __u32 -> __u32
    ("veer_redirect_socks", CookieKey, OrigValue),
    ("veer_orig_dst", OrigKey, OrigValue),
    ("veer_counters", IndexKey, _U64),  # per CPU
)

# Pinned maps that must hold at least this many entries: BCC adopts a pinned
# map whatever its size too, and counters past the end of an earlier
# version's veer_counters would never count (their metric says "since the map
# was created", so restarting from 0 is allowed).
MIN_ENTRIES: Mapping[str, int] = {"veer_counters": len(COUNTER_NAMES)}

# Maps the kernel writes entries into that name each other's: backend ids
# (veer_backends' keys, which a new agent hands out afresh when that map is
# new) and the counts held against them, a flow's two NAT entries. One
# replaced alone would leave the others naming what is gone or means
# something else now, so a group is replaced whole. (What only the agent
# writes, the services and affinity_match included, is rewritten by its
# first pass.)
LAYOUT_GROUPS: tuple[frozenset[str], ...] = (
    frozenset({"veer_backends", "veer_affinity", "veer_ext_affinity", "veer_backend_conns",
               "veer_backend_conns_swept", "veer_lc_flows", "veer_lc_socks"}),
    frozenset({"veer_nat_fwd", "veer_nat_rev"}),
)


def retire_other_layouts(bpffs_dir: str) -> list[str]:
    """Unpin every map an earlier veer version pinned with other key or
    value sizes (or fewer entries than MIN_ENTRIES), with the rest of its
    LAYOUT_GROUPS group, and return their names.

    BCC adopts a pinned map of the same name whatever its sizes, and the
    verifier only checks that a key is at least the map's key size: the new
    programs would read the old layout. Unpinned, the map is made afresh by
    the load that follows; the old programs keep theirs until they are
    replaced. Its entries are lost: the agent rewrites what it owns on its
    first pass; flows and affinities the kernel kept in it start again.
    """
    layouts = [(name, k, v) for _, name, k, v in MAP_LAYOUTS] + list(OTHER_LAYOUTS)
    other = set()
    for name, key_type, value_type in layouts:
        try:
            fd = syscall.obj_get(os.path.join(bpffs_dir, name))
        except DatapathError:
            continue  # not pinned yet
        try:
            info = syscall.map_info(fd)
        finally:
            os.close(fd)
        if ((info.key_size, info.value_size) != (ctypes.sizeof(key_type),
                                                 ctypes.sizeof(value_type))
                or info.max_entries < MIN_ENTRIES.get(name, 0)):
            other.add(name)
    for group in LAYOUT_GROUPS:
        if group & other:
            other |= group
    retired = []
    for name in sorted(other):
        try:
            os.unlink(os.path.join(bpffs_dir, name))
        except FileNotFoundError:
            continue
        retired.append(name)
    return retired


def _possible_cpus() -> int:
    """Number of possible CPUs, which sizes per-CPU map values."""
    with open("/sys/devices/system/cpu/possible") as f:
        spec = f.read().strip()
    count = 0
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        count += (int(hi) - int(lo) + 1) if hi else 1
    return count
