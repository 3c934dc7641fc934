"""Several nodes on one machine: node namespaces on a shared LAN, pods on each,
an agent per node (own cgroup subtree, own bpffs directory), and an external
client on the LAN with no route to any pod.

    ext 10.0.0.100 ──┐
    node-1 10.0.0.1 ─┼─ br0 (lan namespace)        node-N routes 10.244.M.0/24
    node-2 10.0.0.2 ─┘                                via 10.0.0.M for every other M
       │ pods 10.244.1.x          │ pods 10.244.2.x

and the same in IPv6: LAN fd00:10::N (ext fd00:10::100), pods
fd00:10:244:M::x, routes to fd00:10:244:M::/64 via fd00:10::M. Node N is
in zone zone-<a, b, ...>.

Nothing here has a route out of these namespaces.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from agent.sandbox.servers import start_nginx, start_udp_echo, wait_listening, wait_udp
from agent.sandbox.topology import Topology, run, stop_process

LAN_PREFIX = "10.0.0"
LAN6_PREFIX = "fd00:10::"
HTTP_PORTS = (8080, 8081)
UDP_PORT = 9053


def _holds(frontend: str, want: list[str], status: dict[str, Any]) -> bool:
    return sorted(status["frontends"].get(frontend, ["-"])) == want


@dataclass
class NodeHandle:
    name: str  # the Node object's name, e.g. node-1
    netns: str
    address: str
    address6: str
    cgroup: str
    bpffs: str
    status_file: str
    log_file: str
    agent: subprocess.Popen[bytes] | None = None
    pods: list[str] = field(default_factory=list)


class MultiNodeCluster:
    """`pods` maps pod name -> node index (1-based); pod n on node m gets
    10.244.m.(n+1)."""

    def __init__(self, nodes: int = 2, pods: dict[str, int] | None = None) -> None:
        self.topo = Topology()
        try:
            self._build(nodes, pods or {"web-a": 1, "web-b": 1, "web-c": 2})
        except BaseException:
            self.close()
            raise

    def _build(self, count: int, pods: dict[str, int]) -> None:
        topo = self.topo
        self.manifests = os.path.join(topo.workdir, "manifests")
        os.makedirs(self.manifests)
        self.nodes: list[NodeHandle] = []
        for i in range(1, count + 1):
            netns = topo.node_ns if i == 1 else topo.add_node(f"node{i}")
            cgroup = os.path.join(topo.cgroup, f"node-{i}")
            os.mkdir(cgroup)
            node = NodeHandle(
                name=f"node-{i}",
                netns=netns,
                address=f"{LAN_PREFIX}.{i}",
                address6=f"{LAN6_PREFIX}{i}",
                cgroup=cgroup,
                bpffs=f"{topo.bpffs}-node{i}",
                status_file=os.path.join(topo.workdir, f"status-node{i}.json"),
                log_file=os.path.join(topo.workdir, f"agent-node{i}.log"),
            )
            topo._on_close(f"datapath of {node.name}", partial(self._cleanup_node, node))
            topo.join_lan(netns, f"{node.address}/24")
            topo.ns(netns, "ip", "-6", "addr", "add", f"{node.address6}/64", "dev", "eth0",
                    "nodad")
            self.nodes.append(node)
        for node in self.nodes:
            for other in range(1, count + 1):
                if other != int(node.name.split("-")[1]):
                    topo.ns(node.netns, "ip", "route", "add", f"10.244.{other}.0/24",
                            "via", f"{LAN_PREFIX}.{other}")
                    topo.ns(node.netns, "ip", "-6", "route", "add",
                            f"fd00:10:244:{other}::/64", "via", f"{LAN6_PREFIX}{other}")
        self.external = topo._netns("ext")
        topo.join_lan(self.external, f"{LAN_PREFIX}.100/24")
        topo.ns(self.external, "ip", "-6", "addr", "add", f"{LAN6_PREFIX}100/64", "dev",
                "eth0", "nodad")
        self.pod_ips: dict[str, str] = {}
        self.pod_ips6: dict[str, str] = {}
        per_node: dict[int, int] = {}
        for name, index in pods.items():
            per_node[index] = per_node.get(index, 1) + 1
            ip = f"10.244.{index}.{per_node[index]}"
            ip6 = f"fd00:10:244:{index}::{per_node[index]}"
            pod = topo.add_pod(name, ip, ip6, node_ns=self.nodes[index - 1].netns,
                               cgroup=self.nodes[index - 1].cgroup)
            self.pod_ips[name] = ip
            self.pod_ips6[name] = ip6
            self.nodes[index - 1].pods.append(name)
            start_nginx(topo, pod, HTTP_PORTS)
            start_udp_echo(topo, pod, [UDP_PORT])
        for name in pods:
            wait_listening(topo, topo.pods[name], HTTP_PORTS[0])
            wait_udp(topo, topo.pods[name], UDP_PORT)
        self.write_manifest("nodes.yaml", "\n---\n".join(
            json.dumps({
                "apiVersion": "v1", "kind": "Node",
                "metadata": {"name": n.name, "labels": {
                    "topology.kubernetes.io/zone": f"zone-{'abcdefgh'[int(n.name[5:]) - 1]}"}},
                "status": {"addresses": [{"type": "InternalIP", "address": n.address},
                                         {"type": "InternalIP", "address": n.address6}]},
            }) for n in self.nodes))

    def _cleanup_node(self, node: NodeHandle) -> None:
        self.stop_agent(node)
        run(["ip", "netns", "exec", node.netns, sys.executable, "-m", "agent.cli.main",
             "agent", "--cleanup", "--cgroup", node.cgroup, "--bpffs", node.bpffs], check=False)
        if os.path.isdir(node.cgroup):
            os.rmdir(node.cgroup)

    # ---- lifecycle -------------------------------------------------------

    def __enter__(self) -> MultiNodeCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for node in getattr(self, "nodes", []):
            self.stop_agent(node)
        self.topo.close()

    def start_agents(self, extra: Sequence[str] = (),
                     only: Sequence[NodeHandle] | None = None) -> None:
        """Start the agent of every node (or of `only` those) and wait for
        each one's first sync."""
        started = list(only) if only is not None else self.nodes
        for node in started:  # a stale status must not pass for the new agent's
            with contextlib.suppress(FileNotFoundError):
                os.unlink(node.status_file)
        for node in started:
            argv = [
                sys.executable, "-m", "agent.cli.main", "agent",
                "--manifests", self.manifests, "--node-name", node.name,
                "--cgroup", node.cgroup, "--bpffs", node.bpffs,
                "--service-cidr", "10.96.0.0/16", "--status-file", node.status_file,
                "--api-socket", "", "--max-sync-interval", "10", *extra,
            ]
            with open(node.log_file, "ab") as log:
                node.agent = self.topo.spawn(node.netns, argv, in_cgroup=False,
                                             stdout=log, stderr=log)
        for node in started:
            self.wait_status(node, lambda s: s["ok"], "first sync")

    def stop_agent(self, node: NodeHandle, sig: int = signal.SIGTERM) -> None:
        if node.agent is None:
            return
        stop_process(node.agent, sig)
        self.topo.forget(node.agent)
        node.agent = None

    def wait_status(
        self, node: NodeHandle, predicate: Callable[[dict[str, Any]], bool], what: str,
        timeout: float = 60.0,
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with open(node.status_file) as f:
                    status: dict[str, Any] = json.load(f)
                if predicate(status):
                    return status
            except (FileNotFoundError, json.JSONDecodeError):
                pass
            if node.agent is not None and node.agent.poll() is not None:
                break
            time.sleep(0.05)
        with open(node.log_file, errors="replace") as f:
            log = f.read()[-4000:]
        raise TimeoutError(f"{node.name}: waiting for {what} failed; agent log:\n{log}")

    def wait_programmed(self, frontend: str, backends_by_node: dict[str, list[str]]) -> None:
        """Wait until each node named holds `frontend` with the given backends
        (as "ip:port/TCP" strings) for traffic that starts on that node."""
        for node in self.nodes:
            if node.name not in backends_by_node:
                continue
            want = sorted(backends_by_node[node.name])
            self.wait_status(node, partial(_holds, frontend, want), f"{frontend} -> {want}")

    def wait_external(self, frontend: str, node: NodeHandle, backends: list[str],
                      local: bool, sources: Sequence[str] = (), affinity: int = 0) -> None:
        """Wait until `node` holds `frontend`'s external side as given."""
        want = {"backends": sorted(backends), "local": local, "sources": list(sources),
                "affinity": affinity}
        self.wait_status(
            node,
            lambda s: s.get("external_frontends", {}).get(frontend) == want,
            f"external {frontend} -> {want}",
        )

    def write_manifest(self, name: str, text: str) -> None:
        tmp = os.path.join(self.manifests, f".{name}.tmp")
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, os.path.join(self.manifests, name))

    # ---- traffic -----------------------------------------------------------

    def spawn_probe_outside(self, *args: str) -> subprocess.Popen[str]:
        argv = [sys.executable, "-m", "agent.sandbox.probe", *args]
        proc = subprocess.Popen(["ip", "netns", "exec", self.external, *argv],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.topo._procs.append(proc)
        return proc

    def _probe_in(self, netns: str, cgroup: str, args: Sequence[str],
                  timeout: float) -> dict[str, Any]:
        argv = ["ip", "netns", "exec", netns, sys.executable, "-m", "agent.sandbox.probe",
                *args]
        procs = os.path.join(cgroup, "cgroup.procs")

        def join() -> None:
            with open(procs, "w") as f:
                f.write(str(os.getpid()))

        res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                             preexec_fn=join)
        if res.returncode != 0:
            raise RuntimeError(f"probe {' '.join(args)} failed: {res.stderr[-2000:]}")
        return dict(json.loads(res.stdout.strip().splitlines()[-1]))

    def probe_from_pod(self, pod: str, *args: str, timeout: float = 300) -> dict[str, Any]:
        """Run the probe in `pod`, inside its node's served cgroup."""
        node = next(n for n in self.nodes if pod in n.pods)
        return self._probe_in(self.topo.pods[pod].netns, node.cgroup, args, timeout)

    def probe_from_node(self, index: int, *args: str, timeout: float = 300) -> dict[str, Any]:
        """Run the probe as a host process of node `index` (1-based): in the
        node's namespace and its served cgroup."""
        node = self.nodes[index - 1]
        return self._probe_in(node.netns, node.cgroup, args, timeout)

    def probe_from_outside(self, *args: str, timeout: float = 300) -> dict[str, Any]:
        """Run the probe in the external client's namespace (no socket hooks)."""
        argv = [sys.executable, "-m", "agent.sandbox.probe", *args]
        res = self.topo.exec(self.external, argv, timeout=timeout, in_cgroup=False)
        if res.returncode != 0:
            raise RuntimeError(f"probe {' '.join(args)} failed: {res.stderr[-2000:]}")
        return dict(json.loads(res.stdout.strip().splitlines()[-1]))
