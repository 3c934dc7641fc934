"""The side-by-side report: Markdown tables, the goals' verdicts, and the
JSON the plots are drawn from. Pure functions of the results."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from benchlib import Series

from versus.datapath import BY_KEY, PATHS
from versus.programming import CpResult, fmt_s

METRICS = (  # key, title, unit, higher is better
    ("rate", "new conn/s", "", True),
    ("lat_p50_us", "latency p50", "us", False),
    ("lat_p99_us", "latency p99", "us", False),
    ("gbps", "throughput", "Gbit/s", True),
)
CP_PROXIES = ("veer", "kube-proxy-nftables", "kube-proxy-iptables")
TITLES = {"veer": "veer", "kube-proxy-nftables": "kube-proxy nftables",
          "kube-proxy-iptables": "kube-proxy iptables", "veer-tproxy": "veer TPROXY"}
SOCKET_GOAL_RATE = 0.95
SOCKET_GOAL_P99 = 1.05
ONE_MORE_GOAL_S = 0.1


@dataclass
class Load:
    services: int  # Services loaded besides the bench's own
    series: Series | None
    unavailable: dict[str, str] = field(default_factory=dict)  # path -> why

    @property
    def label(self) -> str:
        return f"{self.services:,}" if self.services else "1 (bench only)"


def median(series: Series, path: str, key: str) -> float:
    return statistics.median(series.values(path, key))


def fmt_value(key: str, value: float) -> str:
    if key == "rate":
        return f"{value:,.0f}"
    if key == "gbps":
        return f"{value:.2f}"
    return f"{value:,.1f}"


def cell(series: Series, path: str, key: str) -> str:
    values = series.values(path, key)
    med = statistics.median(values)
    text = f"{fmt_value(key, med)} ({fmt_value(key, min(values))}-{fmt_value(key, max(values))})"
    if path == series.base:
        return text
    return f"{text} **{series.ratio(path, key):.3f}**"


def datapath_table(load: Load) -> str:
    head = "| path | " + " | ".join(
        f"{title}{f' ({unit})' if unit else ''}" for _, title, unit, _ in METRICS) + " |"
    lines = [head, "|---|" + "---:|" * len(METRICS)]
    for path in PATHS:
        if load.series is not None and path.key in load.series.paths:
            cells = [cell(load.series, path.key, key) for key, *_ in METRICS]
        else:
            why = load.unavailable.get(path.key, "not measured")
            cells = [f"not available: {why}"] + ["not available"] * (len(METRICS) - 1)
        lines.append(f"| {path.title} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cp_table(results: Sequence[CpResult]) -> str:
    lines = [
        "| Services (N) | proxy | all N answering after the last created | one more "
        "Service, median (min-max) | programming latency p50 / p99 (own metric) "
        "| CPU s | memory peak / steady (MiB) | other jobs' CPU s meanwhile |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        ones = r.one_more_s
        one = (f"{statistics.median(ones) * 1000:,.0f} ms ({min(ones) * 1000:,.0f}-"
               f"{max(ones) * 1000:,.0f})") if ones else "n/a"
        note = f" ({'; '.join(r.notes)})" if r.notes else ""
        lines.append(
            f"| {r.services:,} | {TITLES.get(r.proxy, r.proxy)} | {r.all_answering_s:.2f} s"
            f"{note} | {one} | {fmt_s(r.programming_p50_s)} / {fmt_s(r.programming_p99_s)} "
            f"({r.programming_count:,} obs.) | {r.cpu_s:.1f} | {r.rss_peak_mib:.0f} / "
            f"{r.rss_steady_mib:.0f} | {r.others_cpu_s:.0f} |")
    return "\n".join(lines)


def trouble(load: Load) -> str:
    """A line on wrk errors and latency runs whose connection never came up,
    in the runs kept (after the redo limit), if any."""
    if load.series is None:
        return ""
    found = []
    for path in load.series.paths:
        runs = [r for r in load.series.used() if r.path == path]
        errors = sum(r.counted.get("wrk_errors", 0) for r in runs)
        lost = sum(r.counted.get("latency_runs_without_answer", 0) for r in runs)
        if errors or lost:
            found.append(f"{BY_KEY[path].title}: {errors} wrk error(s), {lost} latency "
                         f"connection(s) that never came up")
    redone = {r.path for r in load.series.runs if not r.used and r.disturbed}
    text = f"\n\nRounds redone: {load.series.redone()}"
    if redone:
        text += f" (disturbed: {', '.join(sorted(redone))})"
    if found:
        text += f". Left in the kept runs: {'; '.join(found)}"
    return text + "."


# ---- goals ---------------------------------------------------------------------


def _better(key: str, ours: float, theirs: float) -> bool:
    higher = next(h for k, _, _, h in METRICS if k == key)
    return ours > theirs if higher else ours < theirs


def _verdict(checked: int, behind: list[str]) -> str:
    """A goal over several comparisons: met only if some were made and none
    was behind (a run with --paths or --loads that compares nothing says so)."""
    if not checked:
        return "**not tested** (this run compared nothing)"
    return f"**{'met' if not behind else 'NOT met'}**"


def goals(loads: Sequence[Load], cps: Sequence[CpResult], goal_services: int) -> list[str]:
    """One line per goal with the figures that decide it."""
    out: list[str] = []
    if not loads:
        return ["- no datapath figures: the run stopped before measuring any"]
    biggest = max(loads, key=lambda ld: ld.services)
    full = biggest.services >= goal_services
    caveat = "" if full else f" (NOT a test of the goal: {biggest.services:,} Services, not " \
                             f"{goal_services:,})"
    s = biggest.series
    if s is not None and "veer" in s.paths:
        rate, p99 = s.ratio("veer", "rate"), s.ratio("veer", "lat_p99_us")
        ok = rate >= SOCKET_GOAL_RATE and p99 <= SOCKET_GOAL_P99
        out.append(f"- veer socket path at {biggest.label} Services: new conn/s "
                   f"{rate:.3f} x direct (goal >= {SOCKET_GOAL_RATE}), p99 latency {p99:.3f} x "
                   f"direct (goal <= {SOCKET_GOAL_P99}): **{'met' if ok else 'NOT met'}**"
                   f"{caveat}")
    # Datapath: each veer path against kube-proxy nftables' matching path.
    pairs = (("veer", "kp-nftables"), ("veer-tproxy", "kp-nftables"),
             ("veer-nodeport", "kp-nftables-nodeport"))
    behind = []
    checked = 0
    for load in loads:
        ls = load.series
        if ls is None:
            continue
        for ours, theirs in pairs:
            if ours not in ls.paths or theirs not in ls.paths:
                continue
            for key, title, *_ in METRICS:
                checked += 1
                a, b = median(ls, ours, key), median(ls, theirs, key)
                if not _better(key, a, b):
                    behind.append(f"{BY_KEY[ours].title} {title} at {load.label}: "
                                  f"{fmt_value(key, a)} vs {fmt_value(key, b)}")
    out.append(f"- Datapath, ahead of kube-proxy nftables on every figure ({checked} "
               f"comparisons: each veer path against kube-proxy nftables' matching path, "
               f"every metric and load): {_verdict(checked, behind)}"
               + (f"; behind on: {'; '.join(behind)}" if behind else ""))
    by = {(r.proxy, r.services): r for r in cps}
    cp_behind = []
    cp_checked = 0
    for (proxy, n), veer in sorted(by.items()):
        if proxy != "veer" or ("kube-proxy-nftables", n) not in by:
            continue
        nft = by[("kube-proxy-nftables", n)]
        figures: list[tuple[str, float | None, float | None]] = [
            ("all answering", veer.all_answering_s, nft.all_answering_s),
            ("one more", statistics.median(veer.one_more_s or [0]),
             statistics.median(nft.one_more_s or [0])),
            ("programming p50", veer.programming_p50_s, nft.programming_p50_s),
            ("programming p99", veer.programming_p99_s, nft.programming_p99_s),
            ("CPU s", veer.cpu_s, nft.cpu_s),
            ("memory peak", veer.rss_peak_mib, nft.rss_peak_mib),
            ("memory steady", veer.rss_steady_mib, nft.rss_steady_mib),
        ]
        for name, mine, other in figures:
            if mine is None or other is None:
                continue
            cp_checked += 1
            if not mine < other:
                cp_behind.append(f"{name} at N={n:,}: {mine:.3g} vs {other:.3g}")
    out.append(f"- Control plane, ahead of kube-proxy nftables on every figure ({cp_checked} "
               f"comparisons): {_verdict(cp_checked, cp_behind)}"
               + (f"; behind on: {'; '.join(cp_behind)}" if cp_behind else ""))
    big_n = max((n for _, n in by), default=0)
    ours_big, theirs_big = by.get(("veer", big_n)), by.get(("kube-proxy-nftables", big_n))
    if ours_big and theirs_big:
        faster = ours_big.all_answering_s < theirs_big.all_answering_s
        one = statistics.median(ours_big.one_more_s or [float("inf")])
        caveat = "" if big_n >= goal_services else f" (NOT a test of the goal: N={big_n:,})"
        out.append(f"- Programming {big_n:,} Services: veer {ours_big.all_answering_s:.2f} s vs "
                   f"kube-proxy nftables {theirs_big.all_answering_s:.2f} s: "
                   f"**{'met' if faster else 'NOT met'}**; one more Service with {big_n:,} "
                   f"present: {one * 1000:.0f} ms (goal < {ONE_MORE_GOAL_S * 1000:.0f} ms): "
                   f"**{'met' if one < ONE_MORE_GOAL_S else 'NOT met'}**{caveat}")
    return out


def to_json(loads: Sequence[Load], cps: Sequence[CpResult]) -> dict[str, Any]:
    """Everything the plots and a reader need, with medians precomputed."""
    out_loads = []
    for load in loads:
        entry: dict[str, Any] = {"services": load.services, "label": load.label,
                                 "unavailable": load.unavailable}
        s = load.series
        if s is not None:
            entry["summary"] = {
                path: {key: {**s.summary(path, key),
                             "ratio_to_direct": s.ratio(path, key) if path != s.base else 1.0}
                       for key, *_ in METRICS}
                for path in s.paths}
            entry["titles"] = {path: BY_KEY[path].title for path in s.paths}
            entry["rounds_redone"] = s.redone()
            entry["disturbed_rounds_kept"] = s.disturbed_kept()
            entry["runs"] = [r.to_json() for r in s.runs]
        out_loads.append(entry)
    return {"datapath": out_loads, "controlplane": [r.to_json() for r in cps]}
