"""TPROXY mode (--mode tproxy) on one node, with real traffic.

Conventions: see conftest.py (the sandbox's Services and pods).

Most cases here are the eBPF suites' own test functions (test_socket_lb.py,
test_changes.py, test_socket_policies.py), collected again in this module,
whose `shared_cluster` and `cluster` fixtures run the agent in TPROXY mode:
the same traffic must see the same behaviour. Cases those suites check
through eBPF maps are restated here with the agent's status counters, and
what only TPROXY mode has (the fallback of --mode auto, --cleanup of
nftables and routing, a bulk transfer through splice, the proxy going away)
is tested below.

Where TPROXY mode cannot behave as eBPF mode does, the case says so with
xfail(strict=True) and the reason; README.md lists the same differences.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from agent.sandbox.cluster import SandboxCluster
from tests.datapath.conftest import require_datapath
from tests.datapath.manifests import backends, l4, service_with_addresses, service_with_endpoints
from tests.datapath.test_changes import (  # noqa: F401 - collected again, in TPROXY mode
    test_added_endpoint_is_used,
    test_connected_udp_socket_leaves_a_removed_backend,
    test_deleted_service_is_refused,
    test_endpoint_becoming_ready_is_used,
    test_hairpin_a_pod_reaches_itself_through_its_service,
    test_malformed_object_is_reported_with_its_field,
    test_removed_endpoint_gets_no_new_connections_and_established_ones_stay,
    test_scaled_to_zero_and_back,
    test_udp_backend_refusing_by_icmp_fails_a_connected_client,
    test_udp_endpoint_change_applies_to_next_datagrams,
)
from tests.datapath.test_socket_lb import (  # noqa: F401
    test_pod_ip_is_untouched,
    test_spread_over_ready_endpoints_only,
    test_unsupported_service_is_reported_and_others_work,
)
from tests.datapath.test_socket_policies import (  # noqa: F401
    ALL3,
    VIP,
    apply,
    manifest,
    test_client_ip_affinity_keeps_a_client_on_one_backend,
    test_external_ip_from_a_local_pod,
    test_external_policy_local_short_circuits_local_clients,
    test_health_check_node_port_answers_like_kube_proxy,
    test_internal_policy_local,
    test_nodeport_from_a_local_pod,
)

TPROXY = ["--mode", "tproxy"]


def start(cluster: SandboxCluster, extra: list[str] | None = None) -> None:
    cluster.start_agent(extra if extra is not None else TPROXY)
    status = cluster.status()
    assert status is not None and status["mode"] == "tproxy", status


@pytest.fixture(scope="module")
def shared_cluster() -> Iterator[SandboxCluster]:
    require_datapath()
    with SandboxCluster() as cluster:
        start(cluster)
        yield cluster


@pytest.fixture
def cluster() -> Iterator[SandboxCluster]:
    require_datapath()
    with SandboxCluster() as cluster:
        start(cluster)
        yield cluster


def counters(cluster: SandboxCluster) -> dict[str, int]:
    """The datapath's counters as the agent last wrote them (after a pass)."""
    status = cluster.status()
    assert status is not None
    return dict(status["counters"])


def fresh_counters(cluster: SandboxCluster) -> dict[str, int]:
    """Counters after one more pass (a resync the agent makes at most 10 s apart)."""
    before = (cluster.status() or {}).get("time", 0.0)
    status = cluster.wait_status(lambda s: s["time"] > before, timeout=30,
                                 what="the next status")
    return dict(status["counters"])


def in_node(cluster: SandboxCluster, *argv: str) -> subprocess.CompletedProcess[str]:
    return cluster.topo.exec(cluster.topo.node_ns, list(argv), in_cgroup=False, timeout=60)


# ---- refusals ----------------------------------------------------------------------------

UNCONNECTED_UDP = (
    "an unconnected UDP socket never hears of the ICMP port unreachable that refuses its "
    "datagram, so recvfrom() times out; eBPF mode fails sendto() itself with ECONNREFUSED"
)


