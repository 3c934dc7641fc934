"""Smoke test of `bench/progcost.py --quick`, so that it cannot rot: it runs
end to end against make bench's cluster, reads the kernel's statistics of
veer's programs, puts the statistics switch back as it found it and leaves
nothing behind. No threshold on any time."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from tests.datapath.conftest import run_bench
from tests.datapath.test_bench_smoke import assert_nothing_left
from tests.e2e.controlplane import bin_dir, build_binaries, missing_binaries

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "bench" / "progcost.py"
SWITCH = Path("/proc/sys/kernel/bpf_stats_enabled")

pytestmark = [pytest.mark.root, pytest.mark.e2e]


@pytest.mark.timeout(600)
def test_progcost_quick_counts_veer_programs_per_connection(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("bench/progcost.py needs root (network namespaces, eBPF)")
    for tool in ("wrk", "bpftool"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (scripts/setup.sh installs it)")
    if not SWITCH.exists():
        pytest.skip("this kernel has no kernel.bpf_stats_enabled")
    if missing_binaries():
        build_binaries()
    assert not missing_binaries(), bin_dir()
    switch_before = SWITCH.read_text()

    res = run_bench([sys.executable, str(BENCH), "--quick", "--out", str(tmp_path)],
                    timeout=580, cwd=REPO)
    output = res.stdout + res.stderr
    assert res.returncode == 0, output[-6000:]
    assert SWITCH.read_text() == switch_before

    [raw] = tmp_path.glob("progcost-*-quick.json")
    data = json.loads(raw.read_text())
    assert all(len(data["rates"][p]) == 1 and data["rates"][p][0] > 0
               for p in ("direct", "veer", "veer-pod")), data["rates"]
    # The plain node carries no veer program; on veer's node, connect() runs
    # the hook once per connection, translating to the ClusterIP or not.
    # (a stray packet, an ARP probe, may still cross veer's node meanwhile)
    assert all(rows[0][0] < 0.01 for rows in data["costs"]["direct"].values()), data["costs"]
    for path in ("veer", "veer-pod"):
        [(runs, ns_per_run, ns_per_conn)] = data["costs"][path]["veer_connect4"]
        assert 0.95 <= runs <= 1.05 and ns_per_run > 0 and ns_per_conn > 0, data["costs"]
    assert list(tmp_path.glob("progcost-*-quick.md"))
    assert_nothing_left(res.stdout)
