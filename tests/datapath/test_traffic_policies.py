"""TrafficPolicies in the eBPF datapath, with real traffic from pods.

Each test writes a Service (and EndpointSlice) plus a TrafficPolicy into the
sandbox's manifest directory, waits until the agent has programmed it, then
connects from a pod and counts which backend (nginx in web-a/b/c, which
answers with its own name) served each connection.

Statistical bounds are set many standard deviations wide, so they do not
flake, yet each fails for the wrong behaviour: e.g. a 90/10 split checked at
10% +/- 5% over 1,000 connections (sd 0.95%) cannot pass with an even split
(33%) or with the split ignored.

Addresses: Services here use 10.96.1.x; pods as in conftest.py (client
10.244.1.100, web-a/b/c 10.244.1.2-4, web-d 10.244.1.5 (not ready, but its
servers run, so it can act as a second client).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from agent.compute.tables import backend_name, flow_hash, flow_words, maglev_table
from agent.datapath.ebpf.lc_sweep import open_connections
from agent.datapath.ebpf.maps import SockLbMaps
from agent.sandbox.cluster import SandboxCluster
from agent.sandbox.holder import Holder
from tests.datapath.manifests import POD_IPS

from .conftest import require_datapath

CLIENT_IP = "10.244.1.100"


PROXY_UID = 65534  # nobody: HAProxy drops to it; nothing else here runs as it


@pytest.fixture(scope="module")
def live() -> Iterator[SandboxCluster]:
    require_datapath()
    with SandboxCluster() as cluster:
        cluster.start_agent(extra=["--proxy-uid", str(PROXY_UID)])
        yield cluster


def service(name: str, vip: str, pods: list[str]) -> list[dict[str, Any]]:
    return [
        {"apiVersion": "v1", "kind": "Service",
         "metadata": {"name": name, "namespace": "default"},
         "spec": {"clusterIP": vip,
                  "ports": [{"name": "http", "protocol": "TCP", "port": 80,
                             "targetPort": 8080}]}},
        {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
         "metadata": {"name": f"{name}-1", "namespace": "default",
                      "labels": {"kubernetes.io/service-name": name}},
         "addressType": "IPv4",
         "ports": [{"name": "http", "protocol": "TCP", "port": 8080}],
         "endpoints": [{"addresses": [POD_IPS[p]], "conditions": {"ready": True}}
                       for p in pods]},
    ]


def policy(name: str, target: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "veer.dev/v1alpha1", "kind": "TrafficPolicy",
            "metadata": {"name": name, "namespace": "default",
                         "creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"targetRefs": [{"name": target}], **spec}}


def write(cluster: SandboxCluster, file: str, docs: list[dict[str, Any]]) -> None:
    cluster.write_manifest(file, "\n---\n".join(json.dumps(d) for d in docs) + "\n")


def program(cluster: SandboxCluster, file: str, docs: list[dict[str, Any]], vip: str,
            pods: list[str]) -> None:
    write(cluster, file, docs)
    cluster.wait_frontend(f"{vip}:80/TCP", [f"{POD_IPS[p]}:8080/TCP" for p in pods])


def wait_policy(cluster: SandboxCluster, vip: str, what: str) -> None:
    """Wait until the agent's status shows `what` in force (status is written
    after the pass that programmed it)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        status = cluster.status() or {}
        if what in json.dumps(status.get("policies", {})):
            return
        time.sleep(0.1)
    raise AssertionError(f"{what} never programmed for {vip}: {cluster.status()}")


def backend_of(answer: str) -> str:
    return answer.split(":")[0]


def shares(result: dict[str, Any]) -> Counter[str]:
    return Counter({backend_of(a): n for a, n in result["answers"].items()})


# ---- algorithms ------------------------------------------------------------


def test_round_robin_takes_each_backend_in_turn(live: SandboxCluster) -> None:
    vip = "10.96.1.1"
    pods = ["web-a", "web-b", "web-c"]
    program(live, "rr.yaml", [*service("rr", vip, pods),
                              policy("rr", "rr", loadBalancing={"algorithm": "RoundRobin"})],
            vip, pods)
    wait_policy(live, vip, "default/rr")
    res = live.probe("tcp", vip, "80", "--count", "30")
    assert res["errors"] == {}, res
    seq = [backend_of(a) for a in res["sequence"]]
    # One client, one connection at a time: the cursor hands out a cycle.
    assert Counter(seq) == Counter({"web-a": 10, "web-b": 10, "web-c": 10}), seq
    assert all(seq[i] == seq[i % 3] for i in range(30)), seq


