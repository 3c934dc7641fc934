"""The proxies under test, as processes in their node namespaces, all fed by
the same API server (through the relay, see cluster.py).

    veer            veer agent --kubernetes (eBPF: socket programs on the
                    node's cgroup, TC programs on eth0)
    veer-tproxy     veer agent --kubernetes --mode tproxy
    kube-proxy      the real kube-proxy binary, --proxy-mode iptables|nftables

Each can be started afresh and stopped (SIGTERM; both leave their datapath
in place, as they do on a node), and tells how much of the API it has
programmed, from its own state: veer's status file, kube-proxy's rules
(`nft list`, `iptables-save`), read in its namespace.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from benchlib import REPO

from agent.cli.client import Client
from agent.datapath.ebpf.maps import SockLbMaps
from agent.sandbox.topology import BPFFS_MOUNT, run, stop_process
from tests.e2e.controlplane import bin_dir
from versus.cluster import CLUSTER_CIDR, SERVICE_CIDR, BenchCluster, Node

METRICS = "127.0.0.1:10249"


class Proxy:
    key = ""
    title = ""

    def __init__(self, cluster: BenchCluster, node: Node) -> None:
        self.cluster = cluster
        self.node = node
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = cluster.log_dir / f"{self.key}.log"
        self.starts = 0

    # ---- lifecycle ----------------------------------------------------------

    def argv(self) -> list[str]:
        raise NotImplementedError

    def start(self, cpus: set[int] | None = None) -> None:
        """Start afresh, on `cpus` if given (every thread and child inherits
        them; a Go program sizes GOMAXPROCS by them)."""
        if self.running:
            raise RuntimeError(f"{self.key} is already running")
        self.starts += 1
        prefix = ["taskset", "-c", ",".join(map(str, sorted(cpus)))] if cpus else []
        argv = [*prefix, *self.argv()]
        with open(self.log_path, "ab") as log:
            log.write(f"==== start {self.starts}: {' '.join(argv)}\n".encode())
            log.flush()
            self.proc = self.cluster.spawn(self.node.netns, argv, stdout=log,
                                           stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def ready(self) -> bool:
        """Whether it has made its first full sync since it started (a stopped
        proxy's rules keep serving, so traffic alone cannot tell)."""
        raise NotImplementedError

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready():
            self.check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.key} not ready after {timeout:.0f} s; log:\n"
                                   f"{self.log_tail()}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc is None:
            return
        stop_process(self.proc)
        self.cluster.topo.forget(self.proc)
        self.proc = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"{self.key} exited ({self.proc.returncode}); log "
                               f"{self.log_path}:\n{self.log_tail()}")

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return ""

    # ---- what it programmed -------------------------------------------------

    def programmed(self, addresses: set[str]) -> int:
        """How many of `addresses` (ClusterIPs) its own state holds."""
        raise NotImplementedError

    def metrics(self) -> str:
        """Its Prometheus /metrics text (served in its namespace)."""
        res = self.cluster.exec(self.node.netns, [
            sys.executable, "-c",
            "import sys, urllib.request; sys.stdout.write(urllib.request.urlopen("
            f"'http://{METRICS}/metrics', timeout=10).read().decode())"])
        if res.returncode != 0:
            raise RuntimeError(f"{self.key}: /metrics: {res.stderr.strip()[-500:]}")
        return res.stdout

    def counters(self) -> dict[str, int]:
        """What its datapath counted (veer only; kube-proxy counts nothing)."""
        return {}

    def describe_rules(self) -> str:
        """One line on what it programmed in the kernel, for the log."""
        return ""


def chart_min_sync_interval() -> float:
    """agent.minSyncInterval of the Helm chart's values: veer runs as installed."""
    values = yaml.safe_load((REPO / "deploy" / "helm" / "veer" / "values.yaml").read_text())
    return float(values["agent"]["minSyncInterval"])


CHART_MIN_SYNC_INTERVAL = chart_min_sync_interval()