@pytest.mark.parametrize(
    ("name", "args"),
    [
        ("service without endpoints", ("tcp", "10.96.0.99", "80")),
        ("port the Service does not expose", ("tcp", "10.96.0.10", "9999")),
        pytest.param("udp to a tcp-only port", ("udp", "10.96.0.10", "80"),
                     marks=pytest.mark.xfail(strict=True, reason=UNCONNECTED_UDP)),
        ("connected udp to a tcp-only port", ("udp", "10.96.0.10", "80", "--connect")),
        ("address in the Service CIDR with no Service", ("tcp", "10.96.200.1", "80")),
        ("ipv6 address in the Service CIDR with no Service", ("tcp", "fd00:96::99", "80")),
    ],
)
def test_refused_at_once(shared_cluster: SandboxCluster, name: str, args: tuple[str, ...]) -> None:
    """test_socket_lb.py's refusals: the first packet is refused in the kernel
    (a TCP reset, or ICMP port unreachable for UDP), never left to time out."""
    result = shared_cluster.probe(*args, "--count", "5", "--timeout", "5")
    assert result["answers"] == {}, name
    assert result["errors"] == {"ECONNREFUSED": 5}, (name, result)


def test_node_itself_reaches_a_cluster_ip(shared_cluster: SandboxCluster) -> None:
    """A process of the node (no route covers the Service range there) reaches
    a ClusterIP through the local route veer adds, and is refused at once on a
    port the Service does not expose."""
    res = in_node(shared_cluster, sys.executable, "-m", "agent.sandbox.probe", "tcp",
                  "10.96.0.10", "80", "--count", "30")
    assert res.returncode == 0, res.stderr
    result = json.loads(res.stdout.strip().splitlines()[-1])
    assert result["errors"] == {} and result["peer_mismatch"] == 0, result
    assert set(result["answers"]) == {"web-a:8080", "web-b:8080", "web-c:8080"}, result
    res = in_node(shared_cluster, sys.executable, "-m", "agent.sandbox.probe", "tcp",
                  "10.96.0.10", "9999", "--count", "3", "--timeout", "3")
    assert json.loads(res.stdout.strip().splitlines()[-1])["errors"] == {"ECONNREFUSED": 3}


