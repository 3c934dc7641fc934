"""deploy/image/install.sh, the Dockerfile's only step, works on this machine.

No engine can build the image here, so CI runs the script itself: into a
temporary prefix, from this checkout, twice (it must be idempotent), then
runs the installed `veer` as the chart's containers do. A broken step (a
missing Debian package, the bcc link, the gRPC code, the package data)
fails here.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.controlplane import REPO_ROOT

pytestmark = pytest.mark.root

SCRIPT = REPO_ROOT / "deploy" / "image" / "install.sh"


def _run(*argv: str | Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run from / so that nothing of the checkout is on Python's path."""
    proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True,
                          timeout=timeout, check=False, cwd="/")  # fmt: skip
    assert proc.returncode == 0, (
        f"{' '.join(map(str, argv))} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    )
    return proc


@pytest.fixture(scope="module")
def prefix() -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("the install script may install Debian packages: run as root")
    top = Path(tempfile.mkdtemp(prefix="veer-image-"))
    try:
        yield top / "opt" / "veer"
    finally:
        shutil.rmtree(top, ignore_errors=True)


def test_install_script_installs_a_working_veer(prefix: Path) -> None:
    first = _run(SCRIPT, prefix, REPO_ROOT, timeout=900)
    assert "install: ready: veer" in first.stdout
    again = _run(SCRIPT, prefix, REPO_ROOT, timeout=600)  # idempotent
    assert "creating virtualenv" not in again.stdout

    version = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert _run(prefix / "bin" / "veer", "version").stdout.strip() == f"veer {version}"
    help_text = _run(prefix / "bin" / "veer", "agent", "--help").stdout
    for flag in ("--kubernetes", "--node-name", "--cleanup", "--cleanup-on-uninstall",
                 "--owner-daemonset", "--cgroup", "--bpffs"):  # fmt: skip
        assert flag in help_text, flag
    # The debug CLI the NOTES and kubectl-veer run inside the agent's container.
    assert "status" in _run(prefix / "bin" / "veer", "--help").stdout

    # Installed, not linked to the checkout; the gRPC code is in the package;
    # bcc is Debian's, reached through the one link.
    probe = _run(prefix / "bin" / "python", "-c",
                 "import agent, agent.api.gen.veer_pb2 as pb, bcc;"
                 "print(agent.__file__); print(pb.__file__); print(bcc.__file__)").stdout.split()
    assert all(p.startswith(str(prefix)) for p in probe[:2]), probe
    assert probe[2].startswith(str(prefix / "bcc-link")), probe
    packages = _run(prefix / "bin" / "python", "-m", "pip", "list", "--format=freeze").stdout
    assert "grpcio-tools" not in packages  # a build tool, removed again
