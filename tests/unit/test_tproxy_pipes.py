"""The proxy's pipes: small by default, grown once a read fills one, and only
default-size empty pipes go back to the pool (real pipes; no root needed)."""

from __future__ import annotations

import fcntl
import os
import socket
from collections.abc import Iterator

import pytest

from agent.datapath.tproxy.tcp import PIPE_SIZE, PipePool, _Direction, _grow


def closed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return True
    return False


@pytest.fixture
def sockets_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def test_a_direction_starts_at_the_default_and_grows_once(
        sockets_pair: tuple[socket.socket, socket.socket]) -> None:
    pool = PipePool()
    pipe = pool.get()
    assert fcntl.fcntl(pipe[1], fcntl.F_GETPIPE_SZ) == pool.default_size < PIPE_SIZE
    d = _Direction(sockets_pair[0].fileno(), sockets_pair[1], pipe, pool.default_size)
    assert d.growable
    _grow(d)
    assert d.size == PIPE_SIZE == fcntl.fcntl(pipe[1], fcntl.F_GETPIPE_SZ)
    assert not d.growable  # asked once per direction
    # A grown pipe is not pooled: the pool hands out default-size pipes only.
    pool.put(pipe, empty=True, size=d.size)
    assert closed(pipe[0]) and closed(pipe[1])
    pool.close()


def test_a_pipe_grows_with_its_bytes_in_it(
        sockets_pair: tuple[socket.socket, socket.socket]) -> None:
    pool = PipePool()
    r, w = pool.get()
    os.write(w, b"x" * 1000)
    d = _Direction(sockets_pair[0].fileno(), sockets_pair[1], (r, w), pool.default_size)
    _grow(d)
    assert os.read(r, 2000) == b"x" * 1000
    pool.put((r, w), empty=True, size=d.size)
    pool.close()


def test_empty_default_pipes_are_reused_and_others_closed() -> None:
    pool = PipePool(keep=1)
    first, second = pool.get(), pool.get()
    pool.put(first, empty=True, size=pool.default_size)
    pool.put(second, empty=True, size=pool.default_size)  # over `keep`: closed
    assert closed(second[0]) and not closed(first[0])
    assert pool.get() == first
    os.write(first[1], b"left over")
    pool.put(first, empty=False, size=pool.default_size)  # bytes in it: closed
    assert closed(first[0])
    pool.close()
