"""A bounded-frequency runner, after kube-proxy's async.BoundedFrequencyRunner.

`run()` asks for a pass. Passes happen:
- no sooner than `min_interval` after the previous one, except that up to
  `burst` passes may run back to back (a token bucket refilled once per
  min_interval), so a single change is applied at once;
- at least every `max_interval` even without requests (the periodic pass,
  which the caller makes full). The max_interval is counted from the last
  periodic pass, not from the last pass of any kind, so that a steady stream
  of changes cannot starve the periodic full pass: the first pass after it
  falls due is periodic, whatever else asked for it (as kube-proxy's proxiers
  count their full-sync period from the last full sync);
- `retry_after(delay)` schedules an extra pass after a failure.

A pass that found nothing to do (fn returns False) gives its token back: the
rate limit bounds the cost of passes that program the kernel, and a pass
that only looked costs next to nothing. Without this, an event that changes
nothing (an EndpointSlice arriving before its Service, an update that
compute folds away) would spend the token the real change after it needs,
and delay it by a whole min_interval.

The function receives `periodic=True` when the pass is due to max_interval.
The clock is injectable, and `poll()` takes one scheduling decision the way
the loop does, so tests need no real time.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class BoundedFrequencyRunner:
    def __init__(
        self,
        name: str,
        fn: Callable[[bool], bool | None],
        min_interval: float,
        max_interval: float,
        burst: int = 2,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if min_interval < 0 or max_interval <= 0 or max_interval < min_interval or burst < 1:
            raise ValueError("need 0 <= min_interval <= max_interval, max_interval > 0, burst >= 1")
        self.name = name
        self._fn = fn
        self._min = min_interval
        self._max = max_interval
        self._burst = burst
        self._clock = clock
        self._cond = threading.Condition()
        self._pending = False
        self._stopped = False
        self._tokens = float(burst)
        self._token_time = clock()
        self._last_periodic = clock()
        self._retry_at: float | None = None
        self._thread: threading.Thread | None = None

    def run(self) -> None:
        """Request a pass as soon as the rate limit allows.

        Only the first request since the last pass wakes the loop. While one
        is pending the loop already counts on it: it is either about to run
        the pass or waiting for exactly the token that pass needs. Waking it
        again for each event of a burst (thousands when a load arrives) would
        only make it decide to wait again, a thread switch each time.
        """
        with self._cond:
            if not self._pending:
                self._pending = True
                self._cond.notify()

    def retry_after(self, delay: float) -> None:
        with self._cond:
            at = self._clock() + delay
            if self._retry_at is None or at < self._retry_at:
                self._retry_at = at
            self._cond.notify()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def _refill(self, now: float) -> None:
        if self._min > 0:
            self._tokens = min(self._burst, self._tokens + (now - self._token_time) / self._min)
        else:
            self._tokens = float(self._burst)
        self._token_time = now

    def next_action(self, now: float) -> tuple[bool, bool, float]:
        """(run now?, periodic?, seconds to wait otherwise). Call with the lock held.

        Only decides (and refills the token bucket); `poll` also claims the pass.
        """
        self._refill(now)
        periodic_due = now - self._last_periodic >= self._max
        retry_due = self._retry_at is not None and now >= self._retry_at
        wanted = self._pending or retry_due or periodic_due
        if wanted and self._tokens >= 1:
            return True, periodic_due, 0.0
        # Wait for the earliest future event. A reason already due is not an
        # event to wait for (it would make the wait 0 and spin the loop until
        # the next token): while rate limited, the token is what we wait for.
        waits = []
        if not periodic_due:
            waits.append(self._last_periodic + self._max - now)
        if self._retry_at is not None and not retry_due:
            waits.append(self._retry_at - now)
        if wanted:  # rate limited: wait for the next token
            waits.append((1 - self._tokens) * self._min)
        return False, False, max(0.0, min(waits))

    def _take(self) -> tuple[bool, bool, float]:
        """Decide now and, if a pass is due, claim it. Call with the lock held."""
        now = self._clock()
        go, periodic, wait = self.next_action(now)
        if go:
            self._tokens -= 1
            self._pending = False
            self._retry_at = None
            if periodic:
                self._last_periodic = now
        return go, periodic, wait

    def refund(self) -> None:
        """Give back the token of the pass just run: it did nothing."""
        with self._cond:
            self._tokens = min(float(self._burst), self._tokens + 1)

    def poll(self) -> tuple[bool, bool, float]:
        """One scheduling decision, as the loop takes it: if the answer is "run",
        the pass is claimed (a token spent, requests cleared) and the caller
        must run it. For tests and for callers that drive the runner themselves
        (do not mix with `start`)."""
        with self._cond:
            return self._take()

    def _loop(self) -> None:
        while True:
            with self._cond:
                if self._stopped:
                    return
                go, periodic, wait = self._take()
                if not go:
                    self._cond.wait(timeout=wait)
                    continue
            try:
                worked = self._fn(periodic)
            except Exception:  # the runner must survive anything fn does
                log.exception("%s: pass failed", self.name)
                continue
            if worked is False:
                self.refund()
