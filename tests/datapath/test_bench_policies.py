"""Smoke tests of the TrafficPolicy benchmarks, so that they cannot rot:
- bench/sockmap.py `--quick` runs end to end (sandbox, agent, iperf3 and
  sockperf through two ClusterIPs, one with sockmap acceleration) and prints
  a row per message size (the bench itself checks that the spliced runs
  were spliced and the plain ones were not);
- bench/redirect.py `--quick` runs end to end (HAProxy as the node-local
  proxy, reached directly and through a redirected Service) and prints both
  paths' latency and the difference.
Timings are not pass/fail: no threshold on the numbers."""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import pytest

from tests.datapath.conftest import run_bench

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "bench" / "sockmap.py"
REDIRECT_BENCH = REPO / "bench" / "redirect.py"

pytestmark = pytest.mark.root

# | 4,096 B | 2,954 -> 4,436 | 1.50 | 23.6 -> 8.6 | 144.7 -> 49.1 |
ROW = re.compile(r"^\| (?P<size>[\d,]+) B \| [\d,]+ -> [\d,]+ \| \d+\.\d\d \| "
                 r"[\d.]+ -> [\d.]+ \| [\d.]+ -> [\d.]+ \|$", re.M)


def test_sockmap_bench_quick_reports_each_message_size(tmp_path: Path) -> None:
    for tool in ("iperf3", "sockperf"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed: scripts/setup.sh installs it")
    res = run_bench([sys.executable, str(BENCH), "--quick", "--out", str(tmp_path)],
                    timeout=400, cwd=REPO)
    if "sockmap acceleration is not usable here" in res.stdout:
        pytest.skip(res.stdout.strip().splitlines()[-1])  # this kernel: the reason printed
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert [m["size"] for m in ROW.finditer(res.stdout)] == ["64", "4,096", "65,536"], res.stdout
    assert list(tmp_path.glob("sockmap-*-quick.md")) and list(tmp_path.glob("sockmap-*.json"))


# | redirected | 343.9 | 4354.6 |
LATENCY_ROW = re.compile(r"^\| (?P<path>direct|redirected) \| [\d.]+ \| [\d.]+ \|$", re.M)


def test_redirect_bench_quick_reports_both_paths(tmp_path: Path) -> None:
    if shutil.which("haproxy") is None:
        pytest.fail("haproxy is not installed: scripts/setup.sh installs it")
    res = run_bench([sys.executable, str(REDIRECT_BENCH), "--quick", "--out", str(tmp_path)],
                    timeout=400, cwd=REPO)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert [m["path"] for m in LATENCY_ROW.finditer(res.stdout)] == ["direct", "redirected"]
    assert "Added by the redirect: p50 " in res.stdout
    assert list(tmp_path.glob("redirect-*-quick.md"))
