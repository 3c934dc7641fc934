"""Smoke tests of the benchmarks, so that they cannot rot:
- `bench/clusterip.py --quick` runs end to end (sandbox, agent, 100 extra
  Services, wrk on both paths) and prints a ClusterIP/direct ratio per load;
- `bench/nodeport.py --quick` runs end to end (three nodes, three agents, wrk
  from the external client, direct and through a NodePort in each mode) and
  prints a NodePort/direct ratio for the default mode (SNAT) and for DSR.
Each writes its results and leaves nothing behind. Timings are not pass/fail:
no threshold on the numbers."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agent.sandbox.topology import BPFFS_MOUNT, CGROUP_MOUNT
from tests.datapath.conftest import run_bench

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "bench" / "clusterip.py"
NODEPORT_BENCH = REPO / "bench" / "nodeport.py"

pytestmark = pytest.mark.root

# | 1 (bench only) | 12,095 (12,095-12,095) | 12,127 (...) | **1.003** | ... |
ROW = re.compile(r"^\| (?P<label>[\d,]+ \([^)]*\)) \|.*\| \*\*(?P<ratio>\d+\.\d+)\*\* \|", re.M)
# | NodePort via node-1, default mode (SNAT) | 7,857 (...) | **0.855** | 0.800-0.874 | 10.0 | 0 |
NODEPORT_ROW = re.compile(
    r"^\| NodePort via (?P<node>node-\d), (?P<mode>[^|]*) \|[^|]*\| \*\*(?P<ratio>\d+\.\d+)\*\* \|",
    re.M)


def run_quick(bench: Path, out: Path) -> subprocess.CompletedProcess[str]:
    if os.geteuid() != 0:
        pytest.skip(f"{bench.relative_to(REPO)} needs root (network namespaces, eBPF programs)")
    if shutil.which("wrk") is None:
        pytest.skip("wrk is not installed (apt-get install wrk)")
    res = run_bench([sys.executable, str(bench), "--quick", "--out", str(out)],
                    timeout=280, cwd=REPO)
    assert res.returncode == 0, res.stdout + res.stderr
    return res


def assert_nothing_left(stdout: str) -> None:
    """Nothing of the bench's sandbox is left: namespaces, cgroup, pins, processes."""
    prefix = re.search(r"^sandbox (vr[0-9a-f]+):", stdout, re.M)
    assert prefix, stdout
    name = prefix[1]
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not [line for line in netns.splitlines() if line.startswith(name)], netns
    assert not os.path.exists(os.path.join(CGROUP_MOUNT, f"veer-{name}"))
    assert not [p for p in os.listdir(BPFFS_MOUNT) if p.startswith(name)]
    procs = subprocess.run(["pgrep", "-af", f"veer-{name}"], capture_output=True, text=True)
    assert procs.stdout.strip() == "", procs.stdout


def test_bench_quick_prints_a_ratio_for_each_load(tmp_path: Path) -> None:
    res = run_quick(BENCH, tmp_path)
    output = res.stdout + res.stderr

    rows = {m["label"]: float(m["ratio"]) for m in ROW.finditer(res.stdout)}
    assert set(rows) == {"1 (bench only)", "101 (bench + 100)"}, output
    assert all(ratio > 0 for ratio in rows.values()), rows

    [raw] = tmp_path.glob("clusterip-*-quick.json")
    data = json.loads(raw.read_text())
    assert [load["services"] for load in data["loads"]] == [1, 101]
    for load in data["loads"]:
        assert load["ratio"] > 0
        assert {run["path"] for run in load["runs"]} == {"direct", "clusterip"}
    assert list(tmp_path.glob("clusterip-*-quick.md"))
    assert_nothing_left(res.stdout)


def test_nodeport_bench_quick_prints_a_ratio(tmp_path: Path) -> None:
    res = run_quick(NODEPORT_BENCH, tmp_path)
    output = res.stdout + res.stderr

    rows = {m["mode"]: float(m["ratio"]) for m in NODEPORT_ROW.finditer(res.stdout)}
    assert set(rows) == {"default mode (SNAT)", "--nodeport-mode dsr"}, output
    assert "ratio to direct" in res.stdout, output

    [raw] = tmp_path.glob("nodeport-*-quick.json")
    data = json.loads(raw.read_text())
    ratios = data["ratios"]
    assert ratios["nodeport"] == pytest.approx(rows["default mode (SNAT)"], abs=0.001)
    assert ratios["dsr"] == pytest.approx(rows["--nodeport-mode dsr"], abs=0.001)
    assert {run["path"] for run in data["series"]["runs"]} == {"direct", "nodeport", "dsr"}
    assert list(tmp_path.glob("nodeport-*-quick.md"))
    assert_nothing_left(res.stdout)
