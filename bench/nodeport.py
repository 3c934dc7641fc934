#!/usr/bin/env python3
"""New-connection rate from outside the cluster to a pod on another node:
directly, through a NodePort in the default mode (SNAT), and through a
NodePort in DSR mode (--nodeport-mode dsr).

    .venv/bin/python bench/nodeport.py [--quick]        (make bench-nodeport)

What it measures. Three node namespaces on a LAN (agent/sandbox/multinode.py),
one agent each, and ONE nginx pod, web-b 10.244.2.2, on node-2. wrk runs in
the external client's namespace (10.0.0.100, on the LAN, in no served cgroup,
so no socket hook sees its connections) and opens one connection per HTTP
request (`Connection: close`) to that nginx:

  direct    http://10.244.2.2:8080/  the client routes node-2's pod CIDR
                                     10.244.2.0/24 via node-1 (10.0.0.1), and
                                     node-1 routes it on to node-2: plain
                                     forwarding, nothing translated
  nodeport  http://10.0.0.1:30080/   Service `bench` (externalTrafficPolicy
                                     Cluster), whose only endpoint is web-b,
                                     through node-1, whose agent runs in the
                                     default mode: node-1's TC program DNATs to
                                     web-b and, the backend being on another
                                     node, SNATs to 10.0.0.1
  dsr       http://10.0.0.3:30080/   the same Service through node-3, whose
                                     agent runs with --nodeport-mode dsr:
                                     node-3 only DNATs, and adds the frontend
                                     to the first packet; node-2 records it,
                                     and sends the replies straight to the
                                     client from 10.0.0.3:30080

So every path crosses an ingress node (node-1, or node-3 for DSR) then node-2
on the way in. The replies differ, as they do in a real cluster: on the direct
and the DSR paths node-2 sends them straight to the client (10.0.0.100 is on
its LAN); SNATed NodePort replies are addressed to node-1 and come back
through it, where they are restored and sent on to the client: the SNAT
reply path crosses node-1 and the LAN bridge once more than the others; that
is part of what a NodePort costs in that mode.

node-2's agent runs with --nodeport-mode dsr too, so that it accepts the DSR
flows node-3 sends it; that changes nothing for the other two paths (it only
adds the handling of packets that carry veer's DSR option), and node-1, the
node that SNATs, runs the default mode. node-3 is on no path but its own.

The client ignores ICMP redirects: otherwise node-1, forwarding a packet out
of the interface it came in on, tells the client to reach 10.244.2.0/24
through node-2 itself, and the "direct" path would skip node-1.

Fairness and stability: the same machinery as bench/clusterip.py
(bench/benchlib.py, see clusterip.py's docstring): by default (--cpu-layout
single) wrk, nginx and the softirqs that carry their packets share the last
CPU (a veth delivers on the sending CPU, so every namespace hop of a request is
processed on wrk's CPU and every hop of a reply on nginx's), and the agents
run on the other CPU(s); the rate is the inverse of the CPU cost of a
connection. The three paths are interleaved (the order rotating each round);
before each round the bench waits for the machine to be idle, and a round in
which another process took more than 3% of the bench CPU is redone. The
client reuses its own TIME_WAIT ports and the whole port range. Each NodePort
ratio is that path's median rate over the median rate of the same direct
runs.

Honesty checks. Before measuring, 20 requests per path must all reach web-b,
which must see the client's address on the direct and DSR paths and node-1's
on the SNAT one. During each run the datapath counters must show: on the
direct path, no translation anywhere, and node-1 forwarding the packets (it
is on that path); on the SNAT path, new flows on node-1, every one
source-NATed, at least one restored reply per request on node-1 (the replies
come back through it), and no translation on node-2 or node-3; on the DSR
path, new flows on node-3, every one sent by DSR and none SNATed, no reply
restored on node-3 (none comes back through it), DSR flows accepted on node-2
and at least one reply per request restored there, and nothing on node-1.
The direct path must see no wrk errors. NodePort flows that a node failed to
set up (the counter nat_fail: the SYN is dropped, the client retries a second
later) are not hidden: they are counted per run and flagged in the report,
with node-1's reverse-NAT entries (one per SNAT port in use).

`--quick`: one round of 2 s (a smoke test).

Results: a Markdown table on stdout and in bench/results/nodeport-<time>.md;
every run's numbers (rates, latency percentiles, CPU use, counters) in
bench/results/nodeport-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import time
from collections.abc import Sequence
from typing import Any

import benchlib
from benchlib import REPO, CpuMeter, CpuUse, QuietWaiter, Run, Series, log, path_cells

from agent.datapath.ebpf.maps import SockLbMaps
from agent.sandbox.multinode import MultiNodeCluster, NodeHandle
from agent.sandbox.wrk import WrkResult, parse_wrk, wrk_argv

POD = "web-b"
POD_IP = "10.244.2.2"  # the first pod on node-2
POD_CIDR = "10.244.2.0/24"
POD_PORT = 8080
NODE1 = "10.0.0.1"
NODE3 = "10.0.0.3"
EXTERNAL = "10.0.0.100"
NODE_PORT = 30080
CLUSTER_IP = "10.96.0.10"
GOAL = 0.9
PATHS = ("direct", "nodeport", "dsr")
NODEPORT_PATHS = ("nodeport", "dsr")
TITLES = {
    "direct": "direct, routed via node-1",
    "nodeport": "NodePort via node-1, default mode (SNAT)",
    "dsr": "NodePort via node-3, --nodeport-mode dsr",
}
SHORT = {"nodeport": "default mode (SNAT)", "dsr": "DSR"}
# Index in Bench.nodes of the node each path enters the cluster by.
INGRESS = {"direct": 0, "nodeport": 0, "dsr": 2}
BAD_COUNTERS = ("inconsistent", "refused", "dropped", "nat_drop", "nat_denied")

SERVICE = {
    "apiVersion": "v1", "kind": "Service",
    "metadata": {"name": "bench", "namespace": "default"},
    "spec": {
        "type": "NodePort", "clusterIP": CLUSTER_IP, "clusterIPs": [CLUSTER_IP],
        "ipFamilies": ["IPv4"], "externalTrafficPolicy": "Cluster",
        "ports": [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": POD_PORT,
                   "nodePort": NODE_PORT}],
    },
}
ENDPOINTS = {
    "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
    "metadata": {"name": "bench-1", "namespace": "default",
                 "labels": {"kubernetes.io/service-name": "bench"}},
    "addressType": "IPv4",
    "ports": [{"name": "http", "protocol": "TCP", "port": POD_PORT}],
    "endpoints": [{"addresses": [POD_IP], "nodeName": "node-2",
                   "conditions": {"ready": True, "serving": True, "terminating": False},
                   "targetRef": {"kind": "Pod", "name": POD, "namespace": "default"}}],
}
# The benchmark's Service: one TCP port, one endpoint (web-b on node-2), so
# that every path is served by the same single nginx.
BENCH_MANIFEST = json.dumps(SERVICE) + "\n---\n" + json.dumps(ENDPOINTS) + "\n"

MODES_NOTE = (
    "What each mode costs and requires. Default mode (SNAT): works on any network "
    "between nodes; the backend sees the ingress node's address instead of the "
    "client's; the replies come back through the ingress node (twice the packets "
    "there), which holds a source port per connection. DSR (--nodeport-mode dsr, on "
    "every node, with --cluster-cidr): the backend sees the client's address, the "
    "replies go from the backend's node straight to the client with the frontend's "
    "address as their source, so the network must let a node send packets from "
    "another node's (or the load balancer's) address, and pass IPv4 options / IPv6 "
    "destination options between nodes; the flow's first packet (every SYN, every UDP "
    "datagram) grows by 8 bytes (IPv4) or 24 (IPv6), and a UDP flow whose first "
    "datagram has no room under the MTU is source-NATed instead; clients that are pods "
    "or the backend's own node are source-NATed too."
)


def snat_port_range() -> int | None:
    """How many source ports node-1 may SNAT to (per node address and backend),
    as the datapath defines it; None if it cannot be read."""
    text = (REPO / "bpf" / "tc_nat.c").read_text()
    found = re.search(r"#define\s+VEER_SNAT_PORT_RANGE\s+(\d+)", text)
    return int(found[1]) if found else None


def netns_stats(pid: int) -> tuple[int, int]:
    """(IP packets forwarded, packets received on eth0) in the network namespace
    of process `pid`."""
    with open(f"/proc/{pid}/net/snmp") as f:
        ip = [line.split() for line in f if line.startswith("Ip:")]
    forwarded = int(ip[1][ip[0].index("ForwDatagrams")])
    with open(f"/proc/{pid}/net/dev") as f:
        for line in f:
            name, _, values = line.partition(":")
            if name.strip() == "eth0":
                return forwarded, int(values.split()[1])
    raise RuntimeError(f"no eth0 in the network namespace of process {pid}")


def translated(counters: dict[str, int]) -> dict[str, int]:
    """The per-packet translations among a node's counter deltas."""
    return {k: v for k, v in counters.items()
            if v and (k.startswith("nat_") or k == "translated")}


