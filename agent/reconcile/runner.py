"""A bounded-frequency runner, after kube-proxy's async.BoundedFrequencyRunner.

`run()` asks for a pass. Passes happen:
- no sooner than `min_interval` after the previous one, except that up to
  `burst` passes may run back to back (a token bucket refilled once per
  min_interval), so a single change is applied at once;
- at least every `max_interval` even without requests (the periodic pass,
  which the caller makes full);
- `retry_after(delay)` schedules an extra pass after a failure.

The function receives `periodic=True` when the pass is due to max_interval.
The clock and the sleep are injectable so tests need no real time.
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
        fn: Callable[[bool], None],
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
        self._last_run = clock()
        self._retry_at: float | None = None
        self._thread: threading.Thread | None = None

    def run(self) -> None:
        """Request a pass as soon as the rate limit allows."""
        with self._cond:
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
        """(run now?, periodic?, seconds to wait otherwise). Call with the lock held."""
        self._refill(now)
        periodic_due = now - self._last_run >= self._max
        retry_due = self._retry_at is not None and now >= self._retry_at
        wanted = self._pending or retry_due or periodic_due
        if wanted and self._tokens >= 1:
            return True, periodic_due and not self._pending, 0.0
        waits = [self._last_run + self._max - now]
        if self._retry_at is not None:
            waits.append(self._retry_at - now)
        if wanted:  # rate limited: wait for the next token
            waits.append((1 - self._tokens) * self._min)
        return False, False, max(0.0, min(waits))

    def _loop(self) -> None:
        while True:
            with self._cond:
                if self._stopped:
                    return
                go, periodic, wait = self.next_action(self._clock())
                if not go:
                    self._cond.wait(timeout=wait)
                    continue
                self._tokens -= 1
                self._pending = False
                self._retry_at = None
                self._last_run = self._clock()
            try:
                self._fn(periodic)
            except Exception:  # the runner must survive anything fn does
                log.exception("%s: pass failed", self.name)
