"""The API server's socket handling and a round trip through the client,
with an agent on the fake datapath (no root, no kernel).

The socket is created 0600 in a directory made 0700; a stale socket file is
replaced; a live one is refused; stopping removes it.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubefake import FakeApi

from agent.cli.client import AgentUnreachable, ApiError, Client
from agent.cli.render import render_conntrack
from agent.config import AgentConfig
from agent.daemon import Agent
from agent.datapath.fake import FakeDatapath
from agent.datapath.flows import FlowEvent
from agent.datapath.inspect import NatFlow, StateReader
from agent.errors import ConfigError
from agent.kube.source import KubeSource
from agent.serve import ServeOptions

WEB = """
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, protocol: TCP, port: 80, targetPort: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: default
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{name: http, protocol: TCP, port: 8080}]
endpoints:
  - addresses: ["10.244.1.2"]
  - addresses: ["10.244.1.5"]
    conditions: {ready: false}
"""


def make_agent(tmp: Path, sock: str) -> Agent:
    manifests = tmp / "manifests"
    manifests.mkdir(exist_ok=True)
    (manifests / "web.yaml").write_text(WEB)
    config = AgentConfig(node_name="node-1", manifests=str(manifests), scan_interval=0.05)
    return Agent(config, FakeDatapath(), mode=("ebpf", "test"),
                 serve=ServeOptions(api_socket=sock))


@pytest.fixture
def running(tmp_path: Path) -> Iterator[tuple[Agent, str]]:
    sock = str(tmp_path / "run" / "veer.sock")
    agent = make_agent(tmp_path, sock)
    agent.start()
    try:
        deadline = time.monotonic() + 10
        while agent.telemetry.passes == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        yield agent, sock
    finally:
        agent.stop()


def test_socket_and_directory_are_root_only(running: tuple[Agent, str]) -> None:
    _, sock = running
    assert stat.S_ISSOCK(os.stat(sock).st_mode)
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(sock)).st_mode) == 0o700
    assert os.listdir(os.path.dirname(sock)) == ["veer.sock"]  # no staging leftovers


def test_round_trip(running: tuple[Agent, str]) -> None:
    agent, sock = running
    with Client(sock) as client:
        status = client.status()
        assert (status["mode"], status["mode_reason"], status["datapath"]) == (
            "ebpf", "test", "fake")
        assert status["programs"] == [] and status["frontends"] == 1
        assert status["sync"]["passes"] >= 1 and status["source"]["synced"]
        web = client.service("default", "web")["frontends"][0]
        assert [(b["address"], b["in_use"], b["ready"]) for b in web["backends"]] == [
            ("10.244.1.2", True, True), ("10.244.1.5", False, False)]
        assert web["state"] == "FRONTEND_STATE_PROGRAMMED"
        explained = client.explain("", "10.96.0.10", 80)
        assert explained["verdict"] == "VERDICT_TRANSLATE"
        assert [c["address"] for c in explained["candidates"]] == ["10.244.1.2"]
        assert client.maps()["in_sync"] is True
        passes = status["sync"]["passes"]
        assert client.resync(timeout=10)["sync"]["passes"] > passes
        with pytest.raises(ApiError) as missing:
            client.service("default", "nope")
        assert missing.value.code == "NOT_FOUND"

        # Flow events: the fake datapath reports none; feed the agent's hub.
        agent.flows.publish([FlowEvent(
            time=1.5, reason="refused_unknown_port", hook="connect4", protocol="TCP",
            destination=ipaddress.ip_address("10.96.0.10"), port=9999, pid=7, comm="curl")])
        [kept] = client.observe()
        assert (kept["verdict"], kept["reason"], kept["errno"], kept["service_port"]) == (
            "VERDICT_REFUSE", "refused_unknown_port", "ECONNREFUSED", "default/web")
        assert list(client.observe(verdicts=["drop"])) == []
        with pytest.raises(ApiError) as bad:
            list(client.observe(reasons=["bogus"]))
        assert bad.value.code == "INVALID_ARGUMENT"


def _forked_copies_of_this_process() -> list[int]:
    """Children of this process still running its own program: fork()ed,
    not (yet) exec()ed."""
    ours = Path("/proc/self/cmdline").read_bytes()
    pids = [int(p) for task in Path("/proc/self/task").iterdir()
            for p in (task / "children").read_text().split()]
    copies = []
    for pid in pids:
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/cmdline").read_bytes() == ours:
                copies.append(pid)
    return copies


def test_children_forked_beside_a_working_api_server_reach_exec(
    running: tuple[Agent, str],
) -> None:
    """gRPC's fork support is off (agent/__init__.py). With it on, a child
    fork()ed while the server and a client are busy (subprocess takes fork()
    when given a preexec_fn, as the sandbox's pod processes are) can hang or
    die of SIGABRT before exec(), and its program never runs."""
    _, sock = running
    stop = threading.Event()

    def call() -> None:
        with Client(sock) as client:
            while not stop.is_set():
                client.status()

    codes: list[int] = []

    def fork_many() -> None:
        for _ in range(100):
            codes.append(subprocess.run(["true"], preexec_fn=lambda: None).returncode)

    caller = threading.Thread(target=call)
    forker = threading.Thread(target=fork_many, daemon=True)
    caller.start()
    forker.start()
    try:
        forker.join(timeout=60)
        hung = forker.is_alive()
        if hung:  # a child of ours stuck before exec(): end it, so the thread ends
            for pid in _forked_copies_of_this_process():
                os.kill(pid, signal.SIGKILL)
            forker.join(timeout=10)
    finally:
        stop.set()
        caller.join()
    assert not hung, f"a fork()ed child hung before exec() after {len(codes)} children"
    assert codes == [0] * 100, sorted(set(codes))


def test_follow(running: tuple[Agent, str]) -> None:
    agent, sock = running
    started: list[str] = []
    refusal = FlowEvent(time=2.0, reason="refused_no_backend", hook="connect6", protocol="TCP",
                        destination=ipaddress.ip_address("10.96.0.10"), port=80)

    def publish_once_followed() -> None:
        deadline = time.monotonic() + 10
        while not started and time.monotonic() < deadline:
            time.sleep(0.01)
        agent.flows.publish([refusal, refusal])

    feeder = threading.Thread(target=publish_once_followed)
    feeder.start()
    with Client(sock) as client:
        stream = client.observe(namespace="default", follow=True, on_start=started.append)
        first = next(stream)
        assert started == ["traced"] and agent.flows.stats().subscribers == 1
        assert (first["reason"], first["hook"], first["lost_before"]) == (
            "refused_no_backend", "connect6", 0)
        assert next(stream)["time"] == 2.0
        stream.close()
    feeder.join(5)
    deadline = time.monotonic() + 10
    while agent.flows.stats().subscribers and time.monotonic() < deadline:
        time.sleep(0.05)
    assert agent.flows.stats().subscribers == 0 and not agent.flows.tracing


def test_live_socket_is_refused(running: tuple[Agent, str], tmp_path: Path) -> None:
    _, sock = running
    (tmp_path / "second").mkdir()
    second = make_agent(tmp_path / "second", sock)
    with pytest.raises(ConfigError, match="another veer agent answers there"):
        second.servers.start()
    assert stat.S_ISSOCK(os.stat(sock).st_mode)  # the first agent's socket is untouched


def test_stale_socket_is_replaced_and_removed_on_stop(tmp_path: Path) -> None:
    sock = str(tmp_path / "veer.sock")
    with socket.socket(socket.AF_UNIX) as dead:
        dead.bind(sock)  # bound, never listening, then closed: stale
    agent = make_agent(tmp_path, sock)
    agent.servers.start()
    try:
        with Client(sock) as client:
            assert client.status()["node_name"] == "node-1"
    finally:
        agent.servers.stop()
    assert not os.path.exists(sock)
    with pytest.raises(AgentUnreachable, match=f"no veer agent at {sock}"):
        Client(sock).status()


def test_not_a_socket_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "veer.sock"
    path.write_text("not a socket")
    with pytest.raises(ConfigError, match="exists and is not a socket"):
        make_agent(tmp_path, str(path)).servers.start()


@pytest.mark.parametrize("address", ["0.0.0.0:9999", "10.0.0.1:1"])
def test_tcp_api_is_loopback_only(tmp_path: Path, address: str) -> None:
    manifests = tmp_path / "m"
    manifests.mkdir()
    config = AgentConfig(node_name="n", manifests=str(manifests))
    with pytest.raises(ConfigError, match="not a loopback address"):
        Agent(config, FakeDatapath(), serve=ServeOptions(api_address=address))


def test_not_found_names_the_api_server_in_kubernetes_mode(tmp_path: Path) -> None:
    """The agent's source, whichever it is (the manifest directory was named
    even when there was none: "(source: None)")."""
    sock = str(tmp_path / "veer.sock")
    config = AgentConfig(node_name="node-1", kubernetes=True)
    agent = Agent(config, FakeDatapath(), serve=ServeOptions(api_socket=sock),
                  source=lambda store: KubeSource(FakeApi(), store, "node-1"))
    agent.servers.start()
    try:
        with Client(sock) as client, pytest.raises(ApiError) as missing:
            client.service("default", "nope")
    finally:
        agent.servers.stop()
    assert missing.value.code == "NOT_FOUND"
    assert missing.value.details == ("no Service default/nope in this agent's view "
                                     f"(source: {FakeApi.server})")


@pytest.mark.parametrize("timeout", [float("nan"), float("inf"), -1.0, 1e12])
def test_resync_refuses_a_timeout_it_cannot_wait_for(
    running: tuple[Agent, str], timeout: float
) -> None:
    """From any client, not only `veer resync` (which checks too): NaN and
    infinity made the wait fail inside the agent, -1 a pass "not completed
    within -1s"."""
    _, sock = running
    with Client(sock) as client, pytest.raises(ApiError) as refused:
        client._call("Resync", client.pb.ResyncRequest(timeout_seconds=timeout), timeout=10)
    assert refused.value.code == "INVALID_ARGUMENT"
    assert "timeout_seconds must be in 0..86400" in refused.value.details


