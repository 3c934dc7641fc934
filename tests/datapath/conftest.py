"""Fixtures for datapath tests: real programs in the real kernel, inside
network namespaces and a cgroup that each test creates and removes.

Address conventions (the sandbox's, see examples/sandbox/):
  Service CIDRs      10.96.0.0/16, fd00:96::/112
  web (TCP)          10.96.0.10 :80 -> pods :8080 (named port "http"), :8081 -> :8081
  echo (UDP)         10.96.0.53 :53 -> pods :9053
  web-dual           10.96.0.20 / fd00:96::20 :80/TCP -> :8080, :53/UDP -> :9053
  empty              10.96.0.99 :80, no endpoints
  pods               web-a .2, web-b .3, web-c .4 (ready), web-d .5 (not ready)
                     in 10.244.1.0/24 and fd00:10:244:1::/64; client .100
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator, Sequence

import pytest

from agent.sandbox.cluster import SandboxCluster
from agent.sandbox.topology import BPFFS_MOUNT, CREATED_PREFIXES


def _kernel_can_sock_addr() -> str:
    """Empty if the kernel loads cgroup sock_addr programs, else why not."""
    try:
        out = subprocess.run(
            ["bpftool", "feature", "probe", "kernel"], capture_output=True, text=True, timeout=60
        ).stdout
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"bpftool cannot probe the kernel: {err}"
    if "program_type cgroup_sock_addr is available" not in out:
        return "this kernel lacks cgroup_sock_addr programs"
    return ""


def require_datapath() -> None:
    if os.geteuid() != 0:
        pytest.skip("datapath tests need root (eBPF programs, network namespaces)")
    reason = _kernel_can_sock_addr()
    if reason:
        pytest.skip(reason)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/datapath" in str(item.fspath):
            item.add_marker(pytest.mark.root)


@pytest.fixture(scope="module")
def shared_cluster() -> Iterator[SandboxCluster]:
    """A running sandbox for tests that only send traffic (they change nothing)."""
    require_datapath()
    with SandboxCluster() as cluster:
        cluster.start_agent()
        yield cluster


@pytest.fixture
def cluster() -> Iterator[SandboxCluster]:
    """A fresh sandbox with a running agent, for tests that change things."""
    require_datapath()
    with SandboxCluster() as cluster:
        cluster.start_agent()
        yield cluster


@pytest.fixture(scope="session", autouse=True)
def no_leftovers() -> Iterator[None]:
    """Fail the session if tests left namespaces, cgroups or pins of their own behind."""
    def netns() -> set[str]:
        out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        return {line.split()[0] for line in out.splitlines() if line.strip()}

    def cgroups() -> set[str]:
        try:
            return {d for d in os.listdir("/run/veer/cgroup") if d.startswith("veer-")}
        except FileNotFoundError:
            return set()

    yield
    ours = tuple(CREATED_PREFIXES)
    leaked_ns = {n for n in netns() if n.startswith(ours)} if ours else set()
    leaked_cg = {c for c in cgroups() if ours and c.removeprefix("veer-").startswith(ours)}
    leaked_pins = [p for p in ours if os.path.exists(os.path.join(BPFFS_MOUNT, p))]
    assert not (leaked_ns or leaked_cg or leaked_pins), (
        f"left behind: {leaked_ns} {leaked_cg} {leaked_pins}"
    )


def run_bench(argv: Sequence[str], timeout: float, cwd: str | os.PathLike[str] | None = None
              ) -> subprocess.CompletedProcess[str]:
    """Run a bench script to its end, its output captured, as subprocess.run
    would, except when this test is interrupted or times out: then the bench
    gets SIGTERM and up to BENCH_UNWIND_S to remove what it built (benchlib
    unwinds SIGTERM like Ctrl-C), where subprocess.run would SIGKILL it and
    leave its namespaces, cgroups, pins and processes behind. (Not
    topology.stop_process: it wait()s, and a bench still writing to a full
    pipe meanwhile would never end; communicate() keeps reading.)"""
    proc = subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=cwd)
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException:
        proc.terminate()
        try:
            proc.communicate(timeout=BENCH_UNWIND_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
        raise
    return subprocess.CompletedProcess(list(argv), proc.returncode, out, err)


BENCH_UNWIND_S = 120.0
