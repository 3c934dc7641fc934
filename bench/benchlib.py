"""What the benches share: CPU placement and accounting, waiting for an idle
machine, interleaved rounds that are redone when another job disturbed them,
and writing the results.

Used by bench/clusterip.py and bench/nodeport.py (run as scripts: this
directory is on their sys.path). Each bench compares two paths to the same
single nginx (a baseline, "direct", and the path under test) as new
connections per second measured by wrk; see clusterip.py's docstring for why
each of these measures is there.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from agent.sandbox.wrk import WrkResult  # noqa: E402

RESULTS = REPO / "bench" / "results"


_LOG_LOCK = threading.Lock()


def log(msg: str) -> None:
    """One line of the bench's log; whole even when writer threads log at
    once (print writes the text and its newline apart)."""
    with _LOG_LOCK:
        print(msg, flush=True)


# ---- CPU accounting ------------------------------------------------------------------

CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a process (or thread), in seconds; 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def cpu_jiffies() -> dict[int, tuple[int, int]]:
    """CPU number -> (busy, total) jiffies, from /proc/stat."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3].isdigit():
                name, *rest = line.split()
                values = [int(v) for v in rest]
                idle = values[3] + values[4]  # idle + iowait
                out[int(name[3:])] = (sum(values) - idle, sum(values))
    return out


def find_kthread(name: str) -> int | None:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/comm") as f:
                    if f.read().strip() == name:
                        return int(entry)
            except OSError:
                continue
    return None


def nginx_pids(pid_file: str | Path) -> list[int]:
    """An nginx master (from its pid file) and its workers."""
    pid_file = Path(pid_file)
    deadline = time.monotonic() + 10
    while not pid_file.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{pid_file} did not appear")
        time.sleep(0.05)
    master = int(pid_file.read_text().split()[0])
    children: list[int] = []
    for task in os.listdir(f"/proc/{master}/task"):
        with open(f"/proc/{master}/task/{task}/children") as f:
            children += [int(p) for p in f.read().split()]
    return [master, *children]


@dataclass
class CpuUse:
    """CPU seconds over one interval."""

    elapsed: float
    bench_busy: float  # on the CPUs that wrk and nginx run on
    ours: float  # wrk + nginx + those CPUs' ksoftirqd (+ the agents unless pinned away)
    agent: float  # every agent together
    machine_busy: float  # all CPUs

    @property
    def foreign(self) -> float:
        """CPU time that something else took on the bench CPUs."""
        return max(0.0, self.bench_busy - self.ours)

    def to_json(self) -> dict[str, float]:
        return {
            "bench_cpus_busy": round(self.bench_busy, 2),
            "ours": round(self.ours, 2),
            "foreign": round(self.foreign, 2),
            "agent": round(self.agent, 2),
            "machine_busy": round(self.machine_busy, 2),
            "elapsed": round(self.elapsed, 2),
        }


# (time, per-CPU jiffies, waited-for children's CPU, server pids' CPU, agents' CPU)
_Sample = tuple[float, dict[int, tuple[int, int]], float, float, float]


class CpuMeter:
    """Who used the bench CPUs during a run: us (wrk, nginx, the softirqs that
    carry our packets) or someone else (another job on a shared machine).

    Process times include the interrupt time spent while they ran, so on a
    bench CPU that only we use, busy time == our processes' time (checked to
    within a tick). wrk is counted once it has been waited for (RUSAGE_CHILDREN)."""

    def __init__(self, bench_cpus: set[int], server_pids: Sequence[int],
                 agent_pids: Sequence[int], agent_pinned_away: bool) -> None:
        self.cpus = bench_cpus or set(cpu_jiffies())
        self.pids = list(server_pids)
        for cpu in sorted(self.cpus):
            ksoftirqd = find_kthread(f"ksoftirqd/{cpu}")
            if ksoftirqd is not None:
                self.pids.append(ksoftirqd)
        self.agent_pids = list(agent_pids)
        self.agent_pinned_away = agent_pinned_away

    def _sample(self) -> _Sample:
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        return (
            time.monotonic(),
            cpu_jiffies(),
            children.ru_utime + children.ru_stime,
            sum(proc_cpu_seconds(p) for p in self.pids),
            sum(proc_cpu_seconds(p) for p in self.agent_pids),
        )

    def start(self) -> _Sample:
        return self._sample()

    def stop(self, start: _Sample) -> CpuUse:
        t0, j0, c0, p0, a0 = start
        t1, j1, c1, p1, a1 = self._sample()
        bench = sum(j1[c][0] - j0[c][0] for c in self.cpus) / CLK_TCK
        machine = sum(j1[c][0] - j0[c][0] for c in j1) / CLK_TCK
        agent = a1 - a0
        ours = (c1 - c0) + (p1 - p0) + (0.0 if self.agent_pinned_away else agent)
        return CpuUse(t1 - t0, bench, ours, agent, machine)


