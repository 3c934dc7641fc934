"""The side-by-side bench's API writer (bench/versus/apiload.py ApiWriter):
a ClusterIP that an IPAddress object left behind still holds is freed once,
after a grace, and the create then goes through."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from versus import apiload
from versus.apiload import ApiWriter

HELD = (422, json.dumps({"message": 'spec.clusterIPs: Invalid value: ["10.96.130.140"]: '
                                    "failed to allocate IP 10.96.130.140: provided IP is "
                                    "already allocated"}).encode())


class Response:
    def __init__(self, status: int, raw: bytes) -> None:
        self.status, self.raw = status, raw

    def read(self) -> bytes:
        return self.raw


class Connection:
    """Answers from a script of (status, body); records the requests."""

    def __init__(self, answers: list[tuple[int, bytes]]) -> None:
        self.answers = answers
        self.sent = 0

    def request(self, method: str, path: str, body: Any = None, headers: Any = None) -> None:
        self.sent += 1

    def getresponse(self) -> Response:
        return Response(*self.answers.pop(0))


@pytest.fixture
def no_waits(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The writer's sleeps, recorded, not slept; a clock they advance."""
    slept: list[float] = []
    now = [1000.0]
    monkeypatch.setattr(apiload.time, "sleep", lambda s: (slept.append(s), now.__setitem__(
        0, now[0] + s)))
    monkeypatch.setattr(apiload.time, "monotonic", lambda: now[0])
    return slept


def writer(freed: list[str]) -> ApiWriter:
    w = ApiWriter.__new__(ApiWriter)
    w.headers, w.free_address = {}, freed.append
    return w


def test_an_address_held_past_the_grace_is_freed_once(no_waits: list[float]) -> None:
    freed: list[str] = []
    # Held for 20 tries (10 s): freed once, after the grace, and not again.
    conn = Connection([HELD] * 20 + [(201, b"{}")])
    body = {"spec": {"clusterIP": "10.96.130.140"}}
    writer(freed).request(conn, "POST", "/api/v1/namespaces/load/services", body)
    assert freed == ["10.96.130.140"]
    assert conn.sent == 21
    assert sum(no_waits[:int(apiload.ALLOCATED_GRACE / 0.5)]) <= apiload.ALLOCATED_GRACE


def test_an_address_released_within_the_grace_is_left_alone(no_waits: list[float]) -> None:
    freed: list[str] = []
    conn = Connection([HELD] * 2 + [(201, b"{}")])
    writer(freed).request(conn, "POST", "/x", {"spec": {"clusterIP": "10.96.0.9"}})
    assert freed == [] and conn.sent == 3


def test_without_a_way_to_free_it_the_writer_gives_up_after_its_wait(
        no_waits: list[float]) -> None:
    w = writer([])
    w.free_address = None
    conn = Connection([HELD] * 1000)
    with pytest.raises(RuntimeError, match="already allocated"):
        w.request(conn, "POST", "/x", {"spec": {"clusterIP": "10.96.0.9"}})
    assert sum(no_waits) >= apiload.ALLOCATED_WAIT
