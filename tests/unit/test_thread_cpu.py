"""veer_thread_cpu_seconds_total: the agent's CPU split by thread name."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from agent.metrics.threads import thread_clock_seconds, thread_cpu_seconds


def test_tasks_are_named_by_python_thread_or_by_comm(tmp_path: Path) -> None:
    seconds = {10: 1.5, 11: 0.4, 12: 0.1, 13: 0.07}

    def task(tid: int, comm: str) -> None:
        (tmp_path / str(tid)).mkdir()
        (tmp_path / str(tid) / "comm").write_text(comm + "\n")

    def clock(tid: int) -> float:
        if tid not in seconds:
            raise OSError(22, "Invalid argument")  # as the kernel answers for an ended thread
        return seconds[tid]

    task(10, "python3")          # the main thread, known to Python
    task(11, "python3")          # a watch thread
    task(12, "python3")          # a second thread of the same name
    task(13, "grpc_global_tim")  # started by a C library
    task(14, "python3")          # ended between the listing and the read
    got = thread_cpu_seconds(tmp_path, {10: "MainThread", 11: "kube-services",
                                        12: "kube-services", 14: "gone"}, clock)
    assert got == pytest.approx({"MainThread": 1.5, "kube-services": 0.5,
                                 "grpc_global_tim": 0.07})


def test_the_thread_clock_is_this_threads_cpu_time() -> None:
    tid = threading.get_native_id()
    before, own = thread_clock_seconds(tid), time.thread_time()
    sum(range(200_000))
    spent = time.thread_time() - own
    assert thread_clock_seconds(tid) - before == pytest.approx(spent, rel=0.5, abs=1e-3)


def test_a_busy_thread_shows_its_own_seconds() -> None:
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            sum(range(1000))

    main_before = thread_cpu_seconds()["MainThread"]
    worker = threading.Thread(target=spin, name="vr-test-spinner", daemon=True)
    worker.start()
    try:
        deadline = time.monotonic() + 30
        while thread_cpu_seconds().get("vr-test-spinner", 0.0) < 0.3:
            assert time.monotonic() < deadline, thread_cpu_seconds()
            time.sleep(0.05)
        got = thread_cpu_seconds()
        # The main thread mostly slept: the spinner's seconds are not counted as its.
        assert got["MainThread"] - main_before < got["vr-test-spinner"] / 2, got
    finally:
        stop.set()
        worker.join()
    assert "vr-test-spinner" not in thread_cpu_seconds()  # ended: gone