# ---- CPU placement ---------------------------------------------------------------------


def bench_cpus(layout: str) -> tuple[set[int], set[int]]:
    """(CPUs for nginx, CPUs for wrk) in the chosen layout; empty sets: unpinned."""
    cpus = sorted(os.sched_getaffinity(0))
    if layout == "shared" or len(cpus) < 2:
        return set(), set()
    last = {cpus[-1]}
    if layout == "single":
        return last, last
    return last, set(cpus[:-1])  # split


def pin_servers(pids: Sequence[int], cpus: set[int]) -> None:
    for pid in pids:
        os.sched_setaffinity(pid, cpus)


def wrk_prefix(cpus: set[int]) -> list[str]:
    """What to put before wrk's argv to keep it on `cpus` (nothing if unpinned)."""
    return ["taskset", "-c", ",".join(map(str, sorted(cpus)))] if cpus else []


def place_threads(pid: int, cpus: set[int]) -> None:
    """Every thread of `pid` onto `cpus` (threads have their own affinity; a
    process that exits meanwhile is skipped)."""
    with contextlib.suppress(FileNotFoundError, ProcessLookupError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(ProcessLookupError, FileNotFoundError):
                os.sched_setaffinity(int(tid), cpus)


def place_agents(layout: str, agent_pids: Sequence[int]) -> bool:
    """In the single layout, keep the agents (every thread) off the bench CPU.
    Returns whether they were moved."""
    server, _ = bench_cpus(layout)
    if layout != "single" or not server:
        return False
    others = set(os.sched_getaffinity(0)) - server
    for pid in agent_pids:
        place_threads(pid, others)
    return True


def unplace(pids: Sequence[int]) -> None:
    """Let `pids` run on every CPU again."""
    everything = set(range(os.cpu_count() or 1))
    for pid in pids:
        place_threads(pid, everything)


# ---- an idle machine -------------------------------------------------------------------


def settle(agent_pids: Sequence[int], timeout: float = 30.0) -> None:
    """Let the agents go idle (status written, garbage collected) before measuring."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        before = sum(proc_cpu_seconds(p) for p in agent_pids)
        time.sleep(1.0)
        if sum(proc_cpu_seconds(p) for p in agent_pids) - before < 0.05:
            return
    log(f"warning: the agent did not go idle within {timeout:.0f} s")


class QuietWaiter:
    """Waits until no other job uses the machine: on a shared machine a build or
    a test run next door costs a run far more than veer does. Each wait is
    bounded by `timeout`, all of them together by `budget`."""

    def __init__(self, meter: CpuMeter, timeout: float, budget: float) -> None:
        self.meter = meter
        self.timeout = timeout
        self.budget = budget

    def __call__(self) -> None:
        deadline = time.monotonic() + min(self.timeout, self.budget)
        started = time.monotonic()
        said = False
        try:
            while True:
                mark = self.meter.start()
                time.sleep(1.0)
                use = self.meter.stop(mark)
                others = (use.machine_busy - use.agent - use.ours) / use.elapsed
                if others < 0.1:
                    if said:
                        log("  ... quiet again")
                    return
                if time.monotonic() > deadline:
                    log(f"  the machine is still busy ({others:.0%} of a CPU used by other "
                        "processes); measuring anyway")
                    return
                if not said:
                    log(f"  other processes use {others:.0%} of a CPU; waiting up to "
                        f"{deadline - time.monotonic():.0f} s for the machine to quiet down")
                    said = True
        finally:
            self.budget = max(0.0, self.budget - (time.monotonic() - started))


# ---- runs and rounds -------------------------------------------------------------------


@dataclass
class Run:
    label: str  # the series (load) it belongs to
    path: str
    round: int
    attempt: int
    wrk: WrkResult  # the new-connection run (wrk with Connection: close)
    cpu: CpuUse
    counted: dict[str, Any]  # what the datapath counted during the run (bench-specific)
    disturbed: bool = False  # another process took > 3% of the bench CPU(s) during it
    used: bool = True
    extra: dict[str, float] = field(default_factory=dict)  # other figures of the same run

    def to_json(self) -> dict[str, Any]:
        return {
            "load": self.label, "path": self.path, "round": self.round,
            "attempt": self.attempt, "used": self.used, "disturbed": self.disturbed,
            **self.counted,
            **self.extra,
            "cpu_s": self.cpu.to_json(),
            **self.wrk.to_json(),
        }


@dataclass
class Series:
    """Interleaved runs of several paths; the first is the baseline."""

    label: str
    paths: tuple[str, ...]  # e.g. ("direct", "clusterip")
    runs: list[Run] = field(default_factory=list)

    @property
    def base(self) -> str:
        return self.paths[0]

    @property
    def test(self) -> str:
        """The path under test, in a two-path series."""
        return self.paths[1]

    def used(self) -> list[Run]:
        return [r for r in self.runs if r.used]

    def rates(self, path: str) -> list[float]:
        return [r.wrk.rate for r in self.used() if r.path == path]

    def values(self, path: str, key: str) -> list[float]:
        """`key` of each used run of `path`: "rate" (conn/s) or one of `extra`."""
        return [r.wrk.rate if key == "rate" else r.extra[key]
                for r in self.used() if r.path == path and (key == "rate" or key in r.extra)]

    def ratio(self, path: str = "", key: str = "rate") -> float:
        """Median of `path` (default: the tested one) over the baseline's median."""
        return (statistics.median(self.values(path or self.test, key))
                / statistics.median(self.values(self.base, key)))

    def paired_ratios(self, path: str = "", key: str = "rate") -> list[float]:
        """`path` / baseline within each round."""
        path = path or self.test
        by_round: dict[int, dict[str, float]] = {}
        for r in self.used():
            if key == "rate" or key in r.extra:
                by_round.setdefault(r.round, {})[r.path] = (
                    r.wrk.rate if key == "rate" else r.extra[key])
        return [v[path] / v[self.base] for _, v in sorted(by_round.items())
                if self.base in v and path in v and v[self.base]]

    def redone(self) -> int:
        return len({(r.round, r.attempt) for r in self.runs if not r.used})

    def disturbed_kept(self) -> int:
        """Rounds kept although disturbed (the redo limit was reached)."""
        return len({r.round for r in self.used() if r.disturbed})

    def summary(self, path: str, key: str = "rate") -> dict[str, float]:
        values = self.values(path, key)
        return {"median": statistics.median(values), "min": min(values), "max": max(values)}

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"label": self.label, "paths": list(self.paths)}
        if len(self.paths) == 2:
            out["ratio"] = self.ratio()
            out["paired_ratios"] = self.paired_ratios()
        out["rounds_redone"] = self.redone()
        out["disturbed_rounds_kept"] = self.disturbed_kept()
        for path in self.paths:
            out[path] = self.summary(path)
        out["runs"] = [r.to_json() for r in self.runs]
        return out


