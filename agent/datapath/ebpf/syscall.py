"""A thin, typed wrapper over the bpf(2) system call, for map and pin work.

BCC compiles and loads programs; everything after that (reading and writing
pinned maps, pinning, attaching, detaching, querying) goes through here, so
that tools like `veer agent --cleanup` and the map layer work on pinned
objects without compiling anything. Kernel errors become DatapathError with
the operation and object named; ENOSPC/E2BIG become MapFullError.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from collections.abc import Iterator
from typing import TypeVar

from agent.errors import DatapathError, MapFullError

K = TypeVar("K", bound=ctypes.Structure)
V = TypeVar("V", bound=ctypes.Structure)

_SYS_BPF = {"x86_64": 321, "aarch64": 280}.get(os.uname().machine, 321)

BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_MAP_LOOKUP_AND_DELETE_ELEM = 21
BPF_OBJ_PIN = 6
BPF_OBJ_GET = 7
BPF_PROG_ATTACH = 8
BPF_PROG_DETACH = 9
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_PROG_QUERY = 16
BPF_PROG_GET_FD_BY_ID = 13
BPF_MAP_CREATE = 0
BPF_MAP_LOOKUP_BATCH = 24
BPF_MAP_UPDATE_BATCH = 26

BPF_ANY = 0

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

_ATTR_SIZE = 128


def _bpf(cmd: int, attr: ctypes.Array[ctypes.c_char], what: str) -> int:
    ret = _libc.syscall(_SYS_BPF, cmd, attr, _ATTR_SIZE)
    if ret < 0:
        err = ctypes.get_errno()
        raise _error(err, what)
    return int(ret)


def _error(err: int, what: str) -> DatapathError:
    message = f"{what}: {os.strerror(err)} (errno {err})"
    if err in (errno.ENOSPC, errno.E2BIG):
        return MapFullError(message)
    if err == errno.EPERM:
        message += " — veer needs root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN)"
    exc = DatapathError(message)
    exc.errno = err  # type: ignore[attr-defined]
    return exc


# The attr type, made once: create_string_buffer would look the array type
# up on every call, and every map read and write builds an attr.
_Attr = ctypes.c_char * _ATTR_SIZE


def _attr() -> ctypes.Array[ctypes.c_char]:
    return _Attr()  # zero-filled, as the kernel requires of unused fields


def _addr(obj: ctypes._CData | ctypes.Array[ctypes.c_char]) -> int:
    return ctypes.addressof(obj)


def map_lookup(fd: int, key: ctypes._CData, value: ctypes._CData) -> bool:
    """Fill `value` for `key`; False if the key is absent."""
    attr = _attr()
    struct.pack_into("=I4xQQQ", attr, 0, fd, _addr(key), _addr(value), 0)
    try:
        _bpf(BPF_MAP_LOOKUP_ELEM, attr, "map lookup")
    except DatapathError as err:
        if getattr(err, "errno", None) == errno.ENOENT:
            return False
        raise
    return True


def map_update(fd: int, key: ctypes._CData, value: ctypes._CData, what: str) -> None:
    attr = _attr()
    struct.pack_into("=I4xQQQ", attr, 0, fd, _addr(key), _addr(value), BPF_ANY)
    _bpf(BPF_MAP_UPDATE_ELEM, attr, what)


def map_delete(fd: int, key: ctypes._CData, what: str) -> bool:
    """Delete `key`; False if it was absent."""
    attr = _attr()
    struct.pack_into("=I4xQ", attr, 0, fd, _addr(key))
    try:
        _bpf(BPF_MAP_DELETE_ELEM, attr, what)
    except DatapathError as err:
        if getattr(err, "errno", None) == errno.ENOENT:
            return False
        raise
    return True


# What bpf(2) answers a command the map type (or the kernel) lacks, before it
# has touched a single entry. 524: ENOTSUPP, kernel-internal.
_UNSUPPORTED = (errno.EINVAL, errno.ENOTSUP, 524)


class PopUnsupported(DatapathError):
    """The kernel cannot look up and delete in one call for this map type
    (hash maps gained it in 5.14)."""


def map_lookup_and_delete(fd: int, key: ctypes._CData, value: ctypes._CData, what: str) -> bool:
    """Fill `value` for `key` and delete the entry, in one step: the entry
    deleted is the one read. False if the key is absent."""
    attr = _attr()
    struct.pack_into("=I4xQQQ", attr, 0, fd, _addr(key), _addr(value), 0)
    try:
        _bpf(BPF_MAP_LOOKUP_AND_DELETE_ELEM, attr, what)
    except DatapathError as err:
        code = getattr(err, "errno", None)
        if code == errno.ENOENT:
            return False
        if code in _UNSUPPORTED:
            raise PopUnsupported(str(err)) from None
        raise
    return True


def map_next_key(fd: int, key: ctypes._CData | None, next_key: ctypes._CData) -> bool:
    """Fill `next_key` with the key after `key` (the first if None); False at the end."""
    attr = _attr()
    struct.pack_into(
        "=I4xQQ", attr, 0, fd, 0 if key is None else _addr(key), _addr(next_key)
    )
    try:
        _bpf(BPF_MAP_GET_NEXT_KEY, attr, "map iteration")
    except DatapathError as err:
        if getattr(err, "errno", None) == errno.ENOENT:
            return False
        raise
    return True


class BatchUnsupported(DatapathError):
    """The map type has no batch operations (e.g. LPM tries): iterate instead."""


def map_update_batch(fd: int, keys: ctypes.Array[K], values: ctypes.Array[V], what: str) -> None:
    """Write keys[i] -> values[i] for every i, in order, with one
    BPF_MAP_UPDATE_BATCH: a frontend's backend slots go in one system call
    instead of one each.

    The kernel writes the entries one at a time and stops at the first it
    cannot write: after an error the entries before it are written and the
    rest are not, just as a loop of map_update would leave them. Raises
    BatchUnsupported, having written nothing, where the map type or the
    kernel (before 5.6) has no batch update."""
    if len(keys) != len(values):
        raise ValueError(f"{what}: {len(keys)} keys for {len(values)} values")
    if not len(keys):
        return
    attr = _attr()
    struct.pack_into("=QQQQIIQQ", attr, 0, 0, 0, _addr(keys), _addr(values), len(keys), fd,
                     BPF_ANY, 0)
    ret = _libc.syscall(_SYS_BPF, BPF_MAP_UPDATE_BATCH, attr, _ATTR_SIZE)
    if ret >= 0:
        return
    err = ctypes.get_errno()
    written = struct.unpack_from("=I", attr, 32)[0]
    if err in _UNSUPPORTED and not written:
        raise BatchUnsupported(f"{what}: batch update: {os.strerror(err)}")
    raise _error(err, f"{what} (entry {written + 1} of {len(keys)})")


def _lookup_batches(
    fd: int, keys: ctypes.Array[K], values: ctypes.Array[V], token_size: int
) -> Iterator[int]:
    """Fill `keys` and `values` one chunk after another with
    BPF_MAP_LOOKUP_BATCH; yields how many entries each chunk holds (read
    them before the next). Raises BatchUnsupported if the map type has no
    batch operations."""
    token_in = ctypes.create_string_buffer(token_size)
    token_out = ctypes.create_string_buffer(token_size)
    first = True
    while True:
        attr = _attr()
        struct.pack_into(
            "=QQQQIIQQ", attr, 0,
            0 if first else _addr(token_in), _addr(token_out), _addr(keys), _addr(values),
            len(keys), fd, 0, 0,
        )
        ret = _libc.syscall(_SYS_BPF, BPF_MAP_LOOKUP_BATCH, attr, _ATTR_SIZE)
        err = ctypes.get_errno() if ret < 0 else 0
        count = struct.unpack_from("=I", attr, 32)[0] if err in (0, errno.ENOENT) else 0
        yield count
        if err == errno.ENOENT:
            return
        if err in _UNSUPPORTED:
            if first and not count:
                raise BatchUnsupported(f"batch lookup: {os.strerror(err)}")
            raise _error(err, "batch lookup")
        if err:
            raise _error(err, "batch lookup")
        ctypes.memmove(token_in, token_out, token_size)
        first = False


def map_lookup_batch(
    fd: int, key_type: type[K], value_type: type[V], chunk: int = 4096
) -> Iterator[tuple[K, V]]:
    """Every entry of a hash-like map (not a per-CPU one: one value per key),
    read `chunk` at a time with BPF_MAP_LOOKUP_BATCH: one system call per
    chunk instead of two per entry, which is what makes a full pass over
    10,000 Services cheap."""
    keys = (key_type * chunk)()
    values = (value_type * chunk)()
    for count in _lookup_batches(fd, keys, values, max(8, ctypes.sizeof(key_type))):
        for i in range(count):
            yield key_type.from_buffer_copy(keys[i]), value_type.from_buffer_copy(values[i])


def map_count_batch(fd: int, key_type: type[K], value_type: type[V], chunk: int = 4096) -> int:
    """How many entries a hash-like map (not per-CPU) holds, by batch lookup
    without copying any entry out: a metrics scrape counts the Service maps,
    which hold an entry per backend slot, and walking their keys costs a
    system call and a ctypes object per entry. `chunk` must hold the
    fullest hash bucket, or the kernel says ENOSPC."""
    keys = (key_type * chunk)()
    values = (value_type * chunk)()
    return sum(_lookup_batches(fd, keys, values, max(8, ctypes.sizeof(key_type))))


def obj_pin(fd: int, path: str) -> None:
    raw = ctypes.create_string_buffer(os.fsencode(path))
    attr = _attr()
    struct.pack_into("=QI", attr, 0, _addr(raw), fd)
    _bpf(BPF_OBJ_PIN, attr, f"pin {path}")


def obj_get(path: str) -> int:
    """Open a pinned object; raises DatapathError (errno ENOENT) if absent."""
    raw = ctypes.create_string_buffer(os.fsencode(path))
    attr = _attr()
    struct.pack_into("=QI", attr, 0, _addr(raw), 0)
    return _bpf(BPF_OBJ_GET, attr, f"open pinned {path}")


def prog_attach(prog_fd: int, target_fd: int, attach_type: int, flags: int = 0) -> None:
    attr = _attr()
    struct.pack_into("=IIII", attr, 0, target_fd, prog_fd, attach_type, flags)
    _bpf(BPF_PROG_ATTACH, attr, f"attach program (type {attach_type})")


def prog_detach(prog_fd: int, target_fd: int, attach_type: int) -> None:
    attr = _attr()
    struct.pack_into("=III", attr, 0, target_fd, prog_fd, attach_type)
    _bpf(BPF_PROG_DETACH, attr, f"detach program (type {attach_type})")


def prog_query(target_fd: int, attach_type: int) -> list[int]:
    """Ids of the programs attached to a cgroup for one attach type."""
    ids = (ctypes.c_uint32 * 64)()
    attr = _attr()
    struct.pack_into("=IIIIQI", attr, 0, target_fd, attach_type, 0, 0, _addr(ids), 64)
    _bpf(BPF_PROG_QUERY, attr, f"query programs (type {attach_type})")
    count = struct.unpack_from("=I", attr, 24)[0]
    return [ids[i] for i in range(min(count, 64))]


def prog_get_fd_by_id(prog_id: int) -> int:
    attr = _attr()
    struct.pack_into("=I", attr, 0, prog_id)
    return _bpf(BPF_PROG_GET_FD_BY_ID, attr, f"open program id {prog_id}")


class MapInfo(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("name", ctypes.c_char * 16),
        ("_rest", ctypes.c_uint8 * 64),
    ]


class ProgInfo(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("tag", ctypes.c_uint8 * 8),
        ("jited_prog_len", ctypes.c_uint32),
        ("xlated_prog_len", ctypes.c_uint32),
        ("jited_prog_insns", ctypes.c_uint64),
        ("xlated_prog_insns", ctypes.c_uint64),
        ("load_time", ctypes.c_uint64),
        ("created_by_uid", ctypes.c_uint32),
        ("nr_map_ids", ctypes.c_uint32),
        ("map_ids", ctypes.c_uint64),
        ("name", ctypes.c_char * 16),
        ("_rest", ctypes.c_uint8 * 128),
    ]


def _info(fd: int, info: ctypes.Structure, what: str) -> None:
    attr = _attr()
    struct.pack_into("=IIQ", attr, 0, fd, ctypes.sizeof(info), _addr(info))
    _bpf(BPF_OBJ_GET_INFO_BY_FD, attr, what)


def map_info(fd: int) -> MapInfo:
    info = MapInfo()
    _info(fd, info, "map info")
    return info


def prog_info(fd: int) -> ProgInfo:
    info = ProgInfo()
    _info(fd, info, "program info")
    return info
