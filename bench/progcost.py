#!/usr/bin/env python3
"""What veer's kernel programs cost per connection on the socket path, from
the kernel's own BPF statistics (kernel.bpf_stats_enabled: each program's
run count and run time).

    .venv/bin/python bench/progcost.py [--quick]       (make bench-progcost)

Setup: make bench's cluster (bench/versus/cluster.py: the real control
plane, one namespace per node, nginx on the backend node) with veer alone
serving the bench Service, and make bench's placement (tools, nginx and the
softirqs on the last CPU). Paths, interleaved round by round, each run
`wrk -t2 -c32 'Connection: close'` (one request per new connection):

    direct     a pod of the plain node -> the pod IP: no program runs
    veer       a pod of veer's node -> the ClusterIP: translated at connect()
    veer-pod   a pod of veer's node -> the pod IP: veer's programs run and
               find nothing to do

For each veer program that ran: runs per connection, ns per run and ns per
connection (medians over rounds). The statistics cost time themselves (two
clock reads per run), so the rates here are not make bench's and ns per run
includes that overhead; compare programs and paths, not machines.
bpf_stats is a switch of the whole kernel: turned on for the rounds, put
back as it was after, also on failure.

Results: a Markdown table on stdout and in bench/results/progcost-<time>.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for entry in (str(REPO), str(HERE)):
    if entry not in sys.path:
        sys.path.insert(0, entry)

import benchlib  # noqa: E402
import compare  # noqa: E402
from versus import tools  # noqa: E402
from versus.cluster import HTTP_PORT, WEB_IP, BenchCluster  # noqa: E402
from versus.datapath import BENCH_VIP, Datapath  # noqa: E402

STATS_SWITCH = "/proc/sys/kernel/bpf_stats_enabled"
PATHS = ("direct", "veer", "veer-pod")

# program name -> (run count, run time in ns)
Stats = dict[str, tuple[int, int]]


@contextlib.contextmanager
def bpf_stats() -> Iterator[None]:
    """The kernel's per-program statistics on, for the duration."""
    with open(STATS_SWITCH) as f:
        before = f.read().strip()
    with open(STATS_SWITCH, "w") as f:
        f.write("1")
    try:
        yield
    finally:
        with open(STATS_SWITCH, "w") as f:
            f.write(before)


def program_stats() -> Stats:
    """veer's programs' counters, summed by name (each is loaded once)."""
    res = subprocess.run(["bpftool", "prog", "show", "-j"], capture_output=True, text=True,
                         check=True, timeout=30)
    out: Stats = {}
    for prog in json.loads(res.stdout):
        name = prog.get("name", "")
        if name.startswith("veer_"):
            cnt, ns = out.get(name, (0, 0))
            out[name] = (cnt + prog.get("run_cnt", 0), ns + prog.get("run_time_ns", 0))
    return out


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke test: one round of 1 s")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--duration", type=int, default=3, help="seconds per run (default 3)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = p.parse_args()
    if args.quick:
        args.rounds, args.duration = 1, 1
    if args.rounds < 1 or args.duration < 1:
        p.error("--rounds and --duration must be positive")
    return args


