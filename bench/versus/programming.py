"""The control-plane figures of one proxy, alone on the machine's CPUs.

For each N, each proxy in turn is started afresh while the others are
stopped (so that none competes with it for the 2 CPUs, and its memory peak
and CPU time are its own), and then:

- all answering: N Services (10 endpoints each, the load pod's ten
  addresses) are created as fast as the API server takes them; the clock
  runs from the moment the last object was created until the last Service
  created and a random sample of the others all answer HTTP from the
  proxy's client pod (waiter.py). Both proxies program from a consistent
  view (kube-proxy syncs its whole state, veer reconciles a snapshot of
  its store), so the last Service answering means the earlier ones are in;
  that every one of the N is programmed is then checked in the proxy's own
  state (veer's status file, kube-proxy's nft map or iptables rules).
- one more: with the N present, one more Service is created and timed to
  its first answer, a few times (each removed after).
- network programming latency: p50 and p99 of the proxy's own
  kubeproxy_network_programming_duration_seconds histogram, for the
  changes made during the run (the histogram before them is subtracted),
  interpolated within its buckets as Prometheus' histogram_quantile does.
- resources: the proxy's CPU seconds (user + system, with the children it
  waited for: kube-proxy's iptables-restore and nft) from the first object
  created until it is idle again; its peak resident memory (process and
  live children, sampled every 0.2 s) and its steady memory once idle.
"""

from __future__ import annotations

import math
import os
import random
import re
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import benchlib
from benchlib import log

from agent.metrics import exposition
from versus.apiload import ApiWriter, Port, ServiceSpec, batch
from versus.cluster import BACKEND_NODE, LOAD_IPS, BenchCluster
from versus.proxies import Proxy, Waiter, cpu_with_children, tree_rss_kib, wait_answering

LOAD_NAMESPACE = "load"
LOAD_CIDR = "10.96.128.0/17"
ONE_MORE_CIDR = "10.96.2.0/24"
SAMPLE = 20
HISTOGRAM = "kubeproxy_network_programming_duration_seconds"
THREAD_CPU = "veer_thread_cpu_seconds_total"  # veer's own; kube-proxy has none


@dataclass
class CpResult:
    proxy: str
    services: int
    create_s: float  # how long the writer took to create them
    all_answering_s: float
    one_more_s: list[float]
    programmed: int  # of the N, found in the proxy's own state
    programming_p50_s: float | None
    programming_p99_s: float | None
    programming_count: int
    cpu_s: float
    rss_peak_mib: float
    rss_steady_mib: float
    rss_idle_mib: float  # before the N were created
    others_cpu_s: float  # CPU time of other jobs on the machine meanwhile (disturbance)
    notes: list[str] = field(default_factory=list)
    round: int = 0  # which of the control-plane rounds of this proxy and N
    # The proxy's CPU seconds over the same window by thread name, from its
    # own metric (veer only): where cpu_s went.
    cpu_by_thread_s: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def load_batch(count: int) -> list[ServiceSpec]:
    return batch(count, LOAD_CIDR, LOAD_IPS, BACKEND_NODE, prefix="load")


# ---- the histogram --------------------------------------------------------------


def histogram(text: str) -> list[tuple[float, float]]:
    """(upper bound, cumulative count) of the programming histogram, summed
    over its label sets."""
    buckets: dict[float, float] = {}
    pattern = re.compile(rf'^{HISTOGRAM}_bucket{{(?:[^}}]*,)?le="([^"]+)"[^}}]*}} (\S+)$', re.M)
    for le, value in pattern.findall(text):
        bound = math.inf if le == "+Inf" else float(le)
        buckets[bound] = buckets.get(bound, 0.0) + float(value)
    return sorted(buckets.items())


def thread_cpu(text: str) -> dict[str, float]:
    """CPU seconds by thread name from veer_thread_cpu_seconds_total."""
    # Only its lines: the parser knows veer's exposition, not every proxy's.
    ours = "\n".join(line for line in text.splitlines() if line.startswith(THREAD_CPU + "{"))
    samples = exposition.parse(ours).get(THREAD_CPU, {})
    return {dict(labels)["thread"]: value for labels, value in samples.items()}


def thread_cpu_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """What each thread spent between two scrapes, largest first; a thread
    that started meanwhile counts from zero, one that ended is left out."""
    delta = {name: after[name] - before.get(name, 0.0) for name in after}
    return dict(sorted(((n, d) for n, d in delta.items() if d > 0),
                       key=lambda item: (-item[1], item[0])))


def quantile(q: float, before: list[tuple[float, float]],
             after: list[tuple[float, float]]) -> tuple[float | None, int]:
    """histogram_quantile(q) of after - before; (None, 0) if nothing was observed."""
    old = dict(before)
    delta = [(b, c - old.get(b, 0.0)) for b, c in after]
    total = delta[-1][1] if delta else 0.0
    if total <= 0:
        return None, 0
    rank = q * total
    lower, below = 0.0, 0.0
    for bound, count in delta:
        if count >= rank:
            if math.isinf(bound):
                return lower, int(total)  # above the last finite bucket
            inside = count - below
            share = (rank - below) / inside if inside else 1.0
            return lower + (bound - lower) * share, int(total)
        lower, below = bound, count
    return lower, int(total)


# ---- the run ----------------------------------------------------------------------


