"""Smoke test of the flow-events benchmark: `bench/observe.py --quick` runs end
to end (sandbox, agent, wrk with translation events off and with a follower),
prints the on/off ratio, writes its results, and leaves nothing behind.
Timings are not pass/fail: no threshold on the numbers."""

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
BENCH = REPO / "bench" / "observe.py"

pytestmark = pytest.mark.root


def test_observe_bench_quick_prints_the_on_off_ratio(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("bench/observe.py needs root (network namespaces, eBPF programs)")
    if shutil.which("wrk") is None:
        pytest.skip("wrk is not installed (apt-get install wrk)")
    res = run_bench([sys.executable, str(BENCH), "--quick", "--out", str(tmp_path)],
                    timeout=280, cwd=REPO)
    output = res.stdout + res.stderr
    assert res.returncode == 0, output

    ratio = re.search(r"^on/off: \*\*(\d+\.\d+)\*\*", res.stdout, re.M)
    assert ratio and float(ratio[1]) > 0, output
    assert re.search(r"^\| off \(no follower\) \| [\d,]+ .*\| 0 / 0 \|", res.stdout, re.M), output
    [raw] = tmp_path.glob("observe-*-quick.json")
    data = json.loads(raw.read_text())
    runs = {r["mode"]: r for r in data["runs"]}
    assert set(runs) == {"off", "on"}
    assert runs["off"]["events_sent"] == 0
    assert runs["on"]["events_sent"] + runs["on"]["events_lost"] >= runs["on"]["translated"] > 0
    assert list(tmp_path.glob("observe-*-quick.md"))

    prefix = re.search(r"^sandbox (vr[0-9a-f]+):", res.stdout, re.M)
    assert prefix, output
    name = prefix[1]
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not [line for line in netns.splitlines() if line.startswith(name)], netns
    assert not os.path.exists(os.path.join(CGROUP_MOUNT, f"veer-{name}"))
    assert not os.path.exists(os.path.join(BPFFS_MOUNT, name))
    procs = subprocess.run(["pgrep", "-af", f"veer-{name}"], capture_output=True, text=True)
    assert procs.stdout.strip() == "", procs.stdout