# One run of a path for a duration: wrk's result, the CPU use, what the
# datapath counted, and (optionally) other figures measured in the same run.
Measure = Callable[[str, float], tuple[WrkResult, CpuUse, dict[str, Any]]]


def order_of(paths: Sequence[str], rnd: int) -> tuple[str, ...]:
    """The order of the paths in round `rnd`: rotated by one each round, so
    that each path takes each place in turn (two paths alternate)."""
    k = rnd % len(paths)
    return (*paths[k:], *paths[:k])


def default_line(run: Run) -> str:
    return f"{run.wrk.rate:10,.0f} conn/s"


def run_rounds(series: Series, measure: Measure, meter: CpuMeter, wait_quiet: Callable[[], None],
               rounds: int, duration: float, max_redo: int,
               note: Callable[[Run], str] = lambda run: "",
               line: Callable[[Run], str] = default_line,
               warmup: float = 1.0,
               disturbed: Callable[[Run], bool] = lambda run: False) -> None:
    """A warm-up run of each path (not recorded), then `rounds` rounds of one
    run per path, the order rotating each round so that drift hits every path
    alike. A round in which another process took more than 3% of the bench
    CPUs (or in which `disturbed` says a run was) is redone (every path), up
    to `max_redo` times; redone runs are kept, marked unused. `measure` may
    put other figures in the counted dict under "extra" (moved to Run.extra);
    `note` adds to each run's log line."""
    for path in series.paths:
        measure(path, warmup)
    for rnd in range(rounds):
        order = order_of(series.paths, rnd)
        for attempt in range(max_redo + 1):
            wait_quiet()
            runs = []
            for path in order:
                result, use, counted = measure(path, duration)
                extra = counted.pop("extra", {})
                slack = 0.03 * use.elapsed * len(meter.cpus) + 0.05  # + a few ticks
                run = Run(series.label, path, rnd, attempt, result, use, counted, extra=extra)
                run.disturbed = use.foreign > slack or disturbed(run)
                runs.append(run)
            redo = any(r.disturbed for r in runs) and attempt < max_redo
            for run in runs:
                run.used = not redo
                series.runs.append(run)
                log(f"  [{series.label}] round {rnd + 1}/{rounds} {run.path:14s} "
                    f"{line(run)}  (agent {run.cpu.agent:.2f} s, "
                    f"others {run.cpu.foreign:.2f} s CPU on the bench CPU"
                    f"{note(run)}{', REDO' if redo else ''})")
            if not redo:
                break


