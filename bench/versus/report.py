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


# The control-plane figures of a CpResult that a row summarizes over rounds.
CP_FIGURES = ("all_answering_s", "one_more_s", "programming_p50_s", "programming_p99_s",
              "cpu_s", "rss_peak_mib", "rss_steady_mib", "others_cpu_s")


@dataclass
class CpRow:
    """One proxy at one N over its rounds: each figure's median, min, max."""

    proxy: str
    services: int
    runs: list[CpResult]

    def values(self, figure: str) -> list[float]:
        """Every measured value (one more Service: every time it was timed)."""
        if figure == "one_more_s":
            return [v for r in self.runs for v in r.one_more_s]
        return [v for r in self.runs if (v := getattr(r, figure)) is not None]

    def median(self, figure: str) -> float | None:
        values = self.values(figure)
        return statistics.median(values) if values else None

    def summary(self, figure: str) -> dict[str, float] | None:
        values = self.values(figure)
        if not values:
            return None
        return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def cp_rows(results: Sequence[CpResult]) -> list[CpRow]:
    """The runs grouped by proxy and N, in the order they first ran."""
    rows: dict[tuple[str, int], CpRow] = {}
    for r in results:
        rows.setdefault((r.proxy, r.services), CpRow(r.proxy, r.services, [])).runs.append(r)
    return list(rows.values())


def _spread(row: CpRow, figure: str, fmt: str, scale: float = 1.0) -> str:
    """median (min-max), or the value alone when there is one."""
    s = row.summary(figure)
    if s is None:
        return "n/a"
    text = format(s["median"] * scale, fmt)
    if s["min"] != s["max"]:
        text += f" ({format(s['min'] * scale, fmt)}-{format(s['max'] * scale, fmt)})"
    return text


def cp_table(results: Sequence[CpResult]) -> str:
    lines = [
        "| Services (N) | proxy | rounds | all N answering after the last created (s) "
        "| one more Service (ms) | programming latency p50 / p99 (own metric) "
        "| CPU s | memory peak / steady (MiB) | other jobs' CPU s meanwhile |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in cp_rows(results):
        notes = list(dict.fromkeys(n for r in row.runs for n in r.notes))
        note = f" ({'; '.join(notes)})" if notes else ""
        observed = sum(r.programming_count for r in row.runs)
        lines.append(
            f"| {row.services:,} | {TITLES.get(row.proxy, row.proxy)} | {len(row.runs)} "
            f"| {_spread(row, 'all_answering_s', '.2f')}{note} "
            f"| {_spread(row, 'one_more_s', ',.0f', 1000)} "
            f"| {fmt_s(row.median('programming_p50_s'))} / "
            f"{fmt_s(row.median('programming_p99_s'))} ({observed:,} obs.) "
            f"| {_spread(row, 'cpu_s', '.2f')} "
            f"| {_spread(row, 'rss_peak_mib', '.0f')} / {_spread(row, 'rss_steady_mib', '.0f')} "
            f"| {_spread(row, 'others_cpu_s', '.1f')} |")
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
    # Control plane: medians over the rounds, veer against kube-proxy nftables.
    by = {(row.proxy, row.services): row for row in cp_rows(cps)}
    cp_behind = []
    cp_checked = 0
    for (proxy, n), veer in sorted(by.items()):
        if proxy != "veer" or ("kube-proxy-nftables", n) not in by:
            continue
        nft = by[("kube-proxy-nftables", n)]
        for name, figure in (("all answering", "all_answering_s"), ("one more", "one_more_s"),
                             ("programming p50", "programming_p50_s"),
                             ("programming p99", "programming_p99_s"), ("CPU s", "cpu_s"),
                             ("memory peak", "rss_peak_mib"),
                             ("memory steady", "rss_steady_mib")):
            mine, other = veer.median(figure), nft.median(figure)
            if mine is None or other is None:
                continue
            cp_checked += 1
            if not mine < other:
                cp_behind.append(f"{name} at N={n:,}: {mine:.3g} vs {other:.3g}")
    out.append(f"- Control plane, ahead of kube-proxy nftables on every figure ({cp_checked} "
               f"comparisons, medians over the rounds): {_verdict(cp_checked, cp_behind)}"
               + (f"; behind on: {'; '.join(cp_behind)}" if cp_behind else ""))
    big_n = max((n for _, n in by), default=0)
    ours_big, theirs_big = by.get(("veer", big_n)), by.get(("kube-proxy-nftables", big_n))
    if ours_big and theirs_big:
        ours_s = ours_big.median("all_answering_s") or 0.0
        theirs_s = theirs_big.median("all_answering_s") or 0.0
        one = ours_big.median("one_more_s")
        one = float("inf") if one is None else one
        caveat = "" if big_n >= goal_services else f" (NOT a test of the goal: N={big_n:,})"
        out.append(f"- Programming {big_n:,} Services: veer {ours_s:.2f} s vs "
                   f"kube-proxy nftables {theirs_s:.2f} s: "
                   f"**{'met' if ours_s < theirs_s else 'NOT met'}**; one more Service with "
                   f"{big_n:,} present: {one * 1000:.0f} ms (goal < "
                   f"{ONE_MORE_GOAL_S * 1000:.0f} ms): "
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
    summary = [{"proxy": row.proxy, "services": row.services, "rounds": len(row.runs),
                **{figure: row.summary(figure) for figure in CP_FIGURES}}
               for row in cp_rows(cps)]
    return {"datapath": out_loads, "controlplane": [r.to_json() for r in cps],
            "controlplane_summary": summary}
