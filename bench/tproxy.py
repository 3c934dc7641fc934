#!/usr/bin/env python3
"""TPROXY mode against direct: request rates and throughput to one pod.

    .venv/bin/python bench/tproxy.py [--quick]        (make bench-tproxy)

What it measures. The sandbox (one node) with ONE web pod, web-a, running
nginx and an iperf3 server, and the agent in TPROXY mode (--mode tproxy).
From the client pod, each measure runs on two paths to the same server:

  direct   the pod's address (10.244.1.2): plain routing through the node
  tproxy   a ClusterIP whose only endpoint is web-a (10.96.1.1:80 for nginx,
           10.96.1.2:5201 for iperf3): nftables hands the connection to the
           proxy in the agent, which connects to web-a from the client's own
           address and splices the bytes

and three measures:
  connections  wrk -t2 -c32 -H 'Connection: close': one new connection per
               request (the proxy's per-connection cost: two handshakes, its
               accept/connect/close);
  requests     wrk -t2 -c32 with keep-alive: small requests on long-lived
               connections (the proxy's per-request cost: four splice calls);
  throughput   iperf3, one TCP stream, client to server (bulk bytes: splice
               through a pipe, never copied into Python).

Each is reported as TPROXY / direct: the median of the TPROXY runs over the
median of the direct runs, with each round's own ratio beside. The old
userspace kube-proxy reached 0.36 of direct throughput; the aim here is >= 0.8.

Fairness, as in bench/clusterip.py (bench/benchlib.py): by default
(--cpu-layout single) the client, the server and the softirqs that carry
their packets share the last CPU, and the agent, hence the proxy, runs on the
other(s): each path gets the same CPU for the endpoints, and the proxy's own
work is reported beside each run (agent CPU seconds), since on the direct
path nothing does it. Runs alternate between the paths round by round; before
each round the bench waits for the machine to be idle, and a round in which
another process took more than 3% of the bench CPU is redone.

Honesty checks: before measuring, 20 requests per path must reach web-a;
during each run the proxy's counters must show one new proxied connection per
TPROXY connection (none on the direct path). A run in which wrk saw errors
(more than 0.1% of its requests) is redone like a disturbed one; the report
gives the errors of the runs kept.

`--quick`: one round of 2 s per measure (a smoke test; its numbers mean
little).

Results: a Markdown table on stdout and in bench/results/tproxy-<time>.md;
every run's numbers in bench/results/tproxy-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import benchlib
from benchlib import CpuMeter, CpuUse, QuietWaiter, Run, Series, log

from agent.sandbox.cluster import WEB_PODS, SandboxCluster
from agent.sandbox.wrk import WrkResult, run_wrk

POD = WEB_PODS[0]  # web-a, 10.244.1.2
HTTP_VIP, HTTP_PORT, POD_HTTP = "10.96.1.1", 80, 8080
IPERF_VIP, IPERF_PORT = "10.96.1.2", 5201
GOAL_THROUGHPUT = 0.8
USERSPACE_KUBE_PROXY = 0.36


def service(name: str, vip: str, port: int, target: int) -> str:
    return json.dumps({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"clusterIP": vip, "clusterIPs": [vip], "ipFamilies": ["IPv4"],
                 "ports": [{"name": "p", "protocol": "TCP", "port": port,
                            "targetPort": target}]},
    }) + "\n---\n" + json.dumps({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": f"{name}-1", "namespace": "default",
                     "labels": {"kubernetes.io/service-name": name}},
        "addressType": "IPv4",
        "ports": [{"name": "p", "protocol": "TCP", "port": target}],
        "endpoints": [{"addresses": [POD.ipv4], "conditions": {"ready": True},
                       "nodeName": "node-1"}],
    }) + "\n"


# ---- the bench -------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, cluster: SandboxCluster) -> None:
        self.args = args
        self.cluster = cluster
        self.prefix: list[str] = []
        self.meter: CpuMeter | None = None
        self.wait_quiet: QuietWaiter | None = None

    @property
    def agent_pid(self) -> int:
        assert self.cluster.agent is not None
        return self.cluster.agent.pid

    def setup(self) -> None:
        c = self.cluster
        c.write_manifest("http.yaml", service("bench", HTTP_VIP, HTTP_PORT, POD_HTTP))
        c.write_manifest("iperf.yaml", service("iperf", IPERF_VIP, IPERF_PORT, IPERF_PORT))
        c.topo.ns(c.client, "sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1",
                  "net.ipv4.ip_local_port_range=1024 65535")
        server_cpus, client_cpus = benchlib.bench_cpus(self.args.cpu_layout)
        pid_file = Path(c.topo.workdir, f"nginx-{POD.name}", "nginx.pid")
        servers = benchlib.nginx_pids(pid_file)
        self.prefix = benchlib.wrk_prefix(client_cpus)
        iperf = c.topo.spawn(c.topo.pods[POD.name].netns,
                             [*benchlib.wrk_prefix(server_cpus), "iperf3", "-s", "-p",
                              str(IPERF_PORT)])
        if server_cpus:  # (--cpu-layout shared: left to the scheduler)
            benchlib.pin_servers(servers, server_cpus)
        c.start_agent(["--mode", "tproxy", *benchlib.resync_args(self.args)], wait=False)
        c.wait_status(lambda s: s["ok"] and f"{IPERF_VIP}:{IPERF_PORT}/TCP" in s["frontends"]
                      and f"{HTTP_VIP}:{HTTP_PORT}/TCP" in s["frontends"],
                      what="the bench Services")
        status = c.status() or {}
        if status.get("mode") != "tproxy":
            raise RuntimeError(f"the agent runs {status.get('mode')}, not tproxy")
        pinned = benchlib.place_agents(self.args.cpu_layout, [self.agent_pid])
        self.meter = CpuMeter(server_cpus | client_cpus, [*servers[1:], iperf.pid],
                              [self.agent_pid], pinned)
        self.wait_quiet = QuietWaiter(self.meter, self.args.quiet_timeout,
                                      self.args.quiet_budget)
        for addr, port in ((POD.ipv4, POD_HTTP), (HTTP_VIP, HTTP_PORT)):
            res = c.probe("tcp", addr, str(port), "--count", "20")
            if res["answers"] != {f"{POD.name}:{POD_HTTP}": 20} or res["errors"]:
                raise RuntimeError(f"{addr}:{port} does not reach {POD.name} cleanly: {res}")

    def proxied(self) -> int:
        """Connections the proxy has placed so far (its `translated` counter)."""
        res = subprocess.run(
            [sys.executable, "-m", "agent.cli.main", "status", "--socket",
             self.cluster.api_socket, "-o", "json"], capture_output=True, text=True, timeout=30)
        if res.returncode != 0:
            raise RuntimeError(f"veer status failed: {res.stderr}")
        counters = {c["name"]: c["value"] for c in json.loads(res.stdout).get("counters", [])}
        return int(counters.get("translated", 0))

    def _check(self, path: str, connections: int, proxied: int) -> None:
        if path == "direct" and proxied:
            raise RuntimeError(f"direct run, but the proxy placed {proxied} connection(s)")
        if path == "tproxy" and proxied < connections:
            raise RuntimeError(f"{connections} TPROXY connections, the proxy placed {proxied}")

    def wrk(self, close: bool) -> Callable[[str, float], tuple[WrkResult, CpuUse, dict[str, Any]]]:
        def measure(path: str, duration: float) -> tuple[WrkResult, CpuUse, dict[str, Any]]:
            assert self.meter is not None
            url = (f"http://{POD.ipv4}:{POD_HTTP}/" if path == "direct"
                   else f"http://{HTTP_VIP}:{HTTP_PORT}/")
            before = self.proxied()
            mark = self.meter.start()
            try:
                result = run_wrk(self.cluster.topo, self.cluster.client, url, duration,
                                 threads=self.args.threads, connections=self.args.connections,
                                 close=close, prefix=self.prefix)
            except subprocess.TimeoutExpired:
                # Seen once on this shared machine under a load of 7: wrk did
                # not end a minute after its 5 s. A failed run, to be redone.
                use = self.meter.stop(mark)
                log(f"  wrk to {url} did not finish; the run counts as failed")
                failed = WrkResult(url=url, rate=0.0, requests=1, seconds=duration,
                                   errors={"hung": 1})
                return failed, use, {"proxied": self.proxied() - before, "wrk_errors": 1}
            use = self.meter.stop(mark)
            if result.requests == 0:
                raise RuntimeError(f"wrk made no requests to {url}")
            proxied = self.proxied() - before
            # Keep-alive: wrk's connections are opened once per run.
            self._check(path, result.requests if close else self.args.connections, proxied)
            return result, use, {"proxied": proxied, "wrk_errors": result.error_count}

        return measure

    def iperf(self, path: str, duration: float) -> tuple[WrkResult, CpuUse, dict[str, Any]]:
        """One iperf3 run; its Gbit/s stand as the run's rate."""
        assert self.meter is not None
        addr = POD.ipv4 if path == "direct" else IPERF_VIP
        seconds = max(1, round(duration))
        before = self.proxied()
        mark = self.meter.start()
        res = self.cluster.topo.exec(
            self.cluster.client,
            [*self.prefix, "iperf3", "-c", addr, "-p", str(IPERF_PORT), "-t", str(seconds),
             "-J"], timeout=duration + 60)
        use = self.meter.stop(mark)
        if res.returncode != 0:
            raise RuntimeError(f"iperf3 to {addr} failed: {res.stdout[-2000:]} {res.stderr}")
        end = json.loads(res.stdout)["end"]
        proxied = self.proxied() - before
        self._check(path, 2, proxied)  # iperf3: a control and a data connection
        gbps = end["sum_received"]["bits_per_second"] / 1e9
        result = WrkResult(url=f"iperf3://{addr}:{IPERF_PORT}", rate=gbps, requests=1,
                           seconds=float(seconds))
        return result, use, {"proxied": proxied,
                             "retransmits": int(end["sum_sent"].get("retransmits", 0))}

    def rounds(self, series: Series,
               measure: Callable[[str, float], tuple[WrkResult, CpuUse, dict[str, Any]]],
               unit: str) -> None:
        assert self.meter is not None and self.wait_quiet is not None
        fmt = "{:10.2f} " if unit == "Gbit/s" else "{:10,.0f} "
        benchlib.run_rounds(series, measure, self.meter, self.wait_quiet, self.args.rounds,
                            self.args.duration, self.args.max_redo,
                            line=lambda run: fmt.format(run.wrk.rate) + unit
                            + (f", {run.counted['wrk_errors']} wrk errors"
                               if run.counted.get("wrk_errors") else ""),
                            disturbed=_failed)


