"""Changes to Services and endpoints, applied to a live datapath with traffic."""

from __future__ import annotations

import json
import sys
import time

import pytest

from agent.sandbox.cluster import SandboxCluster
from tests.datapath.manifests import backends, service_with_endpoints

VIP = "10.96.0.40"
FRONTEND = f"{VIP}:80/TCP"


def _set_endpoints(cluster: SandboxCluster, pods: list[str], **kw: object) -> None:
    cluster.write_manifest("one.yaml", service_with_endpoints("one", VIP, pods, **kw))  # type: ignore[arg-type]
    ready = [p for p in pods if p not in kw.get("not_ready", ())]  # type: ignore[operator]
    cluster.wait_frontend(FRONTEND, backends(ready))


def test_removed_endpoint_gets_no_new_connections_and_established_ones_stay(
    cluster: SandboxCluster,
) -> None:
    _set_endpoints(cluster, ["web-b"])
    held = cluster.spawn_probe(
        "tcp", VIP, "80", "--persistent", "30", "--interval", "0.1", "--timeout", "5"
    )
    assert held.stdout is not None
    assert json.loads(held.stdout.readline()) == {"connected": True}

    _set_endpoints(cluster, ["web-a", "web-c"])
    fresh = cluster.probe("tcp", VIP, "80", "--count", "150")
    assert fresh["errors"] == {}
    assert set(fresh["answers"]) == {"web-a:8080", "web-c:8080"}, fresh

    out, err = held.communicate(timeout=60)
    result = json.loads(out.strip().splitlines()[-1])
    # The established connection stayed on web-b for all its requests.
    assert result == {"answers": {"web-b:8080": 30}, "errors": {}, "peer_mismatch": 0}, err


def test_added_endpoint_is_used(cluster: SandboxCluster) -> None:
    _set_endpoints(cluster, ["web-a"])
    assert cluster.probe("tcp", VIP, "80", "--count", "20")["answers"] == {"web-a:8080": 20}
    _set_endpoints(cluster, ["web-a", "web-c"])
    result = cluster.probe("tcp", VIP, "80", "--count", "200")
    assert set(result["answers"]) == {"web-a:8080", "web-c:8080"}, result


def test_endpoint_becoming_ready_is_used(cluster: SandboxCluster) -> None:
    _set_endpoints(cluster, ["web-a", "web-d"], not_ready=("web-d",))
    result = cluster.probe("tcp", VIP, "80", "--count", "60")
    assert result["answers"] == {"web-a:8080": 60}
    _set_endpoints(cluster, ["web-a", "web-d"])
    result = cluster.probe("tcp", VIP, "80", "--count", "200")
    assert set(result["answers"]) == {"web-a:8080", "web-d:8080"}, result


def test_deleted_service_is_refused(cluster: SandboxCluster) -> None:
    _set_endpoints(cluster, ["web-a"])
    cluster.remove_manifest("one.yaml")
    cluster.wait_frontend(FRONTEND, None)
    result = cluster.probe("tcp", VIP, "80", "--count", "5", "--timeout", "5")
    assert result["errors"] == {"ECONNREFUSED": 5}, result


def test_scaled_to_zero_and_back(cluster: SandboxCluster) -> None:
    _set_endpoints(cluster, [])
    result = cluster.probe("tcp", VIP, "80", "--count", "5", "--timeout", "5")
    assert result["errors"] == {"ECONNREFUSED": 5}, result
    _set_endpoints(cluster, ["web-c"])
    result = cluster.probe("tcp", VIP, "80", "--count", "10")
    assert result["answers"] == {"web-c:8080": 10}, result


