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
every run's numbers in bench/results/observe-<time>.json. The CPU accounting,
the idle waits, the rounds and their redo, and the results files are
bench/benchlib.py's, shared with the other benches.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import benchlib
from benchlib import REPO, CpuMeter, CpuUse, QuietWaiter, Run, Series, fmt_rate, log

from agent.cli.client import Client
from agent.sandbox.cluster import EXAMPLES, WEB_PODS, SandboxCluster
from agent.sandbox.wrk import WrkResult, run_wrk

POD = WEB_PODS[0]  # web-a, 10.244.1.2
BENCH_VIP = "10.96.1.1"
URL = f"http://{BENCH_VIP}:80/"
MODES = ("off", "on")

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


class Bench:
    def __init__(self, args: argparse.Namespace, cluster: SandboxCluster) -> None:
        self.args = args
        self.cluster = cluster
        self.bench_cpus: set[int] = set()
        self.other_cpus: set[int] = set()
        self.prefix: list[str] = []
        self.follower: subprocess.Popen[bytes] | None = None
        self.meter: CpuMeter | None = None

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
        self.bench_cpus, _ = benchlib.bench_cpus("single")
        self.other_cpus = set(os.sched_getaffinity(0)) - self.bench_cpus
        servers = benchlib.nginx_pids(Path(c.topo.workdir, f"nginx-{POD.name}", "nginx.pid"))
        benchlib.pin_servers(servers, self.bench_cpus)
        pinned_away = benchlib.place_agents("single", [self.agent_pid])
        if pinned_away:
            os.sched_setaffinity(0, self.other_cpus)
        self.prefix = benchlib.wrk_prefix(self.bench_cpus)
        self.meter = CpuMeter(self.bench_cpus, servers[1:], [self.agent_pid], pinned_away)

    def wrk(self, duration: float) -> WrkResult:
        return run_wrk(self.cluster.topo, self.cluster.client, URL, duration,
                       threads=self.args.threads, connections=self.args.connections,
                       prefix=self.prefix)

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
            benchlib.place_threads(self.follower.pid, self.other_cpus)
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

    def measure(self, mode: str, duration: float) -> tuple[WrkResult, CpuUse, dict[str, Any]]:
        assert self.meter is not None
        if mode == "on":
            self.follow()
        try:
            before = self.counters()
            follower0 = benchlib.proc_cpu_seconds(self.follower.pid) if self.follower else 0.0
            mark = self.meter.start()
            result = self.wrk(duration)
            use = self.meter.stop(mark)
            time.sleep(0.3)  # let the agent drain the ring buffer
            follower1 = benchlib.proc_cpu_seconds(self.follower.pid) if self.follower else 0.0
            after = self.counters()
        finally:
            self.unfollow()
        delta = benchlib.counter_delta(before, after)
        counted = {"mode": mode, "translated": delta["translated"],
                   "events_sent": delta["events_sent"], "events_lost": delta["events_lost"],
                   "follower_cpu_s": round(follower1 - follower0, 2)}
        check(result, counted)
        return result, use, counted


def check(result: WrkResult, counted: dict[str, Any]) -> None:
    """The checks that hold however busy the machine is (wrk's errors make a
    round disturbed instead, see disturbed())."""
    translated, sent, lost = counted["translated"], counted["events_sent"], counted["events_lost"]
    if translated < result.requests:
        raise RuntimeError(f"{translated} translations for {result.requests} requests")
    if counted["mode"] == "off" and sent:
        raise RuntimeError(f"{sent} events reported with translation events off")
    if counted["mode"] == "on" and sent + lost < translated:
        raise RuntimeError(f"{translated} translations but only {sent} events reported "
                           f"and {lost} lost")


def disturbed(run: Run) -> bool:
    """wrk's timeouts mean the server starved: another job took the machine."""
    return run.wrk.error_count > 0


def note(run: Run) -> str:
    c = run.counted
    errors = f", wrk errors {run.wrk.errors}" if run.wrk.error_count else ""
    return (f", events {c['events_sent']:,} sent, {c['events_lost']:,} lost, follower "
            f"{c['follower_cpu_s']:.2f} s{errors}")


# ---- reporting ------------------------------------------------------------------------


