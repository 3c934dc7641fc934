"""`veer operator` against the real control plane: two replicas with the
chart's ServiceAccount (release "vo" in "veer-op"), one leading through a
Lease; TrafficPolicy status and Events as `kubectl` shows them.

VeerNode reports are written here by the test (as admin) with the shapes
agents write, so Programmed can be checked at "n/m" without agents; the
agent's own report is covered by test_kube_agent.py.
"""

from __future__ import annotations

import json
import signal
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.controlplane import CommandError, ControlPlane, free_ports
from tests.e2e.kubeveer import (
    Veer,
    VeerProcess,
    condition,
    events_of,
    get_tp,
    install_veer,
    operator_kubeconfig,
    policy,
    uninstall_veer,
    wait_until,
    web_service,
)

pytestmark = pytest.mark.e2e

NS = "e2e-operator"
RELEASE, RELEASE_NS = "vo", "veer-op"
NODES = ("op-node-a", "op-node-b")


@dataclass
class Operators:
    cp: ControlPlane
    veer: Veer
    kubeconfig: Path
    workdir: Path
    replicas: dict[str, VeerProcess] = field(default_factory=dict)
    health_ports: dict[str, int] = field(default_factory=dict)

    def start(self, identity: str) -> VeerProcess:
        self.health_ports[identity] = free_ports(1)[0]
        self.replicas[identity] = VeerProcess(
            f"operator {identity}",
            ["operator", "--kubeconfig", str(self.kubeconfig), "--leader-elect",
             "--leader-elect-resource-namespace", RELEASE_NS,
             "--leader-elect-resource-name", self.veer.operator,
             "--leader-elect-identity", identity,
             # Short, so that a takeover fits in a test.
             "--leader-elect-lease-duration", "4", "--leader-elect-renew-deadline", "3",
             "--leader-elect-retry-period", "0.5",
             "--healthz-bind-address", f"127.0.0.1:{self.health_ports[identity]}"],
            self.workdir / f"operator-{identity}.log")
        return self.replicas[identity]

    def health(self, identity: str) -> tuple[int, str]:
        url = f"http://127.0.0.1:{self.health_ports[identity]}/healthz"
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode().strip()

    def running(self) -> list[VeerProcess]:
        return [p for p in self.replicas.values() if p.running()]

    def holder(self) -> str:
        lease = self.cp.kubectl_json("get", "lease", self.veer.operator, "-n", RELEASE_NS)
        return str(lease["spec"].get("holderIdentity") or "")

    def wait_tp(self, name: str, check: Any, what: str) -> dict[str, Any]:
        def ready() -> dict[str, Any] | None:
            tp = get_tp(self.cp, NS, name)
            return tp if check(tp) else None

        got: dict[str, Any] = wait_until(ready, f"{name}: {what}", 60, self.running())
        return got


def heartbeat() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def report(cp: ControlPlane, node: str, entries: list[dict[str, Any]]) -> None:
    """Write a VeerNode as that node's agent would."""
    got = cp.kubectl("get", "veernode", node, check=False)
    if got.returncode != 0:
        cp.apply({"apiVersion": "veer.dev/v1alpha1", "kind": "VeerNode",
                  "metadata": {"name": node}, "spec": {}})
    status = {"mode": "EBPF", "agentVersion": "0.1.0", "heartbeatTime": heartbeat(),
              "heartbeatSeconds": 60, "services": 1, "trafficPolicies": entries}
    cp.kubectl("patch", "veernode", node, "--subresource=status", "--type=merge",
               "-p", json.dumps({"status": status}))


def entry(tp: dict[str, Any], programmed: bool, reason: str = "") -> dict[str, Any]:
    meta = tp["metadata"]
    out = {"namespace": meta["namespace"], "name": meta["name"], "uid": meta["uid"],
           "generation": meta["generation"], "mode": "EBPF", "programmed": programmed}
    if reason:
        out["reason"] = reason
    return out


