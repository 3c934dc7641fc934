"""TrafficPolicies in TPROXY mode, with real traffic from pods.

The proxy must choose as the eBPF programs do, from the same compute output:
test_traffic_policies.py's round robin, Maglev (the choice the Python table
and hash predict, flow by flow) and weighted split are collected again here
with a `live` sandbox whose agent runs in TPROXY mode. LeastConnections and
access rules, which that file checks through eBPF maps, are restated with
the agent's status counters.

Addresses: Services here use 10.96.1.x; pods as in conftest.py.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator

import pytest

from agent.datapath.tproxy.backend import TproxyDatapath
from agent.sandbox.cluster import SandboxCluster
from agent.sandbox.holder import Holder
from tests.datapath.conftest import require_datapath
from tests.datapath.test_traffic_policies import (  # noqa: F401 - collected again, in TPROXY mode
    CLIENT_IP,
    backend_of,
    policy,
    program,
    service,
    test_maglev_keeps_flows_and_moves_few_when_a_backend_goes,
    test_round_robin_takes_each_backend_in_turn,
    test_split_sends_traffic_in_proportion_and_weight_zero_drains,
    wait_policy,
)


@pytest.fixture(scope="module")
def live() -> Iterator[SandboxCluster]:
    require_datapath()
    with SandboxCluster() as cluster:
        cluster.start_agent(["--mode", "tproxy"])
        yield cluster


def fresh_counters(cluster: SandboxCluster) -> dict[str, int]:
    """The datapath's counters after one more pass (at most 10 s apart)."""
    before = (cluster.status() or {}).get("time", 0.0)
    status = cluster.wait_status(lambda s: s["time"] > before, timeout=30,
                                 what="the next status")
    return dict(status["counters"])


def test_tproxy_mode_acts_on_these_policy_features() -> None:
    """What VeerNode reports as programmed in this mode (redirects are not)."""
    assert TproxyDatapath.policy_features == {
        "loadBalancing.algorithm", "loadBalancing.sessionAffinity", "split", "access"}


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
        # Free one backend's two: the next two connections both go there.
        freed = next(b for b in first if b.startswith("web-b"))
        assert holder.close(freed) == 2
        time.sleep(0.2)  # the proxy sees both ends close
        nxt = [backend_of(holder.open(vip, 80)) for _ in range(2)]
        assert nxt == ["web-b", "web-b"], nxt
    time.sleep(0.2)
    # Every proxied connection was given back.
    assert fresh_counters(live)["open_connections"] == 0


def test_access_rules_refuse_denied_pods_at_once_and_count(live: SandboxCluster) -> None:
    vip = "10.96.1.6"
    pods = ["web-a", "web-b"]
    rules = {"defaultAction": "Allow",
             "rules": [{"action": "Deny", "sources": [f"{CLIENT_IP}/32"]},
                       {"action": "Allow", "sources": ["10.244.0.0/16"]}]}
    program(live, "acl.yaml", [*service("acl", vip, pods), policy("acl", "acl", access=rules)],
            vip, pods)
    wait_policy(live, vip, "default/acl")
    before = fresh_counters(live).get("access_denied", 0)
    denied = live.probe("tcp", vip, "80", "--count", "20")
    # Refused (a reset at the first packet), not timed out: nftables decides.
    assert denied["errors"] == {"ECONNREFUSED": 20}, denied
    other = live.topo.pods["web-d"].netns  # 10.244.1.5: rule 1 allows it
    allowed = live.probe("tcp", vip, "80", "--count", "20", netns=other)
    assert allowed["errors"] == {} and sum(allowed["answers"].values()) == 20, allowed
    plain = live.probe("tcp", "10.96.0.10", "80", "--count", "5")
    assert plain["errors"] == {}, plain
    assert fresh_counters(live)["access_denied"] - before >= 20


def test_default_deny_with_an_allowed_range(live: SandboxCluster) -> None:
    """defaultAction Deny: only the allowed range gets through (first match)."""
    vip = "10.96.1.7"
    pods = ["web-a"]
    rules = {"defaultAction": "Deny",
             "rules": [{"action": "Allow", "sources": ["10.244.1.5/32"]}]}
    program(live, "acl2.yaml", [*service("acl2", vip, pods),
                                policy("acl2", "acl2", access=rules)], vip, pods)
    wait_policy(live, vip, "default/acl2")
    denied = live.probe("tcp", vip, "80", "--count", "5")
    assert denied["errors"] == {"ECONNREFUSED": 5}, denied
    other = live.topo.pods["web-d"].netns
    allowed = live.probe("tcp", vip, "80", "--count", "5", netns=other)
    assert allowed["answers"] == {"web-a:8080": 5}, allowed
