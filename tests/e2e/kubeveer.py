"""veer on the e2e control plane: the CRDs, the chart's ServiceAccounts and
RBAC, tokens, and the agent and operator run as processes.

    install_veer(cp, release, namespace)   CRDs from crds/, then `helm install`
                                           of deploy/helm/veer (its DaemonSet and
                                           Deployment stay inert: no kubelet, no
                                           DaemonSet or Deployment controller)
    agent_pod(cp, veer, node)              a Pod "of the DaemonSet" on `node`, so
                                           the agent's token is bound to it (it
                                           names the node, as the chart's
                                           ValidatingAdmissionPolicy wants)
    agent_kubeconfig / operator_kubeconfig tokens of the chart's ServiceAccounts
    VeerProcess                            a `python -m agent.cli.main ...` child,
                                           its log, stopped by its pid

The agent runs in the root network namespace (it must reach the API server
on 127.0.0.1, which a node namespace cannot) with --cgroup set to the test's
cgroup: the socket programs are attached there, so connections from the
test's pods (in that cgroup, in their own namespaces) are served, and
nothing else on the machine is. It has no devices for the per-packet path,
which these tests do not use.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.e2e.controlplane import REPO_ROOT, ControlPlane, wait_for

CRDS = REPO_ROOT / "crds"
CHART = REPO_ROOT / "deploy" / "helm" / "veer"


@dataclass(frozen=True)
class Veer:
    """What install_veer made: names follow the chart's helpers."""

    release: str
    namespace: str

    @property
    def agent(self) -> str:  # ServiceAccount, ClusterRole and DaemonSet
        return f"{self.release}-veer-agent"

    @property
    def operator(self) -> str:  # ServiceAccount, ClusterRole, Deployment and Lease
        return f"{self.release}-veer-operator"


def apply_crds(cp: ControlPlane) -> None:
    cp.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRDS))
    for crd in sorted(CRDS.glob("*.yaml")):
        name = crd.name.removesuffix(".yaml")
        cp.kubectl("wait", "--for=condition=Established", f"crd/{name}", "--timeout=60s")


def install_veer(cp: ControlPlane, release: str, namespace: str) -> Veer:
    """The CRDs, then the chart (ServiceAccounts, RBAC, admission policy)."""
    apply_crds(cp)
    cp.helm("install", release, str(CHART), "-n", namespace, "--create-namespace")
    return Veer(release, namespace)


def uninstall_veer(cp: ControlPlane, veer: Veer) -> None:
    cp.helm("uninstall", veer.release, "-n", veer.namespace, "--wait", check=False)


def agent_pod(cp: ControlPlane, veer: Veer, node: str) -> dict[str, Any]:
    """A Pod of the agent DaemonSet on `node`, as its controller would make it
    (there is none here): owned by the DaemonSet, the chart's ServiceAccount."""
    ds = cp.kubectl_json("get", "daemonset", veer.agent, "-n", veer.namespace)
    name = f"{veer.agent}-{node}"
    cp.apply({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "labels": ds["spec"]["selector"]["matchLabels"],
            "ownerReferences": [{
                "apiVersion": "apps/v1", "kind": "DaemonSet", "name": veer.agent,
                "uid": ds["metadata"]["uid"], "controller": True,
                "blockOwnerDeletion": True,
            }],
        },
        "spec": {
            "nodeName": node,
            "serviceAccountName": veer.agent,
            "automountServiceAccountToken": False,
            "containers": [{"name": "agent", "image": "registry.invalid/veer:e2e"}],
        },
    }, namespace=veer.namespace)
    pod: dict[str, Any] = cp.kubectl_json("get", "pod", name, "-n", veer.namespace)
    return pod