def test_udp_endpoint_change_applies_to_next_datagrams(cluster: SandboxCluster) -> None:
    cluster.write_manifest(
        "one.yaml", service_with_endpoints("one", VIP, ["web-a"], 53, 9053, "UDP")
    )
    cluster.wait_frontend(f"{VIP}:53/UDP", backends(["web-a"], 9053, "UDP"))
    assert cluster.probe("udp", VIP, "53", "--count", "20")["answers"] == {"web-a": 20}
    cluster.write_manifest(
        "one.yaml", service_with_endpoints("one", VIP, ["web-b"], 53, 9053, "UDP")
    )
    cluster.wait_frontend(f"{VIP}:53/UDP", backends(["web-b"], 9053, "UDP"))
    result = cluster.probe("udp", VIP, "53", "--count", "20")
    assert result["answers"] == {"web-b": 20} and result["peer_mismatch"] == 0, result


def _udp_service(vip: str, pod_ip: str, port: int, target: int) -> str:
    """A single-stack UDP Service of `vip`'s family, with one endpoint."""
    family = "IPv6" if ":" in vip else "IPv4"
    svc = {"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": "one", "namespace": "default"},
           "spec": {"clusterIP": vip, "clusterIPs": [vip], "ipFamilies": [family],
                    "ports": [{"name": "p", "protocol": "UDP", "port": port,
                               "targetPort": target}]}}
    eps = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"name": "one-1", "namespace": "default",
                        "labels": {"kubernetes.io/service-name": "one"}},
           "addressType": family,
           "ports": [{"name": "p", "protocol": "UDP", "port": target}],
           "endpoints": [{"addresses": [pod_ip]}]}
    return json.dumps(svc) + "\n---\n" + json.dumps(eps) + "\n"


@pytest.mark.parametrize(("vip", "pod_ip", "reject", "error"), [
    # Nothing listens on web-a's port: its kernel's port unreachable.
    ("10.96.0.40", "10.244.1.2", "", "ECONNREFUSED"),
    ("fd00:96::40", "fd00:10:244:1::2", "", "ECONNREFUSED"),
    # A firewall of web-a's refuses: administratively prohibited (ICMP code
    # 13, ICMPv6 code 1), which a client's kernel reports as these.
    ("10.96.0.40", "10.244.1.2", "admin-prohibited", "EHOSTUNREACH"),
    ("fd00:96::40", "fd00:10:244:1::2", "admin-prohibited", "EACCES"),
])
def test_udp_backend_refusing_by_icmp_fails_a_connected_client(
    cluster: SandboxCluster, vip: str, pod_ip: str, reject: str, error: str,
) -> None:
    """The backend answers the datagram with an ICMP error: the connected
    client's receive fails with the errno it stands for at once, as through
    kube-proxy (conntrack hands the error back), rather than waiting out its
    timeout."""
    if reject:
        ruleset = ("table inet refuse {\n chain input {\n type filter hook input priority 0;\n"
                   f" udp dport 8999 reject with icmpx type {reject}\n }}\n}}\n")
        res = cluster.topo.exec(cluster.topo.pods["web-a"].netns, ["nft", ruleset],
                                in_cgroup=False, timeout=30)
        assert res.returncode == 0, res.stderr  # the table goes with web-a's namespace
    cluster.write_manifest("one.yaml", _udp_service(vip, pod_ip, 53, 8999))
    host = f"[{vip}]" if ":" in vip else vip
    backend = f"[{pod_ip}]" if ":" in pod_ip else pod_ip
    cluster.wait_frontend(f"{host}:53/UDP", [f"{backend}:8999/UDP"])
    result = cluster.probe("udp", vip, "53", "--connect", "--count", "3", "--timeout", "5")
    assert result["answers"] == {} and result["errors"] == {error: 3}, result


def test_malformed_yaml_is_reported_by_file_and_the_rest_applied(cluster: SandboxCluster) -> None:
    cluster.write_manifest("broken.yaml", "kind: Service\nmetadata: {name: x\nspec: [\n")
    _set_endpoints(cluster, ["web-a"])  # a valid change made alongside still applies
    status = cluster.wait_status(
        lambda s: any("broken.yaml" in p for p in s["manifest_problems"]),
        what="the broken file to be reported",
    )
    assert any("broken.yaml" in p and "invalid YAML" in p for p in status["manifest_problems"])
    assert cluster.probe("tcp", VIP, "80", "--count", "10")["answers"] == {"web-a:8080": 10}
    assert "broken.yaml" in cluster.agent_output()


