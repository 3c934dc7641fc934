"""The proxy's event loop: one epoll, one thread, handlers by file descriptor.

Level-triggered: a handler that leaves data unread is called again, so no
handler has to drain a socket in one go (which bounds the time one busy
connection can hold the loop). Other threads hand work to the loop with
`call_soon_threadsafe`, which wakes it through an eventfd.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import math
import os
import select
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

Handler = Callable[[int], None]  # called with the epoll event mask


class Loop:
    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._handlers: dict[int, Handler] = {}
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._calls: collections.deque[Callable[[], None]] = collections.deque()
        self._timers: list[tuple[float, float, Callable[[float], None]]] = []
        self._later: list[tuple[float, Callable[[], None]]] = []
        self._deferred: collections.deque[Callable[[], None]] = collections.deque()
        # The earliest timer or delayed call; the loop looks at them only once
        # it has passed (kept up to date by every(), call_later() and run()).
        self._due = math.inf
        self._stop = False
        self.register(self._wake, select.EPOLLIN, self._on_wake)

    def register(self, fd: int, events: int, handler: Handler) -> None:
        self._handlers[fd] = handler
        self._epoll.register(fd, events)

    def modify(self, fd: int, events: int) -> None:
        self._epoll.modify(fd, events)

    def unregister(self, fd: int) -> None:
        if self._handlers.pop(fd, None) is not None:
            # Already closed: the kernel dropped it from the set itself.
            with contextlib.suppress(OSError, ValueError):
                self._epoll.unregister(fd)

    def forget(self, fd: int) -> None:
        """Drop `fd`'s handler without epoll_ctl: for a socket about to be
        closed, which leaves the epoll set by itself (one system call less)."""
        self._handlers.pop(fd, None)

    def call_soon_threadsafe(self, fn: Callable[[], None]) -> None:
        self._calls.append(fn)
        try:
            os.eventfd_write(self._wake, 1)
        except OSError as err:  # closed during shutdown
            if err.errno != errno.EBADF:
                raise

    def every(self, interval: float, fn: Callable[[float], None]) -> None:
        """Call fn(now) about every `interval` seconds, from the loop."""
        self._timers.append((time.monotonic() + interval, interval, fn))
        self._due = min(self._due, self._timers[-1][0])

    def defer(self, fn: Callable[[], None]) -> None:
        """Call fn() from the loop after the events at hand (the loop's own
        thread only): for work cut short so that others get their turn."""
        self._deferred.append(fn)

    def call_later(self, delay: float, fn: Callable[[], None]) -> None:
        """Call fn() once, about `delay` seconds from now, from the loop."""
        self._later.append((time.monotonic() + delay, fn))
        self._due = min(self._due, self._later[-1][0])

    def _on_wake(self, _events: int) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._wake)
        while self._calls:
            self._calls.popleft()()

    def stop(self) -> None:
        def halt() -> None:
            self._stop = True

        self.call_soon_threadsafe(halt)

    def run(self) -> None:
        handlers = self._handlers
        poll = self._epoll.poll
        monotonic = time.monotonic
        while not self._stop:
            # (At most a second without a look around, as before timers existed.)
            timeout = 0.0 if self._deferred else min(1.0, max(0.0, self._due - monotonic()))
            try:
                events = poll(timeout, 256)
            except InterruptedError:
                continue
            for fd, mask in events:
                handler = handlers.get(fd)
                if handler is None:
                    continue
                try:
                    handler(mask)
                except Exception:  # one broken flow must never stop the proxy
                    log.exception("proxy: handler for fd %d failed", fd)
            for _ in range(len(self._deferred)):
                try:
                    self._deferred.popleft()()
                except Exception:
                    log.exception("proxy: deferred task failed")
            if monotonic() < self._due:
                continue
            if self._later:
                now = monotonic()
                ready = [fn for when, fn in self._later if when <= now]
                self._later = [(when, fn) for when, fn in self._later if when > now]
                for call in ready:
                    try:
                        call()
                    except Exception:
                        log.exception("proxy: delayed task failed")
            if self._timers:
                now = time.monotonic()
                for i, (when, interval, fn) in enumerate(self._timers):
                    if when <= now:
                        self._timers[i] = (now + interval, interval, fn)
                        try:
                            fn(now)
                        except Exception:
                            log.exception("proxy: periodic task failed")
            self._due = min([t[0] for t in self._timers] + [t[0] for t in self._later],
                            default=math.inf)

    def close(self) -> None:
        self._epoll.close()
        os.close(self._wake)


def start_thread(loop: Loop, name: str) -> threading.Thread:
    thread = threading.Thread(target=loop.run, name=name, daemon=True)
    thread.start()
    return thread
