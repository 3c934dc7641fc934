#!/usr/bin/env python3
"""What flow events cost: new connections per second through a ClusterIP
with translation events off, and on with one follower.

    .venv/bin/python bench/observe.py [--quick]

What it measures. wrk in the sandbox's client pod (inside the served cgroup)
opens one connection per HTTP request (`Connection: close`) to the Service
`bench` (10.96.1.1:80, whose only endpoint is web-a:8080), so every request
is one connect() the socket hook translates:

  off   nobody follows flow events: the hook checks veer_config and reports
        nothing (refusals and drops would still be reported; there are none)
  on    `veer observe --follow -o json` runs (its output to /dev/null): every
        translation is written to the ring buffer, read by the agent,
        decoded, named, counted and sent to the follower

Rounds alternate the order of the two modes, so drift hits both alike; the
table gives medians with min and max, and the ratio on/off of the medians
and of each round. CPU placement as bench/clusterip.py's default: wrk,
nginx and their softirqs share the last CPU (the rate is the inverse of a
connection's CPU cost there, so the hook's extra work shows in full); the
agent and the follower run on the other CPU(s), and their CPU time is
reported beside the rate (what a node pays for being observed).

Honesty checks per run: every connection was translated
(veer_counters translated); with events off none was reported
(events_sent did not move); with events on, each translation was reported
or counted lost (events_sent + events_lost = translated).

Other jobs. On a shared machine another process may take the bench CPU, or
be pushed onto it when the agent and the follower fill the other CPU. Before
each round the bench waits (up to --quiet-timeout) for the bench CPU to be
idle, and it measures the bench CPU's time that was not ours (wrk, nginx,
that CPU's ksoftirqd); a round in which that exceeded 3%, or in which wrk
saw errors (timeouts, when the server starved), is redone, both modes, up
to --max-redo times, and the redone runs are kept in the JSON. wrk errors
left after the last redo stop the bench (not with --quick).

`--quick`: one round of 2 s, no waiting, no redo (a smoke test; its numbers
are not judged).
Results: a Markdown table on stdout and in bench/results/observe-<time>.md,
every run's numbers in bench/results/observe-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from agent.cli.client import Client  # noqa: E402
from agent.sandbox.cluster import EXAMPLES, WEB_PODS, SandboxCluster  # noqa: E402
from agent.sandbox.wrk import WrkResult, run_wrk  # noqa: E402

RESULTS = REPO / "bench" / "results"
POD = WEB_PODS[0]  # web-a, 10.244.1.2
BENCH_VIP = "10.96.1.1"
URL = f"http://{BENCH_VIP}:80/"
MODES = ("off", "on")
CLK_TCK = os.sysconf("SC_CLK_TCK")

BENCH_MANIFEST = f"""\
apiVersion: v1
kind: Service
metadata: {{name: bench, namespace: default}}
spec:
  clusterIP: {BENCH_VIP}
  ports: [{{name: http, protocol: TCP, port: 80, targetPort: 8080}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: bench-1
  namespace: default
  labels: {{kubernetes.io/service-name: bench}}
addressType: IPv4
ports: [{{name: http, protocol: TCP, port: 8080}}]
endpoints:
  - addresses: ["{POD.ipv4}"]
    nodeName: node-1
"""


def log(msg: str) -> None:
    print(msg, flush=True)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process and its threads; 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def cpu_busy(cpus: set[int]) -> float:
    """Busy seconds of `cpus` since boot (everything but idle and iowait)."""
    busy = 0
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3].isdigit():
                name, *rest = line.split()
                if int(name[3:]) in cpus:
                    values = [int(v) for v in rest]
                    busy += sum(values) - values[3] - values[4]
    return busy / CLK_TCK


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


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


def pin(pid: int, cpus: set[int]) -> None:
    """Pin every thread of `pid` (threads have their own affinity)."""
    for task in os.listdir(f"/proc/{pid}/task"):
        os.sched_setaffinity(int(task), cpus)


@dataclass
class Run:
    mode: str
    round: int
    wrk: WrkResult
    translated: int
    events_sent: int
    events_lost: int
    agent_cpu_s: float
    follower_cpu_s: float
    foreign_cpu_s: float  # time on the bench CPU that was not wrk's, nginx's or its softirqs'
    attempt: int = 0
    used: bool = True
    disturbed: bool = False  # others took the bench CPU, or wrk saw errors

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["wrk"] = self.wrk.to_json()
        return out


class Bench:
    def __init__(self, args: argparse.Namespace, cluster: SandboxCluster) -> None:
        self.args = args
        self.cluster = cluster
        self.bench_cpus: set[int] = set()
        self.other_cpus: set[int] = set()
        self.follower: subprocess.Popen[bytes] | None = None
        self.runs: list[Run] = []
        self.ours: list[int] = []  # nginx and the bench CPU's ksoftirqd

    @property
    def agent_pid(self) -> int:
        assert self.cluster.agent is not None
        return self.cluster.agent.pid

    def setup(self) -> None:
        c = self.cluster
        c.write_manifest("node.yaml", (EXAMPLES / "node.yaml").read_text())
        c.write_manifest("bench.yaml", BENCH_MANIFEST)
        # A load generator: reuse TIME_WAIT ports, use the whole port range.
        c.topo.ns(c.client, "sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1",
                  "net.ipv4.ip_local_port_range=1024 65535")
        c.start_agent()
        c.wait_frontend(f"{BENCH_VIP}:80/TCP", [f"{POD.ipv4}:8080/TCP"])
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) > 1:
            self.bench_cpus, self.other_cpus = {cpus[-1]}, set(cpus[:-1])
            pin(self.agent_pid, self.other_cpus)
            os.sched_setaffinity(0, self.other_cpus)
        pid_file = Path(c.topo.workdir, f"nginx-{POD.name}", "nginx.pid")
        master = int(pid_file.read_text().split()[0])
        self.ours = [master]
        for task in os.listdir(f"/proc/{master}/task"):
            with open(f"/proc/{master}/task/{task}/children") as f:
                self.ours += [int(child) for child in f.read().split()]
        for pid in self.ours if self.bench_cpus else ():
            pin(pid, self.bench_cpus)
        for cpu in self.bench_cpus:
            ksoftirqd = find_kthread(f"ksoftirqd/{cpu}")
            if ksoftirqd is not None:
                self.ours.append(ksoftirqd)
        self.wrk(1.0)  # warm up: nginx, the maps, the client's ports

    def wrk(self, duration: float) -> WrkResult:
        prefix = ["taskset", "-c", ",".join(map(str, self.bench_cpus))] if self.bench_cpus \
            else []
        return run_wrk(self.cluster.topo, self.cluster.client, URL, duration,
                       threads=self.args.threads, connections=self.args.connections,
                       prefix=prefix)

    def counters(self) -> dict[str, int]:
        with Client(self.cluster.api_socket) as client:
            return {c["name"]: int(c["value"]) for c in client.status()["counters"]}

    # ---- the follower ------------------------------------------------------------

    def follow(self) -> None:
        self.follower = subprocess.Popen(
            [sys.executable, "-m", "agent.cli.main", "observe", "--follow", "-o", "json",
             "--socket", self.cluster.api_socket],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO,
        )
        if self.other_cpus:
            pin(self.follower.pid, self.other_cpus)
        assert self.follower.stderr is not None
        started = self.follower.stderr.readline().decode()
        if "translations are traced" not in started:
            raise RuntimeError(f"the follower did not start: {started!r}")

    def unfollow(self) -> None:
        if self.follower is None:
            return
        self.follower.terminate()
        try:
            self.follower.wait(10)
        except subprocess.TimeoutExpired:
            self.follower.kill()
            self.follower.wait(5)
        self.follower = None
        # The agent notices the client left within half a second; wait for
        # the switch to be off before the next "off" run.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            before = self.counters()["events_sent"]
            self.wrk(0.2)
            if self.counters()["events_sent"] == before:
                return
        raise RuntimeError("translation events stayed on after the follower left")

    # ---- one run -----------------------------------------------------------------

    def wait_quiet(self) -> None:
        """Wait (up to --quiet-timeout) until the bench CPU idles for a second."""
        cpus = self.bench_cpus or set(os.sched_getaffinity(0))
        deadline = time.monotonic() + self.args.quiet_timeout
        while time.monotonic() < deadline:
            before = cpu_busy(cpus)
            time.sleep(1.0)
            if cpu_busy(cpus) - before < 0.1 * len(cpus):
                return
        if self.args.quiet_timeout:
            log("  the bench CPU did not become idle; measuring anyway")

    def ours_cpu(self) -> float:
        return children_cpu() + sum(cpu_seconds(p) for p in self.ours)

    def run(self, mode: str, rnd: int, attempt: int) -> Run:
        if mode == "on":
            self.follow()
        cpus = self.bench_cpus or set(os.sched_getaffinity(0))
        try:
            before = self.counters()
            agent0 = cpu_seconds(self.agent_pid)
            follower0 = cpu_seconds(self.follower.pid) if self.follower else 0.0
            busy0, ours0 = cpu_busy(cpus), self.ours_cpu()
            result = self.wrk(self.args.duration)
            busy1, ours1 = cpu_busy(cpus), self.ours_cpu()
            time.sleep(0.3)  # let the agent drain the ring buffer
            agent1 = cpu_seconds(self.agent_pid)
            follower1 = cpu_seconds(self.follower.pid) if self.follower else 0.0
            after = self.counters()
        finally:
            self.unfollow()
        delta = {k: after[k] - before.get(k, 0) for k in after}
        foreign = max(0.0, (busy1 - busy0) - (ours1 - ours0))
        run = Run(mode, rnd, result, delta["translated"], delta["events_sent"],
                  delta["events_lost"], round(agent1 - agent0, 2),
                  round(follower1 - follower0, 2), round(foreign, 2), attempt)
        self.check(run)
        return run

    @staticmethod
    def check(run: Run) -> None:
        """The checks that hold however busy the machine is (wrk's errors are
        judged per round, in measure())."""
        if run.translated < run.wrk.requests:
            raise RuntimeError(f"{run.translated} translations for {run.wrk.requests} requests")
        if run.mode == "off" and run.events_sent:
            raise RuntimeError(f"{run.events_sent} events reported with translation events off")
        if run.mode == "on" and run.events_sent + run.events_lost < run.translated:
            raise RuntimeError(f"{run.translated} translations but only {run.events_sent} "
                               f"events reported and {run.events_lost} lost")

    def measure(self) -> None:
        slack = 0.03 * self.args.duration
        for rnd in range(self.args.rounds):
            order = MODES if rnd % 2 == 0 else MODES[::-1]
            for attempt in range(self.args.max_redo + 1):
                self.wait_quiet()
                runs = [self.run(mode, rnd, attempt) for mode in order]
                # A busy machine shows as others' time on the bench CPU, or
                # as wrk's timeouts when it starves the server.
                disturbed = any(r.foreign_cpu_s > slack or r.wrk.error_count for r in runs)
                redo = disturbed and attempt < self.args.max_redo
                errors = [r for r in runs if r.wrk.error_count]
                if errors and not redo and not self.args.quick:
                    raise RuntimeError(f"wrk saw errors in round {rnd + 1} after "
                                       f"{attempt} redo(s): {errors[0].wrk.errors}")
                for run in runs:
                    run.used = not redo
                    run.disturbed = disturbed
                    self.runs.append(run)
                    log(f"  round {rnd + 1}/{self.args.rounds} events {run.mode:3s} "
                        f"{run.wrk.rate:10,.0f} conn/s  (events {run.events_sent:,} sent, "
                        f"{run.events_lost:,} lost; agent {run.agent_cpu_s:.2f} s, "
                        f"follower {run.follower_cpu_s:.2f} s, others "
                        f"{run.foreign_cpu_s:.2f} s on the bench CPU"
                        f"{f', wrk errors {run.wrk.errors}' if run.wrk.error_count else ''}"
                        f"{', REDO' if redo else ''})")
                if not redo:
                    break


# ---- reporting ------------------------------------------------------------------------


def rates(runs: Sequence[Run], mode: str) -> list[float]:
    return [r.wrk.rate for r in runs if r.mode == mode]


def fmt_rate(values: Sequence[float]) -> str:
    return f"{statistics.median(values):,.0f} ({min(values):,.0f}-{max(values):,.0f})"


def paired(runs: Sequence[Run]) -> list[float]:
    by_round: dict[int, dict[str, float]] = {}
    for r in runs:
        if not r.used:
            continue
        by_round.setdefault(r.round, {})[r.mode] = r.wrk.rate
    return [v["on"] / v["off"] for _, v in sorted(by_round.items())]


def table(all_runs: Sequence[Run]) -> tuple[str, float]:
    runs = [r for r in all_runs if r.used]
    ratio = statistics.median(rates(runs, "on")) / statistics.median(rates(runs, "off"))
    pairs = paired(runs)
    lines = [
        "| translation events | conn/s, median (min-max) | events sent / lost "
        "| agent CPU s per s | follower CPU s per s |",
        "|---|---:|---:|---:|---:|",
    ]
    for mode in MODES:
        mine = [r for r in runs if r.mode == mode]
        secs = sum(r.wrk.seconds for r in mine)
        label = "off (no follower)" if mode == "off" else "on (1 follower)"
        lines.append(
            f"| {label} | {fmt_rate(rates(runs, mode))} "
            f"| {sum(r.events_sent for r in mine):,} / {sum(r.events_lost for r in mine):,} "
            f"| {sum(r.agent_cpu_s for r in mine) / secs:.2f} "
            f"| {sum(r.follower_cpu_s for r in mine) / secs:.2f} |"
        )
    redone = len({(r.round, r.attempt) for r in all_runs if not r.used})
    kept = len({r.round for r in runs if r.disturbed})
    lines.append("")
    lines.append(f"on/off: **{ratio:.3f}** (per-round {min(pairs):.3f}-{max(pairs):.3f}); "
                 f"rounds redone because another process took the bench CPU: {redone}; "
                 f"disturbed rounds kept (redo limit reached): {kept}")
    return "\n".join(lines), ratio


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke test: 1 round of 2 s")
    p.add_argument("--rounds", type=int, default=None, help="rounds (default 7)")
    p.add_argument("--duration", type=int, default=None,
                   help="whole seconds per wrk run (default 5)")
    p.add_argument("--threads", type=int, default=2, help="wrk threads (default 2)")
    p.add_argument("--connections", type=int, default=32, help="wrk connections (default 32)")
    p.add_argument("--max-redo", type=int, default=None,
                   help="redo a round up to this many times when another process took time "
                   "on the bench CPU (default 3)")
    p.add_argument("--quiet-timeout", type=float, default=None,
                   help="before each round, wait up to this long for the bench CPU to idle "
                   "(default 60 s)")
    p.add_argument("--out", type=Path, default=RESULTS, help="where to write results")
    args = p.parse_args(argv)
    rounds, duration, redo, quiet = (1, 2, 0, 0.0) if args.quick else (7, 5, 3, 60.0)
    args.rounds = args.rounds or rounds
    args.duration = args.duration or duration
    args.max_redo = redo if args.max_redo is None else args.max_redo
    args.quiet_timeout = quiet if args.quiet_timeout is None else args.quiet_timeout
    if args.rounds < 1 or args.duration < 1:
        p.error("--rounds and --duration must be positive")
    return args


def source_state() -> dict[str, Any]:
    def git(*argv: str) -> str:
        res = subprocess.run(["git", "-C", str(REPO), *argv], capture_output=True, text=True)
        return res.stdout.strip() if res.returncode == 0 else ""

    return {"commit": git("rev-parse", "HEAD"),
            "uncommitted": git("status", "--porcelain", "--", "agent", "bpf").splitlines()}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench/observe.py must run as root (network namespaces, eBPF)", file=sys.stderr)
        return 2

    def on_term(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    import signal

    signal.signal(signal.SIGTERM, on_term)  # a CI timeout unwinds: every cleanup runs
    started = time.monotonic()
    log(f"veer flow events bench: {args.rounds} round(s) x {args.duration} s per mode, "
        f"wrk -t{args.threads} -c{args.connections} -H 'Connection: close', "
        f"{os.cpu_count()} CPU(s)")
    with SandboxCluster(manifests=None, pods=(POD,)) as cluster:
        log(f"sandbox {cluster.topo.prefix}: namespaces {cluster.topo.prefix}-*, "
            f"cgroup {cluster.topo.cgroup}, pins {cluster.topo.bpffs}")
        bench = Bench(args, cluster)
        try:
            bench.setup()
            bench.measure()
        finally:
            bench.unfollow()
    md, ratio = table(bench.runs)
    notes = (f"wrk -t{args.threads} -c{args.connections} -H 'Connection: close' from the "
             f"client pod to a ClusterIP with one nginx endpoint; {args.rounds} round(s) x "
             f"{args.duration} s per mode, order alternating; wrk and nginx on CPU "
             f"{sorted(bench.bench_cpus) or 'any'}, the agent and the follower on "
             f"{sorted(bench.other_cpus) or 'any'}; kernel {platform.release()}. "
             f"Total time {time.monotonic() - started:.0f} s.")
    print()
    print(md)
    print()
    print(notes)

    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S") + ("-quick" if args.quick else "")
    md_path, json_path = args.out / f"observe-{stamp}.md", args.out / f"observe-{stamp}.json"
    md_path.write_text(f"# veer: the cost of flow events (new connections per second)\n\n"
                       f"{md}\n\n{notes}\n")
    json_path.write_text(json.dumps({
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "kernel": platform.release(), "cpus": os.cpu_count(), "source": source_state(),
        "ratio": ratio, "paired_ratios": paired(bench.runs),
        "runs": [r.to_json() for r in bench.runs],
    }, indent=1) + "\n")
    print(f"results: {md_path} and {json_path.name}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; everything was cleaned up", file=sys.stderr)
        sys.exit(130)