# ---- the bench -------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, cluster: MultiNodeCluster) -> None:
        self.args = args
        self.cluster = cluster
        self.nodes = cluster.nodes
        self.node1, self.node2, self.node3 = cluster.nodes
        self.wrk_prefix: list[str] = []
        self.maps: list[SockLbMaps] = []
        self.meter: CpuMeter | None = None
        self.wait_quiet: QuietWaiter | None = None
        self.agent_start_s = 0.0

    def close(self) -> None:
        for maps in self.maps:
            maps.close()
        self.maps = []

    @staticmethod
    def pid(node: NodeHandle) -> int:
        assert node.agent is not None
        return node.agent.pid

    # ---- setup --------------------------------------------------------------------

    def setup(self) -> None:
        cluster, topo, ext = self.cluster, self.cluster.topo, self.cluster.external
        cluster.write_manifest("bench.yaml", BENCH_MANIFEST)
        # The client is a load generator: it reuses its own TIME_WAIT ports and
        # uses the whole port range (the same for every path; only the client's
        # own namespace is touched). It ignores ICMP redirects, so that its route
        # to node-2's pods stays via node-1 (see the docstring).
        topo.ns(ext, "sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1",
                "net.ipv4.ip_local_port_range=1024 65535",
                "net.ipv4.conf.all.accept_redirects=0",
                "net.ipv4.conf.default.accept_redirects=0",
                "net.ipv4.conf.eth0.accept_redirects=0")
        topo.ns(ext, "ip", "route", "add", POD_CIDR, "via", NODE1)
        server_cpus, client_cpus = benchlib.bench_cpus(self.args.cpu_layout)
        servers = benchlib.nginx_pids(os.path.join(topo.workdir, f"nginx-{POD}", "nginx.pid"))
        benchlib.pin_servers(servers, server_cpus)
        self.wrk_prefix = benchlib.wrk_prefix(client_cpus)
        t0 = time.monotonic()
        common = ["--cluster-cidr", "10.244.0.0/16", *benchlib.resync_args(self.args)]
        cluster.start_agents(common, only=[self.node1])
        cluster.start_agents([*common, "--nodeport-mode", "dsr"],
                             only=[self.node2, self.node3])
        backends = [f"{POD_IP}:{POD_PORT}/TCP"]
        cluster.wait_external(f"{NODE1}:{NODE_PORT}/TCP", self.node1, backends, local=False)
        cluster.wait_external(f"{NODE3}:{NODE_PORT}/TCP", self.node3, backends, local=False)
        self.agent_start_s = time.monotonic() - t0
        log(f"agents up and the NodePort programmed on node-1 and node-3 in "
            f"{self.agent_start_s:.1f} s (includes compiling the BPF programs)")
        agents = [self.pid(n) for n in self.nodes]
        pinned_away = benchlib.place_agents(self.args.cpu_layout, agents)
        self.maps = [SockLbMaps.open(n.bpffs) for n in self.nodes]
        self.meter = CpuMeter(server_cpus | client_cpus, servers[1:], agents, pinned_away)
        self.wait_quiet = QuietWaiter(self.meter, self.args.quiet_timeout,
                                      self.args.quiet_budget)
        self.check_paths()

    def check_paths(self) -> None:
        """Every URL answers from web-b; it sees the client's address on the
        direct and DSR paths and node-1's on the SNAT one; the client's route to
        the pod goes through node-1."""
        route = self.cluster.topo.ns(self.cluster.external, "ip", "route", "get", POD_IP).stdout
        if f"via {NODE1} " not in route:
            raise RuntimeError(f"the client does not reach {POD_IP} via node-1: {route}")
        for addr, port, seen in ((POD_IP, POD_PORT, EXTERNAL), (NODE1, NODE_PORT, NODE1),
                                 (NODE3, NODE_PORT, EXTERNAL)):
            res = self.cluster.probe_from_outside("tcp", addr, str(port), "--count", "20",
                                                  "--path", "/client", "--timeout", "5")
            want = {f"{POD}:{POD_PORT} {seen}": 20}
            if res["answers"] != want or res["errors"] or res["peer_mismatch"]:
                raise RuntimeError(f"{addr}:{port} does not reach {POD} as expected "
                                   f"({want}): {res}")

    # ---- measuring ------------------------------------------------------------------

    def url(self, path: str) -> str:
        return {"direct": f"http://{POD_IP}:{POD_PORT}/",
                "nodeport": f"http://{NODE1}:{NODE_PORT}/",
                "dsr": f"http://{NODE3}:{NODE_PORT}/"}[path]

    def run_wrk(self, path: str, duration: float) -> WrkResult:
        """wrk in the external client's namespace, outside every served cgroup."""
        url = self.url(path)
        argv = [*self.wrk_prefix, *wrk_argv(url, duration, self.args.threads,
                                            self.args.connections, close=True)]
        res = self.cluster.topo.exec(self.cluster.external, argv, timeout=duration + 60,
                                     in_cgroup=False)
        if res.returncode != 0:
            raise RuntimeError(f"wrk failed ({res.returncode}): {res.stderr.strip()}\n"
                               f"{res.stdout}")
        return parse_wrk(url, res.stdout)

    def wrk(self, path: str, duration: float) -> tuple[WrkResult, CpuUse, dict[str, Any]]:
        assert self.meter is not None
        ingress = self.nodes[INGRESS[path]]
        before = [m.counters() for m in self.maps]
        fwd0, _ = netns_stats(self.pid(self.node1))
        _, rx0 = netns_stats(self.pid(ingress))
        mark = self.meter.start()
        result = self.run_wrk(path, duration)
        use = self.meter.stop(mark)
        fwd1, _ = netns_stats(self.pid(self.node1))
        _, rx1 = netns_stats(self.pid(ingress))
        node1, node2, node3 = (benchlib.counter_delta(b, m.counters())
                               for b, m in zip(before, self.maps, strict=True))
        counted: dict[str, Any] = {
            "node1_counters": {k: v for k, v in node1.items() if v},
            "node2_counters": {k: v for k, v in node2.items() if v},
            "node3_counters": {k: v for k, v in node3.items() if v},
            "node1_forwarded": fwd1 - fwd0,
            "ingress_node": ingress.name,
            "ingress_eth0_rx_packets": rx1 - rx0,
            "nat_fail": sum(n.get("nat_fail", 0) for n in (node1, node2, node3)),
        }
        problems = []
        # Broken invariants, on any path: the run measured something else.
        for name, delta in (("node-1", node1), ("node-2", node2), ("node-3", node3)):
            bad = {k: v for k, v in delta.items() if k.startswith(BAD_COUNTERS) and v}
            if bad:
                problems.append(f"{name} counted {bad}")
        if path == "direct":
            benchlib.check_wrk(result)
            for name, delta in (("node-1", node1), ("node-2", node2), ("node-3", node3)):
                if translated(delta):
                    problems.append(f"{name} translated direct traffic: {translated(delta)}")
            if fwd1 - fwd0 < result.requests:
                problems.append(f"node-1 forwarded only {fwd1 - fwd0} packets "
                                "(the direct path must cross it)")
        elif path == "nodeport":
            # Every new flow is source-NATed (the backend is on node-2), and every
            # connection's replies came back through node-1 and were restored. (A
            # new connection from a client port used within the last 3 s may reuse
            # its predecessor's mapping: nat_new can be a little below requests.)
            if node1.get("nat_snat", 0) != node1.get("nat_new", 0) or node1.get("nat_dsr"):
                problems.append("node-1 set up NodePort flows without SNAT")
            if node1.get("nat_reply", 0) < result.requests:
                problems.append("node-1 restored fewer replies than there were connections")
            for name, delta in (("node-2", node2), ("node-3", node3)):
                if translated(delta):
                    problems.append(f"{name} translated SNAT traffic: {translated(delta)}")
            # How many SNAT ports node-1 holds now: one reverse-NAT entry each.
            counted["node1_nat_rev_entries"] = len(self.maps[0].nat_rev)
        else:
            # Every new flow went by DSR (none SNATed); no reply came back through
            # node-3; node-2 accepted the DSR flows and restored at least one reply
            # per connection; node-1 is not on this path.
            if not node3.get("nat_new") or node3.get("nat_dsr", 0) != node3.get("nat_new"):
                problems.append("node-3 set up NodePort flows that did not go by DSR")
            if node3.get("nat_snat") or node3.get("nat_reply"):
                problems.append("node-3 source-NATed flows or restored replies")
            if not node2.get("nat_dsr_in"):
                problems.append("node-2 accepted no DSR flow")
            if node2.get("nat_reply", 0) < result.requests:
                problems.append("node-2 restored fewer replies than there were connections")
            if translated(node1):
                problems.append(f"node-1 translated DSR traffic: {translated(node1)}")
        if problems:
            raise RuntimeError(f"{path}: {result.requests} requests, but: "
                               f"{'; '.join(problems)}; counted {counted}")
        return result, use, counted

    def measure(self, series: Series) -> None:
        assert self.meter is not None and self.wait_quiet is not None
        benchlib.run_rounds(series, self.wrk, self.meter, self.wait_quiet, self.args.rounds,
                            self.args.duration, self.args.max_redo, note=run_note)