def table(series: Series) -> tuple[str, float]:
    runs = series.used()
    ratio = series.ratio()
    pairs = series.paired_ratios()
    lines = [
        "| translation events | conn/s, median (min-max) | events sent / lost "
        "| agent CPU s per s | follower CPU s per s |",
        "|---|---:|---:|---:|---:|",
    ]
    for mode in MODES:
        mine = [r for r in runs if r.path == mode]
        secs = sum(r.wrk.seconds for r in mine)
        label = "off (no follower)" if mode == "off" else "on (1 follower)"
        lines.append(
            f"| {label} | {fmt_rate(series.rates(mode))} "
            f"| {sum(r.counted['events_sent'] for r in mine):,} / "
            f"{sum(r.counted['events_lost'] for r in mine):,} "
            f"| {sum(r.cpu.agent for r in mine) / secs:.2f} "
            f"| {sum(r.counted['follower_cpu_s'] for r in mine) / secs:.2f} |"
        )
    lines.append("")
    lines.append(f"on/off: **{ratio:.3f}** (per-round {min(pairs):.3f}-{max(pairs):.3f}); "
                 f"rounds redone because another process took the bench CPU: "
                 f"{series.redone()}; disturbed rounds kept (redo limit reached): "
                 f"{series.disturbed_kept()}")
    return "\n".join(lines), ratio


# Option values of a --quick (smoke) run and of a full one.
QUICK = {"rounds": 1, "duration": 2}
FULL = {"rounds": 7, "duration": 5}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke test: 1 round of 2 s")
    benchlib.add_common_args(p, server=POD.name, full=FULL)
    args = p.parse_args(argv)
    benchlib.apply_presets(args, quick=QUICK, full=FULL)
    if args.rounds < 1 or args.duration < 1:
        p.error("--rounds and --duration must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not benchlib.ready("bench/observe.py"):
        return 2
    started = time.monotonic()
    log(f"veer flow events bench: {args.rounds} round(s) x {args.duration} s per mode, "
        f"wrk -t{args.threads} -c{args.connections} -H 'Connection: close', "
        f"{os.cpu_count()} CPU(s)")
    series = Series(label="flow events", paths=MODES)
    with SandboxCluster(manifests=None, pods=(POD,)) as cluster:
        log(f"sandbox {cluster.topo.prefix}: namespaces {cluster.topo.prefix}-*, "
            f"cgroup {cluster.topo.cgroup}, pins {cluster.topo.bpffs}")
        bench = Bench(args, cluster)
        try:
            bench.setup()
            assert bench.meter is not None
            waiter = QuietWaiter(bench.meter, args.quiet_timeout, args.quiet_budget)
            benchlib.run_rounds(series, bench.measure, bench.meter, waiter, args.rounds,
                                args.duration, args.max_redo, note=note, disturbed=disturbed)
        finally:
            bench.unfollow()
    errors = [r for r in series.used() if r.wrk.error_count]
    if errors and not args.quick:
        raise RuntimeError(f"wrk saw errors in round {errors[0].round + 1} after the last "
                           f"redo: {errors[0].wrk.errors}")
    md, ratio = table(series)
    notes = (f"wrk -t{args.threads} -c{args.connections} -H 'Connection: close' from the "
             f"client pod to a ClusterIP with one nginx endpoint; {args.rounds} round(s) x "
             f"{args.duration} s per mode, order alternating; wrk and nginx on CPU "
             f"{sorted(bench.bench_cpus) or 'any'}, the agent and the follower on "
             f"{sorted(bench.other_cpus) or 'any'}; kernel {platform.release()}. "
             f"Total time {time.monotonic() - started:.0f} s.")
    body = benchlib.report(md, notes)
    benchlib.write_results(
        args, "observe", f"# veer: the cost of flow events (new connections per second)\n\n"
                         f"{body}\n",
        {"ratio": ratio, "paired_ratios": series.paired_ratios(),
         "median_rates": {m: statistics.median(series.rates(m)) for m in MODES},
         "runs": [{**r.to_json(), "mode": r.path} for r in series.runs]})
    return 0


if __name__ == "__main__":
    benchlib.main_guard(main)
