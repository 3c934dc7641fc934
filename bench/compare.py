#!/usr/bin/env python3
"""veer side by side with the real kube-proxy (iptables and nftables modes)
and with the limit (reaching the pod directly), in one run on one machine.

    .venv/bin/python bench/compare.py [--quick]          (make bench)

One real control plane (etcd, kube-apiserver, kube-controller-manager, as
the e2e tests run them) feeds every proxy the same Services and
EndpointSlices; each proxy runs as a process in its own node namespace with
a client pod behind it, and every path ends at the same nginx on a backend
node (bench/versus/cluster.py draws the topology). The run:

1. starts every proxy and measures the datapath with only the bench Service
   (datapath.py: new connections per second, latency p50/p99, single-stream
   throughput, for each path, interleaved round by round);
2. for each N (default 1,000 then 10,000): with the other proxies stopped,
   starts veer, kube-proxy nftables and kube-proxy iptables afresh one at a
   time and measures its control plane (programming.py: N Services created,
   time until all answer, one more Service, programming latency from its own
   metric, CPU and memory), in --cp-rounds rounds for an N up to 1,000 (the
   report gives each figure's median, min and max) and once for a larger N
   (kube-proxy takes minutes per run there); then starts every proxy with
   the N in place and measures the datapath again.

The TPROXY column is veer's --mode tproxy; if it cannot run here, or cannot
program a load in time, its column says "not available" with the reason.

Results: bench/results/compare-<time>.md (the tables and the goals'
verdicts), .json (every run) and -datapath.png / -controlplane.png (drawn
by Debian's python3 with python3-matplotlib, from the JSON). `--quick`
(one datapath round, two control-plane rounds, 1 s per tool, N = 50) is the
smoke test the test suite runs.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import benchlib
from benchlib import REPO, log
from versus import report
from versus.apiload import ApiWriter, EtcdEraser, Port, ServiceSpec
from versus.cluster import BACKEND_NODE, HTTP_PORT, IPERF_PORT, WEB_IP, BenchCluster
from versus.datapath import BENCH_VIP, NODE_PORTS, PATHS, Datapath, PathDef
from versus.programming import (
    LOAD_NAMESPACE,
    CpResult,
    load_batch,
    measure,
    start_alone,
)
from versus.proxies import Proxy, all_proxies, wait_answering

GOAL_SERVICES = 10_000
BENCH_SERVICE = ServiceSpec(
    "bench", BENCH_VIP,
    (Port("http", 80, HTTP_PORT, NODE_PORTS["http"]),
     Port("iperf", IPERF_PORT, IPERF_PORT, NODE_PORTS["iperf"])),
    (WEB_IP,), BACKEND_NODE, node_port=True)
BENCH_TARGETS = [(BENCH_VIP, 80)]
# The control plane is measured proxy by proxy, in this order for the first
# N and with the first two swapped for the next, so that neither veer nor
# kube-proxy nftables always goes first on a fresh API server. kube-proxy
# iptables always goes last and stays running into the datapath phase with
# the N in place: its first sync of a whole ruleset, started afresh with
# 10,000 Services present, took longer than 300 s here (iptables-restore of
# some 400,000 lines), while it follows the same N streaming in within
# seconds.
CP_ORDER = ("veer", "kube-proxy-nftables")
CP_LAST = "kube-proxy-iptables"
# The control plane of an N up to this is measured in --cp-rounds rounds: a
# single run's CPU seconds at N = 1,000 varied by more than the gap between
# veer and kube-proxy nftables from one run of this bench to the next.
CP_ROUNDS_MAX_N = 1_000
# A latency run's p99 is its slowest 1% of requests. A run of 1 s on one
# connection made about 37,000 (compare-20261127-040255.json), so its tail
# was some 10 ms worth of requests, and one brief slowdown of the shared host
# could fill it: at 10,000 Services the socket path's median p99 was 1.062x
# direct's, though once connected both take the same kernel path. Three
# seconds triple what such a slowdown has to outweigh.
LATENCY_SECONDS = 3
PLOTTER = "/usr/bin/python3"
# Option values of a --quick (smoke) run and of a full one. The full run must
# fit in 30 minutes on 2 CPUs, so its waits for an idle machine are bounded
# tighter than the other benches'.
QUICK: dict[str, Any] = {"rounds": 1, "duration": 1, "loads": "50", "cp_rounds": 2,
                         "latency_seconds": 1}
FULL: dict[str, Any] = {"rounds": 5, "duration": 2, "loads": f"1000,{GOAL_SERVICES}",
                        "cp_rounds": 3, "latency_seconds": LATENCY_SECONDS,
                        "quiet_timeout": 30.0, "quiet_budget": 240.0}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="smoke test: N = 50, one datapath round, two control-plane "
                        "rounds, 1 s per tool")
    benchlib.add_common_args(p, server="web", full=FULL)
    p.add_argument("--loads", default=None,
                   help="comma-separated N for the control plane and the loaded datapath "
                        f"(default {FULL['loads']}; --quick {QUICK['loads']})")
    p.add_argument("--one-more", type=int, default=3,
                   help="times one more Service is created and timed per proxy and N "
                        "(default 3; --quick 1)")
    p.add_argument("--aux-share", type=float, default=0.5,
                   help="the throughput run lasts this share of --duration "
                        "(at least 1 s; default 0.5)")
    p.add_argument("--latency-seconds", type=int, default=None,
                   help=f"seconds of each latency run (default {FULL['latency_seconds']}, "
                        f"--quick {QUICK['latency_seconds']})")
    p.add_argument("--paths", default="",
                   help="comma-separated subset of the datapath paths (default: all)")
    p.add_argument("--cp-rounds", type=int, default=None,
                   help=f"control-plane rounds for each N up to {CP_ROUNDS_MAX_N:,} (larger N: "
                        f"one; default {FULL['cp_rounds']}, --quick {QUICK['cp_rounds']})")
    p.add_argument("--program-timeout", type=float, default=300.0,
                   help="how long a proxy may take to program a load (default 300 s)")
    args = p.parse_args(argv)
    benchlib.apply_presets(args, quick=QUICK, full=FULL)
    if args.quick:
        args.one_more = 1
    args.load_counts = [int(n) for n in args.loads.split(",") if n.strip()]
    known = {p.key for p in PATHS}
    args.path_keys = [k for k in args.paths.split(",") if k] or [p.key for p in PATHS]
    if set(args.path_keys) - known or "direct" not in args.path_keys:
        p.error(f"--paths: choose among {', '.join(sorted(known))}, direct included")
    if args.rounds < 1 or args.duration < 1 or args.cp_rounds < 1 or args.latency_seconds < 1 \
            or any(n < 2 for n in args.load_counts):
        p.error("--rounds, --cp-rounds, --duration and --latency-seconds must be positive, "
                "each load at least 2")
    return args


class Run:
    """The whole bench, phase by phase; keeps what each phase found."""

    def __init__(self, args: argparse.Namespace, cluster: BenchCluster) -> None:
        self.args = args
        self.cluster = cluster
        cp = cluster.control_plane
        self.eraser = EtcdEraser(cp.etcd_url)
        self.writer = ApiWriter(cp.url, str(cp.ca_file), cp.tokens["admin"], threads=16,
                                free_address=self.free_address)
        self.proxies = all_proxies(cluster)
        self.loads: list[report.Load] = []
        self.cps: list[CpResult] = []
        self.events: list[str] = []
        self.started = time.monotonic()

    def phase(self, title: str) -> None:
        """A phase's heading, with the time since the run began (where a
        run's 30 minutes go)."""
        log(f"{title}  [{(time.monotonic() - self.started) / 60:.1f} min]")

    def setup(self) -> None:
        cp = self.cluster.control_plane
        cp.create_namespace("bench")
        cp.create_namespace(LOAD_NAMESPACE)
        self.writer.create([BENCH_SERVICE], "bench")

    # ---- proxies ------------------------------------------------------------------

    def start_all(self, loaded: set[str]) -> dict[str, str]:
        """Start every proxy that is not running; wait until each answers the
        bench Service and holds the `loaded` addresses. Returns the proxies
        that could not (key -> why); they are stopped."""
        failed: dict[str, str] = {}
        for proxy in self.proxies.values():
            if not proxy.running:
                proxy.start()
        for proxy in self.proxies.values():
            try:
                start = time.monotonic()
                # With a load in place a fresh kube-proxy's first sync (every rule
                # at once) takes minutes on a busy 2-CPU machine.
                proxy.wait_ready(self.args.program_timeout if loaded else 180)
                took = time.monotonic() - start
                took += wait_answering(self.cluster, proxy, BENCH_TARGETS, timeout=180)
                if loaded:
                    start = time.monotonic()
                    got = self.wait_loaded(proxy, loaded)
                    if got != len(loaded):
                        raise TimeoutError(f"it programmed {got:,} of {len(loaded):,} Services "
                                           f"in {self.args.program_timeout:.0f} s")
                    took += time.monotonic() - start
                log(f"  {proxy.key}: serving ({took:.1f} s); {proxy.describe_rules()}")
            except (RuntimeError, TimeoutError) as err:
                reason = str(err).splitlines()[0][:300]
                if proxy.key != "veer-tproxy":
                    raise
                tail = proxy.log_tail(1500).strip().splitlines()
                failed[proxy.key] = reason
                log(f"  {proxy.key}: NOT available: {reason}")
                for line in tail[-5:]:
                    log(f"    | {line}")
                proxy.stop()
        return failed

    def wait_loaded(self, proxy: Proxy, loaded: set[str]) -> int:
        deadline = time.monotonic() + self.args.program_timeout
        while True:
            proxy.check_alive()
            got = proxy.programmed(loaded)
            if got == len(loaded) or time.monotonic() > deadline:
                return got
            time.sleep(2.0)

    def stop_all(self) -> None:
        for proxy in self.proxies.values():
            proxy.stop()

    # ---- phases ---------------------------------------------------------------------

    def datapath(self, services: int, unavailable: dict[str, str]) -> None:
        args = self.args
        keys = [k for k in args.path_keys
                if not (k == "veer-tproxy" and "veer-tproxy" in unavailable)]
        paths: list[PathDef] = [p for p in PATHS if p.key in keys]
        why = {p.key: unavailable["veer-tproxy"] for p in PATHS
               if p.proxy == "veer-tproxy" and "veer-tproxy" in unavailable}
        load = report.Load(services, None, why)
        self.phase(f"datapath with {load.label} Services loaded: {len(paths)} paths x "
                   f"{args.rounds} round(s)")
        load.series = Datapath(args, self.cluster, self.proxies, paths).run(load.label)
        self.loads.append(load)

    def controlplane(self, count: int, rotate: int) -> None:
        """Each proxy alone, round by round; which of veer and kube-proxy
        nftables goes first alternates, kube-proxy iptables goes last."""
        rounds = self.args.cp_rounds if count <= CP_ROUNDS_MAX_N else 1
        specs = load_batch(count)
        for round_index in range(rounds):
            turn = rotate + round_index
            first = CP_ORDER[turn % 2:] + CP_ORDER[:turn % 2]
            order = (*first, CP_LAST)
            for i, key in enumerate(order):
                proxy = self.proxies[key]
                self.phase(f"control plane, N = {count:,}, round {round_index + 1} of "
                           f"{rounds}: {proxy.key} alone")
                took = start_alone(self.cluster, proxy, BENCH_TARGETS, 180)
                log(f"  {proxy.key}: started, synced and serving in {took:.1f} s")
                result = measure(self.cluster, self.writer, proxy, count, self.args.one_more,
                                 self.args.program_timeout,
                                 seed=count + round_index * len(order) + i)
                result.round = round_index
                self.cps.append(result)
                last = round_index == rounds - 1 and i == len(order) - 1
                if not last:  # the last stays, serving the N, for the datapath
                    proxy.stop()
                    self.remove(specs)

    def free_address(self, ip: str) -> None:
        """A ClusterIP of the load that an IPAddress object left behind still
        holds while the bench creates its Service (ApiWriter.free_address)."""
        log(f"  {ip} is still held by an IPAddress object of the load: erasing it")
        self.eraser.erase_addresses([ip])

    def remove(self, specs: list[ServiceSpec]) -> None:
        """Between runs, no proxy running: erased in etcd (apiload.py says
        why), then the API server is waited for until it lists none."""
        start = time.monotonic()
        erased = self.eraser.erase(specs, LOAD_NAMESPACE)
        # The bench wrote every Service and slice, and nothing else deletes
        # them: a key not found means the API server's etcd layout is not
        # apiload.py's. The IPAddress objects are the API server's own; its
        # repair may have removed some (2 of 10,000 in a run at d48e648).
        if erased.services != len(specs) or erased.slices != len(specs):
            raise RuntimeError(f"erased {erased.services:,} Services and {erased.slices:,} "
                               f"EndpointSlices of {len(specs):,} in etcd: the API server's "
                               "etcd layout is not apiload.py's")
        if erased.addresses != len(specs):
            log(f"  {len(specs) - erased.addresses:,} IPAddress object(s) of the load were "
                "already gone from etcd")
        self.writer.wait_gone(LOAD_NAMESPACE)
        # An erased Service's IPAddress object can be there afterwards, its
        # address then taken for good: compare-20261127-033412 stopped on
        # one (its log is in bench/reports/), most likely made again by the
        # API server's ClusterIP repair for a Service its view still held.
        # Once no Service is listed, erase any that is there, until two
        # looks a second apart find none.
        ips = {s.cluster_ip for s in specs}
        clean = 0
        deadline = time.monotonic() + 120
        while clean < 2:
            back = self.writer.addresses_held(ips)
            if back:
                log(f"  {len(back):,} IPAddress object(s) of the load came back: erasing them")
                self.eraser.erase_addresses(sorted(back))
                clean = 0
            else:
                clean += 1
            if clean < 2:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"IPAddress objects of the load keep coming back: "
                                       f"{sorted(back)[:5]}")
                time.sleep(1.0)
        log(f"  removed {len(specs):,} Services in {time.monotonic() - start:.1f} s")

    def run(self) -> None:
        self.setup()
        self.phase("starting every proxy")
        unavailable = self.start_all(set())
        self.datapath(0, unavailable)
        for index, count in enumerate(self.args.load_counts):
            self.stop_all()
            self.controlplane(count, index)
            self.phase(f"starting every proxy with {count:,} Services in place")
            specs = load_batch(count)
            unavailable = self.start_all({s.cluster_ip for s in specs})
            # The last Service answering through each proxy, not only its state.
            for proxy in self.proxies.values():
                if proxy.running:
                    wait_answering(self.cluster, proxy, specs[-1].frontends(), timeout=120)
            self.datapath(count, unavailable)
            if index < len(self.args.load_counts) - 1:
                self.stop_all()
                self.remove(specs)
        self.stop_all()


