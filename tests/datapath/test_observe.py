"""Flow events end to end: real connections from the client pod, the BPF
programs' reports through the ring buffer, the agent's hub, and `veer
observe` run as a subprocess on the agent's API socket.

- Refusals are always reported, with their reason and Service.
- A follower asking for translations sees each connection to a Service with
  the backend that answered it.
- Without followers, translations cost no event (the kernel's events_sent
  counter does not move).
- The per-packet path (TC, across two nodes) reports drops and denials with
  the outside client's address, and new flows while followed.

Addresses as in conftest.py: default/web 10.96.0.10 (:80 "http" over
web-a/b/c, 10.244.1.2-4:8080), default/empty 10.96.0.99:80 without
endpoints, web-dual [fd00:96::20]:80.
"""

from __future__ import annotations

import contextlib
import json
import queue
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import pytest

from agent.metrics.exposition import parse
from agent.sandbox.cluster import WEB_PODS, SandboxCluster
from agent.sandbox.multinode import MultiNodeCluster

from .conftest import require_datapath

METRICS = "127.0.0.1:10249"
DEBUGGING_DOC = Path(__file__).resolve().parents[2] / "docs" / "debugging.md"
POD_OF_IP = {p.ipv4: p.name for p in WEB_PODS} | {p.ipv6: p.name for p in WEB_PODS}
READY = {p.name for p in WEB_PODS if p.name != "web-d"}


@pytest.fixture(scope="module")
def live() -> Iterator[SandboxCluster]:
    require_datapath()
    with SandboxCluster() as cluster:
        cluster.start_agent(extra=["--metrics-bind-address", METRICS,
                                   "--healthz-bind-address", ""])
        yield cluster


