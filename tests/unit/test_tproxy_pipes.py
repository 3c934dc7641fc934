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


def test_a_connection_that_gets_no_second_pipe_gives_the_first_back(
        sockets_pair: tuple[socket.socket, socket.socket],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Out of descriptors (EMFILE) at the second pipe: the first goes back to
    the pool (or is closed), not leaked, and the error reaches start()."""
    import errno
    from types import SimpleNamespace

    from agent.compute.types import L4Addr, Protocol
    from agent.datapath.tproxy.tcp import Connection
    from agent.model.parse import parse_ip

    pool = PipePool(keep=0)  # nothing is pooled: a pipe given back is closed
    made: list[tuple[int, int]] = []
    real_new = PipePool._new

    def new_then_out_of_descriptors() -> tuple[int, int]:
        if made:
            raise OSError(errno.EMFILE, "Too many open files")
        made.append(real_new())
        return made[-1]

    monkeypatch.setattr(PipePool, "_new", staticmethod(new_then_out_of_descriptors))
    engine = SimpleNamespace(pipes=pool)
    backend = L4Addr(parse_ip("10.244.1.2"), 8080, Protocol.TCP)
    with pytest.raises(OSError):
        Connection(engine, sockets_pair[0], sockets_pair[1], backend)  # type: ignore[arg-type]
    assert made and all(closed(fd) for fd in made[0]), "the first pipe leaked"
