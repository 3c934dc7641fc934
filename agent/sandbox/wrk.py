"""Run wrk inside a sandbox pod and read its summary.

    result = run_wrk(topo, client_netns, "http://10.96.1.1/", duration=5,
                     threads=2, connections=32, close=True)
    result.rate            # requests per second (= connections per second with close=True)

wrk runs through `Topology.exec(..., in_cgroup=True)`, so its sockets are in
the served cgroup and veer's socket hooks apply to them exactly as they do to
a pod's application. With `close=True` every request carries
`Connection: close`: the server closes after answering and wrk opens a new
connection for the next request, so the rate measures new connections.
"""

from __future__ import annotations

import math
import re
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from agent.sandbox.topology import Topology

WRK = shutil.which("wrk") or "/usr/bin/wrk"


@dataclass
class WrkResult:
    url: str
    rate: float  # requests/s over the whole run, as wrk prints it
    requests: int
    seconds: float
    errors: dict[str, int] = field(default_factory=dict)  # connect/read/write/timeout
    non_2xx: int = 0
    latency: dict[str, str] = field(default_factory=dict)  # "50%": "1.10ms", ...

    @property
    def error_count(self) -> int:
        return sum(self.errors.values()) + self.non_2xx

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def parse_wrk(url: str, text: str) -> WrkResult:
    """Parse wrk's text summary. Raises ValueError if it holds no result."""
    rate_m = re.search(r"^Requests/sec:\s+([\d.]+)", text, re.M)
    total_m = re.search(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m)\b", text, re.M)
    if not rate_m or not total_m:
        raise ValueError(f"no result in wrk output:\n{text}")
    scale = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}[total_m.group(3)]
    errors: dict[str, int] = {}
    err_m = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text
    )
    if err_m:
        errors = {k: int(v) for k, v in zip(("connect", "read", "write", "timeout"),
                                            err_m.groups(), strict=True) if int(v)}
    non2xx_m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    latency = dict(re.findall(r"^\s+(50%|75%|90%|99%)\s+(\S+)", text, re.M))
    return WrkResult(
        url=url,
        rate=float(rate_m.group(1)),
        requests=int(total_m.group(1)),
        seconds=float(total_m.group(2)) * scale,
        errors=errors,
        non_2xx=int(non2xx_m.group(1)) if non2xx_m else 0,
        latency=latency,
    )


def wrk_argv(url: str, duration: float, threads: int, connections: int,
             close: bool = True, extra: Sequence[str] = ()) -> list[str]:
    """wrk's command line; wrk takes whole seconds, so `duration` is rounded up."""
    seconds = max(1, math.ceil(duration))
    argv = [WRK, f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency"]
    if close:
        argv += ["-H", "Connection: close"]
    return [*argv, *extra, url]


def run_wrk(
    topo: Topology,
    netns: str,
    url: str,
    duration: float,
    threads: int = 2,
    connections: int = 32,
    close: bool = True,
    prefix: Sequence[str] = (),
) -> WrkResult:
    """Run wrk to completion in `netns`, inside the served cgroup.

    `prefix` goes before wrk's own argv (e.g. `("taskset", "-c", "0")`).
    """
    argv = [*prefix, *wrk_argv(url, duration, threads, connections, close)]
    res = topo.exec(netns, argv, timeout=duration + 60, in_cgroup=True)
    if res.returncode != 0:
        raise RuntimeError(f"wrk failed ({res.returncode}): {res.stderr.strip()}\n{res.stdout}")
    return parse_wrk(url, res.stdout)