def veer(sock: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`veer ARGS --socket SOCK`, which must succeed."""
    res = subprocess.run(
        [sys.executable, "-m", "agent.cli.main", *args, "--socket", sock],
        capture_output=True, text=True, timeout=60,
    )
    assert res.returncode == 0, f"veer {' '.join(args)}: {res.returncode}\n{res.stderr}"
    assert "Traceback" not in res.stderr
    return res


def kept_events(sock: str, *args: str) -> list[dict[str, Any]]:
    return list(json.loads(veer(sock, "observe", "-o", "json", *args).stdout)["events"])


def wait_for(what: str, check: Callable[[], Any], timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def scrape(cluster: SandboxCluster) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    code = ("import urllib.request, sys\n"
            f"sys.stdout.write(urllib.request.urlopen('http://{METRICS}/metrics', "
            "timeout=10).read().decode())\n")
    res = cluster.topo.exec(cluster.topo.node_ns, [sys.executable, "-c", code],
                            in_cgroup=False, timeout=30)
    assert res.returncode == 0, res.stderr
    return parse(res.stdout)


def counters(cluster: SandboxCluster) -> dict[str, int]:
    data = json.loads(veer(cluster.api_socket, "status", "-o", "json").stdout)
    return {c["name"]: int(c["value"]) for c in data["counters"]}


def no_followers(cluster: SandboxCluster) -> bool:
    m = scrape(cluster)
    return m["veer_flow_followers"][()] == 0 and m["veer_flow_translations_traced"][()] == 0


class Follower:
    """`veer observe --follow -o json ...` in the background, its lines in a queue."""

    def __init__(self, sock: str, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent.cli.main", "observe", "--follow", "-o", "json",
             *args, "--socket", sock],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.errors: queue.Queue[str] = queue.Queue()
        for stream, sink in ((self.proc.stdout, self.lines), (self.proc.stderr, self.errors)):
            threading.Thread(target=self._pump, args=(stream, sink), daemon=True).start()

    @staticmethod
    def _pump(stream: IO[str] | None, sink: queue.Queue[str]) -> None:
        assert stream is not None
        for line in stream:
            sink.put(line)

    def started(self, timeout: float = 20.0) -> str:
        """The note printed once the agent registered us."""
        try:
            return self.errors.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(
                f"the follower did not start (exit {self.proc.poll()})") from None

    def events(self, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        out = []
        deadline = time.monotonic() + timeout
        while len(out) < count:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"got {len(out)} of {count} events: {out}") from None
            out.append(json.loads(line))
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


@contextlib.contextmanager
def following(sock: str, *args: str) -> Iterator[Follower]:
    follower = Follower(sock, *args)
    try:
        yield follower
    finally:
        follower.stop()


def test_refusals_appear_with_their_reasons_and_services(live: SandboxCluster) -> None:
    assert live.probe("tcp", "10.96.0.99", "80", "--count", "1")["errors"] == {"ECONNREFUSED": 1}
    assert live.probe("tcp", "10.96.0.10", "9999", "--count", "1")["errors"] == {
        "ECONNREFUSED": 1}

    def both() -> dict[tuple[str, int], dict[str, Any]] | None:
        found = {(e["destination"], e["port"]): e for e in kept_events(live.api_socket)}
        return found if {("10.96.0.99", 80), ("10.96.0.10", 9999)} <= found.keys() else None

    found = wait_for("both refusals in `veer observe`", both)
    empty, unexposed = found[("10.96.0.99", 80)], found[("10.96.0.10", 9999)]
    assert (empty["verdict"], empty["reason"], empty["errno"], empty["service_port"]) == (
        "VERDICT_REFUSE", "refused_no_backend", "ECONNREFUSED", "default/empty:http")
    assert (unexposed["verdict"], unexposed["reason"], unexposed["service_port"]) == (
        "VERDICT_REFUSE", "refused_unknown_port", "default/web")
    for e in (empty, unexposed):
        # The socket hook runs before a source address exists: the process instead.
        assert e["hook"] == "connect4" and e["source"] == "" and e["backend_address"] == ""
        assert e["protocol"] == "TCP" and e["pid"] > 0 and e["comm"] and e["cookie"] > 0
        assert e["namespace"] == "default" and abs(e["time"] - time.time()) < 60

    table = veer(live.api_socket, "observe").stdout
    assert table.splitlines()[0].split() == [
        "TIME", "(UTC)", "VERDICT", "SERVICE", "DESTINATION", "BACKEND", "CLIENT", "REASON"]
    line = next(x for x in table.splitlines() if "10.96.0.99:80/TCP" in x)
    assert "refuse" in line and "default/empty:http" in line
    assert "the Service has no endpoints: refused at once (ECONNREFUSED, connect4)" in line
    line = next(x for x in table.splitlines() if "10.96.0.10:9999/TCP" in x)
    assert "the Service does not expose this port" in line and "default/web " in line

    only = kept_events(live.api_socket, "--service", "empty", "--verdict", "refused-no-backend")
    assert only and {(e["destination"], e["port"]) for e in only} == {("10.96.0.99", 80)}
    assert kept_events(live.api_socket, "--namespace", "kube-system") == []
    assert kept_events(live.api_socket, "--verdict", "translate", "drop") == []

    scraped = scrape(live)
    metrics = scraped["veer_flow_events_total"]
    assert metrics[(("service", "default/empty:http"), ("verdict", "refused_no_backend"))] >= 1
    assert metrics[(("service", "default/web"), ("verdict", "refused_unknown_port"))] >= 1
    documented = DEBUGGING_DOC.read_text()
    for name in ("veer_flow_events_total", "veer_flow_events_lost_total",
                 "veer_flow_followers", "veer_flow_translations_traced"):
        assert name in scraped, f"{name} not exposed"
        assert f"| `{name}" in documented, f"{name} is not documented in docs/debugging.md"


def test_a_follower_sees_each_translation_with_its_backend(live: SandboxCluster) -> None:
    with following(live.api_socket, "--service", "default/web") as follower:
        assert "translations are traced" in follower.started()
        assert wait_for("tracing on", lambda: scrape(live)[
            "veer_flow_translations_traced"][()] == 1)
        answers = live.probe("tcp", "10.96.0.10", "80", "--count", "6")["answers"]
        assert sum(answers.values()) == 6
        got = follower.events(6)
        assert {(e["verdict"], e["reason"], e["hook"], e["service_port"]) for e in got} == {
            ("VERDICT_TRANSLATE", "translated", "connect4", "default/web:http")}
        # Each event names the backend that answered that connection.
        backends = Counter(f"{POD_OF_IP[e['backend_address']]}:{e['backend_port']}"
                           for e in got)
        assert backends == Counter(answers)
        assert {e["backend_address"] for e in got} <= {
            p.ipv4 for p in WEB_PODS if p.name in READY}
        assert len({e["cookie"] for e in got}) == 6  # one socket each

        # Other Services' events do not reach this follower.
        live.probe("tcp", "10.96.0.99", "80", "--count", "1")
        live.probe("tcp", "fd00:96::20", "80", "--count", "1")
        time.sleep(0.5)  # the agent reads the ring buffer every 100 ms
        assert follower.lines.empty(), list(follower.lines.queue)
    # The follower is gone: the agent stops tracing translations.
    wait_for("tracing off once the follower left", lambda: no_followers(live))


def test_a_follower_of_ipv6_and_udp(live: SandboxCluster) -> None:
    with following(live.api_socket, "--service", "default/web-dual") as follower:
        follower.started()
        live.probe("tcp", "fd00:96::20", "80", "--count", "1")
        live.probe("udp", "10.96.0.20", "53", "--count", "1")
        tcp6, udp = follower.events(2)
        assert (tcp6["hook"], tcp6["destination"], tcp6["service_port"]) == (
            "connect6", "fd00:96::20", "default/web-dual:http")
        assert POD_OF_IP[tcp6["backend_address"]] in READY and tcp6["backend_port"] == 8080
        assert (udp["hook"], udp["protocol"], udp["service_port"]) == (
            "sendmsg4", "UDP", "default/web-dual:dns")
        assert udp["backend_port"] == 9053
    wait_for("tracing off", lambda: no_followers(live))


def test_a_follower_of_refusals_only_leaves_translations_untraced(live: SandboxCluster) -> None:
    wait_for("no followers", lambda: no_followers(live))
    with following(live.api_socket, "--verdict", "refuse") as follower:
        assert "translations are not traced" in follower.started()
        before = counters(live)["events_sent"]
        live.probe("tcp", "10.96.0.10", "80", "--count", "3")
        live.probe("tcp", "10.96.0.99", "80", "--count", "1")
        [refusal] = follower.events(1)
        assert refusal["reason"] == "refused_no_backend"
        assert counters(live)["events_sent"] == before + 1
        assert scrape(live)["veer_flow_translations_traced"][()] == 0


def test_without_followers_translations_are_not_reported(live: SandboxCluster) -> None:
    wait_for("no followers", lambda: no_followers(live))
    before = counters(live)
    result = live.probe("tcp", "10.96.0.10", "80", "--count", "20")
    assert sum(result["answers"].values()) == 20
    after = counters(live)
    assert after["translated"] - before["translated"] == 20
    assert after["events_sent"] == before["events_sent"]  # no event for any of them
    assert after["events_lost"] == before["events_lost"] == 0
    # Refusals still are.
    live.probe("tcp", "10.96.0.99", "80", "--count", "2")
    assert counters(live)["events_sent"] == after["events_sent"] + 2


# ---- the per-packet path (TC), across two nodes ------------------------------------------
#
# agent/sandbox/multinode.py: node-1 10.0.0.1 (web-a 10.244.1.2, web-b
# 10.244.1.3), node-2 10.0.0.2 (web-c 10.244.2.2), an external client
# 10.0.0.100 on their LAN. node-1's agent serves the API on a socket of its own.

EXT = "10.0.0.100"
LB_IP = "10.0.1.10"
POD_NAME = {"10.244.1.2": "web-a", "10.244.1.3": "web-b", "10.244.2.2": "web-c"}


def nodeport_web(endpoints: dict[str, str], **spec: object) -> str:
    """Service web, NodePort 30080 -> 8080 (a LoadBalancer at LB_IP with `lb`)."""
    lb = spec.pop("lb", False)
    svc: dict[str, Any] = {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {"type": "LoadBalancer" if lb else "NodePort", "clusterIP": "10.96.0.10",
                 "ports": [{"name": "http", "protocol": "TCP", "port": 80,
                            "targetPort": 8080, "nodePort": 30080}], **spec},
    }
    if lb:
        svc["status"] = {"loadBalancer": {"ingress": [{"ip": LB_IP}]}}
    eps = {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "web-1", "namespace": "default",
                     "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4", "ports": [{"name": "http", "protocol": "TCP", "port": 8080}],
        "endpoints": [{"addresses": [ip], "nodeName": n} for ip, n in endpoints.items()],
    }
    return json.dumps(svc) + "\n---\n" + json.dumps(eps) + "\n"


@pytest.fixture(scope="module")
def two_nodes() -> Iterator[tuple[MultiNodeCluster, str]]:
    """The two-node cluster and node-1's API socket."""
    require_datapath()
    with MultiNodeCluster(pods={"web-a": 1, "web-b": 1, "web-c": 2}) as c:
        sock = f"{c.topo.workdir}/veer-node-1.sock"
        c.start_agents(only=c.nodes[1:])
        c.start_agents(["--api-socket", sock], only=c.nodes[:1])
        c.topo.ns(c.external, "ip", "route", "add", f"{LB_IP}/32", "via", "10.0.0.1")
        yield c, sock


def test_outside_drops_and_denials_appear_with_the_client(
        two_nodes: tuple[MultiNodeCluster, str]) -> None:
    c, api = two_nodes
    node = c.nodes[0]
    # externalTrafficPolicy: Local with the only endpoint on node-2: node-1
    # drops outside traffic, as kube-proxy does.
    c.write_manifest("web.yaml", nodeport_web({"10.244.2.2": "node-2"},
                                              externalTrafficPolicy="Local"))
    c.wait_external("10.0.0.1:30080/TCP", node, [], True)
    assert c.probe_from_outside("tcp", "10.0.0.1", "30080", "--count", "1",
                                "--timeout", "1")["errors"] == {"TIMEOUT": 1}
    drop = wait_for("the drop", lambda: kept_events(api, "--verdict", "drop"))[0]
    assert (drop["verdict"], drop["reason"], drop["hook"]) == (
        "VERDICT_DROP", "nat_drop", "tc-ingress")
    assert (drop["source"], drop["destination"], drop["port"]) == (EXT, "10.0.0.1", 30080)
    assert drop["source_port"] > 0 and drop["service_port"] == "default/web:http"
    assert drop["errno"] == "" and drop["pid"] == 0

    backends = {"10.244.1.2": "node-1", "10.244.1.3": "node-1", "10.244.2.2": "node-2"}
    c.write_manifest("web.yaml", nodeport_web(backends, lb=True,
                                              loadBalancerSourceRanges=["10.0.0.99/32"]))
    c.wait_external(f"{LB_IP}:80/TCP", node, sorted(f"{ip}:8080/TCP" for ip in backends),
                    False, sources=["10.0.0.99/32"])
    assert c.probe_from_outside("tcp", LB_IP, "80", "--count", "1",
                                "--timeout", "1")["errors"] == {"TIMEOUT": 1}
    denied = wait_for("the denial", lambda: kept_events(api, "--verdict", "deny"))[0]
    assert (denied["verdict"], denied["reason"], denied["source"]) == (
        "VERDICT_DENY", "nat_denied_source", EXT)
    assert (denied["destination"], denied["port"], denied["service_port"]) == (
        LB_IP, 80, "default/web:http")
    line = next(x for x in veer(api, "observe").stdout.splitlines() if "deny" in x)
    assert f"{EXT}:{denied['source_port']}" in line
    assert "client outside the Service's loadBalancerSourceRanges" in line


def test_new_flows_from_outside_are_traced_while_followed(
        two_nodes: tuple[MultiNodeCluster, str]) -> None:
    c, api = two_nodes
    backends = {"10.244.1.2": "node-1", "10.244.1.3": "node-1", "10.244.2.2": "node-2"}
    c.write_manifest("web.yaml", nodeport_web(backends))
    c.wait_external("10.0.0.1:30080/TCP", c.nodes[0],
                    sorted(f"{ip}:8080/TCP" for ip in backends), False)
    with following(api, "--verdict", "translate") as follower:
        follower.started()
        result = c.probe_from_outside("tcp", "10.0.0.1", "30080", "--count", "30",
                                      "--timeout", "5")
        assert result["errors"] == {}
        got = follower.events(30)
    assert {(e["reason"], e["hook"], e["source"]) for e in got} == {
        ("nat_new", "tc-ingress", EXT)}
    # The remote backend is reached through SNAT to the node, the local ones not.
    assert {e["backend_address"] for e in got} <= set(backends)
    for e in got:
        assert ("snat" in e["flags"]) == (e["backend_address"] == "10.244.2.2"), e
    assert Counter(POD_NAME[e["backend_address"]] for e in got) == Counter(
        {k.partition(":")[0]: v for k, v in result["answers"].items()})
