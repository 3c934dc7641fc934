"""Smoke test of the ClusterIP benchmark: `bench/clusterip.py --quick` runs end
to end (sandbox, agent, 100 extra Services, wrk on both paths), prints a table
with a ClusterIP/direct ratio for each load, writes its results, and leaves
nothing behind. Timings are not pass/fail: no threshold on the numbers."""

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

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "bench" / "clusterip.py"

pytestmark = pytest.mark.root

# | 1 (bench only) | 12,095 (12,095-12,095) | 12,127 (...) | **1.003** | ... |
ROW = re.compile(r"^\| (?P<label>[\d,]+ \([^)]*\)) \|.*\| \*\*(?P<ratio>\d+\.\d+)\*\* \|", re.M)


def test_bench_quick_prints_a_ratio_for_each_load(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("bench/clusterip.py needs root (network namespaces, eBPF programs)")
    if shutil.which("wrk") is None:
        pytest.skip("wrk is not installed (apt-get install wrk)")

    res = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=280, cwd=REPO,
    )
    output = res.stdout + res.stderr
    assert res.returncode == 0, output

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

    # Nothing of the bench's sandbox is left: namespaces, cgroup, pins, processes.
    prefix = re.search(r"^sandbox (vr[0-9a-f]+):", res.stdout, re.M)
    assert prefix, output
    name = prefix[1]
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not [line for line in netns.splitlines() if line.startswith(name)], netns
    assert not os.path.exists(os.path.join(CGROUP_MOUNT, f"veer-{name}"))
    assert not os.path.exists(os.path.join(BPFFS_MOUNT, name))
    procs = subprocess.run(["pgrep", "-af", f"veer-{name}"], capture_output=True, text=True)
    assert procs.stdout.strip() == "", procs.stdout