class VeerProxy(Proxy):
    key = "veer"
    title = "veer (eBPF)"
    mode = "ebpf"

    def __init__(self, cluster: BenchCluster, node: Node) -> None:
        super().__init__(cluster, node)
        work = Path(cluster.topo.workdir)
        self.status_file = work / f"status-{self.key}.json"
        self.api_socket = str(work / f"veer-{self.key}.sock")
        self.bpffs = os.path.join(BPFFS_MOUNT, f"{cluster.topo.prefix}-{self.key}")
        cluster.topo._on_close(f"datapath of {self.key}", self.cleanup)
        self._maps: SockLbMaps | None = None

    def argv(self) -> list[str]:
        argv = [
            sys.executable, "-m", "agent.cli.main", "agent", "--kubernetes",
            "--kubeconfig", str(self.cluster.kubeconfigs["admin"]),
            "--node-name", self.node.name, "--cgroup", self.node.cgroup,
            "--bpffs", self.bpffs, "--service-cidr", SERVICE_CIDR,
            "--cluster-cidr", CLUSTER_CIDR, "--status-file", str(self.status_file),
            "--api-socket", self.api_socket, "--metrics-bind-address", METRICS,
            "--healthz-bind-address", "", "--no-cleanup-on-uninstall",
            # As installed (deploy/helm/veer/values.yaml agent.minSyncInterval;
            # kube-proxy's own --*-min-sync-period defaults to 1 s): bursts
            # of changes are batched into passes, a lone change applies at once.
            "--min-sync-interval", str(CHART_MIN_SYNC_INTERVAL),
        ]
        if self.mode != "ebpf":
            argv += ["--mode", self.mode]
        if os.environ.get("VEER_BENCH_VERBOSE"):
            argv.append("-v")
        return argv

    def start(self, cpus: set[int] | None = None) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.status_file.unlink()
        super().start(cpus)

    def stop(self) -> None:
        if self._maps is not None:
            self._maps.close()
            self._maps = None
        super().stop()

    def cleanup(self) -> None:
        self.stop()
        run(["ip", "netns", "exec", self.node.netns, sys.executable, "-m", "agent.cli.main",
             "agent", "--cleanup", "--cgroup", self.node.cgroup, "--bpffs", self.bpffs],
            check=False)

    def ready(self) -> bool:
        status = self.status()
        return bool(status and status.get("ok"))

    def status(self) -> dict[str, Any] | None:
        try:
            return dict(json.loads(self.status_file.read_text()))
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def programmed(self, addresses: set[str]) -> int:
        status = self.status() or {}
        have = {fe.split(":")[0] for fe in status.get("frontends", {})}
        return len(addresses & have)

    def counters(self) -> dict[str, int]:
        if self._maps is None:
            self._maps = SockLbMaps.open(self.bpffs)
        return dict(self._maps.counters())

    def describe_rules(self) -> str:
        status = self.status() or {}
        return (f"status file lists {len(status.get('frontends', {}))} frontends, "
                f"{len(status.get('external_frontends', {}))} external")


class TproxyProxy(VeerProxy):
    key = "veer-tproxy"
    title = "veer (TPROXY mode)"
    mode = "tproxy"

    def counters(self) -> dict[str, int]:
        with Client(self.api_socket) as client:
            return {c["name"]: int(c["value"]) for c in client.status()["counters"]}

    def describe_rules(self) -> str:
        res = self.cluster.exec(self.node.netns, ["nft", "list", "table", "inet", "veer"])
        return (f"{super().describe_rules()}; nft table inet veer: "
                f"{len(res.stdout.splitlines())} lines")