class RssSampler:
    def __init__(self, pid: int, every: float = 0.2) -> None:
        self.pid, self.every = pid, every
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss_kib(self.pid))
            self._stop.wait(self.every)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def start_alone(cluster: BenchCluster, proxy: Proxy, bench_targets: list[tuple[str, int]],
                timeout: float) -> float:
    """Start `proxy` afresh and wait until it has synced, the bench Service
    answers through it and it is idle; returns the start-up time."""
    start = time.monotonic()
    proxy.start()
    proxy.wait_ready(timeout)
    wait_answering(cluster, proxy, bench_targets, timeout)
    took = time.monotonic() - start
    benchlib.settle([proxy.pid], timeout=60)
    return took


def wait_programmed(proxy: Proxy, addresses: set[str], timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while True:
        got = proxy.programmed(addresses)
        if got == len(addresses) or time.monotonic() > deadline:
            return got
        proxy.check_alive()
        time.sleep(2.0)


def measure(cluster: BenchCluster, writer: ApiWriter, proxy: Proxy, count: int,
            one_more: int, timeout: float, seed: int) -> CpResult:
    """`proxy` is running alone and idle; creates `count` Services and leaves
    them in place."""
    specs = load_batch(count)
    rng = random.Random(seed)
    sample = [specs[-1], *rng.sample(specs[:-1], min(SAMPLE, count - 1))]
    targets = [fe for spec in sample for fe in spec.frontends()]
    waiter = Waiter(cluster, proxy, targets)
    text0 = proxy.metrics()
    metrics0, threads0 = histogram(text0), thread_cpu(text0)
    rss_idle = tree_rss_kib(proxy.pid)
    sampler = RssSampler(proxy.pid)
    notes: list[str] = []
    ours = [*cluster.background_pids(), os.getpid()]
    try:
        cpu0 = cpu_with_children(proxy.pid)
        busy0 = machine_busy() - sum(cpu_with_children(p) for p in ours)
        t0 = time.monotonic()
        last = writer.create(specs, LOAD_NAMESPACE)
        waiter.go()
        done = float(waiter.result(timeout)["done"])
    finally:
        waiter.close()
    answering = max(0.0, done - last)
    log(f"  {proxy.key}: {count:,} Services created in {last - t0:.1f} s; the last and a "
        f"sample of {len(sample) - 1} answered {answering:.2f} s after the last was created")
    programmed = wait_programmed(proxy, {s.cluster_ip for s in specs}, timeout=120)
    if programmed != count:
        notes.append(f"only {programmed} of {count} Services in its state after 120 s")
    benchlib.settle([proxy.pid], timeout=120)
    cpu = cpu_with_children(proxy.pid) - cpu0
    others = machine_busy() - sum(cpu_with_children(p) for p in ours) - busy0 - cpu
    by_thread = thread_cpu_delta(threads0, thread_cpu(proxy.metrics()))
    if by_thread:
        shown = {name: s for name, s in by_thread.items() if s >= 0.005}
        rest = len(by_thread) - len(shown)
        log(f"  {proxy.key}: CPU by thread: "
            + ", ".join(f"{name} {s:.2f} s" for name, s in shown.items())
            + (f" ({rest} more under 0.005 s)" if rest else ""))
    steady = tree_rss_kib(proxy.pid)
    ones = [one_more_time(cluster, writer, proxy, i, timeout) for i in range(one_more)]
    peak = sampler.stop()
    p50, n = quantile(0.5, metrics0, histogram(proxy.metrics()))
    p99, _ = quantile(0.99, metrics0, histogram(proxy.metrics()))
    log(f"  {proxy.key}: one more Service answered after "
        f"{', '.join(f'{t * 1000:.0f} ms' for t in ones)}; programming latency p50 "
        f"{fmt_s(p50)} p99 {fmt_s(p99)} ({n} observations); CPU {cpu:.1f} s; RSS peak "
        f"{peak / 1024:.0f} MiB, steady {steady / 1024:.0f} MiB; other jobs {others:.1f} s CPU;"
        f" {proxy.describe_rules()}")
    return CpResult(proxy.key, count, last - t0, answering, ones, programmed, p50, p99, n,
                    cpu, peak / 1024, steady / 1024, rss_idle / 1024, max(0.0, others), notes,
                    cpu_by_thread_s=by_thread)


def machine_busy() -> float:
    """Busy CPU seconds of the whole machine since boot."""
    return sum(busy for busy, _ in benchlib.cpu_jiffies().values()) / benchlib.CLK_TCK


def one_more_time(cluster: BenchCluster, writer: ApiWriter, proxy: Proxy, index: int,
                  timeout: float) -> float:
    spec = ServiceSpec(f"one-more-{index}", f"10.96.2.{index + 10}", (Port("http", 80, 8080),),
                       LOAD_IPS, BACKEND_NODE)
    waiter = Waiter(cluster, proxy, spec.frontends())
    try:
        created = writer.create([spec], LOAD_NAMESPACE)
        waiter.go()
        done = float(waiter.result(timeout)["done"])
    finally:
        waiter.close()
    writer.delete([spec], LOAD_NAMESPACE)
    benchlib.settle([proxy.pid], timeout=30)
    return max(0.0, done - created)


def fmt_s(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value * 1000:.0f} ms" if value < 10 else f"{value:.1f} s"
