"""BoundedFrequencyRunner: scheduling decisions on a fake clock (no sleeping),
and one short run of the real thread."""

from __future__ import annotations

import threading

import pytest

from agent.reconcile.runner import BoundedFrequencyRunner


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make(
    min_interval: float = 1.0, max_interval: float = 60.0, burst: int = 2
) -> tuple[BoundedFrequencyRunner, FakeClock]:
    clock = FakeClock()
    runner = BoundedFrequencyRunner(
        "test", lambda periodic: None, min_interval, max_interval, burst, clock=clock
    )
    return runner, clock


def test_nothing_to_do_waits_for_the_periodic_pass() -> None:
    runner, clock = make(max_interval=60)
    go, periodic, wait = runner.poll()
    assert not go and not periodic
    assert wait == pytest.approx(60)
    clock.advance(20)
    assert runner.poll() == (False, False, pytest.approx(40))


def test_next_action_only_decides() -> None:
    runner, clock = make(burst=1)
    runner.run()
    assert runner.next_action(clock()) == (True, False, 0.0)
    assert runner.next_action(clock()) == (True, False, 0.0)  # nothing was claimed
    assert runner.poll()[0]
    assert not runner.next_action(clock())[0]


def test_burst_then_min_interval_throttles() -> None:
    runner, clock = make(min_interval=1.0, burst=2)

    # Two back-to-back passes are allowed at once...
    runner.run()
    assert runner.poll() == (True, False, 0.0)
    runner.run()
    assert runner.poll() == (True, False, 0.0)

    # ...the third waits for a token (one per min_interval).
    runner.run()
    go, _, wait = runner.poll()
    assert not go and wait == pytest.approx(1.0)
    clock.advance(0.6)
    go, _, wait = runner.poll()
    assert not go and wait == pytest.approx(0.4)
    clock.advance(0.4)
    assert runner.poll() == (True, False, 0.0)
    # The request was served: nothing pending any more.
    assert not runner.poll()[0]


def test_sustained_requests_run_once_per_min_interval() -> None:
    runner, clock = make(min_interval=1.0, max_interval=1000, burst=3)
    runs = []
    for _ in range(80):  # a request every 1/8 s for 10 s
        runner.run()
        if runner.poll()[0]:
            runs.append(clock.now)
        clock.advance(0.125)
    # The first requests run as they come (the burst); then one pass per
    # min_interval, however many requests arrive in between.
    assert runs == [1000.0, 1000.125, 1000.25] + [1000.0 + s for s in range(1, 10)]


def test_requests_coalesce() -> None:
    runner, _ = make(burst=1)
    for _ in range(5):
        runner.run()
    assert runner.poll()[0]
    assert not runner.poll()[0]


def test_max_interval_makes_a_periodic_pass_without_requests() -> None:
    runner, clock = make(min_interval=1, max_interval=60)
    clock.advance(59.5)
    assert runner.poll() == (False, False, pytest.approx(0.5))
    clock.advance(0.5)
    assert runner.poll() == (True, True, 0.0)
    # And again one max_interval later.
    clock.advance(59.9)
    assert not runner.poll()[0]
    clock.advance(0.1)
    assert runner.poll() == (True, True, 0.0)


def test_periodic_pass_is_not_starved_by_a_stream_of_changes() -> None:
    """A change every few seconds must not postpone the periodic full pass forever."""
    runner, clock = make(min_interval=1, max_interval=10, burst=1)
    kinds = []
    for _ in range(12):  # a change every 2 s for 24 s
        runner.run()
        go, periodic, _ = runner.poll()
        assert go
        kinds.append((clock.now - 1000.0, periodic))
        clock.advance(2)
    assert [t for t, periodic in kinds if periodic] == [10.0, 20.0]


def test_retry_after_schedules_a_pass() -> None:
    runner, clock = make(min_interval=0, max_interval=60)
    runner.retry_after(5)
    assert runner.poll() == (False, False, pytest.approx(5))
    clock.advance(5)
    assert runner.poll() == (True, False, 0.0)
    assert not runner.poll()[0]  # done; the retry was cleared


def test_retry_after_keeps_the_earliest() -> None:
    runner, clock = make(min_interval=0, max_interval=60)
    runner.retry_after(5)
    runner.retry_after(3)
    runner.retry_after(10)
    assert runner.poll()[2] == pytest.approx(3)
    clock.advance(3)
    assert runner.poll()[0]