@pytest.fixture(scope="module")
def operators(control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory
              ) -> Iterator[Operators]:
    cp = control_plane
    veer = install_veer(cp, RELEASE, RELEASE_NS)
    ops = Operators(cp, veer, operator_kubeconfig(cp, veer), tmp_path_factory.mktemp("operator"))
    try:
        # Only this module's reports count toward "n/m".
        cp.kubectl("delete", "veernodes", "--all", "--wait=true")
        cp.create_namespace(NS)
        ops.start("replica-1")
        ops.start("replica-2")
        yield ops
    finally:
        for process in ops.replicas.values():
            process.stop()
        cp.kubectl("delete", "veernodes", *NODES, "--ignore-not-found", check=False)
        cp.kubectl("delete", "namespace", NS, "--wait=false", check=False)
        uninstall_veer(cp, veer)


def test_one_replica_leads(operators: Operators) -> None:
    holder = wait_until(operators.holder, "a leader", 30, operators.running())
    assert holder in operators.replicas
    other = next(p for name, p in operators.replicas.items() if name != holder)
    wait_until(lambda: "waiting: Lease veer-op/vo-veer-operator is held by" in other.output(),
               "the other replica to wait", 30, operators.running())
    waiting = next(name for name in operators.replicas if name != holder)
    assert operators.health(holder) == (200, "ok (leading)")
    assert operators.health(waiting) == (200, "ok (waiting for the Lease)")
    # The operator's token reads no Secrets either.
    with pytest.raises(CommandError):
        operators.cp.kubectl("get", "secrets", "-n", RELEASE_NS, kubeconfig=operators.kubeconfig)


def test_a_valid_policy_is_accepted_and_programmed(operators: Operators) -> None:
    cp = operators.cp
    cp.apply(web_service("web"), policy("web-rr", "web", loadBalancing={"algorithm": "RoundRobin"}),
             namespace=NS)
    tp = operators.wait_tp("web-rr", lambda t: condition(t, "Accepted").get("status") == "True",
                           "Accepted")
    assert condition(tp, "ResolvedRefs")["status"] == "True"
    assert tp["status"]["observedGeneration"] == tp["metadata"]["generation"]
    assert (condition(tp, "Programmed")["reason"], tp["status"]["programmed"]) == (
        "NoNodes", "0/0")

    # Two nodes report: one has it in force, one not yet.
    report(cp, NODES[0], [entry(tp, True)])
    report(cp, NODES[1], [entry(tp, False, "NotImplemented")])
    tp = operators.wait_tp(
        "web-rr", lambda t: t["status"]["nodes"].get("notProgrammed") == [
            {"name": NODES[1], "reason": "NotImplemented"}], "1/2, NotImplemented on one node")
    assert tp["status"]["programmed"] == "1/2"
    programmed = condition(tp, "Programmed")
    assert (programmed["status"], programmed["reason"]) == ("False", "Pending")

    report(cp, NODES[1], [entry(tp, True)])
    tp = operators.wait_tp("web-rr", lambda t: condition(t, "Programmed").get("status") == "True",
                           "Programmed")
    assert tp["status"]["programmed"] == "2/2"
    table = cp.kubectl("get", "tp", "web-rr", "-n", NS).stdout.splitlines()
    columns = dict(zip(table[0].split(), table[1].split(), strict=False))
    assert (columns["TARGETS"], columns["ALGORITHM"], columns["ACCEPTED"],
            columns["PROGRAMMED"]) == ("web", "RoundRobin", "True", "2/2")
    reasons = {(t, r) for t, r, _ in events_of(cp, NS, "web-rr")}
    assert {("Normal", "Accepted"), ("Normal", "Programmed")} <= reasons

    # A new generation is not programmed until the nodes report it.
    cp.kubectl("patch", "tp", "web-rr", "-n", NS, "--type=merge",
               "-p", '{"spec": {"loadBalancing": {"algorithm": "Maglev"}}}')
    tp = operators.wait_tp("web-rr", lambda t: t["status"].get("observedGeneration") == 2,
                           "generation 2 observed")
    assert tp["status"]["programmed"] == "0/2"
    assert {n["reason"] for n in tp["status"]["nodes"]["notProgrammed"]} == {"NotReported"}


