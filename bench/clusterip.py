#!/usr/bin/env python3
"""New-connection rate to one pod: directly, and through a ClusterIP Service.

    .venv/bin/python bench/clusterip.py [--quick]        (make bench-clusterip)

What it measures. wrk, in the sandbox's client pod and inside the served
cgroup (so veer's connect() hook sees its sockets), opens one connection per
HTTP request (`Connection: close`) against the same single nginx (web-a):

  direct     http://10.244.1.2:8080/   the pod's address; the hook looks it up,
                                       finds no Service, and lets it pass
  ClusterIP  http://10.96.1.1:80/      Service `bench`, whose only endpoint is
                                       web-a:8080; the hook rewrites connect()

first with only the bench Service loaded, then with 10,000 more Services (one
EndpointSlice of 3 endpoints each) added to the running agent. The script
waits until the agent's status file lists every frontend, and prints how long
programming took. Direct and ClusterIP runs are interleaved round by round
(the order alternates each round, so drift hits both alike); the table gives
medians with min and max, and the ratio of the medians.

Fairness and stability on a small machine (2 vCPUs here). Each connection
costs wrk, nginx and the kernel on both ends some CPU; what differs between
the paths is only the socket hook's work in connect().
- CPU layout. By default (--cpu-layout single) wrk, nginx and, with them, the
  veth softirqs all run on one CPU, so the rate is the inverse of the CPU
  cost of a connection and the hook's share shows in full; the agent (every
  thread) is kept on the other CPU(s), where it runs as usual, periodic full
  resyncs included. Left to the scheduler (shared), or with wrk and nginx on
  different CPUs (split), three busy threads and cross-CPU wakeups on 2 vCPUs
  made runs differ by 10-20% from one to the next, which swamps a difference
  of a few percent; single keeps them within about 2%.
- Other jobs. The machine may be shared (CI runs, builds). Before each round
  the bench waits for the machine to be idle, and it measures which CPU time
  on the bench CPU was not ours (wrk, nginx, ksoftirqd): a round in which
  another process took more than 3% is redone (both paths), up to
  --max-redo times. Redone rounds are kept in the JSON, marked unused.
- Steady state. The client pod reuses its own TIME_WAIT ports
  (tcp_tw_reuse=1, wide port range) so that millions of short connections do
  not clog its ephemeral ports as the bench goes on, and before measuring,
  ClusterIP connections fill the per-socket reverse-NAT LRU map so that every
  measured run, with either load, sees it full and evicting, as on a busy
  node.
- Honesty checks. Before each load, 20 requests per path must all reach
  web-a; during each run the datapath's counters must show every ClusterIP
  connection translated, no direct one translated, and nothing refused; wrk
  must see no errors.

`--quick`: one round of 2 s with 100 extra Services (a smoke test).

Results: a Markdown table on stdout and in bench/results/clusterip-<time>.md;
every run's numbers (rates, latency percentiles, CPU use, counters) in
bench/results/clusterip-<time>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import math
import os
import platform
import re
import resource
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from agent.datapath.ebpf.maps import SockLbMaps  # noqa: E402
from agent.sandbox.cluster import EXAMPLES, WEB_PODS, SandboxCluster  # noqa: E402
from agent.sandbox.wrk import WrkResult, run_wrk  # noqa: E402

RESULTS = REPO / "bench" / "results"

POD = WEB_PODS[0]  # web-a, 10.244.1.2
POD_PORT = 8080
BENCH_VIP = "10.96.1.1"
BENCH_PORT = 80
EXTRA_CIDR = ipaddress.ip_network("10.96.128.0/17")  # inside --service-cidr 10.96.0.0/16
EXTRA_ENDPOINTS = ("10.244.1.2", "10.244.1.3", "10.244.1.4")
GOAL = 0.95
GOAL_EXTRA = 10_000

BENCH_MANIFEST = f"""\
# The benchmark's Service: one port, one endpoint (web-a), so that the direct
# and the ClusterIP runs are served by the same single nginx.
apiVersion: v1
kind: Service
metadata:
  name: bench
  namespace: default