def check_wrk(result: WrkResult) -> None:
    """wrk made requests, and (nearly) all of them succeeded."""
    if result.requests == 0:
        raise RuntimeError(f"wrk made no requests to {result.url}")
    if result.error_count > 0.001 * result.requests:
        raise RuntimeError(f"wrk saw errors on {result.url}: {result.errors}, "
                           f"non-2xx {result.non_2xx} of {result.requests}")


def counter_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before.get(k, 0) for k in after}


# ---- reporting ---------------------------------------------------------------------------


def fmt_rate(values: Sequence[float]) -> str:
    return f"{statistics.median(values):,.0f} ({min(values):,.0f}-{max(values):,.0f})"


def ratio_cells(series: Series) -> str:
    """`base rate | test rate | **ratio** | per-round min-max` (no outer pipes)."""
    paired = series.paired_ratios()
    return (f"{fmt_rate(series.rates(series.base))} | {fmt_rate(series.rates(series.test))} "
            f"| **{series.ratio():.3f}** | {min(paired):.3f}-{max(paired):.3f}")


def path_cells(series: Series, path: str) -> str:
    """`rate | **ratio to base** | per-round min-max` of one path under test."""
    paired = series.paired_ratios(path)
    return (f"{fmt_rate(series.rates(path))} | **{series.ratio(path):.3f}** "
            f"| {min(paired):.3f}-{max(paired):.3f}")


# What every bench's full run uses unless its own preset says otherwise.
COMMON_FULL: dict[str, Any] = {"rounds": 7, "duration": 5, "quiet_timeout": 120.0,
                               "quiet_budget": 900.0}


