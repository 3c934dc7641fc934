"""CPU seconds spent by each of the agent's threads.

Python (before 3.14) does not give its threads' names to the kernel, so
/proc and top show every one of them as the process's name. Here each task
of /proc/self/task is named by the `threading.Thread` whose native_id it is
(the reconcile pass, a watch thread per kind, the HTTP servers, ...), and
otherwise by the kernel's comm (threads that C libraries started, such as
gRPC's own). Threads of one name are summed: the figure answers "where does
the agent's CPU go", not "which thread id".

The seconds come from each thread's CPU clock (clock_gettime), exact to the
nanosecond. /proc's utime and stime are sampled at the timer tick instead,
and a thread that works in bursts shorter than a tick, as the reconcile
pass does, can read 0 there after hundreds of passes.

A thread that has ended takes its seconds with it: these are counters of
the threads alive at the scrape, so their sum can be below the process's.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

TASKS = Path("/proc/self/task")

# The kernel's CPU clock ids (include/linux/posix-timers.h, as glibc's
# clock_getcpuclockid and pthread_getcpuclockid build them): ~id << 3, the
# per-thread bit (4) for a thread rather than a whole process, and the
# "sched" clock (2), which counts user and system time.
_CPUCLOCK_SCHED = 2
_CPUCLOCK_PERTHREAD = 4


def cpu_clock_id(pid_or_tid: int, per_thread: bool) -> int:
    """The clock id of a process's (any pid) or one thread's (of this
    process) CPU time, for time.clock_gettime."""
    return (~pid_or_tid << 3) | _CPUCLOCK_SCHED | (_CPUCLOCK_PERTHREAD if per_thread else 0)


def thread_clock_seconds(tid: int) -> float:
    """CPU seconds of thread `tid` of this process; OSError once it has ended.

    By tid rather than through time.pthread_getcpuclockid: that reads the
    thread's pthread structure, which may be unmapped once the thread has
    ended; the kernel answers EINVAL for an ended tid.
    """
    return time.clock_gettime(cpu_clock_id(tid, per_thread=True))


def thread_cpu_seconds(
    tasks: Path = TASKS,
    names: Mapping[int, str] | None = None,
    clock: Callable[[int], float] = thread_clock_seconds,
) -> dict[str, float]:
    """Seconds of CPU (user + system) by thread name, for the threads alive now."""
    if names is None:
        names = python_thread_names(threading.enumerate())
    out: dict[str, float] = {}
    try:
        entries = list(tasks.iterdir())
    except OSError:
        return out
    for entry in entries:
        try:
            tid = int(entry.name)
            used = clock(tid)
            name = names.get(tid) or (entry / "comm").read_text().strip()
        except (OSError, ValueError):
            continue  # the thread ended between the listing and the read
        out[name] = out.get(name, 0.0) + used
    return out


def python_thread_names(threads: Iterable[threading.Thread]) -> dict[int, str]:
    return {t.native_id: t.name for t in threads if t.native_id is not None}
