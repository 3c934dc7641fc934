"""The side-by-side bench's goal lines (bench/versus/report.py): a goal is
met only by figures that were measured."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from versus import report
from versus.programming import CpResult, thread_cpu, thread_cpu_delta

from agent.metrics import exposition
from agent.metrics.collect import MetricsInput, families
from agent.telemetry import Telemetry


def test_a_goal_that_compared_nothing_is_not_met() -> None:
    # A run with only the bench Service and no series, and no control plane:
    # nothing to compare with kube-proxy nftables.
    lines = report.goals([report.Load(0, None)], [], 10_000)
    datapath = next(line for line in lines if line.startswith("- Datapath"))
    control = next(line for line in lines if line.startswith("- Control plane"))
    assert "(0 comparisons" in datapath and "**not tested**" in datapath
    assert "(0 comparisons," in control and "**not tested**" in control
    assert not any("**met**" in line for line in lines), lines


def _run(proxy: str, cpu: float, answering: float, round_index: int) -> CpResult:
    return CpResult(proxy=proxy, services=1000, create_s=3.0, all_answering_s=answering,
                    one_more_s=[0.01 * (round_index + 1)], programmed=1000,
                    programming_p50_s=0.1, programming_p99_s=0.2, programming_count=1003,
                    cpu_s=cpu, rss_peak_mib=60.0, rss_steady_mib=58.0, rss_idle_mib=50.0,
                    others_cpu_s=0.0, round=round_index)


def test_control_plane_rounds_are_judged_by_their_medians() -> None:
    """One slow veer round among three does not decide the CPU figure; the
    table shows median (min-max) and how many rounds there were."""
    cps = [_run("veer", 0.70, 0.05, 0), _run("kube-proxy-nftables", 0.55, 0.5, 0),
           _run("kube-proxy-nftables", 0.60, 0.6, 1), _run("veer", 0.45, 0.06, 1),
           _run("veer", 0.50, 0.04, 2), _run("kube-proxy-nftables", 0.52, 0.4, 2)]
    lines = report.goals([report.Load(0, None)], cps, 10_000)
    control = next(line for line in lines if line.startswith("- Control plane"))
    # programming p50 and p99, memory: equal, so behind; CPU: 0.50 < 0.55, ahead.
    assert "CPU s" not in control and "programming p50" in control, control
    table = report.cp_table(cps)
    veer_row = next(line for line in table.splitlines() if line.startswith("| 1,000 | veer |"))
    assert "| 3 |" in veer_row and "| 0.50 (0.45-0.70) |" in veer_row, veer_row
    assert "| 0.05 (0.04-0.06)" in veer_row and "| 20 (10-30) |" in veer_row, veer_row
    [row] = [r for r in report.to_json([], cps)["controlplane_summary"] if r["proxy"] == "veer"]
    assert row["rounds"] == 3 and row["cpu_s"] == {"median": 0.5, "min": 0.45, "max": 0.7}

    # With the slow round's CPU as the median, the goal says so.
    cps[3] = _run("veer", 0.80, 0.06, 1)
    control = next(line for line in report.goals([report.Load(0, None)], cps, 10_000)
                   if line.startswith("- Control plane"))
    assert "CPU s at N=1,000: 0.7 vs 0.55" in control, control


def test_the_agents_cpu_by_thread_is_read_from_its_own_metric() -> None:
    def scrape(cpu: dict[str, float]) -> str:
        return exposition.render(families(MetricsInput(
            telemetry=Telemetry().snapshot(), mode="ebpf", maps=[], counters={},
            programs_attached=0, skipped={}, manifest_problems=0, frontends=0,
            frontends_failed=0, source_synced=True, access_hits={}, thread_cpu=cpu)))

    before = thread_cpu(scrape({"sync": 1.0, "kube-services": 0.5, "gone": 0.2}))
    assert before == {"sync": 1.0, "kube-services": 0.5, "gone": 0.2}
    after = thread_cpu(scrape({"sync": 1.75, "kube-services": 0.5, "status": 0.25}))
    # Largest first; an idle thread and an ended one are left out, a new one
    # counts from zero.
    assert list(thread_cpu_delta(before, after).items()) == [("sync", 0.75), ("status", 0.25)]
    # kube-proxy exposes no such metric.
    assert thread_cpu('kubeproxy_sync_proxy_rules_last_timestamp_seconds 1.7e+09\n') == {}