def add_common_args(p: argparse.ArgumentParser, server: str, full: Mapping[str, Any]) -> None:
    """The options every bench takes; `server` names the nginx for the help
    text, `full` is the bench's full preset (apply_presets), so that the help
    quotes the defaults a run really gets."""
    d = {**COMMON_FULL, **full}
    p.add_argument("--rounds", type=int, default=None, help=f"rounds (default {d['rounds']})")
    p.add_argument("--duration", type=int, default=None,
                   help=f"whole seconds per wrk run (default {d['duration']})")
    p.add_argument("--threads", type=int, default=2, help="wrk threads (default 2)")
    p.add_argument("--connections", type=int, default=32,
                   help="wrk connections (default 32)")
    p.add_argument("--cpu-layout", choices=("single", "split", "shared"), default="single",
                   help=f"single (default): wrk, nginx ({server}) and their softirqs on the "
                        "last CPU, the agent(s) on the others; split: nginx on the last CPU, "
                        "wrk on the others; shared: leave placement to the scheduler")
    p.add_argument("--resync-interval", type=float, default=None,
                   help="override the agent's --max-sync-interval (periodic full resync; "
                        "default: the sandbox's 10 s)")
    p.add_argument("--max-redo", type=int, default=3,
                   help="redo a round up to this many times when another process took CPU "
                        "time on the bench CPU during it (default 3; --quick: 0)")
    p.add_argument("--quiet-timeout", type=float, default=None,
                   help="before each round, wait up to this long for other processes "
                        f"to leave the machine idle (default {d['quiet_timeout']:g} s; "
                        "--quick: 0)")
    p.add_argument("--quiet-budget", type=float, default=None,
                   help="wait at most this long in all for the machine to be idle "
                        f"(default {d['quiet_budget']:g} s)")
    p.add_argument("--out", type=Path, default=RESULTS, help="where to write results")


def apply_presets(args: argparse.Namespace, quick: Mapping[str, Any],
                  full: Mapping[str, Any]) -> None:
    """Fill the options left unset from the --quick or the full preset (over
    COMMON_FULL); a smoke test (--quick) never waits for, nor redoes after,
    other jobs."""
    for key, value in {**COMMON_FULL, **(quick if args.quick else full)}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.quick:
        args.quiet_timeout = 0.0
        args.max_redo = 0


def resync_args(args: argparse.Namespace) -> list[str]:
    """The agent options that --resync-interval asks for."""
    if args.resync_interval is None:
        return []
    return ["--max-sync-interval", f"{args.resync_interval:g}"]


def source_state() -> dict[str, Any]:
    """Which code was measured: the commit, and files changed in the work tree."""
    def git(*argv: str) -> str:
        res = subprocess.run(["git", "-C", str(REPO), *argv], capture_output=True, text=True)
        return res.stdout.strip() if res.returncode == 0 else ""

    changed = git("status", "--porcelain", "--", "agent", "bpf").splitlines()
    return {"commit": git("rev-parse", "HEAD"), "uncommitted": changed}


def ready(script: str) -> bool:
    """Whether a bench may start: it runs as root (else says so). Makes
    SIGTERM (e.g. a CI timeout) unwind like Ctrl-C, so every cleanup runs."""
    if os.geteuid() != 0:
        print(f"{script} must run as root (network namespaces, eBPF)", file=sys.stderr)
        return False

    def on_term(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    return True


def report(table: str, *paragraphs: str) -> str:
    """Print the table and the paragraphs after it; return them as Markdown."""
    print()
    print(table)
    print()
    for text in paragraphs:
        print(text)
    return "\n\n".join([table, *paragraphs])


def write_results(args: argparse.Namespace, name: str, markdown: str,
                  data: dict[str, Any]) -> tuple[Path, Path]:
    """bench/results/<name>-<time>[-quick].md and .json; `data` gets the
    arguments, the machine and the source state added."""
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    tag = "-quick" if args.quick else ""
    md_path = args.out / f"{name}-{stamp}{tag}.md"
    json_path = args.out / f"{name}-{stamp}{tag}.json"
    md_path.write_text(markdown)
    json_path.write_text(json.dumps({
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "source": source_state(),
        **data,
    }, indent=1) + "\n")
    shown = md_path.relative_to(REPO) if md_path.is_relative_to(REPO) else md_path
    print(f"results: {shown} and {json_path.name}")
    return md_path, json_path


def main_guard(main: Callable[[], int]) -> None:
    """Run a bench's main; Ctrl-C and SIGTERM unwind through every cleanup."""
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; everything was cleaned up", file=sys.stderr)
        sys.exit(130)