def run_note(run: Run) -> str:
    """What the log line of a run adds: flows that failed, wrk's errors."""
    parts = []
    if run.counted.get("nat_fail"):
        parts.append(f"nat_fail {run.counted['nat_fail']:,}")
    if "node1_nat_rev_entries" in run.counted:
        parts.append(f"node-1 reverse-NAT entries {run.counted['node1_nat_rev_entries']:,}")
    if run.wrk.error_count:
        parts.append(f"wrk errors {run.wrk.errors} non-2xx {run.wrk.non_2xx}")
    return "".join(f", {p}" for p in parts)


# ---- reporting -----------------------------------------------------------------


def failed_flows(series: Series, path: str) -> int:
    return sum(r.counted.get("nat_fail", 0) for r in series.used() if r.path == path)


def wrk_errors(series: Series, path: str) -> int:
    return sum(r.wrk.error_count for r in series.used() if r.path == path)


def per_connection(series: Series, path: str, key: str) -> float:
    """Median over used runs of `key` (a packet counter) per connection."""
    return statistics.median(float(r.counted[key]) / max(r.wrk.requests, 1)
                             for r in series.used() if r.path == path)


def table(series: Series) -> str:
    rx = {p: per_connection(series, p, "ingress_eth0_rx_packets") for p in PATHS}
    lines = [
        f"| {series.label}: path | conn/s, median (min-max) | ratio to direct "
        "| per-round ratio (min-max) | packets into the ingress node per connection "
        "| flows a node failed (nat_fail) |",
        "|---|---:|---:|---:|---:|---:|",
        f"| {TITLES['direct']} | {benchlib.fmt_rate(series.rates('direct'))} | 1 | - "
        f"| {rx['direct']:.1f} | - |",
    ]
    for path in NODEPORT_PATHS:
        lines.append(f"| {TITLES[path]} | {path_cells(series, path)} | {rx[path]:.1f} "
                     f"| {failed_flows(series, path):,} |")
    return "\n".join(lines)


