"""The load tools, run in a client's namespace on the bench CPU:

    new connections per second   wrk -t2 -c32 -H 'Connection: close'
    request/response latency     wrk -t1 -c1 (one kept-alive connection, one
                                 request in flight: a ping-pong), p50 and p99
                                 of its latency histogram
    single-stream throughput     iperf3 -c ... -t N, one TCP stream

Latency is measured with wrk rather than sockperf: sockperf spends a fixed
~2.2 s starting each run, which over every path, round and load would cost
about a third of the bench's time budget; wrk starts at once, talks to the
same nginx as the other figures, and its histogram has microsecond
resolution.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

from agent.sandbox.wrk import WrkResult, parse_wrk, wrk_argv
from versus.cluster import BenchCluster

UNITS = {"us": 1.0, "ms": 1e3, "s": 1e6}


def micros(text: str) -> float:
    """wrk's "38.12us" / "1.20ms" / "2.00s" in microseconds."""
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if not m:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(m[1]) * UNITS[m[2]]


def wrk(cluster: BenchCluster, netns: str, cgroup: str, url: str, seconds: int,
        threads: int, connections: int, close: bool, prefix: Sequence[str]) -> WrkResult:
    argv = [*prefix, *wrk_argv(url, seconds, threads, connections, close=close)]
    res = cluster.exec(netns, argv, cgroup=cgroup, timeout=seconds + 60)
    if res.returncode != 0:
        raise RuntimeError(f"wrk {url} failed ({res.returncode}): {res.stderr.strip()}")
    return parse_wrk(url, res.stdout)


def latency(result: WrkResult) -> tuple[float, float]:
    """(p50, p99) in microseconds."""
    return micros(result.latency["50%"]), micros(result.latency["99%"])


def iperf3(cluster: BenchCluster, netns: str, cgroup: str, host: str, port: int,
           seconds: int, prefix: Sequence[str]) -> float:
    """Received bits per second of one TCP stream."""
    argv = [*prefix, "iperf3", "-c", host, "-p", str(port), "-t", str(seconds), "-J",
            "--connect-timeout", "3000"]
    res = cluster.exec(netns, argv, cgroup=cgroup, timeout=seconds + 60)
    try:
        data = json.loads(res.stdout)
    except json.JSONDecodeError:
        data = {}
    if res.returncode != 0 or "error" in data:
        raise RuntimeError(f"iperf3 {host}:{port} failed ({res.returncode}): "
                           f"{data.get('error') or res.stderr.strip()}")
    return float(data["end"]["sum_received"]["bits_per_second"])
