"""The debug surfaces against a live agent: every `veer` command run as a
subprocess on the agent's API socket, the metrics scrape and the health
check, asserted on content.

The agent runs in the sandbox (addresses in conftest.py) with its API on
<workdir>/veer.sock, metrics on 127.0.0.1:10249 and health on
127.0.0.1:10256 inside the node namespace, and a long --max-sync-interval so
no periodic pass repairs a map behind a test's back.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.datapath.ebpf.maps import SockLbMaps
from agent.datapath.ebpf.programs import ALWAYS_HOOKS
from agent.datapath.ebpf.structs import ServiceKey, addr_bytes, port_be
from agent.metrics.exposition import parse
from agent.sandbox.cluster import WEB_PODS, SandboxCluster

from .conftest import require_datapath

METRICS = "127.0.0.1:10249"
HEALTHZ = "127.0.0.1:10256"
READY = {f"{p.ipv4}:8080" for p in WEB_PODS if p.name != "web-d"}
WEB_D = "10.244.1.5"
POD_OF = {f"{p.name}:8080": f"{p.ipv4}:8080" for p in WEB_PODS}
DEBUGGING_DOC = Path(__file__).resolve().parents[2] / "docs" / "debugging.md"


@pytest.fixture(scope="module")
def live() -> Iterator[SandboxCluster]:
    require_datapath()
    with SandboxCluster() as cluster:
        cluster.start_agent(extra=[
            "--metrics-bind-address", METRICS,
            "--healthz-bind-address", HEALTHZ,
            "--max-sync-interval", "600",
        ])
        yield cluster


def veer(cluster: SandboxCluster, *args: str, socket_path: str | None = None,
         ok: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(
        [sys.executable, "-m", "agent.cli.main", *args,
         "--socket", socket_path or cluster.api_socket],
        capture_output=True, text=True, timeout=60,
    )
    if ok:
        assert res.returncode == 0, f"veer {' '.join(args)}: {res.returncode}\n{res.stderr}"
    return res


def veer_json(cluster: SandboxCluster, *args: str) -> Any:
    return json.loads(veer(cluster, *args, "-o", "json").stdout)


def in_node(cluster: SandboxCluster, code: str) -> str:
    """Run Python in the node namespace (where the agent listens), outside the cgroup."""
    res = cluster.topo.exec(cluster.topo.node_ns, [sys.executable, "-c", code],
                            in_cgroup=False, timeout=30)
    assert res.returncode == 0, res.stderr
    return res.stdout


def scrape(cluster: SandboxCluster, address: str = METRICS, path: str = "/metrics") -> str:
    return in_node(cluster, (
        "import urllib.request, urllib.error, sys\n"
        "try:\n"
        f"    r = urllib.request.urlopen('http://{address}{path}', timeout=10)\n"
        "except urllib.error.HTTPError as e:\n"
        "    r = e\n"
        "sys.stdout.write(f'{r.status}\\n' + r.read().decode())\n"
    ))


def test_socket_is_root_only(live: SandboxCluster) -> None:
    mode = os.stat(live.api_socket).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600


def test_status(live: SandboxCluster) -> None:
    data = veer_json(live, "status")
    assert data["mode"] == "ebpf" and data["datapath"] == "ebpf"
    assert data["node_name"] == "node-1"
    assert {p["hook"] for p in data["programs"]} == {h.hook for h in ALWAYS_HOOKS}
    assert len(data["programs"]) == len(ALWAYS_HOOKS) and all(p["id"] > 0 for p in data["programs"])
    assert data["source"]["synced"] is True
    assert data["sync"]["last_errors"] == [] and data["sync"]["passes"] >= 1
    assert {m["name"]: m["entries"] > 0 for m in data["maps"]}["veer_services"]
    assert [p["name"] for p in data["skipped"]] == ["signalling"]
    # The kernel probe's verdict, feature by feature (this kernel has them all).
    assert "program:cgroup_sock_addr" in data["features_found"]
    assert "helper:sched_cls:bpf_redirect_neigh" in data["features_found"]
    assert data.get("features_missing", []) == []

    text = veer(live, "status").stdout
    assert "mode:" in text and "ebpf" in text
    assert f"kernel features:  {len(data['features_found'])} found, none missing" in text
    assert f"PROGRAMS ({len(ALWAYS_HOOKS)} programs attached)" in text
    assert "connect4" in text and "getpeername6" in text
    assert "default/signalling  UnsupportedProtocol" in text


def test_services_lists_ready_backends_and_marks_web_d(live: SandboxCluster) -> None:
    text = veer(live, "services").stdout
    web = next(line for line in text.splitlines() if "10.96.0.10:80/TCP" in line)
    assert web.startswith("default/web ") and "programmed" in web
    assert all(b in web for b in READY) and "(+1 not ready)" in web
    assert WEB_D not in web

    data = veer_json(live, "services")
    svc = next(s for s in data["services"] if s["name"] == "web")
    http = next(f for f in svc["frontends"] if f["port"] == 80)
    used = {f"{b['address']}:{b['port']}" for b in http["backends"] if b["in_use"]}
    assert used == READY
    web_d = next(b for b in http["backends"] if b["address"] == WEB_D)
    assert (web_d["ready"], web_d["in_use"], web_d["programmed"]) == (False, False, False)
    assert http["state"] == "FRONTEND_STATE_PROGRAMMED" and http["programmed_backends"] == 3


def test_service_detail(live: SandboxCluster) -> None:
    text = veer(live, "service", "default/web").stdout
    assert "10.244.1.5:8080  no     no" in text
    empty = veer(live, "service", "default/empty").stdout
    assert "no backends: new connections are refused at once (ECONNREFUSED)" in empty
    assert "BACKEND" not in empty
    assert veer_json(live, "service", "default/empty")["frontends"][0]["backends"] == []
    missing = veer(live, "service", "default/nope", ok=False)
    assert missing.returncode == 1 and "no Service default/nope" in missing.stderr


@pytest.mark.parametrize(("dst", "port", "verdict", "reason"), [
    ("10.96.0.99", "80", "REFUSE", "no_backends"),
    ("10.96.0.10", "9999", "REFUSE", "unknown_port"),
    ("10.96.200.1", "80", "REFUSE", "no_service"),
    ("192.0.2.1", "80", "PASS", "not_a_service"),
])
def test_explain_refusals(live: SandboxCluster, dst: str, port: str, verdict: str,
                          reason: str) -> None:
    data = veer_json(live, "explain", "--src", "10.244.1.100", "--dst", dst, "--port", port)
    assert (data["verdict"], data["reason"]) == (f"VERDICT_{verdict}", reason)
    assert data["candidates"] == []
    text = veer(live, "explain", "--dst", dst, "--port", port).stdout
    assert text.startswith(f"{dst}:{port}/TCP: {verdict}")
    if reason == "no_backends":
        assert "has no backends" in text and "ECONNREFUSED" in text
    if reason == "unknown_port":
        assert "not one of its ports (80/TCP, 8081/TCP)" in text


def test_explain_lists_exactly_the_ready_backends_and_agrees_with_traffic(
    live: SandboxCluster,
) -> None:
    data = veer_json(live, "explain", "--dst", "10.96.0.10", "--port", "80")
    assert data["verdict"] == "VERDICT_TRANSLATE"
    predicted = {f"{c['address']}:{c['port']}" for c in data["candidates"]}
    assert predicted == READY
    assert sorted(c["slot"] for c in data["candidates"]) == [1, 2, 3]
    assert data["frontend"]["service_port"] == "default/web:http"
    result = live.probe("tcp", "10.96.0.10", "80", "--count", "60")
    assert result["errors"] == {}
    assert {POD_OF[a] for a in result["answers"]} == predicted


def test_a_connection_shows_up_in_conntrack(live: SandboxCluster) -> None:
    code = (
        "import json, socket\n"
        "s = socket.create_connection(('10.96.0.10', 80), timeout=5)\n"
        "cookie = int.from_bytes(s.getsockopt(socket.SOL_SOCKET, 57, 8), 'little')\n"
        "s.sendall(b'GET / HTTP/1.1\\r\\nHost: veer\\r\\nConnection: close\\r\\n\\r\\n')\n"
        "data = b''\n"
        "while chunk := s.recv(4096):\n"
        "    data += chunk\n"
        "print(json.dumps({'cookie': cookie, 'answer':"
        " data.split(b'\\r\\n\\r\\n', 1)[1].decode().strip()}))\n"
    )
    res = live.topo.exec(live.client, [sys.executable, "-c", code])
    assert res.returncode == 0, res.stderr
    conn = json.loads(res.stdout)
    data = veer_json(live, "conntrack", "--address", "10.96.0.10")
    mine = [s for s in data["sockets"] if s["cookie"] == conn["cookie"]]
    assert len(mine) == 1, data
    entry = mine[0]
    assert (entry["service_address"], entry["service_port"]) == ("10.96.0.10", 80)
    assert f"{entry['backend_address']}:{entry['backend_port']}" == POD_OF[conn["answer"]]
    assert entry["service"] == "default/web:http"
    text = veer(live, "conntrack").stdout
    # This socket's row, whatever width the COOKIE column takes: the widest
    # cookie's, or the header's when every cookie is shorter (a host with
    # few sockets since boot has 4-digit cookies).
    row = re.search(rf"^{conn['cookie']}\s+10\.96\.0\.10:80\s+(\S+)", text, re.MULTILINE)
    assert row is not None and row.group(1) == POD_OF[conn["answer"]], text
    # Socket-level only: the per-packet path has no flow here (its listing
    # is tested in test_nodeport.py and tests/unit/test_api_server.py).
    assert data["flows"] == [] and data["flows_capacity"] > 0, data
    assert "0 per-packet flows in veer_nat_fwd" in text
    assert veer_json(live, "conntrack", "--address", "192.0.2.9")["sockets"] == []


def test_maps_diff_and_resync(live: SandboxCluster) -> None:
    clean = veer(live, "maps", "--diff")
    assert "no difference" in clean.stdout
    full = veer(live, "maps").stdout
    assert "10.96.0.10:80/TCP  ClusterIP  default/web:http  -> 10.244.1.2:8080/TCP" in full
    assert "# in sync" in full
    before = veer_json(live, "status")["sync"]

    # Break the maps behind the agent's back: remove slot 2 of web:http.
    maps = SockLbMaps.open(live.topo.bpffs)
    try:
        key = ServiceKey(addr=addr_bytes(ipaddress.ip_address("10.96.0.10")),
                         port=port_be(80), proto=socket.IPPROTO_TCP, family=4, slot=2)
        assert maps.services.delete(key)
    finally:
        maps.close()
    broken = veer(live, "maps", "--diff", ok=False)
    assert broken.returncode == 1
    assert "+inconsistent 10.96.0.10:80/TCP slot 2: missing" in broken.stdout
    explained = veer(live, "explain", "--dst", "10.96.0.10", "--port", "80").stdout
    assert "slot 2: missing" in explained

    res = veer(live, "resync")
    assert "full resync done" in res.stdout and "1 change" in res.stdout
    after = veer_json(live, "status")["sync"]
    assert after["last_time"] > before["last_time"]
    assert after["last_full"] is True and after["passes"] > before["passes"]
    assert "no difference" in veer(live, "maps", "--diff").stdout


def test_observe_answers(live: SandboxCluster) -> None:
    # Flow events in detail: tests/datapath/test_observe.py.
    assert "events" in veer_json(live, "observe")


def test_unreachable_agent(live: SandboxCluster) -> None:
    res = veer(live, "status", socket_path="/run/veer/nothing-here.sock", ok=False)
    assert res.returncode == 3
    assert res.stderr.strip() == (
        "no veer agent at /run/veer/nothing-here.sock — is it running on this node?"
    )
    with tempfile.TemporaryDirectory() as tmp:  # a socket file nobody answers on
        stale = os.path.join(tmp, "stale.sock")
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(stale)
        res = veer(live, "services", socket_path=stale, ok=False)
        assert res.returncode == 3 and f"no veer agent at {stale}" in res.stderr


def test_metrics_scrape(live: SandboxCluster) -> None:
    def metrics() -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
        status, _, body = scrape(live).partition("\n")
        assert status == "200"
        return parse(body)

    first = metrics()
    documented = DEBUGGING_DOC.read_text()
    for name in (
        "kubeproxy_sync_proxy_rules_duration_seconds",
        "kubeproxy_sync_full_proxy_rules_duration_seconds",
        "kubeproxy_sync_partial_proxy_rules_duration_seconds",
        "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
        "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
        "kubeproxy_sync_proxy_rules_service_changes_total",
        "kubeproxy_sync_proxy_rules_endpoint_changes_total",
        "veer_map_entries", "veer_map_capacity", "veer_datapath_mode",
        "veer_programs_attached", "veer_socket_lb_events_total", "veer_services_skipped",
        "veer_manifest_problems", "veer_sync_errors_total", "veer_thread_cpu_seconds_total",
    ):
        assert f"| `{name}" in documented, f"{name} is not documented in docs/debugging.md"
        assert any(series.startswith(name) for series in first), f"{name} not exposed"
    assert first["kubeproxy_sync_proxy_rules_duration_seconds_count"][()] > 0
    assert first["kubeproxy_sync_proxy_rules_last_timestamp_seconds"][()] > 1.7e9
    assert first["kubeproxy_sync_proxy_rules_service_changes_total"][()] >= 5
    assert first["kubeproxy_sync_proxy_rules_endpoint_changes_total"][()] >= 5
    assert first["veer_map_entries"][(("map", "veer_services"),)] > 0
    assert first["veer_map_capacity"][(("map", "veer_services"),)] >= \
        first["veer_map_entries"][(("map", "veer_services"),)]
    assert first["veer_datapath_mode"][(("mode", "ebpf"),)] == 1
    assert first["veer_programs_attached"][()] == len(ALWAYS_HOOKS)
    assert first["veer_services_skipped"][(("reason", "UnsupportedProtocol"),)] == 1
    assert first["veer_sync_errors_total"][()] == 0
    threads = {dict(labels)["thread"] for labels in first["veer_thread_cpu_seconds_total"]}
    assert {"MainThread", "sync", "status", "metrics"} <= threads, threads

    translated = (("event", "translated"),)
    live.probe("tcp", "10.96.0.10", "80", "--count", "20")
    grown = metrics()["veer_socket_lb_events_total"][translated]
    assert grown >= first["veer_socket_lb_events_total"][translated] + 20


def test_health(live: SandboxCluster) -> None:
    status, _, body = scrape(live, HEALTHZ, "/healthz").partition("\n")
    assert status == "200"
    answer = json.loads(body)
    assert answer["healthy"] is True and answer["lastUpdated"].endswith("Z")
    assert scrape(live, METRICS, "/proxyMode").split("\n", 1)[1] == "ebpf"