spec:
  type: ClusterIP
  clusterIP: {BENCH_VIP}
  clusterIPs: ["{BENCH_VIP}"]
  ipFamilies: ["IPv4"]
  ports:
    - name: http
      protocol: TCP
      port: {BENCH_PORT}
      targetPort: {POD_PORT}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: bench-1
  namespace: default
  labels:
    kubernetes.io/service-name: bench
addressType: IPv4
ports:
  - name: http
    protocol: TCP
    port: {POD_PORT}
endpoints:
  - addresses: ["{POD.ipv4}"]
    conditions: {{ready: true, serving: true, terminating: false}}
    nodeName: node-1
    targetRef: {{kind: Pod, name: {POD.name}, namespace: default}}
"""


def extra_services(count: int) -> dict[str, Any]:
    """`count` Services (one TCP port each) with one 3-endpoint EndpointSlice each,
    as one `kind: List` (JSON: parsed far faster than YAML, same objects)."""
    hosts = EXTRA_CIDR.hosts()
    items: list[dict[str, Any]] = []
    for i in range(count):
        ip = str(next(hosts))
        name = f"extra-{i:05d}"
        items.append({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name, "namespace": "bench-load"},
            "spec": {
                "type": "ClusterIP",
                "clusterIP": ip,
                "clusterIPs": [ip],
                "ipFamilies": ["IPv4"],
                "ports": [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080}],
            },
        })
        items.append({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": f"{name}-1",
                "namespace": "bench-load",
                "labels": {"kubernetes.io/service-name": name},
            },
            "addressType": "IPv4",
            "ports": [{"name": "http", "protocol": "TCP", "port": 8080}],
            "endpoints": [
                {"addresses": [a], "conditions": {"ready": True}} for a in EXTRA_ENDPOINTS
            ],
        })
    return {"apiVersion": "v1", "kind": "List", "items": items}


def extra_frontends(count: int) -> set[str]:
    hosts = EXTRA_CIDR.hosts()
    return {f"{next(hosts)}:80/TCP" for _ in range(count)}


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


def nginx_pids(cluster: SandboxCluster) -> list[int]:
    """web-a's nginx master and its workers (processes this script started)."""
    pid_file = Path(cluster.topo.workdir, f"nginx-{POD.name}", "nginx.pid")
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
    ours: float  # wrk + nginx + those CPUs' ksoftirqd (+ the agent unless pinned away)
    agent: float
    machine_busy: float  # all CPUs

    @property
    def foreign(self) -> float:
        """CPU time that something else took on the bench CPUs."""
        return max(0.0, self.bench_busy - self.ours)


# (time, per-CPU jiffies, waited-for children's CPU, server pids' CPU, agent CPU)
_Sample = tuple[float, dict[int, tuple[int, int]], float, float, float]


