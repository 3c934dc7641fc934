#!/usr/bin/env python3
"""What sockmap acceleration does to same-node TCP: throughput and
request/response latency at 64 B, 4 KB and 64 KB messages, with and without
it, through a ClusterIP.

    .venv/bin/python bench/sockmap.py [--quick]        (make bench-sockmap)

Setup: the single-node sandbox (agent/sandbox/cluster.py). In pod web-a run
an iperf3 server and a sockperf server; two Services reach them, `plain` and
`spliced`, the same but for a TrafficPolicy with `acceleration.sockmap: true`
on `spliced`. The client pod measures, per message size and per Service
(interleaved, order alternating each round):

  throughput  iperf3 -c VIP -l SIZE -t T (one stream; Mbit/s received)
  latency     sockperf ping-pong --tcp -m SIZE -t T (round trip, p50/p99 us)

Honesty checks: before measuring, the agent must report sockmap usable
(else the bench says why and stops); during the spliced runs the kernel's
accel_spliced counter must move, and during the plain runs it must not.

Results: a Markdown table on stdout and in bench/results/sockmap-<time>.md,
the raw numbers in the .json next to it.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchlib import write_results  # noqa: E402

from agent.datapath.ebpf.maps import SockLbMaps  # noqa: E402
from agent.sandbox.cluster import SandboxCluster  # noqa: E402
from agent.sandbox.servers import wait_listening  # noqa: E402
from tests.datapath.manifests import POD_IPS  # noqa: E402

SIZES = (64, 4096, 65536)
IPERF_PORT, SOCKPERF_PORT = 5201, 11111
VIPS = {"plain": "10.96.3.1", "spliced": "10.96.3.2"}


def manifests() -> str:
    docs: list[dict[str, Any]] = []
    for name, vip in VIPS.items():
        docs.append({"apiVersion": "v1", "kind": "Service",
                     "metadata": {"name": name, "namespace": "default"},
                     "spec": {"clusterIP": vip, "ports": [
                         {"name": "iperf", "protocol": "TCP", "port": IPERF_PORT,
                          "targetPort": IPERF_PORT},
                         {"name": "sockperf", "protocol": "TCP", "port": SOCKPERF_PORT,
                          "targetPort": SOCKPERF_PORT}]}})
        docs.append({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                     "metadata": {"name": f"{name}-1", "namespace": "default",
                                  "labels": {"kubernetes.io/service-name": name}},
                     "addressType": "IPv4",
                     "ports": [{"name": "iperf", "protocol": "TCP", "port": IPERF_PORT},
                               {"name": "sockperf", "protocol": "TCP", "port": SOCKPERF_PORT}],
                     "endpoints": [{"addresses": [POD_IPS["web-a"]],
                                    "conditions": {"ready": True}}]})
    docs.append({"apiVersion": "veer.dev/v1alpha1", "kind": "TrafficPolicy",
                 "metadata": {"name": "spliced", "namespace": "default"},
                 "spec": {"targetRefs": [{"name": "spliced"}],
                          "acceleration": {"sockmap": True}}})
    return "\n---\n".join(json.dumps(d) for d in docs) + "\n"


def spliced_count(bpffs: str) -> int:
    maps = SockLbMaps.open(bpffs)
    try:
        return maps.counters()["accel_spliced"]
    finally:
        maps.close()


def throughput(c: SandboxCluster, vip: str, size: int, seconds: float) -> float:
    res = c.topo.exec(c.client, ["iperf3", "-c", vip, "-p", str(IPERF_PORT), "-l", str(size),
                                 "-t", str(seconds), "-J"], timeout=seconds + 60)
    data = json.loads(res.stdout)
    if "error" in data:
        raise RuntimeError(f"iperf3: {data['error']}")
    return float(data["end"]["sum_received"]["bits_per_second"]) / 1e6


# sockperf's largest message is a little under 64 KiB.
SOCKPERF_MAX = 65000


def latency(c: SandboxCluster, vip: str, size: int, seconds: float) -> tuple[float, float]:
    res = c.topo.exec(c.client, ["sockperf", "ping-pong", "--tcp", "-i", vip,
                                 "-p", str(SOCKPERF_PORT), "-m", str(min(size, SOCKPERF_MAX)),
                                 "-t", str(int(seconds))], timeout=seconds + 60)
    text = res.stdout + res.stderr
    p50 = re.search(r"percentile 50\.000 =\s*([\d.]+)", text)
    p99 = re.search(r"percentile 99\.000 =\s*([\d.]+)", text)
    if not (p50 and p99):
        raise RuntimeError(f"sockperf printed no percentiles:\n{text[-2000:]}")
    # sockperf reports half the round trip ("latency"); double it for the RTT.
    return 2 * float(p50.group(1)), 2 * float(p99.group(1))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="one round of 1 s (a smoke test)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = p.parse_args()
    if args.quick:
        args.rounds, args.seconds = 1, 1.0
    started = time.monotonic()
    runs: dict[str, dict[int, dict[str, list[float]]]] = {
        name: {s: {"mbps": [], "p50": [], "p99": []} for s in SIZES} for name in VIPS}
    with SandboxCluster() as c:
        c.start_agent()
        status = subprocess.run([sys.executable, "-m", "agent.cli.main", "status", "-o", "json",
                                 "--socket", c.api_socket], capture_output=True, text=True)
        sockmap = json.loads(status.stdout).get("sockmap", "")
        if not sockmap.startswith("usable"):
            print(f"sockmap acceleration is not usable here: {sockmap}")
            return 1
        pod = c.topo.pods["web-a"]
        c.topo.spawn(pod.netns, ["iperf3", "-s", "-p", str(IPERF_PORT)])
        c.topo.spawn(pod.netns, ["sockperf", "server", "--tcp", "-p", str(SOCKPERF_PORT)])
        for port in (IPERF_PORT, SOCKPERF_PORT):
            wait_listening(c.topo, pod, port)
        c.write_manifest("bench.yaml", manifests())
        for vip in VIPS.values():
            c.wait_frontend(f"{vip}:{IPERF_PORT}/TCP", [f"{POD_IPS['web-a']}:{IPERF_PORT}/TCP"])
        for rnd in range(args.rounds):
            order = list(VIPS) if rnd % 2 == 0 else list(reversed(VIPS))
            for size in SIZES:
                for name in order:
                    before = spliced_count(c.topo.bpffs)
                    mbps = throughput(c, VIPS[name], size, args.seconds)
                    p50, p99 = latency(c, VIPS[name], size, args.seconds)
                    moved = spliced_count(c.topo.bpffs) - before
                    if (name == "spliced") != (moved > 0):
                        raise RuntimeError(f"{name} at {size} B: accel_spliced moved by {moved}")
                    runs[name][size]["mbps"].append(mbps)
                    runs[name][size]["p50"].append(p50)
                    runs[name][size]["p99"].append(p99)
                    print(f"round {rnd + 1} {name:8} {size:6} B  {mbps:9.0f} Mbit/s  "
                          f"p50 {p50:7.1f} us  p99 {p99:7.1f} us", flush=True)

    def med(name: str, size: int, what: str) -> float:
        return statistics.median(runs[name][size][what])

    lines = ["# veer: sockmap acceleration, same-node TCP through a ClusterIP", "",
             "| message | throughput plain -> spliced (Mbit/s, median) | ratio | "
             "RTT p50 plain -> spliced (us) | RTT p99 plain -> spliced (us) |",
             "|---:|---:|---:|---:|---:|"]
    for size in SIZES:
        plain, spliced = med("plain", size, "mbps"), med("spliced", size, "mbps")
        lines.append(
            f"| {size:,} B | {plain:,.0f} -> {spliced:,.0f} | {spliced / plain:.2f} | "
            f"{med('plain', size, 'p50'):.1f} -> {med('spliced', size, 'p50'):.1f} | "
            f"{med('plain', size, 'p99'):.1f} -> {med('spliced', size, 'p99'):.1f} |")
    lines += ["", f"iperf3 (one stream, -l SIZE) and sockperf ping-pong --tcp (-m SIZE; RTT = "
              f"twice its one-way figure), {args.rounds} round(s) x {args.seconds:g} s per "
              f"test (sockperf's messages are at most {SOCKPERF_MAX:,} B), plain and spliced "
              f"interleaved; client pod -> ClusterIP -> web-a on the "
              f"same node. Total time {time.monotonic() - started:.0f} s."]
    text = "\n".join(lines) + "\n"
    print(text)
    write_results(args, "sockmap", text,
                  {"runs": {n: {str(s): v for s, v in r.items()} for n, r in runs.items()}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
