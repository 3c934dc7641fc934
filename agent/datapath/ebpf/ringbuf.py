"""A reader of a BPF ring buffer map (BPF_MAP_TYPE_RINGBUF), by its fd.

The kernel's layout of the map's mmap-able file (kernel/bpf/ringbuf.c), which
this reader relies on:

    file offset 0          consumer page: consumer_pos (u64), written by us (RW)
    file offset page       producer page: producer_pos (u64), written by the kernel
    file offset 2 * page   the data area, `size` bytes (a power of 2), mapped
                           twice in a row so that a record crossing the end
                           reads as one contiguous piece

Both positions only grow; a position's place in the data area is
`pos & (size - 1)`. Each record starts with an 8-byte header: u32 length,
whose bit 31 (BUSY) says the producer has reserved but not yet submitted it
and bit 30 (DISCARD) says it was discarded, then u32 page offset (the
kernel's own). A record occupies round_up(8 + length, 8) bytes. Records are
handed out in order; a BUSY record stops reading (later records may be
complete, but the consumer position must not pass it).

Invariant: consumer_pos is only ever written here, after the record it
passes was read, so the kernel never reuses bytes still being read.

Ordering: the kernel advances producer_pos when a record is reserved and
clears BUSY (with a full barrier) once its bytes are written; we read
producer_pos, then the header, then the bytes, then store consumer_pos.
libbpf uses acquire loads and a release store for these; Python has none,
but on x86_64 (total store order) plain loads and stores keep that order.
On weaker memory models this relies on the interpreter's long path between
the accesses, which is not a formal guarantee.

Waiting: epoll on the map fd reports readable when a producer asked for a
wakeup (submits without BPF_RB_NO_WAKEUP); `consume` reads whatever is there,
wakeup or not. This is what libbpf's ring_buffer__poll does, in Python.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import select
from collections.abc import Callable

from agent.datapath.ebpf import syscall
from agent.errors import DatapathError

BPF_MAP_TYPE_RINGBUF = 27
BUSY_BIT = 1 << 31
DISCARD_BIT = 1 << 30
HEADER_SIZE = 8

Callback = Callable[[bytes], None]

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long)
_libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_MAP_FAILED = ctypes.c_void_p(-1).value


def _mmap(fd: int, length: int, prot: int, offset: int) -> int:
    """mmap(2) through libc: Python's mmap object hides a read-only mapping's
    address, and positions must be read with one aligned 8-byte load."""
    addr = _libc.mmap(None, length, prot, mmap.MAP_SHARED, fd, offset)
    if addr is None or addr == _MAP_FAILED:
        err = ctypes.get_errno()
        raise DatapathError(f"mapping the ring buffer: {os.strerror(err)} (errno {err})")
    return int(addr)


class RingBuffer:
    """Reads records from a ring buffer map; `fd` stays the caller's.

    Not thread-safe: one thread polls and consumes.
    """

    def __init__(self, fd: int) -> None:
        info = syscall.map_info(fd)
        if info.type != BPF_MAP_TYPE_RINGBUF:
            raise DatapathError(f"map {info.name.decode(errors='replace')!r} (type "
                                f"{info.type}) is not a ring buffer")
        self.size = int(info.max_entries)
        self._mask = self.size - 1
        self._page = mmap.PAGESIZE
        self._maps: list[tuple[int, int]] = []
        self._epoll = select.epoll()
        try:
            consumer = _mmap(fd, self._page, mmap.PROT_READ | mmap.PROT_WRITE, 0)
            self._maps.append((consumer, self._page))
            # The producer page and the data area, twice: read-only (the
            # kernel refuses a writable mapping of them).
            producer = _mmap(fd, self._page + 2 * self.size, mmap.PROT_READ, self._page)
            self._maps.append((producer, self._page + 2 * self.size))
            self._epoll.register(fd, select.EPOLLIN)
        except BaseException:
            self.close()
            raise
        # ctypes reads and writes an aligned u64 with one machine access
        # (x86_64, aarch64): a position is never seen half-written.
        self._consumer = ctypes.c_uint64.from_address(consumer)
        self._producer = ctypes.c_uint64.from_address(producer)
        self._data = producer + self._page

    def poll(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for a wakeup; True if one came."""
        return bool(self._epoll.poll(timeout))

    def consume(self, callback: Callback) -> int:
        """Hand every complete record, in order, to `callback`; returns how
        many. Discarded records are skipped. A callback that raises leaves the
        record it was given consumed."""
        count = 0
        consumer = self._consumer.value
        while consumer < self._producer.value:
            start = self._data + (consumer & self._mask)
            header = ctypes.c_uint32.from_address(start).value
            if header & BUSY_BIT:
                break  # reserved, not yet submitted: later records wait for it
            length = header & ~(BUSY_BIT | DISCARD_BIT)
            # The data area is mapped twice: a record crossing its end is
            # contiguous here.
            data = b"" if header & DISCARD_BIT else ctypes.string_at(start + HEADER_SIZE, length)
            consumer += (HEADER_SIZE + length + 7) & ~7
            self._consumer.value = consumer
            if not header & DISCARD_BIT:
                count += 1
                callback(data)
        return count

    def available(self) -> int:
        """Bytes submitted or reserved and not yet consumed."""
        return int(self._producer.value - self._consumer.value)

    def close(self) -> None:
        """Unmap and stop waiting; idempotent."""
        self._epoll.close()
        while self._maps:
            addr, length = self._maps.pop()
            _libc.munmap(addr, length)