def main() -> int:
    args = parse_args()
    if not benchlib.ready("bench/progcost.py"):
        return 2
    if shutil.which("bpftool") is None:
        print("bench/progcost.py needs bpftool (scripts/setup.sh installs it)", file=sys.stderr)
        return 2
    started = time.monotonic()
    # make bench's own settings, for its cluster, proxy and placement.
    base = compare.parse_args(["--paths", "direct,veer", "--loads", ""])
    rates: dict[str, list[float]] = {p: [] for p in PATHS}
    # path -> program -> per-round (runs per connection, ns per run, ns per connection)
    costs: dict[str, dict[str, list[tuple[float, float, float]]]] = {p: {} for p in PATHS}
    log_dir = Path(tempfile.mkdtemp(prefix="bn-progcost-"))
    try:
        with BenchCluster(log_dir) as cluster:
            print(f"sandbox {cluster.topo.prefix}: namespaces {cluster.topo.prefix}-*, "
                  f"logs {log_dir}", flush=True)
            run = compare.Run(base, cluster)
            run.setup()
            run.proxies = {"veer": run.proxies["veer"]}
            run.start_all(set())
            plain, veer = cluster.nodes["plain"], cluster.nodes["veer"]
            pod_url = f"http://{WEB_IP}:{HTTP_PORT}/"
            clients = {
                "direct": (plain.client.netns, plain.cgroup, pod_url),
                "veer": (veer.client.netns, veer.cgroup, f"http://{BENCH_VIP}:80/"),
                "veer-pod": (veer.client.netns, veer.cgroup, pod_url),
            }
            dp = Datapath(base, cluster, run.proxies, [])
            with dp.placed(), bpf_stats():
                for netns, cgroup, url in clients.values():  # warm-up, not recorded
                    tools.wrk(cluster, netns, cgroup, url, 1, 2, 32, True, dp.prefix)
                for rnd in range(args.rounds):
                    order = PATHS[rnd % len(PATHS):] + PATHS[:rnd % len(PATHS)]
                    for path in order:
                        netns, cgroup, url = clients[path]
                        before = program_stats()
                        got = tools.wrk(cluster, netns, cgroup, url, args.duration, 2, 32, True,
                                        dp.prefix)
                        after = program_stats()
                        benchlib.check_wrk(got)
                        rates[path].append(got.rate)
                        line = f"round {rnd + 1} {path:9} {got.rate:8,.0f} conn/s"
                        for name, (cnt, ns) in sorted(after.items()):
                            runs = cnt - before.get(name, (0, 0))[0]
                            spent = ns - before.get(name, (0, 0))[1]
                            if runs <= 0:
                                continue
                            costs[path].setdefault(name, []).append(
                                (runs / got.requests, spent / runs, spent / got.requests))
                            line += f"  {name} {spent / runs:.0f} ns x{runs / got.requests:.1f}"
                        print(line, flush=True)
            run.stop_all()
    finally:
        if not os.environ.get("VEER_BENCH_KEEP"):
            shutil.rmtree(log_dir, ignore_errors=True)

    def med(values: list[float]) -> float:
        return statistics.median(values)

    lines = ["# veer: what its programs cost per connection (socket path)", "",
             "| path | new conn/s (median) | program | runs per connection | ns per run | "
             "ns per connection |", "|---|---:|---|---:|---:|---:|"]
    for path in PATHS:
        rate = f"{med(rates[path]):,.0f}"
        if not costs[path]:
            lines.append(f"| {path} | {rate} | (none ran) | | | |")
        for name, rows in sorted(costs[path].items()):
            lines.append(f"| {path} | {rate} | {name} | {med([r[0] for r in rows]):.2f} | "
                         f"{med([r[1] for r in rows]):,.0f} | {med([r[2] for r in rows]):,.0f} |")
            rate = ""
    totals = {p: sum(med([r[2] for r in rows]) for rows in costs[p].values()) for p in PATHS}
    lines += ["", "veer's programs in all, ns per connection: "
              + ", ".join(f"{p} {totals[p]:,.0f}" for p in PATHS[1:]) + ".", "",
              f"Command: `bench/progcost.py{' --quick' if args.quick else ''}`; wrk -t2 -c32 "
              f"'Connection: close' for {args.duration} s per run, {args.rounds} round(s), paths "
              f"interleaved; kernel BPF statistics on (their own cost is in every figure). "
              f"Total time {time.monotonic() - started:.0f} s."]
    text = "\n".join(lines) + "\n"
    print(text)
    benchlib.write_results(args, "progcost", text, {"rates": rates, "costs": costs})
    return 0


if __name__ == "__main__":
    benchlib.main_guard(main)