def draw(json_path: Path) -> list[Path]:
    """The PNG plots, drawn by Debian's python3 (python3-matplotlib); the
    virtualenv does not carry matplotlib."""
    script = Path(__file__).resolve().parent / "versus" / "plots.py"
    if not os.access(PLOTTER, os.X_OK):
        log(f"no plots: {PLOTTER} is missing")
        return []
    res = subprocess.run([PLOTTER, str(script), str(json_path)], capture_output=True, text=True)
    if res.returncode != 0:
        log(f"no plots: {res.stderr.strip()[-500:]}")
        return []
    return [Path(line) for line in res.stdout.split()]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not benchlib.ready("bench/compare.py"):
        return 2
    started = time.monotonic()
    command = "make bench" if not argv and not sys.argv[1:] else \
        f"bench/compare.py {' '.join(argv if argv is not None else sys.argv[1:])}"
    log(f"veer side by side: {args.rounds} round(s) x {args.duration} s per path, loads "
        f"{', '.join(f'{n:,}' for n in args.load_counts)}, {os.cpu_count()} CPU(s)")
    log_dir = Path(tempfile.mkdtemp(prefix="bn-compare-"))
    aborted = ""
    try:
        with BenchCluster(log_dir) as cluster:
            log(f"sandbox {cluster.topo.prefix}: namespaces {cluster.topo.prefix}-*, "
                f"control plane {cluster.control_plane.dir}, logs {log_dir}")
            bench = Run(args, cluster)
            try:
                bench.run()
            except (RuntimeError, TimeoutError, OSError, subprocess.SubprocessError) as err:
                # What was measured before stays measured: the report says
                # where and why the run stopped.
                aborted = f"{type(err).__name__}: {str(err).splitlines()[0][:400]}"
                log(f"the run stopped: {aborted}")
    finally:
        if not os.environ.get("VEER_BENCH_KEEP"):
            shutil.rmtree(log_dir, ignore_errors=True)
    elapsed = time.monotonic() - started

    loads, cps = bench.loads, bench.cps
    redone = sum(ld.series.redone() for ld in loads if ld.series)
    kept = sum(ld.series.disturbed_kept() for ld in loads if ld.series)
    sections = [f"Command: `{command}`. {args.rounds} round(s) per load; in each, every path "
                f"in turn (order rotating): wrk -t{args.threads} -c{args.connections} "
                f"'Connection: close' for {args.duration} s (new conn/s), wrk -t1 -c1 "
                f"keep-alive for {args.latency_seconds} s (latency) and iperf3 (one stream) "
                f"for {max(1, round(args.duration * args.aux_share))} s. Cells: median "
                f"(min-max) over rounds, then **ratio to direct** (medians). Tools, nginx and "
                f"softirqs on the last CPU, the proxies and the control plane on the other "
                f"(veer TPROXY's agent joins the bench CPU during its runs: it proxies in "
                f"user space). Rounds redone because another process took the bench CPU: "
                f"{redone}; disturbed rounds kept: {kept}. {os.cpu_count()} CPUs, kernel "
                f"{platform.release()}, Kubernetes {kube_version()}. Total time "
                f"{elapsed / 60:.1f} min."]
    for load in loads:
        sections.append(f"### Datapath, {load.label} Services loaded\n\n"
                        f"{report.datapath_table(load)}{report.trouble(load)}")
    sections.append(f"### Control plane (each proxy alone, started afresh)\n\n"
                    f"Cells: median (min-max) over the rounds (an N up to "
                    f"{CP_ROUNDS_MAX_N:,}: {args.cp_rounds}; a larger N: one), one more "
                    f"Service over every time it was timed.\n\n" + report.cp_table(cps))
    sections.append("### Goals\n\n" + "\n".join(report.goals(loads, cps, GOAL_SERVICES)))
    if aborted:
        sections.append(f"**The run stopped before its end** ({aborted}); the figures above "
                        f"are those measured until then.")
    body = benchlib.report(*sections)
    _, json_path = benchlib.write_results(
        args, "compare", f"# veer side by side with kube-proxy\n\n{body}\n",
        {"elapsed_s": round(elapsed, 1), "command": command, "kubernetes": kube_version(),
         "aborted": aborted,
         **report.to_json(loads, cps)})
    for png in draw(json_path):
        shown = png.relative_to(REPO) if png.is_relative_to(REPO) else png
        log(f"plot: {shown}")
    log(f"total time {elapsed / 60:.1f} min")
    return 1 if aborted else 0


def kube_version() -> str:
    from tests.e2e.controlplane import kubernetes_version
    return kubernetes_version()


if __name__ == "__main__":
    benchlib.main_guard(main)