def test_conntrack_lists_per_packet_flows_filtered_and_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fake datapath has no NAT table: its reader is given three flows:
    one of Service web (id 1, the only frontend), one of the node's own moved
    connection (service 0), and one whose id 1 was another frontend's
    (10.96.0.99:80) before it was freed and handed to web."""
    ip = ipaddress.ip_address
    flows = [
        NatFlow("TCP", ip("10.0.0.100"), 40000, ip("10.96.0.10"), 80, ip("10.0.0.1"), 40000,
                ip("10.244.1.2"), 8080, 1, ("half-closed",), 3.0),
        NatFlow("TCP", ip("10.0.0.1"), 50000, ip("10.244.1.2"), 8080, ip("10.0.0.1"), 61000,
                ip("10.244.1.2"), 8080, 0, (), 1.0),
        NatFlow("TCP", ip("10.0.0.100"), 40001, ip("10.96.0.99"), 80, ip("10.0.0.1"), 40001,
                ip("10.244.9.9"), 8080, 1, ("closing", "expired"), 30.0),
    ]
    monkeypatch.setattr(StateReader, "nat_flows",
                        lambda self, address=None, port=0, limit=0: (flows, 7))
    monkeypatch.setattr(StateReader, "nat_flows_capacity", lambda self: 262144)
    sock = str(tmp_path / "run" / "veer.sock")
    agent = make_agent(tmp_path, sock)
    agent.start()
    try:
        with Client(sock) as client:
            deadline = time.monotonic() + 10
            while not client.status()["sync"]["passes"] and time.monotonic() < deadline:
                time.sleep(0.02)
            every = client.conntrack()
            assert [(f["client_port"], f["service"], f["service_id"], f["flags"])
                    for f in every["flows"]] == [
                        (40000, "default/web:http", 1, ["half-closed"]),
                        (40001, "", 1, ["closing", "expired"]),
                        (50000, "", 0, [])]
            assert (every["flows_total"], every["flows_capacity"]) == (7, 262144)
            assert [f["client_port"] for f in client.conntrack("10.0.0.100")["flows"]] == [
                40000, 40001]
            assert [f["client_port"] for f in client.conntrack(port=61000)["flows"]] == [50000]
            assert [f["client_port"] for f in client.conntrack(port=8080)["flows"]] == [
                40000, 40001, 50000]
            text = render_conntrack(every)
            assert "(the node's own, moved off a source-NATed flow's port)" in text
            assert "(service id 1, gone)" in text and "closing,expired" in text
            assert "7 per-packet flows (the first 3: --limit) in veer_nat_fwd" in text
    finally:
        agent.stop()
