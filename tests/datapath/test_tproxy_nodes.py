"""TPROXY mode across two nodes: NodePort, externalIPs and LoadBalancer IPs
from outside and from pods of other nodes, over TCP and UDP.

The cases are test_nodeport.py's own test functions, collected again here
with a `cluster` whose agents run in TPROXY mode (topology and addresses:
see that file). Which address each backend sees is part of most of them:
the proxy connects from the client's own address where the backend's
replies come back through the node, and from the node's address otherwise,
which is what the eBPF path's SNAT decides too.

Cases that test_nodeport.py checks through eBPF maps are restated with the
agent's status counters; the one eBPF-only property (an agent restart does
not disturb a live flow) is a known difference, marked as such.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator

import pytest

from agent.sandbox.multinode import MultiNodeCluster
from tests.datapath import test_nodeport as eb
from tests.datapath.conftest import require_datapath
from tests.datapath.test_nodeport import ALL, EXT, LB_IP, web

# test_nodeport.py's cases, in that file's order (some leave state the next
# one's wait cannot see, as they do there).
test_nodeport_from_outside = eb.test_nodeport_from_outside
test_no_endpoints_from_outside_is_refused = eb.test_no_endpoints_from_outside_is_refused
test_local_policy_without_local_endpoints_drops = \
    eb.test_local_policy_without_local_endpoints_drops
test_udp_flow_from_outside_moves_when_its_backend_goes = \
    eb.test_udp_flow_from_outside_moves_when_its_backend_goes
test_cluster_ip_from_a_pod_on_another_node = eb.test_cluster_ip_from_a_pod_on_another_node
test_nodeport_of_another_node_from_a_pod = eb.test_nodeport_of_another_node_from_a_pod
test_ipv6_nodeport_from_outside = eb.test_ipv6_nodeport_from_outside
test_load_balancer_source_ranges = eb.test_load_balancer_source_ranges
test_client_ip_affinity_from_outside = eb.test_client_ip_affinity_from_outside
test_pod_reaching_a_local_policy_nodeport_is_served_cluster_wide = \
    eb.test_pod_reaching_a_local_policy_nodeport_is_served_cluster_wide
test_udp_service_scaled_to_zero_and_back = eb.test_udp_service_scaled_to_zero_and_back
test_new_direct_connection_reusing_the_ports_of_a_translated_one = \
    eb.test_new_direct_connection_reusing_the_ports_of_a_translated_one
test_algorithms_on_the_per_packet_path = eb.test_algorithms_on_the_per_packet_path

AGENT_ARGS = ["--mode", "tproxy", "--cluster-cidr", "10.244.0.0/16,fd00:10:244::/48"]


@pytest.fixture(scope="module")
def cluster() -> Iterator[MultiNodeCluster]:
    require_datapath()
    with MultiNodeCluster(pods={"web-a": 1, "web-b": 1, "web-c": 2, "cli-2": 2}) as c:
        c.start_agents(AGENT_ARGS)
        c.topo.ns(c.external, "ip", "route", "add", f"{LB_IP}/32", "via", "10.0.0.1")
        yield c


def fresh_counters(cluster: MultiNodeCluster, index: int = 0) -> dict[str, int]:
    node = cluster.nodes[index]
    with open(node.status_file) as f:
        before = json.load(f)["time"]
    status = cluster.wait_status(node, lambda s: s["time"] > before, "the next status")
    return dict(status["counters"])


def test_udp_from_outside_keeps_or_translates_the_client_address(
        cluster: MultiNodeCluster) -> None:
    """UDP through node-1's NodePort: node-1's pods answer the client's own
    address, node-2's pod is reached from node-1's address, and every answer
    comes back from the NodePort."""
    cluster.write_manifest("web.yaml", web("Cluster", ALL))
    cluster.wait_external("10.0.0.1:30053/UDP", cluster.nodes[0],
                          sorted(f"{ip}:9053/UDP" for ip in ALL), False)
    result = cluster.probe_from_outside("udp", "10.0.0.1", "30053", "--count", "150",
                                        "--timeout", "2")
    assert result["errors"] == {} and result["peer_mismatch"] == 0, result
    assert set(result["answers"]) == {"web-a", "web-b", "web-c"}, result


def test_access_rules_drop_denied_outside_clients(cluster: MultiNodeCluster) -> None:
    """test_nodeport.py's case, counted by nftables (nat_access_denied)."""
    rules = {"defaultAction": "Allow",
             "rules": [{"action": "Deny", "sources": [f"{EXT}/32"]}]}
    tp = {"apiVersion": "veer.dev/v1alpha1", "kind": "TrafficPolicy",
          "metadata": {"name": "web-acl", "namespace": "default",
                       "creationTimestamp": "2026-01-01T00:00:00Z"},
          "spec": {"targetRefs": [{"name": "web"}], "access": rules}}
    cluster.write_manifest("web.yaml", web("Cluster", ALL) + "---\n" + json.dumps(tp) + "\n")
    node = cluster.nodes[0]
    cluster.wait_status(node, lambda s: "default/web-acl" in s.get("policies", {}),
                        "web-acl in force on node-1")
    before = fresh_counters(cluster).get("nat_access_denied", 0)
    denied = cluster.probe_from_outside("tcp", "10.0.0.1", "30080", "--count", "3",
                                        "--timeout", "1")
    assert denied["answers"] == {} and denied["errors"] == {"TIMEOUT": 3}, denied
    allowed = cluster.probe_from_pod("cli-2", "tcp", "10.0.0.1", "30080", "--count", "10")
    assert allowed["errors"] == {} and sum(allowed["answers"].values()) == 10, allowed
    assert fresh_counters(cluster)["nat_access_denied"] - before >= 3


RESTART = ("the proxy runs in the agent: its flows end with it, where eBPF mode's pinned "
           "NAT maps keep serving while no agent runs")


@pytest.mark.xfail(strict=True, reason=RESTART)
def test_agent_restart_does_not_disturb_a_live_udp_flow(cluster: MultiNodeCluster) -> None:
    """test_nodeport.py's case: a UDP flow from outside through an agent
    restart (SIGKILL, then start)."""
    frontend = "10.0.0.1:30053/UDP"
    cluster.write_manifest("web.yaml", web("Cluster", ALL))
    cluster.wait_external(frontend, cluster.nodes[0],
                          sorted(f"{ip}:9053/UDP" for ip in ALL), False)
    client = cluster.spawn_probe_outside(
        "udp", "10.0.0.1", "30053", "--persistent", "50", "--interval", "0.1", "--timeout", "1"
    )
    assert client.stdout is not None
    assert json.loads(client.stdout.readline()) == {"started": True}
    time.sleep(0.5)
    node = cluster.nodes[0]
    cluster.stop_agent(node, signal.SIGKILL)
    cluster.start_agents(AGENT_ARGS, only=[node])
    out, _ = client.communicate(timeout=60)
    result = json.loads(out.strip().splitlines()[-1])
    assert len(result["runs"]) == 1 and result["runs"][0][1] == 50, result
    assert result["errors"] == {}, result