def agent_kubeconfig(cp: ControlPlane, veer: Veer, pod: Mapping[str, Any]) -> Path:
    """The agent's token, bound to its Pod as the kubelet would mount it."""
    meta = pod["metadata"]
    token = cp.kubectl(
        "create", "token", veer.agent, "-n", veer.namespace, "--duration=2h",
        "--bound-object-kind=Pod", f"--bound-object-name={meta['name']}",
        f"--bound-object-uid={meta['uid']}",
    ).stdout.strip()
    return cp.kubeconfig_for_token(token, f"agent-{meta['name']}")


def operator_kubeconfig(cp: ControlPlane, veer: Veer) -> Path:
    return cp.kubeconfig_for_service_account(veer.namespace, veer.operator)


class VeerProcess:
    """One veer process (agent or operator) with its own log, stopped by pid."""

    def __init__(self, name: str, argv: Sequence[str], log: Path,
                 env: Mapping[str, str] | None = None,
                 preexec_fn: Callable[[], None] | None = None) -> None:
        self.name = name
        self.log = log
        self.argv = [sys.executable, "-m", "agent.cli.main", *argv]
        full_env = dict(os.environ)
        full_env["PYTHONPATH"] = str(REPO_ROOT)
        full_env.update(env or {})
        with log.open("ab") as out:
            out.write(f"==== starting: {' '.join(self.argv)}\n".encode())
            out.flush()
            self.popen = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                cwd=REPO_ROOT, env=full_env, preexec_fn=preexec_fn,
            )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def running(self) -> bool:
        return self.popen.poll() is None

    def output(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def check(self) -> None:
        if not self.running():
            raise AssertionError(f"{self.name} exited with {self.popen.returncode}:\n"
                                 f"{self.output()[-6000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Signal this process (only it) and wait; SIGKILL if it lingers."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)
        return int(self.popen.returncode)


def wait_until(check: Callable[[], Any], what: str, timeout: float = 60.0,
               processes: Sequence[VeerProcess] = ()) -> Any:
    """wait_for, failing at once (with its log) if one of `processes` died."""
    def guarded() -> Any:
        for p in processes:
            p.check()
        return check()

    try:
        return wait_for(guarded, what, timeout=timeout, interval=0.1)
    except Exception as err:
        logs = "\n".join(f"--- {p.name} log:\n{p.output()[-6000:]}" for p in processes)
        raise AssertionError(f"{err}\n{logs}") from None


def condition(obj: Mapping[str, Any], kind: str) -> dict[str, Any]:
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c.get("type") == kind:
            return dict(c)
    return {}


def get_tp(cp: ControlPlane, namespace: str, name: str) -> dict[str, Any]:
    got: dict[str, Any] = cp.kubectl_json("get", "trafficpolicy", name, "-n", namespace)
    return got


def events_of(cp: ControlPlane, namespace: str, name: str) -> list[tuple[str, str, str]]:
    """(type, reason, message) of the Events about one object."""
    got = cp.kubectl_json("get", "events", "-n", namespace,
                          "--field-selector", f"involvedObject.name={name}")
    return [(e.get("type", ""), e.get("reason", ""), e.get("message", ""))
            for e in got["items"]]


def policy(name: str, *targets: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "veer.dev/v1alpha1",
        "kind": "TrafficPolicy",
        "metadata": {"name": name},
        "spec": {"targetRefs": [{"name": t} for t in targets], **spec},
    }


def web_service(name: str, app: str = "web", port: int = 80,
                target: int = 8080) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name},
        "spec": {"selector": {"app": app},
                 "ports": [{"name": "http", "port": port, "targetPort": target}]},
    }


def web_pod(name: str, node: str, app: str = "web", port: int = 8080) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": app}},
        "spec": {
            "nodeName": node,
            "automountServiceAccountToken": False,
            "containers": [{"name": "web", "image": "registry.invalid/web:1",
                            "ports": [{"name": "http", "containerPort": port}]}],
        },
    }


def dump(obj: Any) -> str:
    return json.dumps(obj, indent=1, sort_keys=True)


def sleep_until(deadline: float) -> None:
    time.sleep(max(0.0, deadline - time.monotonic()))
