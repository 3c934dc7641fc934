"""The agent's lifecycle: the datapath outlives it, a restart adopts what is
pinned without disturbing traffic, and --cleanup removes everything."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from agent.datapath.ebpf.maps import SockLbMaps
from agent.datapath.ebpf.programs import ALWAYS_HOOKS, attached_programs
from agent.sandbox.cluster import SandboxCluster

WEB = {"web-a:8080", "web-b:8080", "web-c:8080"}


def _services_map(cluster: SandboxCluster) -> dict[bytes, bytes]:
    maps = SockLbMaps.open(cluster.topo.bpffs)
    try:
        return {bytes(k): bytes(v) for k, v in maps.services.items()}
    finally:
        maps.close()


def test_datapath_survives_sigkill(cluster: SandboxCluster) -> None:
    cluster.stop_agent(signal.SIGKILL)
    result = cluster.probe("tcp", "10.96.0.10", "80", "--count", "150")
    assert result["errors"] == {} and set(result["answers"]) == WEB, result
    refused = cluster.probe("tcp", "10.96.0.99", "80", "--count", "3", "--timeout", "5")
    assert refused["errors"] == {"ECONNREFUSED": 3}


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGKILL], ids=["term", "kill"])
def test_restart_under_load_loses_nothing(cluster: SandboxCluster, stop_signal: int) -> None:
    before = _services_map(cluster)
    loop = cluster.spawn_probe(
        "tcp", "10.96.0.10", "80", "--duration", "8", "--interval", "0.002", "--timeout", "5"
    )
    held = cluster.spawn_probe(
        "tcp", "10.96.0.10", "80", "--persistent", "60", "--interval", "0.1", "--timeout", "5"
    )
    assert held.stdout is not None
    assert json.loads(held.stdout.readline()) == {"connected": True}
    time.sleep(1)
    cluster.stop_agent(stop_signal)
    cluster.start_agent()  # waits for the first (full) sync of the new agent
    loop_out, _ = loop.communicate(timeout=60)
    held_out, _ = held.communicate(timeout=60)
    looped = json.loads(loop_out.strip().splitlines()[-1])
    kept = json.loads(held_out.strip().splitlines()[-1])

    assert looped["errors"] == {}, looped
    assert looped["attempts"] > 100 and set(looped["answers"]) == WEB, looped
    # The established connection stayed on one backend for all 60 requests.
    assert kept["errors"] == {} and len(kept["answers"]) == 1, kept
    assert sum(kept["answers"].values()) == 60
    # The new agent adopted the pinned maps: same ids, same slots, nothing rewritten.
    assert _services_map(cluster) == before


def test_cleanup_removes_programs_and_pins(cluster: SandboxCluster) -> None:
    topo = cluster.topo
    attached = attached_programs(topo.cgroup)
    assert {p.hook for p in attached} == {h.hook for h in ALWAYS_HOOKS}
    cluster.stop_agent()
    res = subprocess.run(
        [sys.executable, "-m", "agent.cli.main", "agent", "--cleanup",
         "--cgroup", topo.cgroup, "--bpffs", topo.bpffs],
        capture_output=True, text=True, timeout=60,
    )
    assert res.returncode == 0, res.stderr
    assert attached_programs(topo.cgroup) == []
    assert not os.path.exists(topo.bpffs)
    # The Service address is no longer translated or refused by veer; the pod
    # address still works.
    direct = cluster.probe("tcp", "10.244.1.2", "8080", "--count", "3")
    assert direct["answers"] == {"web-a:8080": 3}
    vip = cluster.probe("tcp", "10.96.0.10", "80", "--count", "1", "--timeout", "2")
    assert vip["answers"] == {} and "ECONNREFUSED" not in vip["errors"], vip
    # A second cleanup is a no-op.
    again = subprocess.run(
        [sys.executable, "-m", "agent.cli.main", "agent", "--cleanup",
         "--cgroup", topo.cgroup, "--bpffs", topo.bpffs],
        capture_output=True, text=True, timeout=60,
    )
    assert again.returncode == 0, again.stderr


def test_restart_prunes_what_was_deleted_while_the_agent_was_down(
    cluster: SandboxCluster,
) -> None:
    cluster.stop_agent()
    cluster.remove_manifest("echo.yaml")
    # With no agent, the datapath still serves the old state.
    assert cluster.probe("udp", "10.96.0.53", "53", "--count", "5")["errors"] == {}
    cluster.start_agent()
    status = cluster.wait_status(lambda s: "10.96.0.53:53/UDP" not in s["frontends"])
    assert status["ok"]
    refused = cluster.probe("udp", "10.96.0.53", "53", "--count", "3", "--timeout", "2")
    assert refused["errors"] == {"ECONNREFUSED": 3}, refused
    still = cluster.probe("tcp", "10.96.0.10", "80", "--count", "30")
    assert still["errors"] == {} and set(still["answers"]) <= WEB


def test_auto_mode_probes_the_kernel(cluster: SandboxCluster) -> None:
    """--mode auto starts eBPF mode on a kernel with every feature (the
    sandbox agent did); --mode ebpf refuses at start, naming the feature,
    when the probe is told to hide one (auto then falls back to TPROXY mode:
    test_tproxy.py; not with --nodeport-mode dsr)."""
    assert "auto: the kernel has all" in cluster.agent_output()
    forced = subprocess.run(
        cluster.agent_argv(["--mode", "ebpf", "--hide-kernel-feature", "program:sched_cls"]),
        capture_output=True, text=True, timeout=60,
    )
    assert forced.returncode == 2 and "--mode ebpf: this kernel lacks program:sched_cls" in (
        forced.stderr), forced.stderr
    # DSR is done by the eBPF programs, and the other nodes count on it: no
    # fallback to TPROXY mode.
    dsr = subprocess.run(
        cluster.agent_argv(["--nodeport-mode", "dsr", "--cluster-cidr", "10.244.0.0/16",
                            "--hide-kernel-feature", "program:sched_cls"]),
        capture_output=True, text=True, timeout=60,
    )
    assert dsr.returncode == 2 and "--nodeport-mode dsr needs eBPF mode: this kernel lacks " \
        "program:sched_cls" in dsr.stderr, dsr.stderr


def test_policy_hooks_are_attached_only_while_a_frontend_needs_them(
        cluster: SandboxCluster) -> None:
    """sockops and getsockopt (redirect) and sock_release (LeastConnections)
    run for every socket of the cgroup once attached, so they are attached
    before the first frontend that needs them and detached after the last."""
    from agent.datapath.ebpf.lc_sweep import open_connections
    from agent.sandbox.holder import Holder
    from tests.datapath.test_traffic_policies import policy, service, wait_policy, write

    def hooks() -> set[str]:
        return {p.hook for p in attached_programs(cluster.topo.cgroup)}

    def wait_hooks(want: set[str]) -> None:
        deadline = time.monotonic() + 30
        while hooks() != want:
            assert time.monotonic() < deadline, (hooks(), want)
            time.sleep(0.1)

    def counted_after_release() -> int:
        """Connections LeastConnections counts once released sockets are given back."""
        time.sleep(0.2)
        maps = SockLbMaps.open(cluster.topo.bpffs)
        try:
            return sum(open_connections(maps).values())
        finally:
            maps.close()

    always = {h.hook for h in ALWAYS_HOOKS}
    redirect_hooks = {"sockops", "getsockopt"}
    assert hooks() == always
    cluster.stop_agent()
    cluster.start_agent(extra=["--proxy-uid", "65534"])
    assert hooks() == always
    lc = [*service("lc", "10.96.1.3", ["web-a", "web-b"]),
          policy("lc", "lc", loadBalancing={"algorithm": "LeastConnections"})]
    redir = [*service("redir", "10.96.1.6", ["web-a"]),
             policy("redir", "redir", redirect={"port": 15001, "mode": "EBPF"})]
    write(cluster, "needs.yaml", lc + redir)
    wait_policy(cluster, "10.96.1.3", "default/lc")
    wait_policy(cluster, "10.96.1.6", "default/redir")
    assert hooks() == always | redirect_hooks | {"sock_release"}
    # Attached before the frontend: every connection counted is given back.
    res = cluster.probe("tcp", "10.96.1.3", "80", "--count", "20")
    assert res["errors"] == {} and sum(res["answers"].values()) == 20, res
    assert counted_after_release() == 0

    # A restarted agent keeps what its frontends need, with its own programs.
    old = {p.hook: p.prog_id for p in attached_programs(cluster.topo.cgroup)}
    cluster.stop_agent()
    cluster.start_agent(extra=["--proxy-uid", "65534"])
    new = {p.hook: p.prog_id for p in attached_programs(cluster.topo.cgroup)}
    assert set(new) == set(old) and all(new[h] != old[h] for h in new), (old, new)

    # Without the LeastConnections policy, only the redirect's hooks stay,
    # but not before the last socket it counted is closed: that socket gives
    # its count back only through sock_release.
    with Holder(cluster.client, cluster.topo._join_cgroup) as holder:
        held = holder.open("10.96.1.3", 80)
        write(cluster, "needs.yaml", redir)
        cluster.wait_status(lambda s: "default/lc" not in json.dumps(s.get("policies", {})),
                            what="the LeastConnections policy gone")
        time.sleep(0.5)
        assert "sock_release" in hooks()
        assert holder.close(held) == 1
    assert counted_after_release() == 0
    write(cluster, "other.yaml", service("other", "10.96.1.7", ["web-a"]))  # a pass
    wait_hooks(always | redirect_hooks)
    cluster.remove_manifest("needs.yaml")
    cluster.remove_manifest("other.yaml")
    wait_hooks(always)
    res = cluster.probe("tcp", "10.96.0.10", "80", "--count", "20")
    assert res["errors"] == {} and set(res["answers"]) <= WEB, res