# Option values of a --quick (smoke) run and of a full one.
QUICK = {"rounds": 1, "duration": 2}
FULL = {"rounds": 7, "duration": 5}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke test: 1 round of 2 s")
    benchlib.add_common_args(p, server=POD, full=FULL)
    args = p.parse_args(argv)
    benchlib.apply_presets(args, quick=QUICK, full=FULL)
    if args.rounds < 1 or args.duration <= 0 or args.max_redo < 0:
        p.error("--rounds and --duration must be positive, --max-redo not negative")
    return args


def run_bench(args: argparse.Namespace) -> tuple[Series, dict[str, Any]]:
    """The measurement, in one three-node sandbox; returns the runs and facts
    about the sandbox."""
    series = Series(label=f"external {EXTERNAL} -> {POD} {POD_IP} on node-2",
                    paths=PATHS)
    with MultiNodeCluster(nodes=3, pods={POD: 2}) as cluster:
        topo = cluster.topo
        log(f"sandbox {topo.prefix}: namespaces {topo.prefix}-*, cgroup {topo.cgroup}, "
            f"pins {topo.bpffs}-node*")
        bench = Bench(args, cluster)
        try:
            bench.setup()
            benchlib.settle([bench.pid(n) for n in cluster.nodes])
            log(f"measuring: direct http://{POD_IP}:{POD_PORT}/ (via node-1), NodePort "
                f"http://{NODE1}:{NODE_PORT}/ (SNAT) and http://{NODE3}:{NODE_PORT}/ (DSR)")
            bench.measure(series)
            facts = {
                "agent_start_s": round(bench.agent_start_s, 1),
                "node1_nat_rev_entries_at_end": len(bench.maps[0].nat_rev),
                "node1_nat_rev_capacity": bench.maps[0].nat_rev.capacity,
                "snat_port_range": snat_port_range(),
            }
        finally:
            bench.close()
    return series, facts


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not benchlib.ready("bench/nodeport.py"):
        return 2

    started = time.monotonic()
    log(f"veer NodePort bench: {args.rounds} round(s) x {args.duration:g} s per path, "
        f"wrk -t{args.threads} -c{args.connections} -H 'Connection: close' from the external "
        f"client, cpu layout {args.cpu_layout}, {os.cpu_count()} CPU(s)")
    series, facts = run_bench(args)
    elapsed = time.monotonic() - started

    md = table(series)
    verdicts = {p: series.ratio(p) >= GOAL for p in NODEPORT_PATHS}
    goal_line = f"Goal: NodePort >= {GOAL:.2f} x direct: " + "; ".join(
        f"{SHORT[p]} {'met' if verdicts[p] else 'NOT met'} (ratio {series.ratio(p):.3f})"
        for p in NODEPORT_PATHS) + "."
    if args.rounds < 5:
        goal_line += f" (Not a test of the goal: {args.rounds} round(s).)"
    warnings = []
    failed = {p: failed_flows(series, p) for p in NODEPORT_PATHS}
    errors = {p: wrk_errors(series, p) for p in NODEPORT_PATHS}
    if any(failed.values()) or any(errors.values()):
        ports = facts["snat_port_range"]
        exhausted = bool(ports) and facts["node1_nat_rev_entries_at_end"] >= 0.9 * ports
        per_port = f"; {ports:,} SNAT ports per node address and backend" if ports else ""
        warnings.append(
            f"WARNING: flows the nodes failed to set up during the measured runs (nat_fail: "
            f"the SYN is dropped, the client retries after 1 s or more): SNAT path "
            f"{failed['nodeport']:,}, DSR path {failed['dsr']:,}; wrk errors: SNAT path "
            f"{errors['nodeport']:,}, DSR path {errors['dsr']:,}. node-1's reverse-NAT map "
            f"held {facts['node1_nat_rev_entries_at_end']:,} entries at the end (one per SNAT "
            f"port in use{per_port})."
            f"{' The SNAT ports are (nearly) all in use.' if exhausted else ''} "
            f"The NodePort rates then reflect those failures, not only the per-connection "
            f"cost.")
    redone, kept = series.redone(), series.disturbed_kept()
    notes = (
        f"wrk -t{args.threads} -c{args.connections} -H 'Connection: close' from the external "
        f"client namespace ({EXTERNAL}, in no served cgroup); {args.rounds} round(s) x "
        f"{args.duration:g} s per path, the three paths interleaved (order rotating); the "
        f"same single nginx worker ({POD} on node-2) serves every path. Direct: the client "
        f"routes {POD_CIDR} via node-1, which forwards to node-2; the replies return straight "
        f"from node-2 to the client. NodePort (externalTrafficPolicy Cluster), default mode: "
        f"node-1 DNATs to {POD_IP}:{POD_PORT} and SNATs to {NODE1}, so the replies come back "
        f"through node-1. NodePort in DSR mode: node-3 DNATs and tells node-2 the frontend; "
        f"node-2 sends the replies straight to the client from {NODE3}:{NODE_PORT}. node-2 "
        f"runs in DSR mode for every path (it then accepts DSR flows; nothing else changes). "
        f"Packets into the ingress node = packets received on eth0 of node-1 (direct, SNAT) "
        f"or node-3 (DSR) per connection, median. cpu layout {args.cpu_layout}; "
        f"{os.cpu_count()} CPUs; kernel {platform.release()}. Ratio = median rate of the "
        f"path / median rate of direct; per-round ratio = path / direct within each round. "
        f"Rounds redone because another process took time on the bench CPU: {redone}; "
        f"disturbed rounds kept (redo limit reached): {kept}. Total time {elapsed:.0f} s."
    )
    body = benchlib.report(md, goal_line, *warnings, notes, MODES_NOTE)
    benchlib.write_results(
        args, "nodeport",
        f"# veer: new connections per second from outside, direct vs NodePort (SNAT, DSR)"
        f"\n\n{body}\n",
        {
            "elapsed_s": round(elapsed, 1),
            "goal": GOAL,
            "ratios": {p: series.ratio(p) for p in NODEPORT_PATHS},
            "paired_ratios": {p: series.paired_ratios(p) for p in NODEPORT_PATHS},
            "goal_met": verdicts,
            "nodeport_flows_failed": failed,
            **facts,
            "series": series.to_json(),
        },
    )
    return 0


if __name__ == "__main__":
    benchlib.main_guard(main)
