"""The sandbox cluster: one node, web pods running nginx and a UDP echo server,
a client pod, the example manifests, and a veer agent serving them.

Used by `veer sandbox` and by the datapath tests, so the demo and the tests
exercise the same thing.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.sandbox.servers import start_nginx, start_udp_echo, wait_listening, wait_udp
from agent.sandbox.topology import Topology, stop_process

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "sandbox"
NODE_NAME = "node-1"
SERVICE_CIDRS = "10.96.0.0/16,fd00:96::/112"
HTTP_PORTS = (8080, 8081)
UDP_PORT = 9053


@dataclass(frozen=True)
class PodSpec:
    name: str
    ipv4: str
    ipv6: str
    serves: bool = True


WEB_PODS = (
    PodSpec("web-a", "10.244.1.2", "fd00:10:244:1::2"),
    PodSpec("web-b", "10.244.1.3", "fd00:10:244:1::3"),
    PodSpec("web-c", "10.244.1.4", "fd00:10:244:1::4"),
    # Runs servers but is listed as not ready: it must never be chosen.
    PodSpec("web-d", "10.244.1.5", "fd00:10:244:1::5"),
)
CLIENT = PodSpec("client", "10.244.1.100", "fd00:10:244:1::100", serves=False)


class SandboxCluster:
    def __init__(self, manifests: Path | None = EXAMPLES, pods: Sequence[PodSpec] = WEB_PODS):
        self.topo = Topology()
        try:
            self.manifests = os.path.join(self.topo.workdir, "manifests")
            os.makedirs(self.manifests)
            if manifests is not None:
                for f in sorted(manifests.iterdir()):
                    if f.suffix in (".yaml", ".yml", ".json"):
                        shutil.copy(f, self.manifests)
            self.status_file = os.path.join(self.topo.workdir, "status.json")
            self.agent_log = os.path.join(self.topo.workdir, "agent.log")
            # The agent's API socket: per sandbox, never the node-wide default.
            self.api_socket = os.path.join(self.topo.workdir, "veer.sock")
            self.agent: subprocess.Popen[bytes] | None = None
            for spec in (*pods, CLIENT):
                self.topo.add_pod(spec.name, spec.ipv4, spec.ipv6)
            for spec in pods:
                pod = self.topo.pods[spec.name]
                start_nginx(self.topo, pod, HTTP_PORTS)
                start_udp_echo(self.topo, pod, [UDP_PORT])
            for spec in pods:
                pod = self.topo.pods[spec.name]
                for port in HTTP_PORTS:
                    wait_listening(self.topo, pod, port)
                wait_udp(self.topo, pod, UDP_PORT)
        except BaseException:
            self.topo.close()
            raise

    # ---- lifecycle ---------------------------------------------------------

    def __enter__(self) -> SandboxCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.stop_agent()
        self.topo.close()

    @property
    def client(self) -> str:
        return self.topo.pods[CLIENT.name].netns

    def agent_argv(self, extra: Sequence[str] = ()) -> list[str]:
        return [
            sys.executable, "-m", "agent.cli.main", "agent",
            "--manifests", self.manifests,
            "--node-name", NODE_NAME,
            "--cgroup", self.topo.cgroup,
            "--bpffs", self.topo.bpffs,
            "--service-cidr", SERVICE_CIDRS,
            "--status-file", self.status_file,
            "--max-sync-interval", "10",
            "--api-socket", self.api_socket,
            *extra,
        ]

    def start_agent(self, extra: Sequence[str] = (), wait: bool = True) -> subprocess.Popen[bytes]:
        """Start the agent in the node namespace (outside the served cgroup)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.status_file)
        with open(self.agent_log, "ab") as log:
            self.agent = self.topo.spawn(
                self.topo.node_ns, self.agent_argv(extra), in_cgroup=False, stdout=log,
                stderr=log,
            )
        if wait:
            self.wait_status(lambda s: s["ok"], what="the agent's first sync")
        return self.agent

    def stop_agent(self, sig: int = signal.SIGTERM) -> None:
        if self.agent is None:
            return
        stop_process(self.agent, sig)
        self.topo.forget(self.agent)
        self.agent = None

    def agent_output(self) -> str:
        try:
            return Path(self.agent_log).read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # ---- observing the agent -------------------------------------------

    def status(self) -> dict[str, Any] | None:
        try:
            with open(self.status_file) as f:
                return dict(json.load(f))
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def wait_status(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 60.0, what: str = ""
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.status()
            if status is not None and predicate(status):
                return status
            if self.agent is not None and self.agent.poll() is not None:
                raise RuntimeError(
                    f"the agent exited ({self.agent.returncode}) while waiting for "
                    f"{what}:\n{self.agent_output()[-4000:]}"
                )
            time.sleep(0.05)
        raise TimeoutError(
            f"timed out waiting for {what}; last status: {self.status()}\n"
            f"agent log:\n{self.agent_output()[-4000:]}"
        )

    def wait_frontend(self, frontend: str, backends: Sequence[str] | None) -> dict[str, Any]:
        """Wait until `frontend` ("10.96.0.10:80/TCP") is programmed with exactly
        `backends` (None: until it is gone)."""
        want = None if backends is None else sorted(backends)

        def ok(s: dict[str, Any]) -> bool:
            got = s["frontends"].get(frontend)
            return (got is None) if want is None else (got is not None and sorted(got) == want)

        return self.wait_status(ok, what=f"{frontend} -> {want}")

    # ---- manifests -------------------------------------------------------

    def write_manifest(self, name: str, text: str) -> None:
        """Replace a manifest atomically (as a deploy tool would)."""
        path = os.path.join(self.manifests, name)
        tmp = os.path.join(self.manifests, f".{name}.tmp")
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)

    def remove_manifest(self, name: str) -> None:
        os.unlink(os.path.join(self.manifests, name))

    def read_manifest(self, name: str) -> str:
        return Path(self.manifests, name).read_text()

    # ---- traffic -----------------------------------------------------------

    def probe(self, *args: str, netns: str | None = None, timeout: float = 300) -> dict[str, Any]:
        """Run agent.sandbox.probe in the client pod (inside the served cgroup)."""
        argv = [sys.executable, "-m", "agent.sandbox.probe", *args]
        res = self.topo.exec(netns or self.client, argv, timeout=timeout)
        if res.returncode != 0:
            raise RuntimeError(f"probe {' '.join(args)} failed: {res.stderr[-2000:]}")
        return dict(json.loads(res.stdout.strip().splitlines()[-1]))

    def spawn_probe(self, *args: str) -> subprocess.Popen[str]:
        argv = [sys.executable, "-m", "agent.sandbox.probe", *args]
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.client, *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=self.topo._join_cgroup,
        )
        self.topo._procs.append(proc)
        return proc