class CpuMeter:
    """Who used the bench CPUs during a run: us (wrk, nginx, the softirqs that
    carry our packets) or someone else (another job on a shared machine).

    Process times include the interrupt time spent while they ran, so on a
    bench CPU that only we use, busy time == our processes' time (checked to
    within a tick)."""

    def __init__(self, bench_cpus: set[int], server_pids: Sequence[int], agent_pid: int,
                 agent_pinned_away: bool) -> None:
        self.cpus = bench_cpus or set(cpu_jiffies())
        self.pids = list(server_pids)
        for cpu in sorted(self.cpus):
            ksoftirqd = find_kthread(f"ksoftirqd/{cpu}")
            if ksoftirqd is not None:
                self.pids.append(ksoftirqd)
        self.agent_pid = agent_pid
        self.agent_pinned_away = agent_pinned_away

    def _sample(self) -> _Sample:
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        return (
            time.monotonic(),
            cpu_jiffies(),
            children.ru_utime + children.ru_stime,  # wrk, once it has been waited for
            sum(proc_cpu_seconds(p) for p in self.pids),
            proc_cpu_seconds(self.agent_pid),
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


# ---- results ---------------------------------------------------------------------------


@dataclass
class Run:
    load: str
    path: str  # "direct" or "clusterip"
    round: int
    attempt: int
    wrk: WrkResult
    cpu: CpuUse
    translated: int  # connect() calls the hook translated during the run
    disturbed: bool = False  # another process took > 3% of the bench CPU(s) during it
    used: bool = True

    def to_json(self) -> dict[str, Any]:
        return {
            "load": self.load, "path": self.path, "round": self.round,
            "attempt": self.attempt, "used": self.used, "disturbed": self.disturbed,
            "translated": self.translated,
            "cpu_s": {
                "bench_cpus_busy": round(self.cpu.bench_busy, 2),
                "ours": round(self.cpu.ours, 2),
                "foreign": round(self.cpu.foreign, 2),
                "agent": round(self.cpu.agent, 2),
                "machine_busy": round(self.cpu.machine_busy, 2),
                "elapsed": round(self.cpu.elapsed, 2),
            },
            **self.wrk.to_json(),
        }


@dataclass
class LoadResult:
    label: str
    services: int  # Services loaded in all (bench + extra)
    programming: str
    runs: list[Run] = field(default_factory=list)

    def used(self) -> list[Run]:
        return [r for r in self.runs if r.used]

    def rates(self, path: str) -> list[float]:
        return [r.wrk.rate for r in self.used() if r.path == path]

    def ratio(self) -> float:
        return statistics.median(self.rates("clusterip")) / statistics.median(self.rates("direct"))

    def paired_ratios(self) -> list[float]:
        by_round: dict[int, dict[str, float]] = {}
        for r in self.used():
            by_round.setdefault(r.round, {})[r.path] = r.wrk.rate
        return [v["clusterip"] / v["direct"] for _, v in sorted(by_round.items())
                if "direct" in v and "clusterip" in v]

    def redone(self) -> int:
        return len({(r.round, r.attempt) for r in self.runs if not r.used})

    def disturbed_kept(self) -> int:
        """Rounds kept although disturbed (the redo limit was reached)."""
        return len({r.round for r in self.used() if r.disturbed})

    def summary(self, path: str) -> dict[str, float]:
        rates = self.rates(path)
        return {"median": statistics.median(rates), "min": min(rates), "max": max(rates)}


# ---- the bench -------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, cluster: SandboxCluster) -> None:
        self.args = args
        self.cluster = cluster
        self.wrk_prefix: list[str] = []
        self.maps: SockLbMaps | None = None
        self.meter: CpuMeter | None = None
        self.agent_start_s = 0.0
        self.quiet_budget = args.quiet_budget

    def close(self) -> None:
        if self.maps is not None:
            self.maps.close()
            self.maps = None

    @property
    def agent_pid(self) -> int:
        assert self.cluster.agent is not None
        return self.cluster.agent.pid

    # ---- setup --------------------------------------------------------------------

    def setup(self) -> None:
        cluster = self.cluster
        cluster.write_manifest("node.yaml", (EXAMPLES / "node.yaml").read_text())
        cluster.write_manifest("bench.yaml", BENCH_MANIFEST)
        # The client pod is a load generator: let it reuse its own TIME_WAIT
        # ports and use the whole port range, so that millions of short
        # connections neither exhaust nor slowly clog its ephemeral ports (the
        # same for both paths; only the client's own namespace is touched).
        cluster.topo.ns(cluster.client, "sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1",
                        "net.ipv4.ip_local_port_range=1024 65535")
        server_cpus, client_cpus = self.bench_cpus()
        servers = nginx_pids(cluster)
        if server_cpus:
            for pid in servers:
                os.sched_setaffinity(pid, server_cpus)
        if client_cpus:
            self.wrk_prefix = ["taskset", "-c", ",".join(map(str, sorted(client_cpus)))]
        t0 = time.monotonic()
        extra = [] if self.args.resync_interval is None else [
            "--max-sync-interval", f"{self.args.resync_interval:g}"]
        cluster.start_agent(extra=extra, wait=False)
        self.wait_frontends({f"{BENCH_VIP}:{BENCH_PORT}/TCP"}, timeout=120)
        self.agent_start_s = time.monotonic() - t0
        log(f"agent up and bench Service programmed in {self.agent_start_s:.1f} s "
            "(includes compiling the BPF programs)")
        pinned_away = self.place_agent()
        self.maps = SockLbMaps.open(cluster.topo.bpffs)
        self.meter = CpuMeter(server_cpus | client_cpus, servers[1:], self.agent_pid,
                              pinned_away)
        self.check_paths()

    def bench_cpus(self) -> tuple[set[int], set[int]]:
        """(CPUs for nginx, CPUs for wrk) in the chosen layout; empty sets: unpinned."""
        cpus = sorted(os.sched_getaffinity(0))
        layout = self.args.cpu_layout
        if layout == "shared" or len(cpus) < 2:
            return set(), set()
        last = {cpus[-1]}
        if layout == "single":
            return last, last
        return last, set(cpus[:-1])  # split

    def place_agent(self) -> bool:
        """In the single layout, keep the agent (every thread) off the bench CPU."""
        server, _ = self.bench_cpus()
        if self.args.cpu_layout != "single" or not server:
            return False
        others = set(os.sched_getaffinity(0)) - server
        for tid in os.listdir(f"/proc/{self.agent_pid}/task"):
            with contextlib.suppress(ProcessLookupError, FileNotFoundError):
                os.sched_setaffinity(int(tid), others)
        return True

    def check_paths(self) -> None:
        """Both URLs answer from web-a, and the ClusterIP really is translated
        (the client pod has no route to the Service range: only the hook can
        make that connect() succeed)."""
        for addr, port in ((POD.ipv4, POD_PORT), (BENCH_VIP, BENCH_PORT)):
            res = self.cluster.probe("tcp", addr, str(port), "--count", "20")
            want = {f"{POD.name}:{POD_PORT}": 20}
            if res["answers"] != want or res["errors"] or res["peer_mismatch"]:
                raise RuntimeError(f"{addr}:{port} does not reach {POD.name} cleanly: {res}")

    def wait_frontends(self, want: set[str], timeout: float) -> float:
        """Wait until the agent's status lists every frontend in `want`; return the
        time it took. Polls gently: the status file is large with 10,000 Services
        and the agent needs the CPU."""
        start = time.monotonic()
        deadline = start + timeout
        while True:
            status = self.cluster.status()
            if status is not None and status.get("ok") and want <= status["frontends"].keys():
                return time.monotonic() - start
            agent = self.cluster.agent
            if agent is not None and agent.poll() is not None:
                raise RuntimeError(f"the agent exited ({agent.returncode}):\n"
                                   f"{self.cluster.agent_output()[-4000:]}")
            if time.monotonic() > deadline:
                got = len(status["frontends"]) if status else None
                raise TimeoutError(f"{len(want)} frontends not programmed after {timeout} s "
                                   f"(status lists {got}); agent log:\n"
                                   f"{self.cluster.agent_output()[-4000:]}")
            time.sleep(0.2)

    def add_extra(self, count: int) -> float:
        """Add `count` Services to the running agent; return how long until all
        of them were programmed."""
        text = json.dumps(extra_services(count))
        want = extra_frontends(count) | {f"{BENCH_VIP}:{BENCH_PORT}/TCP"}
        start = time.monotonic()
        self.cluster.write_manifest("extra-services.json", text)
        self.wait_frontends(want, timeout=self.args.program_timeout)
        took = time.monotonic() - start
        status = self.cluster.status() or {}
        if len(status.get("frontends", {})) != len(want):
            raise RuntimeError(f"status lists {len(status.get('frontends', {}))} frontends, "
                               f"expected {len(want)}")
        assert self.maps is not None
        entries = len(self.maps.services)
        log(f"  the kernel's service map holds {entries:,} entries "
            f"({len(want):,} frontends + their backend slots)")
        return took

    def settle(self) -> None:
        """Let the agent go idle (status written, garbage collected) before measuring."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            before = proc_cpu_seconds(self.agent_pid)
            time.sleep(1.0)
            if proc_cpu_seconds(self.agent_pid) - before < 0.05:
                return
        log("warning: the agent did not go idle within 30 s")

    def wait_quiet(self) -> None:
        """Wait until no other job uses the machine: on a shared machine a build or a
        test run next door costs a run far more than veer does. Each wait is bounded
        by --quiet-timeout, all of them together by --quiet-budget."""
        assert self.meter is not None
        deadline = time.monotonic() + min(self.args.quiet_timeout, self.quiet_budget)
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
            self.quiet_budget = max(0.0, self.quiet_budget - (time.monotonic() - started))

    # ---- measuring ------------------------------------------------------------------

    def url(self, path: str) -> str:
        if path == "direct":
            return f"http://{POD.ipv4}:{POD_PORT}/"
        return f"http://{BENCH_VIP}:{BENCH_PORT}/"

    def wrk(self, path: str, duration: float) -> tuple[WrkResult, CpuUse, int]:
        assert self.meter is not None and self.maps is not None
        before = self.maps.counters()
        mark = self.meter.start()
        result = run_wrk(
            self.cluster.topo, self.cluster.client, self.url(path), duration,
            threads=self.args.threads, connections=self.args.connections, close=True,
            prefix=self.wrk_prefix,
        )
        use = self.meter.stop(mark)
        after = self.maps.counters()
        delta = {k: after[k] - before.get(k, 0) for k in after}
        if result.requests == 0:
            raise RuntimeError(f"wrk made no requests to {result.url}")
        if result.error_count > 0.001 * result.requests:
            raise RuntimeError(f"wrk saw errors on {result.url}: {result.errors}, "
                               f"non-2xx {result.non_2xx} of {result.requests}")
        # The hook must have done exactly what the path claims: translated every
        # ClusterIP connection, none of the direct ones, refused or dropped nothing.
        translated = delta.get("translated", 0)
        problems = {k: v for k, v in delta.items()
                    if k.startswith(("refused", "dropped", "inconsistent")) and v}
        if problems or (path == "direct" and translated) or (
                path == "clusterip" and translated < result.requests):
            raise RuntimeError(f"{path}: {result.requests} requests but the datapath "
                               f"counted {delta}")
        return result, use, translated

    def fill_revnat(self) -> None:
        """Bring the per-socket reverse-NAT LRU to its steady state (full, evicting)
        before anything is measured, so that both loads see it the same way."""
        assert self.maps is not None
        capacity = self.maps.sock_revnat.capacity
        probe, _, _ = self.wrk("clusterip", 1.0)
        seconds = math.ceil(min(120.0, 1.1 * capacity / max(probe.rate, 1.0)))
        log(f"filling the socket reverse-NAT LRU ({capacity:,} entries): "
            f"{seconds:.0f} s of ClusterIP connections")
        _, _, translated = self.wrk("clusterip", seconds)
        log(f"  {translated + probe.requests:,} connections translated")

    def measure(self, load: LoadResult) -> None:
        assert self.meter is not None
        rounds, duration = self.args.rounds, self.args.duration
        # A run is disturbed when something else took more than 3% of the bench
        # CPUs (plus a few ticks of accounting slack).
        slack = 0.03 * duration * len(self.meter.cpus) + 0.05
        # Warm-up (not recorded).
        for path in ("direct", "clusterip"):
            self.wrk(path, 1)
        for rnd in range(rounds):
            order = ("direct", "clusterip") if rnd % 2 == 0 else ("clusterip", "direct")
            for attempt in range(self.args.max_redo + 1):
                self.wait_quiet()
                runs = []
                for path in order:
                    result, use, translated = self.wrk(path, duration)
                    runs.append(Run(load.label, path, rnd, attempt, result, use, translated,
                                    disturbed=use.foreign > slack))
                redo = any(r.disturbed for r in runs) and attempt < self.args.max_redo
                for run in runs:
                    run.used = not redo
                    load.runs.append(run)
                    log(f"  [{load.label}] round {rnd + 1}/{rounds} {run.path:9s} "
                        f"{run.wrk.rate:10,.0f} conn/s  (agent {run.cpu.agent:.2f} s, "
                        f"others {run.cpu.foreign:.2f} s CPU on the bench CPU"
                        f"{', REDO' if redo else ''})")
                if not redo:
                    break


# ---- reporting -----------------------------------------------------------------


def fmt_rate(values: Sequence[float]) -> str:
    return f"{statistics.median(values):,.0f} ({min(values):,.0f}-{max(values):,.0f})"


def table(loads: Sequence[LoadResult]) -> str:
    lines = [
        "| Services loaded | direct conn/s, median (min-max) "
        "| ClusterIP conn/s, median (min-max) | ClusterIP/direct "
        "| per-round ratio (min-max) | programming |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for load in loads:
        paired = load.paired_ratios()
        lines.append(
            f"| {load.label} | {fmt_rate(load.rates('direct'))} "
            f"| {fmt_rate(load.rates('clusterip'))} | **{load.ratio():.3f}** "
            f"| {min(paired):.3f}-{max(paired):.3f} | {load.programming} |"
        )
    return "\n".join(lines)


def log(msg: str) -> None:
    print(msg, flush=True)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 1 round of 2 s, 100 extra Services")
    p.add_argument("--rounds", type=int, default=None, help="rounds per load (default 7)")
    p.add_argument("--duration", type=int, default=None,
                   help="whole seconds per wrk run (default 5)")
    p.add_argument("--extra", type=int, default=None,
                   help="extra Services for the second load (default 10000)")
    p.add_argument("--threads", type=int, default=2, help="wrk threads (default 2)")
    p.add_argument("--connections", type=int, default=32,
                   help="wrk connections (default 32)")
    p.add_argument("--cpu-layout", choices=("single", "split", "shared"), default="single",
                   help="single (default): wrk, nginx and their softirqs on the last CPU, "
                        "the agent on the others; split: nginx on the last CPU, wrk on the "
                        "others; shared: leave placement to the scheduler")
    p.add_argument("--resync-interval", type=float, default=None,
                   help="override the agent's --max-sync-interval (periodic full resync; "
                        "default: the sandbox's 10 s)")
    p.add_argument("--no-fill", action="store_true",
                   help="do not fill the reverse-NAT LRU before measuring (implied by --quick)")
    p.add_argument("--max-redo", type=int, default=3,
                   help="redo a round up to this many times when another process took CPU "
                        "time on the bench CPU during it (default 3)")
    p.add_argument("--quiet-timeout", type=float, default=120.0,
                   help="before each round, wait up to this long for other processes "
                        "to leave the machine idle (default 120 s)")
    p.add_argument("--quiet-budget", type=float, default=900.0,
                   help="wait at most this long in all for the machine to be idle "
                        "(default 900 s)")
    p.add_argument("--program-timeout", type=float, default=600.0,
                   help="how long to wait for the agent to program the extra Services")
    p.add_argument("--out", type=Path, default=RESULTS, help="where to write results")
    args = p.parse_args(argv)
    quick = {"rounds": 1, "duration": 2, "extra": 100}
    full = {"rounds": 7, "duration": 5, "extra": GOAL_EXTRA}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.quick:  # a smoke test: never wait for, nor redo after, other jobs
        args.no_fill = True
        args.quiet_timeout = 0.0
        args.max_redo = 0
    if args.rounds < 1 or args.duration <= 0 or args.extra < 1 or args.max_redo < 0:
        p.error("--rounds, --duration and --extra must be positive, --max-redo not negative")
    if args.extra > EXTRA_CIDR.num_addresses - 2:
        p.error(f"at most {EXTRA_CIDR.num_addresses - 2} extra Services fit in {EXTRA_CIDR}")
    return args


def run_bench(args: argparse.Namespace) -> tuple[list[LoadResult], str]:
    """Both loads, in one sandbox; returns the results and the agent's log."""
    loads: list[LoadResult] = []
    with SandboxCluster(manifests=None, pods=(POD,)) as cluster:
        topo = cluster.topo
        log(f"sandbox {topo.prefix}: namespaces {topo.prefix}-*, cgroup {topo.cgroup}, "
            f"pins {topo.bpffs}")
        bench = Bench(args, cluster)
        try:
            bench.setup()
            if not args.no_fill:
                bench.fill_revnat()
            bench.settle()
            small = LoadResult("1 (bench only)", 1,
                               f"{bench.agent_start_s:.1f} s (agent start, BPF compile)")
            log("measuring with 1 Service (bench only)")
            bench.measure(small)
            loads.append(small)

            log(f"adding {args.extra:,} Services (one 3-endpoint EndpointSlice each) "
                "to the running agent")
            took = bench.add_extra(args.extra)
            log(f"the agent programmed all {args.extra + 1:,} Services {took:.1f} s after "
                "the manifest was written")
            syncs = re.findall(r"sync \((?:full|incremental)\): .*", cluster.agent_output())
            if syncs:
                log(f"  agent's last sync: {syncs[-1]}")
            bench.check_paths()
            bench.settle()
            big = LoadResult(f"{args.extra + 1:,} (bench + {args.extra:,})",
                             args.extra + 1, f"{took:.1f} s")
            log(f"measuring with {args.extra + 1:,} Services")
            bench.measure(big)
            loads.append(big)
        finally:
            bench.close()
        return loads, cluster.agent_output()


def source_state() -> dict[str, Any]:
    """Which code was measured: the commit, and files changed in the work tree."""
    def git(*argv: str) -> str:
        res = subprocess.run(["git", "-C", str(REPO), *argv], capture_output=True, text=True)
        return res.stdout.strip() if res.returncode == 0 else ""

    changed = git("status", "--porcelain", "--", "agent", "bpf").splitlines()
    return {"commit": git("rev-parse", "HEAD"), "uncommitted": changed}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench/clusterip.py must run as root (network namespaces, eBPF)", file=sys.stderr)
        return 2

    # SIGTERM (e.g. a CI timeout) unwinds like Ctrl-C, so every cleanup runs.
    def on_term(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)

    started = time.monotonic()
    log(f"veer ClusterIP bench: {args.rounds} round(s) x {args.duration:g} s per path and "
        f"load, wrk -t{args.threads} -c{args.connections} -H 'Connection: close', "
        f"cpu layout {args.cpu_layout}, {os.cpu_count()} CPU(s)")
    loads, agent_log = run_bench(args)
    elapsed = time.monotonic() - started

    md = table(loads)
    last = loads[-1]
    verdict = last.ratio() >= GOAL
    goal_line = (f"Goal: ClusterIP >= {GOAL:.2f} x direct with {GOAL_EXTRA:,} other Services: "
                 f"{'met' if verdict else 'NOT met'} (ratio {last.ratio():.3f}).")
    if args.extra < GOAL_EXTRA or args.rounds < 5:
        goal_line += (f" (Not a test of the goal: {args.extra:,} other Services, "
                      f"{args.rounds} round(s).)")
    redone = sum(load.redone() for load in loads)
    kept = sum(load.disturbed_kept() for load in loads)
    notes = (
        f"wrk -t{args.threads} -c{args.connections} -H 'Connection: close' from the client "
        f"pod (inside the served cgroup); {args.rounds} round(s) x {args.duration:g} s per "
        f"path and load, direct and ClusterIP interleaved (order alternating); the same "
        f"single nginx worker (web-a) serves both paths; cpu layout {args.cpu_layout}; "
        f"{os.cpu_count()} CPUs; kernel {platform.release()}. Ratio = median ClusterIP / "
        f"median direct; per-round ratio = ClusterIP / direct within each round. "
        f"Programming = from writing the manifest to the agent's status listing every "
        f"frontend. Rounds redone because another process took time on the bench CPU: "
        f"{redone}; disturbed rounds kept (redo limit reached): {kept}. "
        f"Total time {elapsed:.0f} s."
    )
    print()
    print(md)
    print()
    print(goal_line)
    print(notes)

    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    tag = "-quick" if args.quick else ""
    md_path = args.out / f"clusterip-{stamp}{tag}.md"
    json_path = args.out / f"clusterip-{stamp}{tag}.json"
    md_path.write_text(f"# veer: new connections per second, direct vs ClusterIP\n\n{md}\n\n"
                       f"{goal_line}\n\n{notes}\n")
    json_path.write_text(json.dumps({
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "source": source_state(),
        "elapsed_s": round(elapsed, 1),
        "goal": GOAL,
        "goal_met": verdict,
        "loads": [
            {
                "label": load.label,
                "services": load.services,
                "programming": load.programming,
                "ratio": load.ratio(),
                "paired_ratios": load.paired_ratios(),
                "rounds_redone": load.redone(),
                "disturbed_rounds_kept": load.disturbed_kept(),
                "direct": load.summary("direct"),
                "clusterip": load.summary("clusterip"),
                "runs": [r.to_json() for r in load.runs],
            }
            for load in loads
        ],
        "agent_sync_log": re.findall(r".*sync \(.*", agent_log),
    }, indent=1) + "\n")
    shown = md_path.relative_to(REPO) if md_path.is_relative_to(REPO) else md_path
    print(f"results: {shown} and {json_path.name}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; everything was cleaned up", file=sys.stderr)
        sys.exit(130)
