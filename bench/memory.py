#!/usr/bin/env python3
"""Where the agent's resident memory is: RSS and PSS of a sandbox agent, by mapping.

    .venv/bin/python bench/memory.py [--sockmap] [--settle S] [--services N]

Without --services: starts the one-node sandbox (the example manifests, eBPF mode), waits for
the agent's first sync and then --settle seconds, and reads the agent
process's /proc/PID/status (VmRSS, VmHWM: resident now and at its peak),
/proc/PID/smaps_rollup (RSS and PSS, anonymous and file-backed) and
/proc/PID/smaps, whose mappings it groups by file (anonymous ones as
[anon], plus [heap] and [stack]) to show which libraries hold the memory.
Groups named "compiler" add up BCC and clang/LLVM (libbcc, libclang,
libLLVM), the in-process compiler whose cost this bench was written to see.

With --services N: the figures bench/compare.py reports for veer's memory,
measured the same way (its control-plane phase, veer alone: a real API
server, N Services created, RSS of the process and its live children
sampled every 0.2 s for the peak, and read once idle for the steady
figure), followed by the same breakdown of the idle agent.

It also says what the agent's log says about its loader (when programs are
compiled in a child process, the child's own peak RSS and CPU).

Results: a Markdown table on stdout and in bench/results/memory-<time>.md,
the numbers in bench/results/memory-<time>.json.
"""

from __future__ import annotations

import argparse
import os
import re
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import benchlib
from benchlib import REPO, log

from agent.sandbox.cluster import SandboxCluster

COMPILER = re.compile(r"lib(bcc|clang|LLVM)", re.IGNORECASE)
_HEADER = re.compile(r"^[0-9a-f]+-[0-9a-f]+ ")


