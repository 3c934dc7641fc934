"""A one-machine cluster made of network namespaces, for the sandbox and tests.

    pod netns ──veth──┐
    pod netns ──veth──┼── node netns (routes between pods; no link to the host)
    pod netns ──veth──┘

- A pod has a /32 (and /128) on eth0, a link-scoped route to the gateway
  (169.254.1.1, held by the node's loopback; fe80::1 on the node's veth) and
  a default route through it. The node has a /32 (/128) route per pod.
- Nothing here touches the root namespace's addresses or routes: Service,
  pod and node addresses exist only inside the namespaces, with no route out.
- Every namespace, cgroup, bpffs directory and process is registered on
  creation and removed by `close()` in reverse order, even after a failure;
  processes are ended by the pids we started, never by name.

Names carry a random prefix so parallel runs and leftovers never collide.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

log = logging.getLogger(__name__)

GATEWAY4 = "169.254.1.1"
GATEWAY6 = "fe80::1"
VEER_RUN = "/run/veer"
CGROUP_MOUNT = f"{VEER_RUN}/cgroup"
BPFFS_MOUNT = f"{VEER_RUN}/bpf"


def run(argv: Sequence[str], check: bool = True, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(list(argv), capture_output=True, text=True, **kwargs)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({res.returncode}): {res.stderr.strip()}")
    return res


def stop_process(proc: subprocess.Popen[Any], sig: int = signal.SIGTERM,
                 grace: float = 15.0) -> None:
    """Send `sig` to a process we started, wait `grace` seconds, then kill it."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def wait_for_interrupt() -> None:
    """Block until SIGINT or SIGTERM (the sandboxes' --keep)."""
    stop = False

    def on_signal(_signum: int, _frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    while not stop:
        time.sleep(0.5)


def _ignore(_result: object) -> None:
    """Discard a result, for cleanup callbacks that must return None."""


def ensure_mounts() -> None:
    """bpffs and cgroup2 under /run/veer, visible inside `ip netns exec` (which
    remounts /sys). Idempotent; scripts/setup.sh does the same."""
    with open("/proc/self/mounts") as f:
        mounted = {line.split()[1]: line.split()[2] for line in f}
    os.makedirs(CGROUP_MOUNT, exist_ok=True)
    os.makedirs(BPFFS_MOUNT, exist_ok=True)
    if mounted.get(CGROUP_MOUNT) != "cgroup2":
        run(["mount", "-t", "cgroup2", "none", CGROUP_MOUNT])
    if mounted.get(BPFFS_MOUNT) != "bpf":
        run(["mount", "-t", "bpf", "bpf", BPFFS_MOUNT])


# Prefixes of every Topology made by this process, so tests can check that
# each one was removed.
CREATED_PREFIXES: list[str] = []


@dataclass
class Pod:
    name: str
    netns: str
    ipv4: str
    ipv6: str
    host_veth: str

    @property
    def addresses(self) -> list[str]:
        return [a for a in (self.ipv4, self.ipv6) if a]


@dataclass
class Topology:
    """Namespaces, a cgroup and a bpffs directory; a context manager that cleans up."""

    prefix: str = field(default_factory=lambda: "vr" + secrets.token_hex(3))
    pods: dict[str, Pod] = field(default_factory=dict)
    workdir: str = ""
    _cleanups: list[tuple[str, Callable[[], None]]] = field(default_factory=list)
    _procs: list[subprocess.Popen[Any]] = field(default_factory=list)
    _veth_count: int = 0
    lan_ns: str = ""

    def __post_init__(self) -> None:
        ensure_mounts()
        CREATED_PREFIXES.append(self.prefix)
        self.workdir = tempfile.mkdtemp(prefix=f"veer-{self.prefix}-")
        self._on_close("workdir", lambda: shutil.rmtree(self.workdir, ignore_errors=True))
        self.cgroup = os.path.join(CGROUP_MOUNT, f"veer-{self.prefix}")
        os.mkdir(self.cgroup)
        self._on_close("cgroup", self._remove_cgroup)
        self.bpffs = os.path.join(BPFFS_MOUNT, self.prefix)
        self._on_close("bpffs", self._remove_bpffs)
        self.node_ns = self._netns("node")
        self.ns(self.node_ns, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        self.ns(self.node_ns, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
        self.ns(self.node_ns, "ip", "addr", "add", f"{GATEWAY4}/32", "dev", "lo")

    # ---- lifecycle ---------------------------------------------------------

    def _on_close(self, what: str, fn: Callable[[], None]) -> None:
        self._cleanups.append((what, fn))

    def __enter__(self) -> Topology:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.stop_processes()
        while self._cleanups:
            what, fn = self._cleanups.pop()
            try:
                fn()
            except Exception as err:  # keep cleaning the rest
                log.warning("cleanup of %s failed: %s", what, err)

    def _remove_cgroup(self) -> None:
        procs_file = os.path.join(self.cgroup, "cgroup.procs")
        for _ in range(50):
            try:
                with open(procs_file) as f:
                    pids = [int(p) for p in f.read().split()]
            except FileNotFoundError:
                return
            if not pids:
                break
            # Only processes we started (or their children) can be in our cgroup.
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)
        # Detach veer's programs (if an agent left them) before removing the cgroup.
        self.cleanup_datapath()
        os.rmdir(self.cgroup)

    def _remove_bpffs(self) -> None:
        if os.path.isdir(self.bpffs):
            self.cleanup_datapath()
            shutil.rmtree(self.bpffs, ignore_errors=True)

    def cleanup_datapath(self) -> None:
        run([sys.executable, "-m", "agent.cli.main", "agent", "--cleanup",
             "--cgroup", self.cgroup, "--bpffs", self.bpffs], check=False)

    def stop_processes(self) -> None:
        for proc in reversed(self._procs):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
        deadline = time.monotonic() + 5
        for proc in self._procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        self._procs.clear()

    # ---- namespaces and pods -------------------------------------------

    def _netns(self, role: str) -> str:
        name = f"{self.prefix}-{role}"
        run(["ip", "netns", "add", name])
        self._on_close(f"netns {name}", lambda: _ignore(run(["ip", "netns", "del", name],
                                                           check=False)))
        self.ns(name, "ip", "link", "set", "lo", "up")
        # Addresses usable at once: no duplicate address detection delay.
        self.ns(name, "sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0")
        self.ns(name, "sysctl", "-qw", "net.ipv6.conf.default.accept_dad=0")
        return name

    def ns(self, netns: str, *argv: str) -> subprocess.CompletedProcess[str]:
        return run(["ip", "netns", "exec", netns, *argv])

    def add_node(self, role: str) -> str:
        """Another node namespace, set up like the first; returns its name."""
        node_ns = self._netns(role)
        self.ns(node_ns, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        self.ns(node_ns, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
        self.ns(node_ns, "ip", "addr", "add", f"{GATEWAY4}/32", "dev", "lo")
        return node_ns

    def join_lan(self, netns: str, cidr: str, device: str = "eth0") -> None:
        """Put `netns` on the topology's LAN (a bridge in a namespace of its
        own, made on first use) with address `cidr` on `device`."""
        if not self.lan_ns:
            self.lan_ns = self._netns("lan")
            self.ns(self.lan_ns, "ip", "link", "add", "name", "br0", "type", "bridge")
            self.ns(self.lan_ns, "ip", "link", "set", "br0", "up")
        self._veth_count += 1
        port = f"{self.prefix}l{self._veth_count}"
        run(["ip", "link", "add", port, "netns", self.lan_ns, "type", "veth",
             "peer", "name", device, "netns", netns])
        self.ns(self.lan_ns, "ip", "link", "set", port, "master", "br0", "up")
        self.ns(netns, "ip", "addr", "add", cidr, "dev", device)
        self.ns(netns, "ip", "link", "set", device, "up")

    def add_pod(self, name: str, ipv4: str = "", ipv6: str = "", node_ns: str = "",
                cgroup: str = "") -> Pod:
        """A pod: a namespace with its addresses, a veth to its node, and a
        process that holds it, as kubelet's pause container does (in
        `cgroup`, default the topology's), so that the agent sees the pod's
        namespace before any of its clients runs."""
        netns = self._netns(name)
        node = node_ns or self.node_ns
        self._veth_count += 1
        host = f"{self.prefix}v{self._veth_count}"
        run(["ip", "link", "add", host, "netns", node, "type", "veth",
             "peer", "name", "eth0", "netns", netns])
        self.ns(netns, "ip", "link", "set", "eth0", "up")
        self.ns(node, "ip", "link", "set", host, "up")
        if ipv4:
            ipaddress.IPv4Address(ipv4)
            self.ns(netns, "ip", "addr", "add", f"{ipv4}/32", "dev", "eth0")
            self.ns(netns, "ip", "route", "add", GATEWAY4, "dev", "eth0", "scope", "link")
            self.ns(netns, "ip", "route", "add", "default", "via", GATEWAY4, "dev", "eth0")
            self.ns(node, "ip", "route", "add", f"{ipv4}/32", "dev", host)
        if ipv6:
            ipaddress.IPv6Address(ipv6)
            self.ns(node, "ip", "-6", "addr", "add", f"{GATEWAY6}/64", "dev", host, "nodad")
            self.ns(netns, "ip", "-6", "addr", "add", f"{ipv6}/128", "dev", "eth0", "nodad")
            self.ns(netns, "ip", "-6", "route", "add", "default", "via", GATEWAY6, "dev", "eth0")
            self.ns(node, "ip", "-6", "route", "add", f"{ipv6}/128", "dev", host)
        pod = Pod(name, netns, ipv4, ipv6, host)
        self.pods[name] = pod
        procs = os.path.join(cgroup or self.cgroup, "cgroup.procs")

        def join() -> None:
            with open(procs, "w") as f:
                f.write(str(os.getpid()))

        self._procs.append(subprocess.Popen(
            ["ip", "netns", "exec", netns, "sleep", "infinity"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=join,
        ))
        return pod

    # ---- processes -------------------------------------------------------

    def spawn(
        self,
        netns: str,
        argv: Sequence[str],
        in_cgroup: bool = True,
        stdout: int | IO[Any] | None = subprocess.DEVNULL,
        stderr: int | IO[Any] | None = subprocess.DEVNULL,
        env: dict[str, str] | None = None,
        stdin: int | IO[Any] | None = subprocess.DEVNULL,
    ) -> subprocess.Popen[Any]:
        """Start a long-running process in `netns`, inside the test cgroup if asked."""
        proc = subprocess.Popen(
            ["ip", "netns", "exec", netns, *argv],
            stdout=stdout,
            stderr=stderr,
            stdin=stdin,
            preexec_fn=self._join_cgroup if in_cgroup else None,
            env=env,
        )
        self._procs.append(proc)
        return proc

    def exec(
        self, netns: str, argv: Sequence[str], timeout: float = 120, in_cgroup: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run a command to completion in `netns` (inside the cgroup)."""
        return subprocess.run(
            ["ip", "netns", "exec", netns, *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            preexec_fn=self._join_cgroup if in_cgroup else None,
        )

    def _join_cgroup(self) -> None:
        with open(os.path.join(self.cgroup, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))

    def forget(self, proc: subprocess.Popen[Any]) -> None:
        """Stop tracking a process the caller has ended itself."""
        if proc in self._procs:
            self._procs.remove(proc)