def test_a_missing_service_is_target_not_found_until_it_exists(operators: Operators) -> None:
    cp = operators.cp
    cp.apply(policy("api-sticky", "api", loadBalancing={
        "sessionAffinity": {"type": "ClientIP", "timeoutSeconds": 60}}), namespace=NS)
    tp = operators.wait_tp(
        "api-sticky", lambda t: condition(t, "ResolvedRefs").get("reason") == "TargetNotFound",
        "TargetNotFound")
    assert condition(tp, "ResolvedRefs")["status"] == "False"
    assert condition(tp, "ResolvedRefs")["message"] == (
        f"target Service api not found in namespace {NS}")
    assert condition(tp, "Accepted")["status"] == "True"
    assert ("Warning", "TargetNotFound") in {(t, r) for t, r, _ in events_of(cp, NS, "api-sticky")}
    generation = tp["metadata"]["generation"]

    cp.apply(web_service("api"), namespace=NS)  # the policy itself is not touched
    tp = operators.wait_tp(
        "api-sticky", lambda t: condition(t, "ResolvedRefs").get("status") == "True", "resolved")
    assert tp["metadata"]["generation"] == generation
    assert condition(tp, "ResolvedRefs")["reason"] == "ResolvedRefs"


def test_two_policies_on_one_service_the_older_wins(operators: Operators) -> None:
    cp = operators.cp
    cp.apply(web_service("shared"), namespace=NS)
    cp.apply(policy("zz-first", "shared"), namespace=NS)
    time.sleep(1.1)  # creationTimestamps have seconds: the name must not decide
    cp.apply(policy("aa-second", "shared"), namespace=NS)
    loser = operators.wait_tp(
        "aa-second", lambda t: condition(t, "Accepted").get("reason") == "Conflicted", "conflict")
    accepted = condition(loser, "Accepted")
    assert accepted["status"] == "False"
    assert accepted["message"] == (
        f"Service shared already targeted by the older TrafficPolicy {NS}/zz-first")
    assert condition(loser, "Programmed")["reason"] == "NotAccepted"
    winner = get_tp(cp, NS, "zz-first")
    assert condition(winner, "Accepted")["status"] == "True"
    assert ("Warning", "Conflicted", accepted["message"]) in events_of(cp, NS, "aa-second")
    table = cp.kubectl("get", "tp", "-n", NS, "--no-headers").stdout
    rows = {line.split()[0]: line.split()[3] for line in table.splitlines()}
    assert (rows["zz-first"], rows["aa-second"]) == ("True", "False")

    # The winner goes: the other one is accepted.
    cp.kubectl("delete", "tp", "zz-first", "-n", NS)
    operators.wait_tp("aa-second", lambda t: condition(t, "Accepted").get("status") == "True",
                      "accepted after the winner left")


def test_the_other_replica_takes_over(operators: Operators) -> None:
    cp = operators.cp
    leader = operators.holder()
    # A leader that dies without releasing: the Lease runs out, then the other leads.
    operators.replicas[leader].stop(signal.SIGKILL)
    new = wait_until(lambda: ((h := operators.holder()) != leader and h) or None,
                     "the other replica to take the Lease", 30, operators.running())
    assert new in operators.replicas and operators.replicas[new].running()
    cp.apply(web_service("solo"), policy("after-failover", "solo"), namespace=NS)
    operators.wait_tp("after-failover", lambda t: condition(t, "Accepted").get("status") == "True",
                      "accepted by the new leader")
    # A replica that stops cleanly hands over at once.
    operators.start(leader)
    assert operators.replicas[new].stop(signal.SIGTERM) == 0
    assert "released Lease" in operators.replicas[new].output()
    wait_until(lambda: operators.holder() == leader, "the restarted replica to lead", 15,
               operators.running())
    for process in operators.replicas.values():
        assert "Traceback" not in process.output(), process.output()[-4000:]
