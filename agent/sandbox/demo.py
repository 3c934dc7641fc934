"""`veer sandbox`: build the one-node sandbox, run the agent on the example
manifests, send real traffic, print a report, and remove everything.

Every figure in the report is measured during the run it is printed in.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from agent.datapath.ebpf.maps import SockLbMaps
from agent.errors import EnvironmentProblem
from agent.sandbox.cluster import EXAMPLES, SandboxCluster
from agent.sandbox.topology import wait_for_interrupt

FLOWS: Sequence[tuple[str, tuple[str, ...]]] = (
    ("default/web:http       10.96.0.10:80/TCP", ("tcp", "10.96.0.10", "80")),
    ("default/web:admin      10.96.0.10:8081/TCP", ("tcp", "10.96.0.10", "8081")),
    ("default/echo:dns       10.96.0.53:53/UDP", ("udp", "10.96.0.53", "53")),
    ("default/web-dual:http  [fd00:96::20]:80/TCP", ("tcp", "fd00:96::20", "80")),
    ("default/web-dual:dns   [fd00:96::20]:53/UDP", ("udp", "fd00:96::20", "53")),
)


def _bar(share: float, width: int = 30) -> str:
    return "#" * round(share * width)


def _print_shares(title: str, result: dict[str, Any]) -> None:
    answers: dict[str, int] = result["answers"]
    total = sum(answers.values())
    errors = result["errors"]
    print(f"\n  {title}")
    for backend, count in sorted(answers.items()):
        share = count / total if total else 0.0
        print(f"    {backend:<14} {count:>5}  {share:6.1%}  {_bar(share)}")
    if errors:
        print(f"    errors: {errors}")
    mismatch = result.get("peer_mismatch", 0)
    print(f"    peer address seen by the client: "
          f"{'the Service address' if not mismatch else f'{mismatch} mismatches!'}")


def run_demo(keep: bool = False, requests: int = 300) -> int:
    if os.geteuid() != 0:
        raise EnvironmentProblem("the sandbox needs root: run `sudo ./scripts/sandbox`")
    print("veer sandbox: one node, four web pods (nginx + UDP echo), a client pod,")
    print(f"the manifests in {EXAMPLES}, and a veer agent serving them.\n")
    start = time.monotonic()
    with SandboxCluster() as cluster:
        cluster.start_agent()
        status = cluster.status() or {}
        print(f"agent ready in {time.monotonic() - start:.1f} s "
              f"(namespaces, nginx, BPF compile, first sync); "
              f"{len(status.get('frontends', {}))} frontends programmed")
        for problem in status.get("problems", []):
            print(f"  reported and skipped: {problem}")

        print(f"\n== share of {requests} connections (datagrams for UDP) per backend "
              "(web-d is not ready and must get none)")
        for title, args in FLOWS:
            _print_shares(title, cluster.probe(*args, "--count", str(requests)))

        print("\n== refusals (immediate, no timeout)")
        for title, args in (
            ("default/empty (no endpoints)   10.96.0.99:80", ("tcp", "10.96.0.99", "80")),
            ("port not exposed              10.96.0.10:9999", ("tcp", "10.96.0.10", "9999")),
            ("no such Service               10.96.200.1:80", ("tcp", "10.96.200.1", "80")),
        ):
            result = cluster.probe(*args, "--count", "10", "--timeout", "5")
            took = result.get("error_latency_us", {}).get("p50", "-")
            print(f"  {title}: {result['errors'] or result['answers']}  (median {took} µs to fail)")

        print(f"\n== latency of one HTTP request on a new connection ({requests} each, µs)")
        direct = cluster.probe("tcp", "10.244.1.2", "8080", "--count", str(requests))
        via = cluster.probe("tcp", "10.96.0.10", "80", "--count", str(requests))
        print(f"  {'path':<34} {'p50':>8} {'p90':>8} {'p99':>8}")
        for label, res in (("direct to pod 10.244.1.2:8080", direct),
                           ("through ClusterIP 10.96.0.10:80", via)):
            lat = res["latency_us"]
            print(f"  {label:<34} {lat['p50']:>8} {lat['p90']:>8} {lat['p99']:>8}")

        maps = SockLbMaps.open(cluster.topo.bpffs)
        try:
            counters = maps.counters()
        finally:
            maps.close()
        print("\n== the socket hooks' own counters (per-CPU map veer_counters)")
        print("  " + ", ".join(f"{k}={v}" for k, v in sorted(counters.items())))

        if keep:
            _keep_running(cluster)
    print("\nsandbox removed: namespaces, cgroup, pins and processes are gone.")
    return 0


def _keep_running(cluster: SandboxCluster) -> None:
    topo = cluster.topo
    procs = os.path.join(topo.cgroup, "cgroup.procs")
    print("\n== the sandbox keeps running until Ctrl-C")
    print("  a shell in the client pod (inside the served cgroup):")
    print(f"    sudo sh -c 'echo $$ > {procs} && exec ip netns exec {cluster.client} bash'")
    print("  then, for example:")
    print(f"    {sys.executable} -m agent.sandbox.probe tcp 10.96.0.10 80 --count 10")
    print(f"  manifests (edit them; the agent follows): {cluster.manifests}")
    print(f"  agent log: {cluster.agent_log}; status: {cluster.status_file}")
    print("  ask the agent (docs/debugging.md): veer status | services | explain ... "
          f"--socket {cluster.api_socket}")
    wait_for_interrupt()
