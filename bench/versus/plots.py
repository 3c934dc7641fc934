"""Draw the side-by-side report's plots from its JSON.

    /usr/bin/python3 bench/versus/plots.py bench/results/compare-<time>.json

Run by Debian's python3, which has python3-matplotlib (scripts/setup.sh
installs it); veer's virtualenv does not carry matplotlib. Writes, beside
the JSON, <name>-datapath.png (each path's figures as a ratio to direct,
per load) and <name>-controlplane.png (time until N Services answer, one
more Service, CPU and peak memory, per proxy), and prints their paths.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display: files only
import matplotlib.pyplot as plt

METRICS = (("rate", "new connections/s"), ("lat_p50_us", "latency p50"),
           ("lat_p99_us", "latency p99"), ("gbps", "throughput, one stream"))
CP_FIGURES = (("all_answering_s", "N Services all answering (s)"),
              ("one_more_s", "one more Service (ms)"),
              ("cpu_s", "proxy CPU (s)"), ("rss_peak_mib", "proxy peak memory (MiB)"))
COLORS = {"veer": "#1b7837", "veer-tproxy": "#7fbf7b", "veer-nodeport": "#5aae61",
          "kp-iptables": "#c2a5cf", "kp-nftables": "#762a83",
          "kp-iptables-nodeport": "#e7d4e8", "kp-nftables-nodeport": "#9970ab",
          "kube-proxy-nftables": "#762a83", "kube-proxy-iptables": "#c2a5cf"}


def datapath(data: dict[str, Any], out: Path) -> None:
    loads = [ld for ld in data["datapath"] if "summary" in ld]
    paths = [p for p in loads[0]["summary"] if p != "direct"] if loads else []
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4.2 * len(METRICS), 4.2), sharey=False)
    width = 0.8 / max(1, len(paths))
    for ax, (key, title) in zip(axes, METRICS, strict=True):
        for i, path in enumerate(paths):
            values = [ld["summary"].get(path, {}).get(key, {}).get("ratio_to_direct", 0.0)
                      for ld in loads]
            xs = [j + (i - (len(paths) - 1) / 2) * width for j in range(len(loads))]
            ax.bar(xs, values, width, label=loads[0]["titles"].get(path, path),
                   color=COLORS.get(path))
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(loads)), [ld["label"] for ld in loads], fontsize=8)
        ax.set_title(f"{title}\n(ratio to direct; "
                     f"{'higher' if key in ('rate', 'gbps') else 'lower'} is better)",
                     fontsize=9)
        ax.set_xlabel("Services loaded", fontsize=8)
    axes[0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def controlplane(data: dict[str, Any], out: Path) -> None:
    """Bars at each figure's median over the rounds, whiskers from min to max."""
    rows = data["controlplane_summary"]
    sizes = sorted({r["services"] for r in rows})
    proxies = list(dict.fromkeys(r["proxy"] for r in rows))
    fig, axes = plt.subplots(1, len(CP_FIGURES), figsize=(4.2 * len(CP_FIGURES), 4.0))
    width = 0.8 / max(1, len(proxies))
    for ax, (key, title) in zip(axes, CP_FIGURES, strict=True):
        scale = 1000.0 if key == "one_more_s" else 1.0
        for i, proxy in enumerate(proxies):
            values: list[float] = []
            low: list[float] = []
            high: list[float] = []
            for n in sizes:
                row = next((x for x in rows if x["proxy"] == proxy and x["services"] == n), None)
                figure = row.get(key) if row else None
                med = figure["median"] * scale if figure else 0.0
                values.append(med)
                low.append(med - figure["min"] * scale if figure else 0.0)
                high.append(figure["max"] * scale - med if figure else 0.0)
            xs = [j + (i - (len(proxies) - 1) / 2) * width for j in range(len(sizes))]
            ax.bar(xs, values, width, label=proxy, color=COLORS.get(proxy),
                   yerr=[low, high], capsize=2, error_kw={"linewidth": 0.8})
        ax.set_xticks(range(len(sizes)), [f"N = {n:,}" for n in sizes], fontsize=8)
        ax.set_title(f"{title}\n(median, min-max; lower is better)", fontsize=9)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> int:
    source = Path(sys.argv[1])
    data = json.loads(source.read_text())
    stem = source.with_suffix("")
    written = []
    if data.get("datapath"):
        datapath(data, stem.with_name(stem.name + "-datapath.png"))
        written.append(stem.with_name(stem.name + "-datapath.png"))
    if data.get("controlplane_summary"):
        controlplane(data, stem.with_name(stem.name + "-controlplane.png"))
        written.append(stem.with_name(stem.name + "-controlplane.png"))
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
