"""Smoke test of bench/tproxy.py, so that it cannot rot: `--quick` runs end to
end (sandbox, agent in TPROXY mode, wrk and iperf3 on both paths) and prints
a TPROXY/direct ratio per measure, writes its results and leaves nothing
behind. Timings are not pass/fail: no threshold on the numbers."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from tests.datapath.test_bench_smoke import REPO, assert_nothing_left, run_quick

BENCH = REPO / "bench" / "tproxy.py"
# | new connections (wrk, Connection: close) | 9,054 (...) conn/s | 3,911 (...) | **0.432** | ...
ROW = re.compile(r"^\| (?P<measure>[a-z][^|]*) \|.*\| \*\*(?P<ratio>\d+\.\d+)\*\* \|", re.M)


def test_tproxy_bench_quick_prints_a_ratio_per_measure(tmp_path: Path) -> None:
    if shutil.which("iperf3") is None:
        pytest.skip("iperf3 is not installed (apt-get install iperf3)")
    res = run_quick(BENCH, tmp_path)
    rows = {m["measure"]: float(m["ratio"]) for m in ROW.finditer(res.stdout)}
    assert set(rows) == {"new connections (wrk, Connection: close)",
                         "requests on keep-alive connections (wrk)",
                         "throughput (iperf3, 1 stream)"}, res.stdout + res.stderr
    assert all(ratio > 0 for ratio in rows.values()), rows
    [raw] = tmp_path.glob("tproxy-*-quick.json")
    data = json.loads(raw.read_text())
    for measure in ("connections", "requests", "throughput"):
        assert {run["path"] for run in data[measure]["runs"]} == {"direct", "tproxy"}
        assert all(run["proxied"] > 0 for run in data[measure]["runs"]
                   if run["path"] == "tproxy")
    assert list(tmp_path.glob("tproxy-*-quick.md"))
    assert_nothing_left(res.stdout)
