"""`veer agent --kubernetes` against the real control plane, serving real
traffic between network-namespace pods.

The chart is installed (release "vk" in "veer-kube") for its ServiceAccounts,
RBAC and admission policy; its DaemonSet and Deployment stay inert (no
kubelet or controllers for them), so the agent and the operator run here as
processes with the chart's tokens, the agent's bound to a Pod "of the
DaemonSet" on node-1 as a kubelet would mount it. The agent runs in the root
network namespace, serving the test's cgroup (see tests/e2e/kubeveer.py).

Addresses: node-1 is 198.51.100.10 (API objects only); the pods are
web-a/b/c 10.244.1.2-4 (nginx on 8080) and client 10.244.1.100, in network
namespaces joined to a node namespace (agent/sandbox/cluster.py); Services
get ClusterIPs from 10.96.0.0/16. Pods' Ready status is set by the test,
playing the kubelet; the real EndpointSlice controller writes the slices.

The tests run in order and share one agent: traffic, readiness, deletion,
an API server restart, the metrics, the VeerNode report and a TrafficPolicy,
a plain SIGTERM, and last `helm uninstall` (which removes the RBAC).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import math
import os
import signal
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.metrics.threads import cpu_clock_id
from agent.sandbox.cluster import WEB_PODS, SandboxCluster
from tests.e2e.controlplane import CommandError, ControlPlane, free_ports
from tests.e2e.kubeveer import (
    Veer,
    VeerProcess,
    agent_kubeconfig,
    agent_pod,
    condition,
    events_of,
    get_tp,
    install_veer,
    operator_kubeconfig,
    policy,
    uninstall_veer,
    wait_until,
    web_pod,
    web_service,
)

pytestmark = pytest.mark.e2e

NODE = "node-1"
NODE_IP = "198.51.100.10"
NS = "e2e-agent"
RELEASE, RELEASE_NS = "vk", "veer-kube"
SERVICE_CIDR = "10.96.0.0/16"
POD_IPS = {p.name: p.ipv4 for p in WEB_PODS[:3]}  # web-a, web-b, web-c


@dataclass
class Env:
    cp: ControlPlane
    veer: Veer
    sandbox: SandboxCluster
    agent_pod: dict[str, Any]
    kubeconfig: Path
    metrics_port: int
    agent: VeerProcess | None = None
    operator: VeerProcess | None = None

    def start_agent(self) -> VeerProcess:
        sb = self.sandbox
        with contextlib.suppress(FileNotFoundError):
            os.unlink(sb.status_file)  # so that waits see the new agent's
        self.agent = VeerProcess(
            "agent",
            [
                "agent", "--kubernetes", "--kubeconfig", str(self.kubeconfig),
                "--node-name", NODE,
                "--cgroup", sb.topo.cgroup, "--bpffs", sb.topo.bpffs,
                "--service-cidr", SERVICE_CIDR,
                "--status-file", sb.status_file, "--api-socket", sb.api_socket,
                "--metrics-bind-address", f"127.0.0.1:{self.metrics_port}",
                "--healthz-bind-address", "",
                "--max-sync-interval", "10",
                "--owner-daemonset", f"{RELEASE_NS}/{self.veer.agent}",
            ],
            Path(sb.topo.workdir) / "agent.log",
            env={"POD_NAME": self.agent_pod["metadata"]["name"], "POD_NAMESPACE": RELEASE_NS},
        )  # fmt: skip
        return self.agent

    def processes(self) -> list[VeerProcess]:
        return [p for p in (self.agent, self.operator) if p is not None]

    def cluster_ip(self, service: str) -> str:
        ip: str = self.cp.kubectl_json("get", "service", service, "-n", NS)["spec"]["clusterIP"]
        assert ipaddress.ip_address(ip) in ipaddress.ip_network(SERVICE_CIDR)
        return ip

    def wait_backends(self, ip: str, port: int, pods: list[str] | None) -> None:
        """Until the agent has programmed ip:port with exactly these pods (None: gone)."""
        want = None if pods is None else sorted(f"{POD_IPS[p]}:8080/TCP" for p in pods)
        frontend = f"{ip}:{port}/TCP"

        def programmed() -> bool:
            status = self.sandbox.status()
            if status is None:
                return False
            got = status["frontends"].get(frontend)
            return got is None if want is None else got is not None and sorted(got) == want

        wait_until(programmed, f"{frontend} -> {want}", 60, self.processes())

    def probe(self, ip: str, port: int, count: int = 60) -> dict[str, Any]:
        return self.sandbox.probe("tcp", ip, str(port), "--count", str(count))

    def metrics(self) -> dict[str, float]:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as resp:
            text = resp.read().decode()
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out


def answered_by(result: dict[str, Any]) -> set[str]:
    return {answer.split(":")[0] for answer in result["answers"]}


@pytest.fixture(scope="module")
def env(control_plane: ControlPlane) -> Iterator[Env]:
    cp = control_plane
    veer = install_veer(cp, RELEASE, RELEASE_NS)
    sandbox: SandboxCluster | None = None
    environment: Env | None = None
    try:
        cp.add_node(NODE, NODE_IP)
        cp.create_namespace(NS)
        pod = agent_pod(cp, veer, NODE)
        kubeconfig = agent_kubeconfig(cp, veer, pod)
        sandbox = SandboxCluster(manifests=None, pods=WEB_PODS[:3])
        environment = Env(cp, veer, sandbox, pod, kubeconfig, free_ports(1)[0])
        environment.start_agent()
        environment.operator = VeerProcess(
            "operator", ["operator", "--kubeconfig", str(operator_kubeconfig(cp, veer))],
            Path(sandbox.topo.workdir) / "operator.log")
        yield environment
    finally:
        if environment is not None:
            for process in environment.processes():
                process.stop()
        if sandbox is not None:
            sandbox.close()
        cp.kubectl("delete", "veernode", NODE, "--ignore-not-found", check=False)
        cp.kubectl("delete", "namespace", NS, "--wait=false", check=False)
        uninstall_veer(cp, veer)


def test_the_agents_token_cannot_read_secrets(env: Env) -> None:
    cp = env.cp
    who = cp.kubectl_json("auth", "whoami", kubeconfig=env.kubeconfig)["status"]["userInfo"]
    assert who["username"] == f"system:serviceaccount:{RELEASE_NS}:{env.veer.agent}"
    assert who["extra"]["authentication.kubernetes.io/node-name"] == [NODE]
    for namespace in (RELEASE_NS, NS, "kube-system"):
        with pytest.raises(CommandError) as refused:
            cp.kubectl("get", "secrets", "-n", namespace, kubeconfig=env.kubeconfig)
        assert "forbidden" in refused.value.stderr.lower()
    got = cp.kubectl("auth", "can-i", "list", "secrets", "--all-namespaces",
                     kubeconfig=env.kubeconfig, check=False)
    assert got.stdout.strip() == "no"
    # ... while what it needs is granted.
    for verb, resource in (("watch", "services"), ("watch", "endpointslices.discovery.k8s.io"),
                           ("watch", "nodes"), ("watch", "trafficpolicies.veer.dev")):
        got = cp.kubectl("auth", "can-i", verb, resource, "--all-namespaces",
                         kubeconfig=env.kubeconfig, check=False)
        assert got.stdout.strip() == "yes", (verb, resource)


def test_a_service_with_ready_pods_gets_traffic(env: Env) -> None:
    cp = env.cp
    cp.apply(web_service("web"), *(web_pod(name, NODE) for name in POD_IPS), namespace=NS)
    for name, ip in POD_IPS.items():
        cp.set_pod_status(NS, name, ip, ready=True, host_ip=NODE_IP)
    ip = env.cluster_ip("web")
    env.wait_backends(ip, 80, ["web-a", "web-b", "web-c"])
    got = env.probe(ip, 80, 90)
    assert got["errors"] == {}, got
    assert answered_by(got) == {"web-a", "web-b", "web-c"}, got
    assert got["peer_mismatch"] == 0


def test_a_pod_made_unready_or_deleted_loses_its_traffic(env: Env) -> None:
    cp = env.cp
    ip = env.cluster_ip("web")
    cp.set_pod_status(NS, "web-b", POD_IPS["web-b"], ready=False, host_ip=NODE_IP)
    env.wait_backends(ip, 80, ["web-a", "web-c"])
    got = env.probe(ip, 80)
    assert got["errors"] == {} and answered_by(got) == {"web-a", "web-c"}, got

    cp.kubectl("delete", "pod", "web-c", "-n", NS, "--grace-period=0", "--force")
    env.wait_backends(ip, 80, ["web-a"])
    got = env.probe(ip, 80, 30)
    assert got["errors"] == {} and answered_by(got) == {"web-a"}, got


def test_a_deleted_service_is_refused(env: Env) -> None:
    cp = env.cp
    cp.apply(web_service("doomed", port=81), namespace=NS)
    ip = env.cluster_ip("doomed")
    env.wait_backends(ip, 81, ["web-a"])
    assert answered_by(env.probe(ip, 81, 10)) == {"web-a"}
    cp.kubectl("delete", "service", "doomed", "-n", NS)
    env.wait_backends(ip, 81, None)
    got = env.probe(ip, 81, 10)
    assert got["answers"] == {} and got["errors"] == {"ECONNREFUSED": 10}, got


def test_an_api_server_restart_does_not_interrupt_traffic(env: Env) -> None:
    cp, sb = env.cp, env.sandbox
    ip = env.cluster_ip("web")
    before = env.metrics()
    agent_log = env.agent.output() if env.agent else ""
    probe = sb.spawn_probe("tcp", ip, "80", "--duration", "15", "--interval", "0.01")
    time.sleep(1.0)
    cp.restart_apiserver()
    # The agent noticed: its watches broke and it listed again.
    wait_until(lambda: env.agent is not None and env.agent.output().count("listing again")
               > agent_log.count("listing again"), "the agent to list again", 60,
               env.processes())
    # A change made after the restart is programmed.
    cp.set_pod_status(NS, "web-b", POD_IPS["web-b"], ready=True, host_ip=NODE_IP)
    env.wait_backends(ip, 80, ["web-a", "web-b"])
    out, err = probe.communicate(timeout=60)
    assert probe.returncode == 0, err
    got = json.loads(out.strip().splitlines()[-1])
    assert got["errors"] == {}, got  # not one connection failed across the restart
    assert got["attempts"] > 100 and answered_by(got) <= {"web-a", "web-b"}
    after = env.metrics()
    # The relists changed nothing: no Service change was seen.
    service_changes = "kubeproxy_sync_proxy_rules_service_changes_total"
    assert after[service_changes] == before[service_changes]


def test_network_programming_latency_is_recorded(env: Env) -> None:
    name = "kubeproxy_network_programming_duration_seconds"
    ip = env.cluster_ip("web")
    try:
        for ready, backends in ((False, ["web-a"]), (True, ["web-a", "web-b"])):
            # Conditions carry seconds: two flips in one second look like none to
            # the EndpointSlice controller's trigger-time tracker.
            time.sleep(1.1)
            before = env.metrics()
            # The Pod's change is stamped with this second (see set_pod_status).
            changed = math.floor(time.time())
            env.cp.set_pod_status(NS, "web-b", POD_IPS["web-b"], ready=ready, host_ip=NODE_IP)
            env.wait_backends(ip, 80, backends)
            # The pass that programmed it has ended: the change was observed.
            count = before[f"{name}_count"]
            wait_until(lambda count=count: env.metrics()[f"{name}_count"] > count,  # type: ignore[misc]
                       "the latency to be observed", 10, env.processes())
            seen = time.time()
            after = env.metrics()
            seconds = after[f"{name}_sum"] - before[f"{name}_sum"]
            observed = after[f"{name}_count"] - before[f"{name}_count"]
            # From the Pod's change to programmed: after the change, and no
            # longer than this test saw pass. How long that is depends on the
            # EndpointSlice controller too (after the API server's restart in
            # the test before, its informers catch up on their own back-off),
            # so the bound is what the test measured, not a fixed figure.
            assert 0 < seconds / observed <= seen - changed, (seconds, observed, seen - changed)
    finally:
        # The tests after this one expect web-b ready, whatever happened here.
        env.cp.set_pod_status(NS, "web-b", POD_IPS["web-b"], ready=True, host_ip=NODE_IP)


def test_the_agents_cpu_is_split_by_thread(env: Env) -> None:
    assert env.agent is not None
    metrics = env.metrics()
    # The agent process's exact CPU clock, read after the scrape: it can only
    # have grown since.
    process_seconds = time.clock_gettime(cpu_clock_id(env.agent.pid, per_thread=False))
    prefix = 'veer_thread_cpu_seconds_total{thread="'
    threads = {name[len(prefix):-2]: value for name, value in metrics.items()
               if name.startswith(prefix)}
    # The reconcile pass and one watch thread per kind, by the names Python gave them.
    assert {"MainThread", "sync", "kube-services", "kube-endpointslices"} <= set(threads), threads
    assert threads["sync"] > 0, threads  # it has programmed this file's Services
    # Each thread's own: together no more than the whole process spent.
    assert sum(threads.values()) <= process_seconds, (threads, process_seconds)


def test_a_trafficpolicy_is_accepted_programmed_and_in_force(env: Env) -> None:
    cp = env.cp
    cp.apply(policy("web-policy", "web", loadBalancing={"algorithm": "RoundRobin"}),
             namespace=NS)

    def reported() -> dict[str, Any] | None:
        tp = get_tp(cp, NS, "web-policy")
        status = tp.get("status") or {}
        if status.get("programmed") == "1/1" and condition(tp, "Programmed").get(
                "status") == "True":
            return tp
        return None

    tp = wait_until(reported, "the policy's status", 60, env.processes())
    assert condition(tp, "Accepted")["status"] == "True"
    assert condition(tp, "ResolvedRefs")["status"] == "True"
    table = cp.kubectl("get", "tp", "web-policy", "-n", NS).stdout.split("\n")
    header, row = table[0].split(), table[1].split()
    assert dict(zip(header, row, strict=False))["ACCEPTED"] == "True"
    assert dict(zip(header, row, strict=False))["PROGRAMMED"] == "1/1"
    assert ("Normal", "Accepted", "applies to Service web") in events_of(cp, NS, "web-policy")
    # And it acts: one client, one connection at a time, round robin over
    # web's two pods alternates (random would repeat a pod within 20 tries
    # with probability 1 - 2^-19).
    got = env.sandbox.probe("tcp", env.cluster_ip("web"), "80", "--count", "20")
    seq = [a.split(":")[0] for a in got["sequence"]]
    assert got["errors"] == {} and all(seq[i] != seq[i + 1] for i in range(19)), seq
    assert set(seq) == {"web-a", "web-b"}


def test_the_veernode_reports_this_node(env: Env) -> None:
    vn = env.cp.kubectl_json("get", "veernode", NODE)
    status = vn["status"]
    node = env.cp.kubectl_json("get", "node", NODE)
    assert status["nodeUID"] == node["metadata"]["uid"]
    assert vn["metadata"]["ownerReferences"][0]["uid"] == node["metadata"]["uid"]
    assert status["podName"] == env.agent_pod["metadata"]["name"]
    assert status["mode"] == "EBPF"
    assert condition(vn, "Ready")["status"] == "True"
    assert status["services"] >= 2  # kubernetes and web (doomed is gone)
    [entry] = [p for p in status["trafficPolicies"] if p["name"] == "web-policy"]
    assert entry["programmed"] is True and entry["reason"] == "Programmed"
    assert entry["generation"] == get_tp(env.cp, NS, "web-policy")["metadata"]["generation"]


def test_sigterm_leaves_the_datapath_serving(env: Env) -> None:
    assert env.agent is not None
    ip = env.cluster_ip("web")
    assert env.agent.stop(signal.SIGTERM) == 0
    assert "leaving the datapath in place: DaemonSet veer-kube/vk-veer-agent is in place" in (
        env.agent.output())
    assert os.listdir(env.sandbox.topo.bpffs)  # the pins stay
    got = env.probe(ip, 80, 30)  # the kernel serves without an agent
    assert got["errors"] == {} and answered_by(got) == {"web-a", "web-b"}, got
    env.start_agent()
    env.sandbox.wait_status(lambda s: s["ok"], what="the new agent's first pass")
    env.wait_backends(ip, 80, ["web-a", "web-b"])


def test_helm_uninstall_removes_the_datapath(env: Env) -> None:
    from agent.datapath.ebpf.programs import attached_programs

    assert env.agent is not None and env.operator is not None
    cgroup, bpffs = env.sandbox.topo.cgroup, env.sandbox.topo.bpffs
    env.wait_backends(env.cluster_ip("web"), 80, ["web-a", "web-b"])
    assert attached_programs(cgroup)
    env.operator.stop()
    uninstall_veer(env.cp, env.veer)  # the DaemonSet, then RBAC and ServiceAccounts
    wait_until(lambda: "veer is being uninstalled; the datapath is removed" in
               env.agent.output(), "the agent to see its DaemonSet go", 60)  # type: ignore[union-attr]
    # The kubelet would now stop the agent's Pod.
    assert env.agent.stop(signal.SIGTERM) == 0
    log = env.agent.output()
    assert "veer is being uninstalled (DaemonSet veer-kube/vk-veer-agent" in log, log[-3000:]
    assert attached_programs(cgroup) == []
    assert not os.path.exists(bpffs) or os.listdir(bpffs) == []
    for process in env.processes():
        assert "Traceback" not in process.output(), process.output()[-6000:]