class KubeProxy(Proxy):
    def __init__(self, cluster: BenchCluster, node: Node, mode: str) -> None:
        self.mode = mode
        self.key = f"kube-proxy-{mode}"
        self.title = f"kube-proxy {mode}"
        super().__init__(cluster, node)

    def argv(self) -> list[str]:
        return [
            str(bin_dir() / "kube-proxy"), "--proxy-mode", self.mode,
            "--kubeconfig", str(self.cluster.kubeconfigs["kube-proxy"]),
            "--hostname-override", self.node.name, "--cluster-cidr", CLUSTER_CIDR,
            # Leave the machine's conntrack settings alone (they are global).
            "--conntrack-max-per-core", "0", "--conntrack-tcp-timeout-established", "0",
            "--conntrack-tcp-timeout-close-wait", "0",
            "--metrics-bind-address", METRICS, "--healthz-bind-address", "127.0.0.1:10256",
        ]

    def ready(self) -> bool:
        try:
            text = self.metrics()
        except RuntimeError:
            return False  # not listening yet
        # The IPv4 proxier's (the bench is IPv4; the nodes have no IPv6 address).
        found = re.search(r'^kubeproxy_sync_proxy_rules_last_timestamp_seconds'
                          r'(?:{ip_family="IPv4"})? (\S+)$', text, re.M)
        return bool(found and float(found[1]) > 0)

    def _rules(self) -> str:
        if self.mode == "nftables":
            argv = ["nft", "list", "map", "ip", "kube-proxy", "service-ips"]
        else:
            argv = ["iptables-save", "-t", "nat"]
        res = self.cluster.exec(self.node.netns, argv, timeout=300)
        return res.stdout if res.returncode == 0 else ""

    def programmed(self, addresses: set[str]) -> int:
        text = self._rules()
        if self.mode == "nftables":
            found = set(re.findall(r"(\d+\.\d+\.\d+\.\d+) \. tcp \. \d+ :", text))
        else:
            found = set(re.findall(r"-A KUBE-SERVICES -d (\d+\.\d+\.\d+\.\d+)/32", text))
        return len(addresses & found)

    def describe_rules(self) -> str:
        if self.mode == "nftables":
            res = self.cluster.exec(self.node.netns, ["nft", "list", "table", "ip", "kube-proxy"])
            return f"nft table ip kube-proxy: {len(res.stdout.splitlines())} lines"
        res = self.cluster.exec(self.node.netns, ["iptables-save", "-t", "nat"])
        return (f"iptables nat table: {len(res.stdout.splitlines())} lines, "
                f"{res.stdout.count('-j KUBE-SVC-')} KUBE-SVC jumps")


def all_proxies(cluster: BenchCluster) -> dict[str, Proxy]:
    nodes = cluster.nodes
    proxies: list[Proxy] = [
        VeerProxy(cluster, nodes["veer"]),
        TproxyProxy(cluster, nodes["tproxy"]),
        KubeProxy(cluster, nodes["kp-ipt"], "iptables"),
        KubeProxy(cluster, nodes["kp-nft"], "nftables"),
    ]
    return {p.key: p for p in proxies}


def wait_answering(cluster: BenchCluster, proxy: Proxy, targets: list[tuple[str, int]],
                   timeout: float) -> float:
    """Until every target answers HTTP from the proxy's client pod; returns
    how long that took. Used where the time itself is not a result."""
    start = time.monotonic()
    waiter = Waiter(cluster, proxy, targets)
    try:
        waiter.go()
        waiter.result(timeout)
    finally:
        waiter.close()
    return time.monotonic() - start


class Waiter:
    """waiter.py armed in the proxy's client pod (inside its node's cgroup,
    so that veer's socket programs see its connections)."""

    def __init__(self, cluster: BenchCluster, proxy: Proxy,
                 targets: list[tuple[str, int]]) -> None:
        self.proxy = proxy
        work = Path(cluster.topo.workdir)
        self.file = work / f"targets-{proxy.key}-{time.monotonic_ns()}.txt"
        self.file.write_text("".join(f"{ip} {port}\n" for ip, port in targets))
        node = proxy.node
        self.proc: subprocess.Popen[str] = cluster.spawn(
            node.client.netns, [sys.executable, str(Path(__file__).parent / "waiter.py"),
                                str(self.file)],
            cgroup=node.cgroup, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)
        self.cluster = cluster
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "armed":
            raise RuntimeError(f"the waiter did not start: {self.proc.stderr}")

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def result(self, timeout: float) -> dict[str, Any]:
        """{"done": monotonic time the last target first answered, "rounds": n}."""
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            self.proxy.check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.proxy.key}: targets not answering after "
                                   f"{timeout:.0f} s; log:\n{self.proxy.log_tail()}")
            time.sleep(0.05)
        assert self.proc.stdout is not None
        out = self.proc.stdout.read().strip()
        if self.proc.returncode != 0 or not out:
            raise RuntimeError(f"waiter failed ({self.proc.returncode}): {out}")
        return dict(json.loads(out.splitlines()[-1]))

    def close(self) -> None:
        stop_process(self.proc, grace=2)
        self.cluster.topo.forget(self.proc)
        with contextlib.suppress(FileNotFoundError):
            self.file.unlink()


def tree_rss_kib(pid: int) -> int:
    """Resident memory of a process and its live children, in KiB."""
    total = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def cpu_with_children(pid: int) -> float:
    """utime + stime of a process and of its children it has waited for
    (kube-proxy's iptables-restore and nft runs), in seconds."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")
