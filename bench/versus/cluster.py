"""The side-by-side bench's cluster: a real control plane, one node namespace
per proxy under test, one backend node, and the clients.

    ext 10.0.0.100 ─┐                                  (NodePort clients)
    plain  10.0.0.5 ┤ client 10.244.5.100              direct: no proxy at all
    veer   10.0.0.1 ┤ client 10.244.1.100              veer, eBPF (socket + TC)
    tproxy 10.0.0.2 ┤ client 10.244.2.100              veer --mode tproxy
    kp-ipt 10.0.0.3 ┤ client 10.244.3.100              kube-proxy --proxy-mode iptables
    kp-nft 10.0.0.4 ┤ client 10.244.4.100              kube-proxy --proxy-mode nftables
    backend 10.0.0.9┘ web  10.244.9.2  (nginx :8080, iperf3 :5201)
                      load 10.244.9.3-12 (one nginx on ten addresses: the
                                          endpoints of the loaded Services)
       all on br0 in the lan namespace; node k routes 10.244.9.0/24 via the
       backend node, which routes 10.244.k.0/24 back via node k.

Every path crosses the same hops: client pod, its node, the LAN, the backend
node, the pod (NodePort clients enter the node from the LAN instead of from
a pod). The control plane (etcd, kube-apiserver, kube-controller-manager)
runs as tests/e2e/controlplane.py starts it, on 127.0.0.1 of the root
namespace; a relay (relay.py) gives each node namespace a 127.0.0.1:6443
that leads to it. Nothing has a route out of the namespaces.

Each node has its own cgroup (its pods' processes are in it; veer's socket
programs attach there) and every node, proxy or not, carries the same small
nftables table of stateless counters (`inet bn_check`) that the honesty
checks read: SYNs to the Service range and to NodePorts as they arrive, and
SYNs forwarded to the backend pods.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from agent.sandbox.servers import start_nginx, wait_listening
from agent.sandbox.topology import Pod, Topology, run
from tests.e2e.controlplane import ControlPlane, write_kubeconfig
from tests.e2e.kubeveer import apply_crds

HERE = Path(__file__).resolve().parent
LAN = "10.0.0"
BACKEND_NODE = "bench-backend"
BACKEND_LAN = f"{LAN}.9"
WEB_IP = "10.244.9.2"
LOAD_IPS = tuple(f"10.244.9.{i}" for i in range(3, 13))
EXTERNAL_IP = f"{LAN}.100"
CLUSTER_CIDR = "10.244.0.0/16"
SERVICE_CIDR = "10.96.0.0/16"
RELAY_PORT = 6443
HTTP_PORT = 8080
IPERF_PORT = 5201

CHECK_TABLE = "bn_check"


@dataclass
class Node:
    key: str  # "plain", "veer", "tproxy", "kp-ipt", "kp-nft"
    name: str  # the Node object's name
    index: int
    netns: str
    cgroup: str
    client: Pod

    @property
    def address(self) -> str:
        return f"{LAN}.{self.index}"


NODES = (("veer", 1), ("tproxy", 2), ("kp-ipt", 3), ("kp-nft", 4), ("plain", 5))


SYN = "tcp flags & (syn | ack) == syn"
NODEPORT_RULE = f"fib daddr type local tcp dport 30000-32767 {SYN} counter name nodeport_syn"


def check_table() -> str:
    """The counters every node carries (stateless: no rule here turns
    conntrack on in a namespace that would not otherwise use it)."""
    return f"""table inet {CHECK_TABLE} {{
    counter svc_syn {{}}
    counter nodeport_syn {{}}
    counter fwd_syn {{}}
    chain pre {{
        type filter hook prerouting priority -160; policy accept;
        ip daddr {SERVICE_CIDR} tcp flags & (syn | ack) == syn counter name svc_syn
        {NODEPORT_RULE}
    }}
    chain forwarded {{
        type filter hook forward priority 0; policy accept;
        ip daddr 10.244.9.0/24 tcp flags & (syn | ack) == syn counter name fwd_syn
    }}
}}
"""


class BenchCluster:
    """Builds everything in __init__ and removes it all in close(), also
    after a failure half way."""

    def __init__(self, log_dir: Path) -> None:
        self.topo = Topology()
        self.cp: ControlPlane | None = None
        self.relay: subprocess.Popen[str] | None = None
        self.log_dir = log_dir
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    # ---- building ----------------------------------------------------------

    def _build(self) -> None:
        topo = self.topo
        self.cp = ControlPlane()
        self.cp.start()
        apply_crds(self.cp)  # veer reports its VeerNode, as on a cluster
        self.backend = topo.node_ns
        topo.join_lan(self.backend, f"{BACKEND_LAN}/24")
        self.nodes: dict[str, Node] = {}
        for key, index in NODES:
            netns = topo.add_node(key)
            cgroup = os.path.join(topo.cgroup, key)
            os.mkdir(cgroup)
            topo._on_close(f"cgroup {key}", partial(self._remove_cgroup, cgroup))
            topo.join_lan(netns, f"{LAN}.{index}/24")
            topo.ns(netns, "ip", "route", "add", "10.244.9.0/24", "via", BACKEND_LAN)
            topo.ns(self.backend, "ip", "route", "add", f"10.244.{index}.0/24", "via",
                    f"{LAN}.{index}")
            client = topo.add_pod(f"client{index}", f"10.244.{index}.100", node_ns=netns,
                                  cgroup=cgroup)
            self._load_generator(client.netns)
            self.nodes[key] = Node(key, f"bench-{key}", index, netns, cgroup, client)
        self.external = topo._netns("ext")
        topo.join_lan(self.external, f"{EXTERNAL_IP}/24")
        self._load_generator(self.external)
        for netns in (self.backend, self.external, *(n.netns for n in self.nodes.values())):
            run(["ip", "netns", "exec", netns, "nft", "-f", "-"], input=check_table())
        self._backends()
        self._api_objects()
        self._start_relay()

    @staticmethod
    def _load_generator(netns: str) -> None:
        # Clients reuse their own TIME_WAIT ports and use the whole range, so
        # that many short connections do not clog them (the same for all).
        run(["ip", "netns", "exec", netns, "sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1",
             "net.ipv4.ip_local_port_range=1024 65535"])

    def _remove_cgroup(self, cgroup: str) -> None:
        if os.path.isdir(cgroup):
            os.rmdir(cgroup)

    def _backends(self) -> None:
        topo = self.topo
        self.web = topo.add_pod("web", WEB_IP, node_ns=self.backend)
        self.load = topo.add_pod("load", LOAD_IPS[0], node_ns=self.backend)
        for ip in LOAD_IPS[1:]:
            topo.ns(self.load.netns, "ip", "addr", "add", f"{ip}/32", "dev", "eth0")
            topo.ns(self.backend, "ip", "route", "add", f"{ip}/32", "dev", self.load.host_veth)
        self.nginx = start_nginx(topo, self.web, (HTTP_PORT,))
        start_nginx(topo, self.load, (HTTP_PORT,))
        self.iperf = topo.spawn(self.web.netns, ["iperf3", "-s", "-p", str(IPERF_PORT)],
                                in_cgroup=False)
        for pod in (self.web, self.load):
            wait_listening(topo, pod, HTTP_PORT)
        wait_listening(topo, self.web, IPERF_PORT)

    def _api_objects(self) -> None:
        cp = self.control_plane
        cp.add_node(BACKEND_NODE, BACKEND_LAN)
        for node in self.nodes.values():
            cp.add_node(node.name, node.address)
        self.kubeconfigs = {
            "admin": write_kubeconfig(cp.dir / "bench" / "admin.yaml", self.relay_url,
                                      cp.ca_file, cp.tokens["admin"], "bench-admin"),
            "kube-proxy": write_kubeconfig(cp.dir / "bench" / "kube-proxy.yaml", self.relay_url,
                                           cp.ca_file, cp.tokens["system:kube-proxy"],
                                           "kube-proxy"),
        }

    @property
    def relay_url(self) -> str:
        return f"https://127.0.0.1:{RELAY_PORT}"

    def _start_relay(self) -> None:
        port = self.control_plane.url.rsplit(":", 1)[1]
        namespaces = [n.netns for n in self.nodes.values() if n.key != "plain"]
        self.relay = subprocess.Popen(
            [sys.executable, str(HERE / "relay.py"), "--target", f"127.0.0.1:{port}",
             "--port", str(RELAY_PORT), *namespaces],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert self.relay.stdout is not None
        if self.relay.stdout.readline().strip() != "ready":
            raise RuntimeError("the API relay did not start")

    # ---- using it ------------------------------------------------------------

    @property
    def control_plane(self) -> ControlPlane:
        assert self.cp is not None
        return self.cp

    def background_pids(self) -> list[int]:
        """The control plane's processes and the relay (not the proxies)."""
        pids = list(self.control_plane.processes.values())
        if self.relay is not None:
            pids.append(self.relay.pid)
        return pids

    def exec(self, netns: str, argv: Sequence[str], cgroup: str = "",
             timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run to completion in `netns`, inside `cgroup` if given."""
        return subprocess.run(["ip", "netns", "exec", netns, *argv], capture_output=True,
                              text=True, timeout=timeout,
                              preexec_fn=partial(join_cgroup, cgroup) if cgroup else None)

    def spawn(self, netns: str, argv: Sequence[str], cgroup: str = "",
              **kwargs: Any) -> subprocess.Popen[Any]:
        """Start in `netns` (inside `cgroup`), stopped by close() if still running."""
        proc: subprocess.Popen[Any] = subprocess.Popen(
            ["ip", "netns", "exec", netns, *argv],
            preexec_fn=partial(join_cgroup, cgroup) if cgroup else None, **kwargs)
        self.topo._procs.append(proc)
        return proc

    def counters(self, netns: str) -> dict[str, int]:
        """The node's bn_check counters (packets).

        `list table`, not `list counters table`: nft 1.0.6 fetches only the
        named table for the former, but every table's rules for the latter.
        In kube-proxy iptables' node with 10,000 Services (430,171 rules in
        its nat table) the latter hit exec()'s 120 s timeout; in a test
        namespace with 200,000 rules it took 8.5 s, the former 0.02 s."""
        res = self.exec(netns, ["nft", "-j", "list", "table", "inet", CHECK_TABLE])
        out = {}
        for obj in json.loads(res.stdout)["nftables"]:
            counter = obj.get("counter")
            if counter:
                out[counter["name"]] = int(counter["packets"])
        return out

    # ---- tearing down -----------------------------------------------------------

    def __enter__(self) -> BenchCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.relay is not None:
            self.relay.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.relay.wait(5)
            if self.relay.poll() is None:
                self.relay.kill()
                self.relay.wait(5)
            self.relay = None
        self.topo.close()
        if self.cp is not None:
            self.cp.stop()
            self.cp = None


def join_cgroup(cgroup: str) -> None:
    with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
        f.write(str(os.getpid()))
