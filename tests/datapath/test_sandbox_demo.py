"""The README's first command runs `veer sandbox`: it must keep working and
keep reporting what it claims to, for one node and for several."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.datapath.conftest import require_datapath


def run(*args: str) -> str:
    require_datapath()
    res = subprocess.run([sys.executable, "-m", "agent.cli.main", "sandbox", *args],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout


def test_single_node_sandbox_report() -> None:
    out = run("--requests", "60")
    # Shares over the three ready web pods, never the not-ready one.
    for backend in ("web-a:8080", "web-b:8080", "web-c:8080"):
        assert re.search(rf"{backend}\s+\d+\s+\d+\.\d%", out), out
    shares = out.split("== share")[1].split("== refusals")[0]
    assert not re.search(r"web-d:\d+\s+\d+", shares), shares
    assert out.count("{'ECONNREFUSED': 10}") == 3, out
    assert "reported and skipped: Service/default/signalling: UnsupportedProtocol" in out
    assert "sandbox removed" in out


def test_multi_node_sandbox_report() -> None:
    out = run("--nodes", "2", "--requests", "40")
    cluster_part, local_part = out.split("externalTrafficPolicy: Local")
    assert "SNAT to the node" in cluster_part and "client address kept" in cluster_part
    assert "SNAT to the node" not in local_part and "client address kept" in local_part
    assert "sandbox removed" in out