def test_file_turning_bad_keeps_its_last_good_content(cluster: SandboxCluster) -> None:
    good = cluster.read_manifest("web.yaml")
    cluster.write_manifest("web.yaml", good + "\n---\n: : [unbalanced\n")
    cluster.wait_status(
        lambda s: any("web.yaml" in p for p in s["manifest_problems"]),
        what="the broken web.yaml to be reported",
    )
    result = cluster.probe("tcp", "10.96.0.10", "80", "--count", "60")
    assert result["errors"] == {}
    assert set(result["answers"]) == {"web-a:8080", "web-b:8080", "web-c:8080"}


def test_malformed_object_is_reported_with_its_field(cluster: SandboxCluster) -> None:
    good = service_with_endpoints("bad", "10.96.0.41", ["web-a"])
    bad = good.replace('"port": 80,', '"port": "x",', 1)
    cluster.write_manifest("bad.yaml", bad)
    _set_endpoints(cluster, ["web-b"])
    status = cluster.wait_status(
        lambda s: any("bad.yaml" in p for p in s["manifest_problems"]),
        what="the malformed Service to be reported",
    )
    problem = next(p for p in status["manifest_problems"] if "bad.yaml" in p)
    assert "Service/default/bad" in problem and "spec.ports[0].port" in problem, problem
    # Its slice is valid and stays; the Service itself is not programmed.
    assert "10.96.0.41:80/TCP" not in status["frontends"]
    assert cluster.probe("tcp", VIP, "80", "--count", "10")["answers"] == {"web-b:8080": 10}


def test_connected_udp_socket_leaves_a_removed_backend(cluster: SandboxCluster) -> None:
    """kube-proxy's most reported failure: a long-lived UDP client keeps
    talking to a backend that is gone. veer destroys such sockets, so the
    client's next send fails once, it reconnects, and reaches a live one."""
    cluster.write_manifest(
        "one.yaml", service_with_endpoints("one", VIP, ["web-a"], 53, 9053, "UDP")
    )
    cluster.wait_frontend(f"{VIP}:53/UDP", backends(["web-a"], 9053, "UDP"))
    client = cluster.spawn_probe(
        "udp", VIP, "53", "--persistent", "40", "--interval", "0.1", "--connect",
        "--timeout", "1",
    )
    assert client.stdout is not None
    assert json.loads(client.stdout.readline()) == {"started": True}
    time.sleep(1)
    cluster.write_manifest(
        "one.yaml", service_with_endpoints("one", VIP, ["web-b"], 53, 9053, "UDP")
    )
    cluster.wait_frontend(f"{VIP}:53/UDP", backends(["web-b"], 9053, "UDP"))
    out, _ = client.communicate(timeout=60)
    result = json.loads(out.strip().splitlines()[-1])
    runs = result["runs"]
    # web-a until the change, then web-b for the rest: never back to web-a,
    # and no datagram lost to a timeout.
    assert [name for name, _ in runs] == ["web-a", "web-b"], result
    assert "TIMEOUT" not in result["errors"], result
    assert sum(n for _, n in runs) + sum(result["errors"].values()) == 40


def test_hairpin_a_pod_reaches_itself_through_its_service(cluster: SandboxCluster) -> None:
    _set_endpoints(cluster, ["web-b"])
    argv = [sys.executable, "-m", "agent.sandbox.probe", "tcp", VIP, "80", "--count", "20"]
    res = cluster.topo.exec(cluster.topo.pods["web-b"].netns, argv)
    assert res.returncode == 0, res.stderr
    result = json.loads(res.stdout.strip().splitlines()[-1])
    assert result["answers"] == {"web-b:8080": 20} and result["peer_mismatch"] == 0, result
