"""Where the agent's CPU goes per Kubernetes event: the control-plane load of
bench/compare.py (N Services of 10 endpoints each, created as fast as the API
server takes them), fed to the agent's own code in this process. Not a test.

    .venv/bin/python bench/agentcpu.py [--services N] [--rate OBJ/S] [--profile]
                                       [--min-sync-interval S]

What runs is the agent as `veer agent --kubernetes` wires it (agent/cli/main.py):
the Kubernetes source (list+watch reflectors, parsing, the Store), the
VeerNode reporter, telemetry, the bounded-frequency runner with its default
intervals, compute with its cache, the reconciler and the eBPF datapath on
real pinned maps (programs loaded so that the maps exist, but attached
nowhere: nothing on this machine is steered by them), and the status file
rewritten after every pass. Only the API server is replaced, by the
in-memory FakeApi of the unit tests (tests/unit/kubefake.py): its watches
deliver the Services and EndpointSlices bench/versus/apiload.py writes (same
objects, the slice's trigger-time annotation set when it is sent), in its
order (each Service, then its slice), at `--rate` objects per second. The
default rate is what the API server managed in the last `bench/compare.py
--loads 1000` run while veer ran (2,000 objects in 12.5 s); `--rate 0`
sends them all at once, as a relist would.

Printed, and written to bench/results/agentcpu-<time>.md and .json:
- CPU seconds of this process (every agent thread; the feeder only puts
  prepared dicts on queues) from the first object sent until the agent is
  idle (all N programmed and no pass for a second), the same window
  bench/compare.py charges to veer; per object sent;
- the same CPU split by thread (agent/metrics/threads.py, which also serves
  veer_thread_cpu_seconds_total), from each thread's CPU clock;
- of it, the CPU seconds spent in the cyclic garbage collector, by
  generation; paced as `veer agent` paces it (agent/collector.py) unless
  `--gc-threshold` says otherwise;
- passes run meanwhile, and how long after the last object was sent all N
  were in the datapath;
- one more Service with N present, to the datapath (`--one-more` times);
- this process's resident memory before the load, once idle after it, and
  at its peak, with the blocks Python's object allocator holds at the first
  two (to tell live objects from fragmentation when the figure moves),
  and after malloc_trim(0) (what C's allocator held free);
- with `--profile`: each agent thread under cProfile (start-up, the load and
  the idle wait), merged, top functions by cumulative and by own time.
  Profiling slows everything down, so its CPU figure is not comparable.

Needs root and a bpffs at /run/veer/bpf (scripts/setup.sh mounts it); pins
go to /run/veer/bpf/vr-cpu-<random> and are removed at the end.
"""

from __future__ import annotations

import argparse
import cProfile
import ctypes
import gc
import io
import ipaddress
import json
import logging
import os
import pstats
import resource
import shutil
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "bench"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from memory import status_kib  # noqa: E402
from versus.apiload import TRIGGER, ServiceSpec, batch  # noqa: E402

from agent.collector import YOUNG_COLLECTION_THRESHOLD, pace_for_agent  # noqa: E402
from agent.compute.types import L4Addr  # noqa: E402
from agent.config import AgentConfig  # noqa: E402
from agent.daemon import Agent  # noqa: E402
from agent.datapath.ebpf.backend import EbpfDatapath  # noqa: E402
from agent.datapath.ebpf.maps import SockLbMaps  # noqa: E402
from agent.datapath.ebpf.programs import SockLbPrograms, cleanup  # noqa: E402
from agent.kube.client import ENDPOINT_SLICES, NODES, SERVICES, Obj  # noqa: E402
from agent.kube.report import Identity  # noqa: E402
from agent.kube.runtime import KubeRuntime  # noqa: E402
from agent.metrics.threads import thread_cpu_seconds  # noqa: E402
from agent.model.objects import Protocol  # noqa: E402
from agent.model.snapshot import Store  # noqa: E402
from agent.sources import Source  # noqa: E402
from tests.unit.kubefake import FakeApi  # noqa: E402

NODE = "bench-node"
NODE_IP = "10.0.0.2"
NAMESPACE = "load"
LOAD_CIDR = "10.96.128.0/17"
LOAD_IPS = tuple(f"10.244.9.{i}" for i in range(3, 13))  # as bench/versus/cluster.py
BACKEND_NODE = "bench-backend"
# 2,000 objects in 12.5 s: the API server's pace in bench/compare.py's last run.
DEFAULT_RATE = 160.0
IDLE = 1.0  # no pass for this long: idle