def test_maglev_keeps_flows_and_moves_few_when_a_backend_goes(live: SandboxCluster) -> None:
    vip = "10.96.1.2"
    pods = ["web-a", "web-b", "web-c"]
    spec = {"loadBalancing": {"algorithm": "Maglev"}}
    program(live, "maglev.yaml", [*service("mg", vip, pods), policy("mg", "mg", **spec)],
            vip, pods)
    wait_policy(live, vip, "default/mg")
    flows = 300
    # Fixed source ports below the ephemeral range: a port an earlier
    # connection took at random may still be in TIME_WAIT (EADDRINUSE).
    first = live.probe("tcp", vip, "80", "--count", str(flows), "--source-port", "20000")
    again = live.probe("tcp", vip, "80", "--count", str(flows), "--source-port", "20000")
    assert first["errors"] == {} and again["errors"] == {}, (first, again)
    before = [backend_of(a) for a in first["sequence"]]
    # The same flow (client address, source port) always lands on one backend...
    assert before == [backend_of(a) for a in again["sequence"]]
    # ... the one the table and hash in agent/compute/tables.py predict
    # (the kernel's hash is the same function).
    table = maglev_table([backend_name(bytes(map(int, POD_IPS[p].split("."))), 8080)
                          for p in pods], [], 1021)
    client = bytes(map(int, CLIENT_IP.split(".")))
    predicted = [
        pods[table[flow_hash(flow_words(client.ljust(16, b"\0"),
                                        int.from_bytes(port.to_bytes(2, "big"), "little"),
                                        6)) % 1021]]
        for port in range(20000, 20000 + flows)
    ]
    assert before == predicted
    # ... and every backend gets a fair share of the flows.
    assert all(60 <= before.count(p) <= 140 for p in pods), Counter(before)

    # web-c goes: its flows must move; of the others, about none may
    # (Maglev's bound is ~1/N; a random choice would move 1/2 of them).
    program(live, "maglev.yaml", [*service("mg", vip, pods[:2]), policy("mg", "mg", **spec)],
            vip, pods[:2])
    after = [backend_of(a) for a in live.probe(
        "tcp", vip, "80", "--count", str(flows), "--source-port", "20000")["sequence"]]
    kept = [i for i, b in enumerate(before) if b != "web-c"]
    moved = sum(1 for i in kept if after[i] != before[i])
    assert moved <= len(kept) // 10, (moved, len(kept))
    assert all(after[i] in ("web-a", "web-b") for i in range(flows))


def test_least_connections_fills_the_emptiest_backend(live: SandboxCluster) -> None:
    vip = "10.96.1.3"
    pods = ["web-a", "web-b", "web-c"]
    program(live, "lc.yaml", [*service("lc", vip, pods),
                              policy("lc", "lc",
                                     loadBalancing={"algorithm": "LeastConnections"})],
            vip, pods)
    wait_policy(live, vip, "default/lc")
    with Holder(live.client, live.topo._join_cgroup) as holder:
        # Six held connections: two per backend, whatever the order.
        first = [holder.open(vip, 80) for _ in range(6)]
        assert Counter(backend_of(b) for b in first) == Counter(
            {"web-a": 2, "web-b": 2, "web-c": 2}), first
        # Free one backend's two: the next two connections both go there
        # (random: 1/9; round robin: never both).
        freed = next(b for b in first if b.startswith("web-b"))
        assert holder.close(freed) == 2
        time.sleep(0.2)  # the socket release program runs as the sockets go
        nxt = [backend_of(holder.open(vip, 80)) for _ in range(2)]
        assert nxt == ["web-b", "web-b"], nxt
    # Closed connections were given back: nothing counted for this Service's
    # backends once the holder is gone.
    maps = SockLbMaps.open(live.topo.bpffs)
    try:
        open_now = sum(open_connections(maps).values())
    finally:
        maps.close()
    assert open_now == 0