def _failed(run: Run) -> bool:
    """A run in which wrk saw errors (a stall of this shared machine: wrk's
    2 s timeouts hit the direct path too) is redone like a disturbed one;
    kept, if the redo limit is reached, and counted in the report."""
    return bool(run.counted.get("wrk_errors", 0) > 0.001 * max(run.wrk.requests, 1))


# ---- reporting -------------------------------------------------------------------------


def agent_cpu(runs: Sequence[Any], path: str) -> float:
    """The agent's CPU seconds per second of run, median over the path's runs."""
    values = [r.cpu.agent / r.cpu.elapsed for r in runs if r.used and r.path == path]
    return statistics.median(values) if values else 0.0


def table(measures: Sequence[tuple[str, str, Series]]) -> str:
    lines = ["| measure | direct, median (min-max) | TPROXY, median (min-max) | TPROXY/direct "
             "| per-round ratio (min-max) | proxy CPU (s/s) |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, unit, series in measures:
        paired = series.paired_ratios()

        def cell(path: str, unit: str = unit, series: Series = series) -> str:
            values = series.rates(path)
            if unit == "Gbit/s":
                return (f"{statistics.median(values):.2f} ({min(values):.2f}-"
                        f"{max(values):.2f}) {unit}")
            return f"{benchlib.fmt_rate(values)} {unit}"

        lines.append(f"| {name} | {cell('direct')} | {cell('tproxy')} | "
                     f"**{series.ratio():.3f}** | {min(paired):.3f}-{max(paired):.3f} | "
                     f"{agent_cpu(series.runs, 'tproxy'):.2f} |")
    return "\n".join(lines)


def _errors(series: Series) -> int:
    return sum(int(r.counted.get("wrk_errors", 0)) for r in series.used())


# Option values of a --quick (smoke) run and of a full one.
QUICK = {"rounds": 1, "duration": 2}
FULL = {"rounds": 5, "duration": 5}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke test: 1 round of 2 s")
    benchlib.add_common_args(p, server="web-a", full=FULL)
    args = p.parse_args(argv)
    benchlib.apply_presets(args, quick=QUICK, full=FULL)
    if args.rounds < 1 or args.duration <= 0 or args.max_redo < 0:
        p.error("--rounds and --duration must be positive, --max-redo not negative")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not benchlib.ready("bench/tproxy.py"):
        return 2
    started = time.monotonic()
    log(f"veer TPROXY bench: {args.rounds} round(s) x {args.duration:g} s per path and "
        f"measure, wrk -t{args.threads} -c{args.connections}, iperf3 1 stream, cpu layout "
        f"{args.cpu_layout}, {os.cpu_count()} CPU(s)")
    paths = ("direct", "tproxy")
    connections = Series(label="connections", paths=paths)
    requests = Series(label="requests", paths=paths)
    throughput = Series(label="throughput", paths=paths)
    with SandboxCluster(manifests=None, pods=(POD,)) as cluster:
        log(f"sandbox {cluster.topo.prefix}: namespaces {cluster.topo.prefix}-*")
        bench = Bench(args, cluster)
        bench.setup()
        benchlib.settle([bench.agent_pid])
        log("new connections per second (Connection: close)")
        bench.rounds(connections, bench.wrk(close=True), "conn/s")
        log("requests per second on keep-alive connections")
        bench.rounds(requests, bench.wrk(close=False), "req/s")
        log("throughput (iperf3, one stream)")
        bench.rounds(throughput, bench.iperf, "Gbit/s")
        agent_log = cluster.agent_output()
    elapsed = time.monotonic() - started
    md = table([("new connections (wrk, Connection: close)", "conn/s", connections),
                ("requests on keep-alive connections (wrk)", "req/s", requests),
                ("throughput (iperf3, 1 stream)", "Gbit/s", throughput)])
    ratio = throughput.ratio()
    goal = (f"Goal: TPROXY throughput >= {GOAL_THROUGHPUT:.2f} x direct (the old userspace "
            f"kube-proxy reached {USERSPACE_KUBE_PROXY:.2f}): "
            f"{'met' if ratio >= GOAL_THROUGHPUT else 'NOT met'} ({ratio:.3f}).")
    if args.quick:
        goal += " (A --quick run: not a test of the goal.)"
    notes = (
        f"From the client pod to web-a (one nginx worker, one iperf3 server); {args.rounds} "
        f"round(s) x {args.duration:g} s per path and measure, paths alternating; wrk "
        f"-t{args.threads} -c{args.connections}; cpu layout {args.cpu_layout} (client and "
        f"server on one CPU, the agent and its proxy on the other(s)); {os.cpu_count()} CPUs; "
        f"kernel {platform.release()}. Ratio = median TPROXY / median direct. Proxy CPU = "
        f"the agent's CPU seconds per second of TPROXY run (on the direct path it does "
        f"nothing). wrk errors in the runs kept: "
        f"{_errors(connections)} (connections), {_errors(requests)} (requests). "
        f"Rounds redone (another process, or wrk errors): {connections.redone()}, "
        f"{requests.redone()}, {throughput.redone()}; disturbed rounds kept: "
        f"{connections.disturbed_kept()}, {requests.disturbed_kept()}, "
        f"{throughput.disturbed_kept()}. Total time {elapsed:.0f} s."
    )
    body = benchlib.report(md, goal, notes)
    benchlib.write_results(
        args, "tproxy",
        f"# veer: TPROXY mode against direct\n\n{body}\n",
        {"elapsed_s": round(elapsed, 1), "goal": GOAL_THROUGHPUT,
         "goal_met": ratio >= GOAL_THROUGHPUT,
         "connections": connections.to_json(), "requests": requests.to_json(),
         "throughput": throughput.to_json(),
         "agent_log_tail": agent_log[-4000:]},
    )
    return 0


if __name__ == "__main__":
    benchlib.main_guard(main)