def test_due_retry_while_rate_limited_waits_for_the_token_not_zero() -> None:
    """A due retry that the rate limit holds back must not make the loop spin."""
    runner, clock = make(min_interval=10, max_interval=60, burst=1)
    runner.run()
    assert runner.poll()[0]
    runner.retry_after(1)  # the pass failed; try again in a second
    clock.advance(2)
    go, _, wait = runner.poll()
    assert not go
    assert wait == pytest.approx(8)  # the next token, 10 s after the pass
    clock.advance(8)
    assert runner.poll()[0]


@pytest.mark.parametrize(
    ("min_interval", "max_interval", "burst"),
    [(-1, 10, 1), (1, 0, 1), (5, 1, 1), (0, 1, 0)],
)
def test_rejects_impossible_settings(min_interval: float, max_interval: float, burst: int) -> None:
    with pytest.raises(ValueError):
        BoundedFrequencyRunner("x", lambda p: None, min_interval, max_interval, burst)


def test_real_thread_runs_after_run_and_stops() -> None:
    calls: list[bool] = []
    called = threading.Event()

    def fn(periodic: bool) -> None:
        calls.append(periodic)
        called.set()
        if len(calls) == 1:
            raise RuntimeError("a failing pass must not kill the runner")

    name = "veer-test-runner"
    runner = BoundedFrequencyRunner(name, fn, min_interval=0.001, max_interval=30, burst=1)
    runner.start()
    try:
        assert not called.wait(0.05), "ran without a request"
        runner.run()
        assert called.wait(5), "run() did not wake the runner"
        called.clear()
        runner.run()
        assert called.wait(5), "the runner died after fn raised"
    finally:
        runner.stop(timeout=5)
    assert calls == [False, False]
    assert name not in {t.name for t in threading.enumerate()}, "stop() did not join"


def test_a_pass_that_did_nothing_gives_its_token_back() -> None:
    # A slice arriving just before its Service wakes a pass that finds nothing
    # to program; the Service's pass right after must not wait for a token.
    runner, clock = make(min_interval=1.0, burst=2)
    runner.run()
    assert runner.poll()[0]  # a real change: one token spent
    clock.advance(0.5)
    runner.run()
    assert runner.poll()[0]  # the slice alone: nothing to do...
    runner.refund()  # ...so the pass gives its token back
    runner.run()
    assert runner.poll() == (True, False, 0.0)  # the Service goes at once
    runner.run()
    go, _, wait = runner.poll()  # without the refund this one would have run
    assert not go and wait == pytest.approx(0.5)


def test_refund_never_exceeds_the_burst() -> None:
    runner, _ = make(burst=2)
    runner.refund()
    runner.refund()
    for _ in range(2):
        runner.run()
        assert runner.poll()[0]
    runner.run()
    assert not runner.poll()[0]


def test_real_thread_refunds_when_fn_returns_false() -> None:
    # min_interval 1000 s: only refunds let more than `burst` passes run.
    passes = threading.Semaphore(0)

    def fn(periodic: bool) -> bool:
        passes.release()
        return False

    runner = BoundedFrequencyRunner("veer-test-refund", fn, min_interval=1000,
                                    max_interval=1000, burst=1)
    runner.start()
    try:
        for _ in range(3):
            runner.run()
            assert passes.acquire(timeout=5), "a pass that did nothing kept its token"
    finally:
        runner.stop(timeout=5)


def test_a_burst_of_requests_wakes_the_loop_once() -> None:
    """While a request is pending the loop already counts on it: thousands of
    events arriving while it waits for a token must not wake it each time."""
    runner, clock = make(min_interval=1.0, burst=1)
    wakeups = 0
    notify = runner._cond.notify

    def counting_notify(n: int = 1) -> None:
        nonlocal wakeups
        wakeups += 1
        notify(n)

    runner._cond.notify = counting_notify  # type: ignore[method-assign]
    runner.run()
    assert runner.poll() == (True, False, 0.0)  # the token is spent
    for _ in range(1000):
        runner.run()
    assert wakeups == 2  # the first request, then the first of the burst
    # The burst is not lost: one pass, as soon as the token is back.
    assert runner.poll() == (False, False, pytest.approx(1.0))
    clock.advance(1.0)
    assert runner.poll() == (True, False, 0.0)
    assert runner.poll()[0] is False
    runner.run()
    assert wakeups == 3