# ---- weighted split --------------------------------------------------------


def test_split_sends_traffic_in_proportion_and_weight_zero_drains(
        live: SandboxCluster) -> None:
    vip = "10.96.1.4"
    stable = service("stable", vip, ["web-a", "web-b"])
    canary = service("canary", "10.96.1.5", ["web-c"])
    split = policy("split", "stable", split=[{"service": "stable", "weight": 90},
                                             {"service": "canary", "weight": 10}])
    program(live, "split.yaml", [*stable, *canary, split], vip, ["web-a", "web-b", "web-c"])
    wait_policy(live, vip, "default/split")
    res = live.probe("tcp", vip, "80", "--count", "1000")
    assert res["errors"] == {}, res
    got = shares(res)
    # 10% canary (sd 0.95%), stable's 90% even over its two pods.
    assert 50 <= got["web-c"] <= 150, got
    assert 350 <= got["web-a"] <= 550 and 350 <= got["web-b"] <= 550, got
    # `veer service` names the policy and each backend's share.
    res = subprocess.run([sys.executable, "-m", "agent.cli.main", "service", "default/stable",
                          "-o", "json", "--socket", live.api_socket],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    (fe,) = [f for f in json.loads(res.stdout)["frontends"] if f["address"] == vip]
    assert (fe["policy"], fe["algorithm"]) == ("default/split", "Random"), fe
    assert {b["address"]: round(b["weight_percent"]) for b in fe["backends"]} == {
        POD_IPS["web-a"]: 45, POD_IPS["web-b"]: 45, POD_IPS["web-c"]: 10}, fe

    # A connection held to the canary survives the drain (new connections only).
    held = live.spawn_probe("tcp", vip, "80", "--persistent", "40", "--interval", "0.05")
    drained = policy("split", "stable", split=[{"service": "stable", "weight": 90},
                                               {"service": "canary", "weight": 0}])
    program(live, "split.yaml", [*stable, *canary, drained], vip, ["web-a", "web-b"])
    res = live.probe("tcp", vip, "80", "--count", "300")
    assert res["errors"] == {} and "web-c" not in shares(res), res
    out, _ = held.communicate(timeout=60)
    assert json.loads(out.strip().splitlines()[-1])["errors"] == {}


# ---- access rules ------------------------------------------------------------


def test_access_rules_refuse_denied_pods_at_once_and_count(live: SandboxCluster) -> None:
    vip = "10.96.1.6"
    pods = ["web-a", "web-b"]
    rules = {"defaultAction": "Allow",
             "rules": [{"action": "Deny", "sources": [f"{CLIENT_IP}/32"]},
                       {"action": "Allow", "sources": ["10.244.0.0/16"]}]}
    program(live, "acl.yaml", [*service("acl", vip, pods), policy("acl", "acl", access=rules)],
            vip, pods)
    wait_policy(live, vip, "default/acl")
    denied = live.probe("tcp", vip, "80", "--count", "20")
    # Refused (ECONNREFUSED), not timed out: a drop would end in a timeout.
    assert denied["errors"] == {"ECONNREFUSED": 20}, denied
    other = live.topo.pods["web-d"].netns  # 10.244.1.5: rule 1 allows it
    allowed = live.probe("tcp", vip, "80", "--count", "20", netns=other)
    assert allowed["errors"] == {} and sum(allowed["answers"].values()) == 20, allowed
    # The unrelated Service at 10.96.0.10 is untouched by these rules.
    plain = live.probe("tcp", "10.96.0.10", "80", "--count", "5")
    assert plain["errors"] == {}, plain

    maps = SockLbMaps.open(live.topo.bpffs)
    try:
        hits = maps.access_hit_counts()
    finally:
        maps.close()
    by_rule: Counter[int] = Counter()
    for (_, rule), n in hits.items():
        by_rule[rule] += n
    assert by_rule[0] >= 20 and by_rule[1] >= 20, hits

    # `veer observe` shows the denials: who, what, and which rule decided.
    def observe(*args: str) -> str:
        res = subprocess.run([sys.executable, "-m", "agent.cli.main", "observe", *args,
                              "--socket", live.api_socket],
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        return res.stdout

    events = [e for e in json.loads(observe("--verdict", "deny", "-o", "json"))["events"]
              if e["reason"] == "access_denied"]
    assert len(events) >= 20, events
    assert {(e["source"], e["access_rule"], e["service_port"], e["errno"])
            for e in events} == {(CLIENT_IP, "access.rules[0]", "default/acl:http",
                                  "ECONNREFUSED")}
    table = observe("--verdict", "deny")
    line = next(x for x in table.splitlines() if "default/acl:http" in x)
    assert CLIENT_IP in line and "decided by access.rules[0]" in line, table


# ---- redirect to a node-local proxy ---------------------------------------------

HAPROXY_CFG = """\
global
    user nobody
    group nogroup
    maxconn 256
defaults
    mode http
    timeout connect 3s
    timeout client 10s
    timeout server 10s
frontend redirected
    bind {bind}
    http-response set-header X-Veer-Client %[src]
    http-response set-header X-Veer-Dst %[dst]:%[dst_port]
    default_backend original
backend original
    # 0.0.0.0:0: connect to the client's original destination, which HAProxy
    # learns with getsockopt(SO_ORIGINAL_DST) (answered by veer).
    server original 0.0.0.0:0
"""

FETCH = """\
import json, socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
peer = s.getpeername()
path = sys.argv[3] if len(sys.argv) > 3 else "/"
s.sendall(b"GET " + path.encode() + b" HTTP/1.1\\r\\nHost: veer\\r\\nConnection: close\\r\\n\\r\\n")
data = b""
while True:
    chunk = s.recv(65536)
    if not chunk:
        break
    data += chunk
head, _, body = data.partition(b"\\r\\n\\r\\n")
headers = {k.lower(): v for k, v in (line.split(": ", 1)
                                     for line in head.decode().split("\\r\\n")[1:])}
print(json.dumps({"peer": list(peer), "headers": headers,
                  "body": body.decode().strip().splitlines()[0]}))
"""


def test_redirect_sends_connections_to_the_node_proxy_with_client_and_destination(
        live: SandboxCluster) -> None:
    node_ip = "10.0.0.1"  # node-1's InternalIP (examples/sandbox/node.yaml)
    vip, port = "10.96.1.7", 15001
    pods = ["web-a", "web-b"]
    topo = live.topo
    # The node's address, where its proxy listens (the single-node sandbox
    # does not otherwise give the node namespace an address of its own).
    topo.ns(topo.node_ns, "ip", "addr", "add", f"{node_ip}/32", "dev", "lo")
    cfg = f"{topo.workdir}/haproxy.cfg"
    with open(cfg, "w") as f:
        f.write(HAPROXY_CFG.format(bind=f"{node_ip}:{port}"))
    topo.spawn(topo.node_ns, ["haproxy", "-db", "-f", cfg])  # in the served cgroup
    deadline = time.monotonic() + 20
    while "15001" not in topo.ns(topo.node_ns, "ss", "-ltn").stdout:
        assert time.monotonic() < deadline, "haproxy did not start"
        time.sleep(0.1)

    program(live, "redirect.yaml",
            [*service("redir", vip, pods),
             policy("redir", "redir", redirect={"port": port, "mode": "EBPF"})], vip, pods)
    wait_policy(live, vip, "default/redir")
    seen = Counter()
    for _ in range(10):
        res = topo.exec(live.client, [sys.executable, "-c", FETCH, vip, "80"])
        assert res.returncode == 0, res.stderr
        got = json.loads(res.stdout)
        # HAProxy saw the pod's own address and the Service it dialled ...
        assert got["headers"].get("x-veer-client") == CLIENT_IP, got
        assert got["headers"].get("x-veer-dst") == f"{vip}:80", got
        # ... the client still believes it talks to the Service ...
        assert got["peer"] == [vip, 80], got
        # ... and HAProxy's own connection to the Service reached a backend
        # (it was balanced, not redirected back to HAProxy: no loop).
        seen[backend_of(got["body"])] += 1
    assert set(seen) <= {"web-a", "web-b"} and sum(seen.values()) == 10, seen
    maps = SockLbMaps.open(topo.bpffs)
    try:
        counts = maps.counters()
    finally:
        maps.close()
    assert counts["redirected"] >= 10 and counts["orig_dst"] >= 10, counts


def test_explain_names_the_algorithm_and_the_access_verdict(live: SandboxCluster) -> None:
    """`veer explain` on live maps: the Maglev frontend's choice is described
    as Maglev's, and for the ACL frontend a denied source is refused naming
    the rule while an allowed one is translated."""
    def explain(*args: str) -> dict[str, Any]:
        res = subprocess.run([sys.executable, "-m", "agent.cli.main", "explain", *args,
                              "-o", "json", "--socket", live.api_socket],
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        return dict(json.loads(res.stdout))

    vip = "10.96.1.8"
    pods = ["web-a", "web-b", "web-c"]
    program(live, "explain.yaml",
            [*service("ex", vip, pods),
             policy("ex", "ex", loadBalancing={"algorithm": "Maglev"},
                    access={"defaultAction": "Allow",
                            "rules": [{"action": "Deny", "sources": [f"{CLIENT_IP}/32"]}]})],
            vip, pods)
    wait_policy(live, vip, "default/ex")
    denied = explain("--src", CLIENT_IP, "--dst", vip, "--port", "80")
    assert (denied["verdict"], denied["reason"]) == ("VERDICT_REFUSE", "access_denied"), denied
    assert "access.rules[0]" in denied["summary"], denied
    allowed = explain("--src", "10.244.1.5", "--dst", vip, "--port", "80")
    assert allowed["verdict"] == "VERDICT_TRANSLATE", allowed
    assert "Maglev" in allowed["summary"], allowed
    # Each backend fills about a third of the 1,021-slot table.
    assert {c["address"] for c in allowed["candidates"]} == {
        POD_IPS[p] for p in pods}, allowed
    assert all(0.25 < c["probability"] < 0.42 for c in allowed["candidates"]), allowed


# ---- sockmap acceleration ------------------------------------------------------

ECHO_SERVER = """\\
import socket, sys, threading
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", int(sys.argv[1])))
srv.listen(64)
def serve(c):
    with c:
        while True:
            data = c.recv(65536)
            if not data:
                return
            c.sendall(data)
while True:
    conn, _ = srv.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""

ECHO_CLIENT = """\\
import hashlib, json, socket, sys, threading
sizes = [int(x) for x in sys.argv[3].split(",")]
out = []
for size in sizes:
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
    # Everything at once, right after connect(): the moment a splice could
    # reorder bytes if a direction were split between TCP and the splice.
    payload = b"".join(i.to_bytes(4, "big") * (size // 4 or 1) for i in range(400))
    got = bytearray()
    def read():
        while True:
            chunk = s.recv(1 << 20)
            if not chunk:
                return
            got.extend(chunk)
    reader = threading.Thread(target=read)
    reader.start()
    for i in range(0, len(payload), size):
        s.sendall(payload[i:i + size])
    s.shutdown(socket.SHUT_WR)
    reader.join(30)
    s.close()
    out.append({"size": size, "sent": len(payload), "equal": bytes(got) == payload})
print(json.dumps(out))
"""


def test_sockmap_splices_same_node_connections_without_losing_or_reordering_a_byte(
        live: SandboxCluster) -> None:
    vip, port = "10.96.1.9", 7000
    status = subprocess.run([sys.executable, "-m", "agent.cli.main", "status", "-o", "json",
                             "--socket", live.api_socket], capture_output=True, text=True)
    sockmap = json.loads(status.stdout)["sockmap"]
    if not sockmap.startswith("usable"):
        pytest.skip(f"sockmap acceleration is off on this kernel: {sockmap}")
    topo = live.topo
    topo.spawn(topo.pods["web-a"].netns, [sys.executable, "-c", ECHO_SERVER, str(port)])
    deadline = time.monotonic() + 30
    while str(port) not in topo.ns(topo.pods["web-a"].netns, "ss", "-ltn").stdout:
        assert time.monotonic() < deadline, "echo server did not start"
        time.sleep(0.1)
    docs = service("splice", vip, ["web-a"])
    docs[0]["spec"]["ports"] = [{"name": "echo", "protocol": "TCP", "port": port,
                                 "targetPort": port}]
    docs[1]["ports"] = [{"name": "echo", "protocol": "TCP", "port": port}]
    docs.append(policy("splice", "splice", acceleration={"sockmap": True}))
    write(live, "sockmap.yaml", docs)
    live.wait_frontend(f"{vip}:{port}/TCP", [f"{POD_IPS['web-a']}:{port}/TCP"])
    wait_policy(live, vip, "default/splice")

    def counters() -> dict[str, int]:
        maps = SockLbMaps.open(topo.bpffs)
        try:
            return maps.counters()
        finally:
            maps.close()

    before = counters()
    res = topo.exec(live.client, [sys.executable, "-c", ECHO_CLIENT, vip, str(port),
                                  "64,4096,65536"], timeout=120)
    assert res.returncode == 0, res.stderr
    results = json.loads(res.stdout)
    assert [r["equal"] for r in results] == [True, True, True], results
    after = counters()
    # Both ends of each of the three connections joined the splice, and the
    # data went through it (not only through TCP).
    assert after["accel_sockets"] - before["accel_sockets"] >= 6, (before, after)
    assert after["accel_spliced"] - before["accel_spliced"] >= 3, (before, after)


HAPROXY_TPROXY_CFG = """\
global
    maxconn 256
defaults
    mode http
    timeout connect 3s
    timeout client 10s
    timeout server 10s
frontend tproxied
    # A transparent listener: nftables' tproxy hands it connections addressed
    # to the Service, whose address it keeps as its own.
    bind :{port} transparent
    http-response set-header X-Veer-Client %[src]
    http-response set-header X-Veer-Dst %[dst]:%[dst_port]
    default_backend pod
backend pod
    # Reach the backend from the client's own address (IP_TRANSPARENT).
    source 0.0.0.0 usesrc clientip
    server web-a {backend}:8080
"""


def test_redirect_by_tproxy_keeps_client_and_destination_all_the_way(
        live: SandboxCluster) -> None:
    """redirect.mode TPROXY: the pod's connection to the Service is left alone
    by the socket hooks and handed by nftables' tproxy to HAProxy's
    transparent listener (outside veer's cgroup, running as root: no
    exemption needed), which sees the pod's address and the Service as the
    destination, and reaches nginx from the pod's own address."""
    vip, port = "10.96.1.10", 15003
    topo = live.topo
    cfg = f"{topo.workdir}/haproxy-tproxy.cfg"
    with open(cfg, "w") as f:
        f.write(HAPROXY_TPROXY_CFG.format(port=port, backend=POD_IPS["web-a"]))
    topo.spawn(topo.node_ns, ["haproxy", "-db", "-f", cfg], in_cgroup=False)
    deadline = time.monotonic() + 20
    while str(port) not in topo.ns(topo.node_ns, "ss", "-ltn").stdout:
        assert time.monotonic() < deadline, "haproxy did not start"
        time.sleep(0.1)
    program(live, "redirect-tproxy.yaml",
            [*service("tp", vip, ["web-a", "web-b"]),
             policy("tp", "tp", redirect={"port": port, "mode": "TPROXY"})],
            vip, ["web-a", "web-b"])
    wait_policy(live, vip, "default/tp")
    chain = topo.ns(topo.node_ns, "nft", "list", "chain", "inet", "veer", "policy_redirect").stdout
    assert f"ip daddr {vip} tcp dport 80" in chain and f"tproxy ip to :{port}" in chain, chain
    for _ in range(5):
        res = topo.exec(live.client, [sys.executable, "-c", FETCH, vip, "80", "/client"])
        assert res.returncode == 0, res.stderr
        got = json.loads(res.stdout)
        assert got["headers"].get("x-veer-client") == CLIENT_IP, got
        assert got["headers"].get("x-veer-dst") == f"{vip}:80", got
        assert got["peer"] == [vip, 80], got
        # nginx answered, and saw the pod's address, not the node's or HAProxy's.
        assert got["body"] == f"web-a:8080 {CLIENT_IP}", got
    status = live.status() or {}
    assert "default/tp" in status.get("policies", {}), status
