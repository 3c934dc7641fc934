"""The datapath figures: every path to the same nginx, round by round.

    direct                  a pod on a node without any proxy -> the pod IP
    veer                    a pod -> the ClusterIP; veer's connect() hook
    veer-tproxy             a pod -> the ClusterIP; veer's TPROXY mode
    kp-iptables/nftables    a pod -> the ClusterIP; kube-proxy's DNAT
    veer-nodeport           outside client -> node:NodePort; veer's TC programs
    kp-*-nodeport           outside client -> node:NodePort; kube-proxy

Each path's run measures, back to back: new connections per second (wrk,
Connection: close), request/response latency (wrk, one kept-alive
connection) and single-stream throughput (iperf3); tools.py says how.

Placement (benchlib's "single" layout): the tools, nginx, the iperf3 server
and the softirqs that carry their packets share the last CPU, so a rate is
the inverse of a connection's CPU cost there; the control plane, the relay
and every proxy run on the other CPU(s), since none of them is on a
connection's path: kube-proxy's rules and veer's programs run in the
kernel, in the softirqs and system calls of the bench CPU. The exception is
TPROXY mode, whose proxy is a thread of the agent: during its runs the
agent is moved onto the bench CPU and counted as ours, so that its cost
shows in its figures as it would on a busy node.

Honesty checks, per run (the counters are cluster.py's bn_check table and
veer's own): the direct path's SYNs were forwarded by the plain node; veer's
hook translated every connection and no packet to the Service address
reached its node; TPROXY's proxy translated every connection; kube-proxy's
node saw each SYN to the Service address (or NodePort) and forwarded it to
the backend (it has no route for the Service range: only its DNAT can do
that); veer's TC programs restored a reply for each connection. Before
each load, 20 requests per path must all reach the nginx.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import benchlib
from benchlib import CpuMeter, CpuUse, QuietWaiter, Run, Series

from agent.sandbox.wrk import WrkResult
from versus import tools
from versus.cluster import HTTP_PORT, IPERF_PORT, WEB_IP, BenchCluster
from versus.proxies import Proxy

BENCH_VIP = "10.96.1.1"
NODE_PORTS = {"http": 30080, "iperf": 30201}


@dataclass(frozen=True)
class PathDef:
    key: str
    title: str
    proxy: str  # the proxy's key, "" for direct
    node: str  # the node whose counters are checked
    external: bool  # the client is outside the cluster (else a pod of `node`)
    host: str
    http_port: int
    iperf_port: int


PATHS: tuple[PathDef, ...] = (
    PathDef("direct", "direct (pod IP)", "", "plain", False, WEB_IP, HTTP_PORT, IPERF_PORT),
    PathDef("veer", "veer socket-LB", "veer", "veer", False, BENCH_VIP, 80, IPERF_PORT),
    PathDef("veer-tproxy", "veer TPROXY", "veer-tproxy", "tproxy", False, BENCH_VIP, 80,
            IPERF_PORT),
    PathDef("kp-iptables", "kube-proxy iptables", "kube-proxy-iptables", "kp-ipt", False,
            BENCH_VIP, 80, IPERF_PORT),
    PathDef("kp-nftables", "kube-proxy nftables", "kube-proxy-nftables", "kp-nft", False,
            BENCH_VIP, 80, IPERF_PORT),
    PathDef("veer-nodeport", "veer per-packet (NodePort)", "veer", "veer", True, "10.0.0.1",
            NODE_PORTS["http"], NODE_PORTS["iperf"]),
    PathDef("kp-iptables-nodeport", "kube-proxy iptables (NodePort)", "kube-proxy-iptables",
            "kp-ipt", True, "10.0.0.3", NODE_PORTS["http"], NODE_PORTS["iperf"]),
    PathDef("kp-nftables-nodeport", "kube-proxy nftables (NodePort)", "kube-proxy-nftables",
            "kp-nft", True, "10.0.0.4", NODE_PORTS["http"], NODE_PORTS["iperf"]),
)
BY_KEY = {p.key: p for p in PATHS}


class Datapath:
    def __init__(self, args: argparse.Namespace, cluster: BenchCluster,
                 proxies: dict[str, Proxy], paths: Sequence[PathDef]) -> None:
        self.args = args
        self.cluster = cluster
        self.proxies = proxies
        self.paths = list(paths)
        self.server_cpus, self.client_cpus = benchlib.bench_cpus(args.cpu_layout)
        self.prefix = benchlib.wrk_prefix(self.client_cpus)
        self.meter: CpuMeter | None = None
        self.background: list[int] = []

    # ---- placement ------------------------------------------------------------

    @contextlib.contextmanager
    def placed(self) -> Iterator[None]:
        """Servers on the bench CPU, everything else off it, for the duration."""
        cluster = self.cluster
        servers = benchlib.nginx_pids(os.path.join(cluster.topo.workdir, "nginx-web",
                                                   "nginx.pid"))
        servers.append(cluster.iperf.pid)
        self.background = [*cluster.background_pids(),
                           *(p.pid for p in self.proxies.values() if p.running)]
        benchlib.pin_servers(servers, self.server_cpus)
        pinned_away = benchlib.place_agents(self.args.cpu_layout, self.background)
        mine = os.sched_getaffinity(0)
        others = mine - self.server_cpus
        if others and pinned_away:
            os.sched_setaffinity(0, others)
        self.meter = CpuMeter(self.server_cpus | self.client_cpus, servers[1:],
                              self.background, pinned_away)
        try:
            yield
        finally:
            os.sched_setaffinity(0, mine)
            benchlib.unplace([*self.background, *servers])

    @contextlib.contextmanager
    def on_bench_cpu(self, proxy: Proxy | None) -> Iterator[None]:
        """TPROXY's agent proxies in user space: during its runs it works on
        the bench CPU and its time is ours."""
        if proxy is None or proxy.key != "veer-tproxy" or not self.server_cpus:
            yield
            return
        assert self.meter is not None
        benchlib.place_threads(proxy.pid, self.server_cpus)
        self.meter.pids.append(proxy.pid)
        self.meter.agent_pids.remove(proxy.pid)
        try:
            yield
        finally:
            self.meter.pids.remove(proxy.pid)
            self.meter.agent_pids.append(proxy.pid)
            benchlib.place_threads(proxy.pid, set(os.sched_getaffinity(0)) - self.server_cpus
                                   or self.server_cpus)

    # ---- checks ---------------------------------------------------------------

    def client(self, path: PathDef) -> tuple[str, str]:
        """(netns, cgroup) of the path's client."""
        if path.external:
            return self.cluster.external, ""
        node = self.cluster.nodes[path.node]
        return node.client.netns, node.cgroup

    def check_paths(self) -> None:
        """20 requests per path, every one answered by the web pod's nginx."""
        for path in self.paths:
            netns, cgroup = self.client(path)
            res = self.cluster.exec(netns, [sys.executable, "-m", "agent.sandbox.probe", "tcp",
                                            path.host, str(path.http_port), "--count", "20",
                                            "--timeout", "5"], cgroup=cgroup)
            if res.returncode != 0:
                raise RuntimeError(f"{path.key}: probe failed: {res.stderr[-1000:]}")
            got = json.loads(res.stdout.strip().splitlines()[-1])
            if got["answers"] != {f"web:{HTTP_PORT}": 20} or got["errors"]:
                raise RuntimeError(f"{path.key}: {path.host}:{path.http_port} does not reach "
                                   f"the web pod cleanly: {got}")

    def _snapshot(self, path: PathDef) -> tuple[dict[str, int], dict[str, int]]:
        proxy = self.proxies.get(path.proxy)
        return (self.cluster.counters(self.cluster.nodes[path.node].netns),
                proxy.counters() if proxy is not None else {})

    @staticmethod
    def judge(path: PathDef, requests: int, node: dict[str, int],
              proxy: dict[str, int]) -> list[str]:
        """What is wrong with a run of `path`, from the counters' deltas."""
        bad = []
        fwd, svc, np_syn = node.get("fwd_syn", 0), node.get("svc_syn", 0), \
            node.get("nodeport_syn", 0)
        if path.key == "direct":
            if fwd < requests:
                bad.append(f"the plain node forwarded {fwd} SYNs for {requests} requests")
        elif path.key == "veer":
            if proxy.get("translated", 0) < requests:
                bad.append(f"veer translated {proxy.get('translated', 0)} connections")
            if svc:
                bad.append(f"{svc} SYNs to the Service range reached veer's node")
        elif path.key == "veer-tproxy":
            if proxy.get("translated", 0) < requests:
                bad.append(f"the TPROXY proxy translated {proxy.get('translated', 0)}")
            if svc < requests:
                bad.append(f"only {svc} SYNs to the Service range reached the node")
        elif path.key == "veer-nodeport":
            if proxy.get("nat_reply", 0) < requests or not proxy.get("nat_new", 0):
                bad.append(f"veer's TC programs counted {proxy}")
        else:  # kube-proxy: the SYNs to its Service address were DNATed and forwarded
            seen = np_syn if path.external else svc
            if seen < requests or fwd < requests:
                bad.append(f"kube-proxy's node saw {seen} SYNs to the Service and "
                           f"forwarded {fwd} for {requests} requests")
        problems = {k: v for k, v in proxy.items()
                    if k.startswith(("refused", "dropped", "inconsistent", "nat_drop",
                                     "nat_denied", "upstream_failed")) and v}
        if problems:
            bad.append(f"the proxy counted {problems}")
        return bad

    # ---- one run --------------------------------------------------------------

    def measure(self, key: str, duration: float) -> tuple[WrkResult, CpuUse, dict[str, Any]]:
        assert self.meter is not None
        path = BY_KEY[key]
        proxy = self.proxies.get(path.proxy)
        netns, cgroup = self.client(path)
        url = f"http://{path.host}:{path.http_port}/"
        seconds = max(1, round(duration))
        throughput_s = max(1, round(duration * self.args.aux_share))
        latency_s = self.args.latency_seconds
        with self.on_bench_cpu(proxy):
            node0, proxy0 = self._snapshot(path)
            mark = self.meter.start()
            conn = tools.wrk(self.cluster, netns, cgroup, url, seconds, self.args.threads,
                             self.args.connections, True, self.prefix)
            ping = tools.wrk(self.cluster, netns, cgroup, url, latency_s, 1, 1, False, self.prefix)
            retried = 0
            while ping.requests == 0 and retried < 2:
                # The one connection's SYN was lost (retried after 1 s, past the
                # run's end): a datapath event, counted and shown, not a latency.
                retried += 1
                ping = tools.wrk(self.cluster, netns, cgroup, url, latency_s, 1, 1, False,
                                 self.prefix)
            bits = tools.iperf3(self.cluster, netns, cgroup, path.host, path.iperf_port,
                                throughput_s, self.prefix)
            use = self.meter.stop(mark)
            node1, proxy1 = self._snapshot(path)
        if conn.requests == 0 or ping.requests == 0:
            raise RuntimeError(f"{key}: wrk made no requests to {url}")
        node = benchlib.counter_delta(node0, node1)
        counted = benchlib.counter_delta(proxy0, proxy1)
        problems = self.judge(path, conn.requests, node, counted)
        if problems:
            raise RuntimeError(f"{key}: {'; '.join(problems)} (node counters {node})")
        p50, p99 = tools.latency(ping)
        return conn, use, {
            "node_counters": node,
            "proxy_counters": {k: v for k, v in counted.items() if v},
            "latency_runs_without_answer": retried,
            "wrk_errors": conn.error_count + ping.error_count,
            "extra": {"lat_p50_us": p50, "lat_p99_us": p99, "gbps": bits / 1e9,
                      "requests_keepalive": float(ping.requests),
                      "latency_run_s": ping.seconds},
        }

    def run(self, label: str, wait_quiet: QuietWaiter | None = None) -> Series:
        series = Series(label=label, paths=tuple(p.key for p in self.paths))
        with self.placed():
            assert self.meter is not None
            self.check_paths()
            waiter = wait_quiet or QuietWaiter(self.meter, self.args.quiet_timeout,
                                               self.args.quiet_budget)
            benchlib.run_rounds(series, self.measure, self.meter, waiter, self.args.rounds,
                                self.args.duration, self.args.max_redo, line=line,
                                note=note, disturbed=troubled)
        return series


def troubled(run: Run) -> bool:
    """wrk errors (timeouts, resets) or a latency run whose connection never
    came up: redo the round, as for another job's disturbance; the runs are
    kept in the JSON, and what is left after the last redo is in the report."""
    return bool(run.counted["wrk_errors"] or run.counted["latency_runs_without_answer"])


def note(run: Run) -> str:
    parts = []
    if run.counted["wrk_errors"]:
        parts.append(f"wrk errors {run.counted['wrk_errors']}")
    if run.counted["latency_runs_without_answer"]:
        parts.append(f"latency run without answer x{run.counted['latency_runs_without_answer']}")
    return "".join(f", {p}" for p in parts)


def line(run: Run) -> str:
    return (f"{run.wrk.rate:8,.0f} conn/s  p50 {run.extra['lat_p50_us']:6.1f} us  "
            f"p99 {run.extra['lat_p99_us']:6.1f} us  {run.extra['gbps']:5.2f} Gbit/s")