def status_kib(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile of /proc/PID/status, in KiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem", "Threads"):
            out[key] = int(rest.split()[0])
    return out


def rollup_kib(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, _, rest = line.partition(":")
        if rest.strip().endswith("kB"):
            out[key] = int(rest.split()[0])
    return out


def by_mapping(pid: int) -> dict[str, dict[str, int]]:
    """Rss and Pss (KiB) per mapped file; anonymous mappings as [anon]."""
    groups: dict[str, dict[str, int]] = defaultdict(lambda: {"Rss": 0, "Pss": 0})
    name = "[anon]"
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        if _HEADER.match(line):
            parts = line.split(None, 5)
            name = parts[5].strip() if len(parts) > 5 else "[anon]"
            continue
        key, _, rest = line.partition(":")
        if key in ("Rss", "Pss"):
            groups[name][key] += int(rest.split()[0])
    return dict(groups)


def snapshot(pid: int) -> dict[str, Any]:
    mappings = by_mapping(pid)
    compiler = {"Rss": 0, "Pss": 0}
    for name, sizes in mappings.items():
        if COMPILER.search(Path(name).name):
            compiler["Rss"] += sizes["Rss"]
            compiler["Pss"] += sizes["Pss"]
    return {"status": status_kib(pid), "rollup": rollup_kib(pid), "compiler": compiler,
            "mappings": mappings}


def mib(kib: int) -> str:
    return f"{kib / 1024:.1f}"


def table(snap: dict[str, Any], top: int) -> str:
    status, rollup = snap["status"], snap["rollup"]
    lines = [
        "| figure | MiB |", "|---|---:|",
        f"| RSS now (VmRSS) | {mib(status['VmRSS'])} |",
        f"| RSS peak (VmHWM) | {mib(status['VmHWM'])} |",
        f"| RSS anonymous / file | {mib(status['RssAnon'])} / {mib(status['RssFile'])} |",
        f"| PSS | {mib(rollup['Pss'])} |",
        f"| PSS anonymous / file | {mib(rollup.get('Pss_Anon', 0))} / "
        f"{mib(rollup.get('Pss_File', 0))} |",
        f"| compiler (libbcc, libclang, libLLVM) RSS / PSS | {mib(snap['compiler']['Rss'])} / "
        f"{mib(snap['compiler']['Pss'])} |",
        f"| threads | {status['Threads']} |",
        "", f"Largest mappings (top {top} by RSS):", "",
        "| mapping | RSS MiB | PSS MiB |", "|---|---:|---:|",
    ]
    ranked = sorted(snap["mappings"].items(), key=lambda kv: -kv[1]["Rss"])[:top]
    lines += [f"| `{name}` | {mib(s['Rss'])} | {mib(s['Pss'])} |" for name, s in ranked]
    return "\n".join(lines)


def loader_lines(log_text: str) -> list[str]:
    return [line for line in log_text.splitlines()
            if "loader" in line or "compiled" in line.lower()]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--sockmap", action="store_true", help="run the agent with --sockmap")
    p.add_argument("--settle", type=float, default=5.0,
                   help="seconds to wait after the first sync (default 5)")
    p.add_argument("--top", type=int, default=12, help="mappings to list (default 12)")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="run the agent with this in its environment (repeatable), "
                        "e.g. MALLOC_ARENA_MAX=2")
    p.add_argument("--services", type=int, default=0, metavar="N",
                   help="measure as bench/compare.py does, with N Services through a real "
                        "API server (its control plane is built or taken from the cache)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = p.parse_args(argv)
    args.quick = False
    return args


def in_sandbox(args: argparse.Namespace) -> tuple[dict[str, Any], str, dict[str, Any]]:
    """(snapshot, agent log, {}) of a sandbox agent, --settle s after its first sync."""
    with SandboxCluster() as cluster:
        log(f"sandbox {cluster.topo.prefix}: pins {cluster.topo.bpffs}")
        agent = cluster.start_agent(["--sockmap"] if args.sockmap else [])
        time.sleep(args.settle)
        return snapshot(agent.pid), cluster.agent_output(), {}


def with_services(args: argparse.Namespace) -> tuple[dict[str, Any], str, dict[str, Any]]:
    """(snapshot, agent log, compare's figures) of veer alone with N Services."""
    import tempfile

    from compare import BENCH_SERVICE, BENCH_TARGETS
    from versus.apiload import ApiWriter
    from versus.cluster import BenchCluster
    from versus.programming import LOAD_NAMESPACE, measure, start_alone
    from versus.proxies import all_proxies

    with BenchCluster(Path(tempfile.mkdtemp(prefix="bn-memory-"))) as cluster:
        cp = cluster.control_plane
        writer = ApiWriter(cp.url, str(cp.ca_file), cp.tokens["admin"], threads=16)
        cp.create_namespace("bench")
        cp.create_namespace(LOAD_NAMESPACE)
        writer.create([BENCH_SERVICE], "bench")
        veer = all_proxies(cluster)["veer"]
        start_alone(cluster, veer, BENCH_TARGETS, 180)
        result = measure(cluster, writer, veer, args.services, 1, 300, seed=args.services)
        snap = snapshot(veer.pid)
        text = veer.log_path.read_text(errors="replace")
        veer.stop()
    return snap, text, result.to_json()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not benchlib.ready("bench/memory.py"):
        return 2
    os.environ.update(dict(e.split("=", 1) for e in args.env))  # the agent inherits it
    snap, agent_log, cp = (with_services if args.services else in_sandbox)(args)
    loader = loader_lines(agent_log)
    md = ""
    if cp:
        md = (f"bench/compare.py's figures, veer alone with {args.services:,} Services: RSS "
              f"peak {cp['rss_peak_mib']:.1f} MiB, steady {cp['rss_steady_mib']:.1f} MiB "
              f"(idle before them {cp['rss_idle_mib']:.1f} MiB); CPU {cp['cpu_s']:.1f} s. "
              "The breakdown of the agent once idle:\n\n")
    md += table(snap, args.top)
    if loader:
        md += "\n\nThe agent's log about its loader:\n\n" + "\n".join(
            f"    {line}" for line in loader)
    print(md)
    name = f"memory-{args.services}" if args.services else "memory"
    benchlib.write_results(args, name, f"# veer agent: resident memory by mapping\n\n{md}\n",
                           {**snap, "loader": loader, "controlplane": cp})
    return 0


if __name__ == "__main__":
    benchlib.main_guard(main)