def cpu_seconds() -> float:
    use = resource.getrusage(resource.RUSAGE_SELF)
    return use.ru_utime + use.ru_stime


class CollectorTime:
    """CPU seconds spent in the cyclic garbage collector, per generation,
    in whichever thread it ran (gc.callbacks run in the collecting one)."""

    def __init__(self) -> None:
        self.seconds = [0.0, 0.0, 0.0]
        self.collections = [0, 0, 0]
        self._started = threading.local()

    def __enter__(self) -> CollectorTime:
        gc.callbacks.append(self._on_collection)
        return self

    def __exit__(self, *_exc: object) -> None:
        gc.callbacks.remove(self._on_collection)

    def _on_collection(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started.at = time.thread_time()
        elif hasattr(self._started, "at"):
            generation = info["generation"]
            self.seconds[generation] += time.thread_time() - self._started.at
            self.collections[generation] += 1


class ThreadProfiles:
    """cProfile in every thread started from now on (cProfile sees one thread
    only); merged once those threads have ended."""

    def __init__(self) -> None:
        self.profiles: list[cProfile.Profile] = []
        self._run = threading.Thread.run

    def install(self) -> None:
        profiles, run = self.profiles, self._run

        def profiled(thread: threading.Thread) -> None:
            prof = cProfile.Profile()
            profiles.append(prof)
            prof.enable()
            try:
                run(thread)
            finally:
                prof.disable()

        threading.Thread.run = profiled  # type: ignore[method-assign]

    def uninstall(self) -> None:
        threading.Thread.run = self._run  # type: ignore[method-assign]

    def report(self, top: int) -> str:
        out = io.StringIO()
        stats = pstats.Stats(*self.profiles, stream=out)  # type: ignore[arg-type]
        stats.strip_dirs()
        for order in ("cumulative", "tottime"):
            out.write(f"\n---- top {top} by {order} ----\n")
            stats.sort_stats(order).print_stats(top)
        return out.getvalue()


class Feeder:
    """Sends the objects on the FakeApi's open watches at a steady rate."""

    def __init__(self, api: FakeApi) -> None:
        self.api = api
        self.version = 1000

    def send(self, resource: Any, obj: Obj) -> None:
        self.version += 1
        obj["metadata"]["resourceVersion"] = str(self.version)
        obj["metadata"]["uid"] = f"uid-{self.version}"
        watches = self.api._open(resource)
        assert watches, f"no watch open on {resource}"
        for w in watches:
            w.events.put({"type": "ADDED", "object": obj})

    def spec(self, spec: ServiceSpec) -> None:
        self.send(SERVICES, spec.service(NAMESPACE))
        sliced = spec.slice(NAMESPACE)
        # When it is sent (spec.slice stamps it when built, which is now).
        sliced["metadata"]["annotations"][TRIGGER] = datetime.now(UTC).strftime(
            "%Y-%m-%dT%H:%M:%S.%fZ")
        self.send(ENDPOINT_SLICES, sliced)

    def feed(self, specs: list[ServiceSpec], rate: float) -> float:
        """Returns the monotonic time the last object was sent."""
        start = time.monotonic()
        for i, spec in enumerate(specs):
            if rate > 0:
                due = start + 2 * i / rate
                delay = due - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            self.spec(spec)
        return time.monotonic()


def frontend(spec: ServiceSpec) -> L4Addr:
    return L4Addr(ipaddress.ip_address(spec.cluster_ip), spec.ports[0].port, Protocol.TCP)


def wait_for(what: str, cond: Any, timeout: float, every: float = 0.01) -> float:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not after {timeout:.0f} s")
        time.sleep(every)
    return time.monotonic()


def wait_idle(agent: Agent, timeout: float) -> float:
    """Until no pass has run for IDLE seconds; the time the last one ended."""
    deadline = time.monotonic() + timeout
    passes, since = agent.telemetry.passes, time.monotonic()
    while time.monotonic() - since < IDLE:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the agent is still busy after {timeout:.0f} s")
        time.sleep(0.05)
        now = agent.telemetry.passes
        if now != passes:
            passes, since = now, time.monotonic()
    return since


def run(args: argparse.Namespace, pins: str, work: str) -> dict[str, Any]:
    api = FakeApi()
    api.put(NODES, {"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE},
                    "status": {"addresses": [{"type": "InternalIP", "address": NODE_IP}]}})
    SockLbPrograms(pins).load()
    datapath = EbpfDatapath(SockLbMaps.open(pins))
    config = AgentConfig(
        node_name=NODE, kubernetes=True, bpffs=pins, min_sync_interval=args.min_sync_interval,
        service_cidrs=frozenset({ipaddress.ip_network("10.96.0.0/16")}),
        cluster_cidrs=frozenset({ipaddress.ip_network("10.244.0.0/16")}),
    )
    runtimes: list[KubeRuntime] = []

    def source(store: Store) -> Source:
        runtimes.append(KubeRuntime(api, store, NODE, Identity("ebpf", "bench")))
        return runtimes[-1]

    profiles = ThreadProfiles()
    if args.profile:
        profiles.install()
    status = os.path.join(work, "status.json")
    agent = Agent(config, datapath, status_file=status, mode=("ebpf", "bench"), source=source)
    for runtime in runtimes:
        runtime.attach(agent)
    specs = batch(args.services, LOAD_CIDR, LOAD_IPS, BACKEND_NODE, prefix="load")
    feeder = Feeder(api)
    try:
        agent.start()
        wait_for("the first pass", lambda: agent.reconciler.last_result is not None, 60)
        wait_for("the watches", lambda: api._open(SERVICES) and api._open(ENDPOINT_SLICES), 60)
        wait_idle(agent, 60)
        passes0 = agent.telemetry.passes
        before, blocks0 = status_kib(os.getpid()), sys.getallocatedblocks()
        cpu0, t0 = cpu_seconds(), time.monotonic()
        threads0 = thread_cpu_seconds()
        with CollectorTime() as collector:
            last = feeder.feed(specs, args.rate)
            keys = [frontend(s) for s in specs]
            done = wait_for("all N in the datapath",
                            lambda: all(datapath.service_id(k) is not None for k in keys),
                            args.timeout, every=0.05)
            wait_idle(agent, args.timeout)
        cpu = cpu_seconds() - cpu0  # the idle wait itself costs next to nothing
        # Resident memory against the blocks Python's allocator holds: the
        # same blocks in more resident memory is fragmentation, not objects.
        after, blocks1 = status_kib(os.getpid()), sys.getallocatedblocks()
        threads1 = thread_cpu_seconds()
        # What C's allocator holds free but resident: malloc_trim(0) (glibc)
        # hands it back to the kernel. After the CPU figures: not charged.
        libc = ctypes.CDLL(None)
        if hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)
        trimmed = status_kib(os.getpid())
        by_thread = {name: round(seconds - threads0.get(name, 0.0), 2)
                     for name, seconds in threads1.items()}
        passes = agent.telemetry.passes - passes0
        feed_s = last - t0
        ones = []
        for i in range(args.one_more):
            spec = ServiceSpec(f"one-more-{i}", f"10.96.2.{i + 10}", specs[0].ports,
                               LOAD_IPS, BACKEND_NODE)
            sent = time.monotonic()
            feeder.spec(spec)
            got = wait_for("one more", lambda s=spec: datapath.service_id(frontend(s))  # type: ignore[misc]
                           is not None, 60, every=0.001)
            ones.append(got - sent)
            wait_idle(agent, 60)
        with open(status) as f:
            listed = len(json.load(f)["frontends"])
    finally:
        agent.stop()
        for runtime in runtimes:
            runtime.stop()
        profiles.uninstall()
    return {
        "services": args.services, "objects": 2 * args.services, "rate": args.rate,
        "feed_s": feed_s, "cpu_s": cpu, "cpu_per_object_ms": cpu / (2 * args.services) * 1000,
        "by_thread_s": dict(sorted(by_thread.items(), key=lambda kv: -kv[1])),
        "passes": passes, "all_programmed_after_last_s": max(0.0, done - last),
        "one_more_s": ones, "status_file_frontends": listed,
        "rss_before_mib": before["VmRSS"] / 1024, "rss_idle_mib": after["VmRSS"] / 1024,
        "rss_peak_mib": after["VmHWM"] / 1024, "rss_trimmed_mib": trimmed["VmRSS"] / 1024,
        "blocks_before": blocks0, "blocks_idle": blocks1,
        "gc_threshold": gc.get_threshold(), "gc_seconds": collector.seconds,
        "gc_collections": collector.collections,
        "profile": profiles.report(args.top) if args.profile else "",
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--services", type=int, default=1000)
    p.add_argument("--rate", type=float, default=DEFAULT_RATE,
                   help=f"objects sent per second (default {DEFAULT_RATE:.0f}; 0: all at once)")
    p.add_argument("--one-more", type=int, default=3)
    p.add_argument("--min-sync-interval", type=float, default=0.0,
                   help="the agent's --min-sync-interval (default 0, the CLI's; the Helm "
                   "chart sets 0.1, and bench/compare.py runs veer with the chart's)")
    p.add_argument("--gc-threshold", type=int, default=None, metavar="N",
                   help="collect the young generation every N net allocations (default: "
                        f"{YOUNG_COLLECTION_THRESHOLD:,}, as `veer agent` sets it, "
                        "agent/collector.py; CPython's own is 700; 0: never)")
    p.add_argument("--profile", action="store_true", help="cProfile every agent thread")
    p.add_argument("--top", type=int, default=35, help="functions listed per profile order")
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = p.parse_args()
    if args.gc_threshold is not None and args.gc_threshold < 0:
        p.error("--gc-threshold: 0 (no automatic collection) or more")
    if os.geteuid() != 0:
        print("bench/agentcpu.py needs root (eBPF maps)", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    pace_for_agent(YOUNG_COLLECTION_THRESHOLD if args.gc_threshold is None else args.gc_threshold)
    tag = uuid.uuid4().hex[:8]
    pins = f"/run/veer/bpf/vr-cpu-{tag}"
    work = tempfile.mkdtemp(prefix=f"vr-cpu-{tag}-")
    try:
        r = run(args, pins, work)
    finally:
        cleanup("/nonexistent", pins)
        shutil.rmtree(pins, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    ones = ", ".join(f"{t * 1000:.0f} ms" for t in r["one_more_s"])
    lines = [
        f"# bench/agentcpu.py: {r['services']:,} Services x 10 endpoints, "
        f"{r['objects']:,} objects at {r['rate']:.0f}/s, "
        f"--min-sync-interval {args.min_sync_interval:g}, "
        f"garbage collector thresholds {'/'.join(str(t) for t in r['gc_threshold'])}"
        f"{' (under cProfile: CPU not comparable)' if args.profile else ''}",
        "",
        f"- objects sent in {r['feed_s']:.1f} s; all {r['services']:,} in the datapath "
        f"{r['all_programmed_after_last_s']:.2f} s after the last was sent",
        f"- agent CPU from the first object until idle: {r['cpu_s']:.2f} s "
        f"({r['cpu_per_object_ms']:.2f} ms per object), {r['passes']} passes",
        "- of which, by thread (the agent's names; MainThread is this script's feeder): "
        + ", ".join(f"{name} {sec:.2f} s" for name, sec in r["by_thread_s"].items() if sec > 0),
        "- of which in the cyclic garbage collector, by generation (collections, CPU s): "
        + ", ".join(f"{g}: {n:,}, {sec:.2f} s" for g, (n, sec)
                    in enumerate(zip(r["gc_collections"], r["gc_seconds"], strict=True))),
        f"- one more Service with {r['services']:,} present, to the datapath: {ones}",
        f"- status file lists {r['status_file_frontends']:,} frontends",
        f"- this process's resident memory: {r['rss_before_mib']:.0f} MiB before the load, "
        f"{r['rss_idle_mib']:.0f} MiB once idle after it, peak since start "
        f"(loading the programs included) {r['rss_peak_mib']:.0f} MiB; "
        f"Python's allocated blocks {r['blocks_before']:,} before, {r['blocks_idle']:,} idle "
        "(the feeder's prepared objects are in both); "
        f"{r['rss_trimmed_mib']:.0f} MiB after malloc_trim(0)",
    ]
    text = "\n".join(lines)
    print(text)
    if r["profile"]:
        print(r["profile"])
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    md = args.out / f"agentcpu-{stamp}.md"
    md.write_text(text + ("\n\n```\n" + r["profile"] + "\n```\n" if r["profile"] else "\n"))
    (args.out / f"agentcpu-{stamp}.json").write_text(json.dumps(
        {"args": {k: str(v) for k, v in vars(args).items()}, **r}, indent=1) + "\n")
    shown = md.relative_to(REPO) if md.is_relative_to(REPO) else md
    print(f"results: {shown} and {md.with_suffix('.json').name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