def test_affinity_expires_after_its_timeout(cluster: SandboxCluster) -> None:
    """test_socket_policies.py's case, counted by the proxy (affinity_hit)."""
    spec = {"sessionAffinity": "ClientIP",
            "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 1}}}
    apply(cluster, manifest(ALL3, spec=spec), f"{VIP}:80/TCP", ["web-a", "web-b", "web-c"])
    before = fresh_counters(cluster).get("affinity_hit", 0)
    cluster.probe("tcp", VIP, "80", "--count", "5", "--interval", "0.05")
    quick = fresh_counters(cluster)["affinity_hit"]
    assert quick - before == 4  # the first connection creates the entry
    time.sleep(1.5)
    cluster.probe("tcp", VIP, "80", "--count", "3", "--interval", "1.5")
    # 1.5 s apart with a 1 s timeout: the entry is stale each time.
    assert fresh_counters(cluster)["affinity_hit"] == quick


# ---- --mode auto ---------------------------------------------------------------------------


def test_auto_falls_back_to_tproxy_and_says_why() -> None:
    """On a kernel that lacks a feature eBPF mode needs (here: hidden from the
    probe), --mode auto runs TPROXY mode and says why in its log, its status
    file and `veer status`; Services work."""
    require_datapath()
    hidden = "program:cgroup_sock_addr"
    with SandboxCluster() as cluster:
        start(cluster, ["--hide-kernel-feature", hidden])
        status = cluster.status()
        assert status is not None
        assert status["mode"] == "tproxy" and status["datapath"] == "tproxy", status
        assert hidden in status["mode_reason"] and "auto" in status["mode_reason"], status
        assert f"datapath mode tproxy (auto: this kernel lacks {hidden}" in (
            cluster.agent_output())
        res = subprocess.run(
            [sys.executable, "-m", "agent.cli.main", "status", "--socket", cluster.api_socket,
             "-o", "json"], capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        api = json.loads(res.stdout)
        assert api["mode"] == "tproxy" and hidden in api["mode_reason"], api
        result = cluster.probe("tcp", "10.96.0.10", "80", "--count", "30")
        assert result["errors"] == {} and len(result["answers"]) == 3, result


# ---- the proxy's own paths ---------------------------------------------------------------

ECHO_SERVER = """
import socket, sys
srv = socket.socket(socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((sys.argv[1], int(sys.argv[2]))); srv.listen(16)
print("ready", flush=True)
while True:
    conn, _ = srv.accept()
    # Echo everything, then, after the client's half-close, a trailer: the
    # proxy must carry the end of file through and keep the other way open.
    while data := conn.recv(1 << 16):
        conn.sendall(data)
    conn.sendall(b"TRAILER")
    conn.close()
"""

ECHO_CLIENT = """
import hashlib, os, socket, sys, threading
size = int(sys.argv[3])
payload = os.urandom(size)
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
# A small receive buffer and a slow start make the proxy's pipes fill: the
# back-pressure path, not only the fast one.
got = bytearray()
def reader():
    while chunk := s.recv(1 << 14):
        got.extend(chunk)
t = threading.Thread(target=reader); t.start()
view = memoryview(payload)
for i in range(0, size, 1 << 20):
    s.sendall(view[i:i + (1 << 20)])
s.shutdown(socket.SHUT_WR)
t.join()
ok = bytes(got[:size]) == payload and bytes(got[size:]) == b"TRAILER"
print(hashlib.sha256(payload).hexdigest(), len(got), ok)
"""


def test_bulk_transfer_arrives_whole_and_half_close_travels(cluster: SandboxCluster) -> None:
    """32 MiB each way through the proxy's splice path, byte for byte, and the
    client's half-close reaches the server while the answer still flows."""
    web_a = cluster.topo.pods["web-a"]
    server = cluster.topo.spawn(web_a.netns, [sys.executable, "-c", ECHO_SERVER, "0.0.0.0",
                                              "9100"], stdout=subprocess.PIPE)
    assert server.stdout is not None and server.stdout.readline().strip() == b"ready"
    cluster.write_manifest("echo-tcp.yaml", service_with_endpoints(
        "echotcp", "10.96.0.44", ["web-a"], port=9100, target=9100))
    cluster.wait_frontend("10.96.0.44:9100/TCP", backends(["web-a"], 9100))
    size = 32 << 20
    res = cluster.topo.exec(cluster.client, [sys.executable, "-c", ECHO_CLIENT, "10.96.0.44",
                                             "9100", str(size)], timeout=120)
    assert res.returncode == 0, res.stderr
    _, received, ok = res.stdout.split()
    assert ok == "True" and int(received) == size + len(b"TRAILER"), res.stdout


PEER_SERVER = """
import socket, sys
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", int(sys.argv[1]))); srv.listen(16)
print("ready", flush=True)
while True:
    conn, peer = srv.accept()
    conn.sendall(f"{peer[0]} {peer[1]}\\n".encode())
    while conn.recv(4096):  # the client closes first: its side ends in TIME_WAIT
        pass
    conn.close()
"""

PORT_REUSE_CLIENT = """
import socket, sys
vip, port, pod = sys.argv[1], int(sys.argv[2]), sys.argv[3]
s = socket.create_connection((vip, port), timeout=5)
seen_ip, seen_port = s.makefile().readline().split()
s.shutdown(socket.SHUT_WR)
while s.recv(4096):
    pass
s.close()
# The proxy's upstream socket (seen_ip:seen_port -> pod) is now in TIME_WAIT.
d = socket.socket(); d.settimeout(3)
d.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
d.bind((seen_ip, int(seen_port)))
d.connect((pod, port))
print(seen_ip, seen_port, d.makefile().readline().strip())
"""


def _serve_from_web_a(cluster: SandboxCluster, script: str, name: str, vip: str,
                      port: int) -> subprocess.Popen[bytes]:
    """Run `script` (argv: port; prints "ready" once listening) in web-a, and
    a Service `name` at vip:port whose one backend it is."""
    server = cluster.topo.spawn(cluster.topo.pods["web-a"].netns,
                                [sys.executable, "-c", script, str(port)],
                                stdout=subprocess.PIPE)
    assert server.stdout is not None and server.stdout.readline().strip() == b"ready"
    cluster.write_manifest(f"{name}.yaml", service_with_endpoints(
        name, vip, ["web-a"], port=port, target=port))
    cluster.wait_frontend(f"{vip}:{port}/TCP", backends(["web-a"], port))
    return server


def test_an_upstream_time_wait_never_catches_a_direct_connection(cluster: SandboxCluster) -> None:
    """The proxy's upstream socket carries the client's address; when the
    client closed first, that socket ends in TIME_WAIT. A later connection of
    the same client straight to the backend, from the same port, must not be
    caught by it (nftables steers only to the proxy's live sockets)."""
    web_a = cluster.topo.pods["web-a"]
    _serve_from_web_a(cluster, PEER_SERVER, "peer", "10.96.0.46", 9200)
    res = cluster.topo.exec(cluster.client, [sys.executable, "-c", PORT_REUSE_CLIENT,
                                             "10.96.0.46", "9200", web_a.ipv4], timeout=60)
    assert res.returncode == 0, res.stderr
    seen_ip, seen_port, *direct = res.stdout.split()
    assert seen_ip == "10.244.1.100"  # the client's address, kept
    # The direct connection, from the same port, reached the backend.
    assert direct == ["10.244.1.100", seen_port], res.stdout


def test_a_backend_that_refuses_resets_the_client(cluster: SandboxCluster) -> None:
    """Known difference: the client's handshake completes with the proxy, so a
    backend that refuses, with no other to try, shows up as a reset after
    connect() succeeded (eBPF mode connects to the backend itself and gets
    ECONNREFUSED)."""
    cluster.write_manifest("dead.yaml", service_with_endpoints(
        "dead", "10.96.0.45", ["web-a"], port=80, target=8999))
    cluster.wait_frontend("10.96.0.45:80/TCP", backends(["web-a"], 8999))
    result = cluster.probe("tcp", "10.96.0.45", "80", "--count", "3", "--timeout", "5")
    assert result["answers"] == {}, result
    # A reset, seen by the first send or receive after connect() succeeded.
    assert set(result["errors"]) <= {"ECONNRESET", "EPIPE"}, result
    assert sum(result["errors"].values()) == 3, result
    assert fresh_counters(cluster).get("upstream_failed", 0) >= 3


def _web_a_port_answers(cluster: SandboxCluster, name: str, vip: str, port: int,
                        verdict: str, pods: tuple[str, ...] = ("web-a",)) -> None:
    """A Service `name` at vip:80 whose backends are `port` of `pods`, where
    web-a's nftables answers TCP with `verdict` (the table goes with web-a's
    namespace)."""
    ruleset = (f"table inet {name} {{\n chain input {{\n type filter hook input priority 0;\n"
               f" tcp dport {port} {verdict}\n }}\n}}\n")
    res = cluster.topo.exec(cluster.topo.pods["web-a"].netns, ["nft", ruleset],
                            in_cgroup=False, timeout=30)
    assert res.returncode == 0, res.stderr
    cluster.write_manifest(f"{name}.yaml", service_with_endpoints(
        name, vip, list(pods), port=80, target=port))
    cluster.wait_frontend(f"{vip}:80/TCP", backends(list(pods), port))


def test_a_backend_that_refuses_is_replaced_by_another(cluster: SandboxCluster) -> None:
    """web-a refuses (a TCP reset), web-b serves: where the proxy chose web-a
    it tries another backend, as kube-proxy's userspace proxy did, so every
    connection is answered by web-b and no client sees the refusal."""
    _web_a_port_answers(cluster, "refuse", "10.96.0.42", 8080, "reject with tcp reset",
                        pods=("web-a", "web-b"))
    result = cluster.probe("tcp", "10.96.0.42", "80", "--count", "20", "--timeout", "5")
    assert result["errors"] == {} and result["answers"] == {"web-b:8080": 20}, result
    assert fresh_counters(cluster).get("upstream_retried", 0) >= 1  # (2^-20: web-a never chosen)


def test_a_backend_that_does_not_answer_is_replaced_after_a_second(
    cluster: SandboxCluster,
) -> None:
    """web-a drops SYNs, web-b serves: a connect to web-a is given up after
    its 1 s timeout (the frontend has another backend) for web-b, within the
    client's 5 s; without it, those clients would time out."""
    _web_a_port_answers(cluster, "silent", "10.96.0.41", 8080, "drop", pods=("web-a", "web-b"))
    # 24 connections: web-a is chosen for one of them but with odds of 2^-24.
    result = cluster.probe("tcp", "10.96.0.41", "80", "--count", "24", "--timeout", "5")
    assert result["errors"] == {} and result["answers"] == {"web-b:8080": 24}, result
    counters = fresh_counters(cluster)
    assert counters.get("upstream_timeout", 0) >= 1 and counters.get("upstream_retried", 0) >= 1


def test_a_backend_unreachable_by_icmp_resets_the_client_at_once(cluster: SandboxCluster) -> None:
    """web-a answers SYNs to port 8998 with ICMP host unreachable. The error
    is addressed to the client (the upstream keeps its address); nftables
    must divert it to the proxy's connecting socket, whose connect() then
    fails at once, and the client is reset within its 5 s timeout rather
    than left hanging while the proxy retries the SYN for two minutes."""
    _web_a_port_answers(cluster, "unreach", "10.96.0.44", 8998,
                        "reject with icmpx type host-unreachable")
    result = cluster.probe("tcp", "10.96.0.44", "80", "--count", "3", "--timeout", "5")
    assert result["answers"] == {}, result
    assert set(result["errors"]) <= {"ECONNRESET", "EPIPE"}, result
    assert sum(result["errors"].values()) == 3, result
    assert fresh_counters(cluster).get("upstream_failed", 0) >= 3


def test_a_backend_that_fails_at_once_is_replaced_by_another(cluster: SandboxCluster) -> None:
    """One endpoint, 10.99.99.99, has no route from the node: the proxy's
    connect() to it fails before any packet is sent (ENETUNREACH). The
    connection goes on to web-b at once, as for a refusal, rather than the
    client being reset."""
    cluster.write_manifest("unrouted.yaml", service_with_addresses(
        "unrouted", "10.96.0.39", ["10.99.99.99", "10.244.1.3"]))
    cluster.wait_frontend("10.96.0.39:80/TCP", ["10.99.99.99:8080/TCP", "10.244.1.3:8080/TCP"])
    result = cluster.probe("tcp", "10.96.0.39", "80", "--count", "20", "--timeout", "5")
    assert result["errors"] == {} and result["answers"] == {"web-b:8080": 20}, result
    counters = fresh_counters(cluster)
    assert counters.get("upstream_retried", 0) >= 1, counters  # (2^-20: never chosen)
    assert counters.get("upstream_gave_up", 0) == 0, counters


@pytest.mark.parametrize(("vip", "endpoint"), [
    ("10.96.0.38", "10.244.1.77"),
    ("fd00:96::38", "fd00:10:244:1::77"),
])
def test_a_pod_this_node_cannot_reach_resets_the_client_in_seconds(
    cluster: SandboxCluster, vip: str, endpoint: str,
) -> None:
    """The only endpoint is routed through web-a's veth, where nobody holds
    its address: the node's ARP (neighbour solicitation) goes unanswered,
    and after its probes (by default three, a second apart) the node
    answers the SYN it held with "host unreachable" (IPv6: "address
    unreachable"), addressed to the client,
    whose address the upstream connection carries. nftables must bring a
    copy of that error back to the proxy's connecting socket, so the client
    is reset within its 10 s, as kube-proxy's client gets EHOSTUNREACH;
    without it the proxy retries the SYN for two minutes."""
    host = cluster.topo.pods["web-a"].host_veth
    res = in_node(cluster, "ip", "route", "add", endpoint, "dev", host)
    assert res.returncode == 0, res.stderr
    cluster.write_manifest("unreachable.yaml",
                           service_with_addresses("unreachable", vip, [endpoint]))
    cluster.wait_frontend(l4(vip, 80), [l4(endpoint, 8080)])
    result = cluster.probe("tcp", vip, "80", "--count", "1", "--timeout", "10")
    assert result["answers"] == {}, result
    assert set(result["errors"]) <= {"ECONNRESET", "EPIPE"}, result
    assert sum(result["errors"].values()) == 1, result
    assert fresh_counters(cluster).get("upstream_failed", 0) >= 1


# argv: address, port. Connects, says so, resets when told (a line on stdin).
RESET_WHEN_TOLD = """
import socket, struct, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
print("connected", flush=True)
sys.stdin.readline()
s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
s.close()
print("reset", flush=True)
"""


def test_a_client_reset_while_the_proxy_connects_ends_the_attempt(
    cluster: SandboxCluster,
) -> None:
    """web-a drops SYNs to port 8997, so the proxy's connect() would retry
    for two minutes. A client that gives up (resets) meanwhile must end the
    attempt and free the connection's sockets and pipes at once."""
    _web_a_port_answers(cluster, "blackhole", "10.96.0.43", 8997, "drop")
    client = cluster.topo.spawn(cluster.client, [sys.executable, "-c", RESET_WHEN_TOLD,
                                                 "10.96.0.43", "80"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert client.stdin is not None and client.stdout is not None
    assert client.stdout.readline().strip() == b"connected"
    cluster.wait_status(lambda s: s["counters"].get("open_connections") == 1, timeout=30,
                        what="the proxy to hold the connecting connection")
    client.stdin.write(b"go\n")
    client.stdin.flush()
    assert client.stdout.readline().strip() == b"reset"
    assert client.wait(timeout=10) == 0
    cluster.topo.forget(client)
    # A status pass comes at most 10 s apart; the SYN retries would last ~2 min.
    cluster.wait_status(lambda s: s["counters"].get("open_connections") == 0, timeout=30,
                        what="the proxy to end the attempt")


# argv: port. Accepts one connection, reads the request up to the client's
# FIN, then waits (10 s at most) for the connection to be reset, and says so.
SILENT_SERVER = """
import select, socket, sys
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", int(sys.argv[1]))); srv.listen(4)
print("ready", flush=True)
conn, _ = srv.accept()
while conn.recv(4096):
    pass
p = select.poll(); p.register(conn, select.POLLERR | select.POLLHUP)
print("reset" if p.poll(10000) else "alive", flush=True)
"""

# argv: address, port. Sends a request, half-closes, then resets.
RESET_AFTER_HALF_CLOSE = """
import socket, struct, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
s.sendall(b"request"); s.shutdown(socket.SHUT_WR)
time.sleep(0.5)  # the FIN goes through the proxy to the server
s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
s.close()
"""


def test_a_client_reset_after_its_half_close_reaches_the_backend(
    cluster: SandboxCluster,
) -> None:
    """The client sends its request, half-closes, then resets (it gave up)
    while the backend is still working: the reset must reach the backend,
    not wait until the backend writes (which a silent one never does)."""
    server = _serve_from_web_a(cluster, SILENT_SERVER, "silent", "10.96.0.47", 9101)
    assert server.stdout is not None
    res = cluster.topo.exec(cluster.client, [sys.executable, "-c", RESET_AFTER_HALF_CLOSE,
                                             "10.96.0.47", "9101"], timeout=30)
    assert res.returncode == 0, res.stderr
    assert server.stdout.readline().strip() == b"reset", "the backend never heard of the reset"
    assert server.wait(timeout=10) == 0
    cluster.topo.forget(server)


def test_agent_gone_means_refused_and_a_new_agent_serves_again(cluster: SandboxCluster) -> None:
    """The proxy lives in the agent: while it is stopped, nftables still
    intercepts and finds no listener, so connections are refused at once (not
    left to time out); a new agent replaces the table and serves again."""
    held = cluster.spawn_probe("tcp", "10.96.0.10", "80", "--persistent", "100",
                               "--interval", "0.05", "--timeout", "2")
    assert held.stdout is not None
    assert json.loads(held.stdout.readline()) == {"connected": True}
    cluster.stop_agent(signal.SIGKILL)
    gone = cluster.probe("tcp", "10.96.0.10", "80", "--count", "3", "--timeout", "5")
    assert gone["errors"] == {"ECONNREFUSED": 3}, gone
    out, _ = held.communicate(timeout=60)
    # Known difference: an established connection ends with its proxy.
    assert json.loads(out.strip().splitlines()[-1])["errors"] != {}
    start(cluster)
    back = cluster.probe("tcp", "10.96.0.10", "80", "--count", "30")
    assert back["errors"] == {} and len(back["answers"]) == 3, back


def nft_tables(cluster: SandboxCluster) -> str:
    return in_node(cluster, "nft", "list", "tables").stdout


def routing(cluster: SandboxCluster) -> str:
    return "".join(in_node(cluster, "ip", *family, "rule").stdout for family in ([], ["-6"]))


def early_demux(cluster: SandboxCluster) -> str:
    return in_node(cluster, "sysctl", "-n", "net.ipv4.tcp_early_demux").stdout.strip()


def test_cleanup_removes_table_rules_and_routes(cluster: SandboxCluster) -> None:
    assert {"table inet veer", "table ip veer", "table ip6 veer"} <= set(
        nft_tables(cluster).splitlines())
    assert "lookup 8337" in routing(cluster) and "lookup 8338" in routing(cluster)
    assert early_demux(cluster) == "0"
    cluster.stop_agent()
    # Stopping leaves the datapath in place, as in eBPF mode.
    assert "inet veer" in nft_tables(cluster)
    argv = [sys.executable, "-m", "agent.cli.main", "agent", "--cleanup",
            "--cgroup", cluster.topo.cgroup, "--bpffs", cluster.topo.bpffs]
    res = in_node(cluster, *argv)
    assert res.returncode == 0, res.stderr
    for family in ("inet", "ip", "ip6"):
        assert f"removed nftables table {family} veer" in res.stderr, res.stderr
    assert "veer" not in nft_tables(cluster)
    assert "8337" not in routing(cluster) and "8338" not in routing(cluster)
    assert early_demux(cluster) == "1"
    for table in ("8337", "8338"):
        assert in_node(cluster, "ip", "route", "show", "table", table).stdout == ""
    again = in_node(cluster, *argv)  # idempotent
    assert again.returncode == 0 and "removed" not in again.stderr, again.stderr


def test_tables_removed_behind_the_agent_s_back_are_made_again(cluster: SandboxCluster) -> None:
    """Someone deletes or flushes veer's tables: the agent's next resync (at
    most 10 s apart) makes them again, rules and all, and the Services are
    served again."""
    for damage, family, wanted in (
        (["delete", "table", "ip", "veer"], "ip", 'dup to 127.0.0.1 device "lo"'),
        (["flush", "chain", "ip6", "veer", "output"], "ip6", 'dup to ::1 device "lo"'),
        (["delete", "table", "inet", "veer"], "inet", "socket mark"),
    ):
        res = in_node(cluster, "nft", *damage)
        assert res.returncode == 0, res.stderr
        deadline = time.monotonic() + 30
        while wanted not in in_node(cluster, "nft", "list", "table", family, "veer").stdout:
            assert time.monotonic() < deadline, f"{' '.join(damage)}: not made again"
            time.sleep(0.5)
    cluster.wait_frontend("10.96.0.10:80/TCP", backends(["web-a", "web-b", "web-c"]))
    result = cluster.probe("tcp", "10.96.0.10", "80", "--count", "6")
    assert result["errors"] == {} and sum(result["answers"].values()) == 6, result


def test_status_lists_the_proxy_counters(shared_cluster: SandboxCluster) -> None:
    shared_cluster.probe("tcp", "10.96.0.10", "80", "--count", "10")
    shared_cluster.probe("tcp", "10.96.0.99", "80", "--count", "2", "--timeout", "2")
    got = fresh_counters(shared_cluster)
    assert got["translated"] >= 10 and got["refused_no_backend"] >= 2, got

