"""The ring buffer reader against a real BPF ring buffer.

A tiny program (BCC, in this test process) writes one record per run into a
one-page ring buffer; BPF_PROG_TEST_RUN runs it N times. Run i writes
8 + (7 i mod 32) bytes: i as a u64, then the byte i & 0xff repeated, so
lengths are rarely multiples of 8 (the reader must align); every fifth run
reserves a record and discards it (the reader must skip it). Records that do
not fit are counted by the program (state[1]).
"""

from __future__ import annotations

import ctypes
import os
import struct
from collections.abc import Iterator
from typing import Any

import pytest

from agent.datapath.ebpf.ringbuf import RingBuffer
from agent.errors import DatapathError

PROGRAM = r"""
BPF_RINGBUF_OUTPUT(rb, 1);
BPF_ARRAY(state, u64, 2); /* [0] runs so far, [1] records that did not fit */

int emit(struct __sk_buff *skb) {
    u32 k0 = 0, k1 = 1;
    u64 *runs = state.lookup(&k0);
    u64 *lost = state.lookup(&k1);
    if (!runs || !lost)
        return 0;
    u64 i = *runs;
    *runs = i + 1;
    if (i % 5 == 4) {
        u64 *r = rb.ringbuf_reserve(sizeof(u64));
        if (r) {
            *r = i;
            rb.ringbuf_discard(r, 0);
        }
        return 0;
    }
    u8 buf[40] = {};
    u32 len = 8 + ((i * 7) & 31);
    *(u64 *)buf = i;
    #pragma unroll
    for (int j = 8; j < 40; j++)
        buf[j] = (u8)i;
    if (rb.ringbuf_output(&buf, len, 0) < 0)
        *lost += 1;
    return 0;
}
"""

BPF_PROG_TEST_RUN = 10
BPF_PROG_TYPE_SCHED_CLS = 3


def expected_length(i: int) -> int:
    return 8 + ((i * 7) & 31)


def written(start: int, stop: int) -> list[int]:
    """The runs in [start, stop) that write a record (not a discarded one)."""
    return [i for i in range(start, stop) if i % 5 != 4]


class Emitter:
    def __init__(self) -> None:
        bcc = pytest.importorskip("bcc")
        from bcc.libbcc import lib

        self.bpf: Any = bcc.BPF(text=PROGRAM.encode())
        self.prog_fd = int(self.bpf.load_func(b"emit", BPF_PROG_TYPE_SCHED_CLS).fd)
        self.ring_fd = int(lib.bpf_table_fd(self.bpf.module, b"rb"))
        self.state_fd = int(lib.bpf_table_fd(self.bpf.module, b"state"))
        assert self.ring_fd >= 0

    def run(self, times: int) -> None:
        data = ctypes.create_string_buffer(64)
        attr = ctypes.create_string_buffer(128)
        struct.pack_into("=IIIIQQII", attr, 0, self.prog_fd, 0, 64, 0,
                         ctypes.addressof(data), 0, times, 0)
        libc = ctypes.CDLL(None, use_errno=True)
        ret = libc.syscall(321, BPF_PROG_TEST_RUN, attr, 128)
        assert ret == 0, os.strerror(ctypes.get_errno())

    def lost(self) -> int:
        return int(self.bpf[b"state"][ctypes.c_int(1)].value)


@pytest.fixture
def emitter() -> Iterator[Emitter]:
    if os.geteuid() != 0:
        pytest.skip("loading a BPF program needs root")
    e = Emitter()
    yield e
    e.bpf.cleanup()


def check(records: list[bytes], runs: list[int]) -> None:
    assert [struct.unpack_from("=Q", r)[0] for r in records] == runs
    for r, i in zip(records, runs, strict=True):
        assert len(r) == expected_length(i)
        assert r[8:] == bytes([i & 0xFF]) * (len(r) - 8)


def test_records_in_order_discarded_skipped_full_buffer_loses_the_rest(
        emitter: Emitter) -> None:
    ring = RingBuffer(emitter.ring_fd)
    try:
        assert ring.size == 4096
        emitter.run(200)  # about 8 KiB of records into 4 KiB: the rest is lost
        got: list[bytes] = []
        assert ring.consume(got.append) == len(got)
        assert 0 < len(got) < 160
        check(got, written(0, 200)[:len(got)])
        assert len(got) + emitter.lost() == len(written(0, 200))
        assert ring.available() == 0
        # Consumed space is free again: the next records fit.
        emitter.run(20)
        more: list[bytes] = []
        ring.consume(more.append)
        check(more, written(200, 220))
    finally:
        ring.close()


def test_records_across_the_end_of_the_data_area(emitter: Emitter) -> None:
    """Many rounds of a few records: positions go around the 4 KiB area
    dozens of times, records crossing its end included."""
    ring = RingBuffer(emitter.ring_fd)
    try:
        got: list[bytes] = []
        for _ in range(60):
            emitter.run(37)
            ring.consume(got.append)
        check(got, written(0, 60 * 37))
        assert emitter.lost() == 0
    finally:
        ring.close()


def test_poll_wakes_on_a_record(emitter: Emitter) -> None:
    ring = RingBuffer(emitter.ring_fd)
    try:
        assert not ring.poll(0)
        emitter.run(1)  # submitted with a wakeup
        assert ring.poll(10)
        got: list[bytes] = []
        ring.consume(got.append)
        check(got, [0])
        assert not ring.poll(0)
    finally:
        ring.close()


def test_a_raising_callback_leaves_its_record_consumed(emitter: Emitter) -> None:
    ring = RingBuffer(emitter.ring_fd)
    try:
        emitter.run(3)

        def boom(_: bytes) -> None:
            raise RuntimeError("sink failed")

        with pytest.raises(RuntimeError):
            ring.consume(boom)
        got: list[bytes] = []
        ring.consume(got.append)
        check(got, [1, 2])
    finally:
        ring.close()


def test_other_map_types_are_refused(emitter: Emitter) -> None:
    with pytest.raises(DatapathError, match="not a ring buffer"):
        RingBuffer(emitter.state_fd)
