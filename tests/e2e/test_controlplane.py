"""The real control plane does what the end-to-end tests rely on.

- kube-controller-manager turns a Service and a Pod whose status the test
  sets (as a kubelet would) into an EndpointSlice, and follows readiness;
- the API server authenticates ServiceAccount tokens from the TokenRequest
  API and refuses what RBAC does not grant;
- kube-apiserver restarts on the same state;
- the helm, kubectl and kube-proxy binaries are the wanted versions.
"""

from __future__ import annotations

import ipaddress
import subprocess
import urllib.error
from typing import Any

import pytest

from tests.e2e.controlplane import (
    SERVICE_CIDR,
    CommandError,
    ControlPlane,
    kubernetes_version,
    wait_for,
)

pytestmark = pytest.mark.e2e

NODE = "node-a"
NODE_IP = "192.0.2.10"  # API objects only: no traffic goes to these addresses
POD_IP = "10.244.1.2"


def _endpoint_for(cp: ControlPlane, namespace: str, service: str, ip: str) -> dict[str, Any] | None:
    for eps in cp.endpoint_slices(namespace, service):
        for endpoint in eps.get("endpoints") or []:
            if ip in endpoint["addresses"]:
                return {"slice": eps, "endpoint": endpoint}
    return None


def test_controller_manager_writes_endpoint_slices_that_follow_readiness(
    control_plane: ControlPlane,
) -> None:
    cp = control_plane
    ns = "e2e-slices"
    cp.create_namespace(ns)
    cp.add_node(NODE, NODE_IP)
    cp.apply(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "web"},
            "spec": {
                "selector": {"app": "web"},
                "ports": [{"name": "http", "port": 80, "targetPort": "http"}],
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "web-a", "labels": {"app": "web"}},
            "spec": {
                "nodeName": NODE,
                "automountServiceAccountToken": False,
                "containers": [
                    {
                        "name": "web",
                        "image": "registry.invalid/web:1",  # never pulled: no kubelet
                        "ports": [{"name": "http", "containerPort": 8080}],
                    }
                ],
            },
        },
        namespace=ns,
    )
    svc = cp.kubectl_json("get", "service", "web", "-n", ns)
    assert ipaddress.ip_address(svc["spec"]["clusterIP"]) in ipaddress.ip_network(SERVICE_CIDR)

    cp.set_pod_status(ns, "web-a", POD_IP, ready=True, host_ip=NODE_IP)

    def ready_endpoint() -> dict[str, Any] | None:
        found = _endpoint_for(cp, ns, "web", POD_IP)
        if found and found["endpoint"]["conditions"].get("ready") is True:
            return found
        return None

    found = wait_for(ready_endpoint, "an EndpointSlice with web-a ready", timeout=60)
    eps, endpoint = found["slice"], found["endpoint"]
    assert eps["addressType"] == "IPv4"
    assert eps["metadata"]["labels"]["endpointslice.kubernetes.io/managed-by"] == (
        "endpointslice-controller.k8s.io"
    )
    assert eps["ports"] == [{"name": "http", "port": 8080, "protocol": "TCP"}]
    assert endpoint["nodeName"] == NODE
    assert endpoint["targetRef"]["name"] == "web-a"
    assert endpoint["conditions"] == {"ready": True, "serving": True, "terminating": False}

    cp.set_pod_status(ns, "web-a", POD_IP, ready=False, host_ip=NODE_IP)

    def not_ready_endpoint() -> dict[str, Any] | None:
        found = _endpoint_for(cp, ns, "web", POD_IP)
        if found and found["endpoint"]["conditions"].get("ready") is False:
            return found
        return None

    found = wait_for(not_ready_endpoint, "the EndpointSlice to show web-a not ready", timeout=60)
    assert found["endpoint"]["conditions"] == {
        "ready": False,
        "serving": False,
        "terminating": False,
    }


def test_service_account_token_is_refused_what_rbac_does_not_grant(
    control_plane: ControlPlane,
) -> None:
    cp = control_plane
    ns = "e2e-rbac"
    cp.create_namespace(ns)
    cp.kubectl("create", "serviceaccount", "reader", "-n", ns)
    cp.kubectl("create", "secret", "generic", "s1", "-n", ns, "--from-literal=k=v")

    token = cp.token_for_service_account(ns, "reader")
    kubeconfig = cp.kubeconfig_for_token(token, "reader", ns)

    # The token authenticates: the API server knows who this is ...
    whoami = cp.kubectl_json("auth", "whoami", kubeconfig=kubeconfig)
    assert whoami["status"]["userInfo"]["username"] == f"system:serviceaccount:{ns}:reader"

    # ... and RBAC refuses it Secrets, through kubectl and on the wire.
    with pytest.raises(CommandError) as refused:
        cp.kubectl("get", "secret", "s1", "-n", ns, kubeconfig=kubeconfig)
    assert "forbidden" in refused.value.stderr.lower()
    assert f"system:serviceaccount:{ns}:reader" in refused.value.stderr
    with pytest.raises(urllib.error.HTTPError) as http:
        cp.get(f"/api/v1/namespaces/{ns}/secrets/s1", token=token)
    assert http.value.code == 403

    # A token the API server did not issue is not authenticated at all.
    with pytest.raises(urllib.error.HTTPError) as bogus:
        cp.get(f"/api/v1/namespaces/{ns}/secrets/s1", token=token[:-8] + "AAAAAAAA")
    assert bogus.value.code == 401

    # Granting the Role is what changes the answer.
    cp.kubectl("create", "role", "read-secrets", "-n", ns, "--verb=get", "--resource=secrets")
    cp.kubectl(
        "create", "rolebinding", "reader", "-n", ns, "--role=read-secrets",
        f"--serviceaccount={ns}:reader",
    )  # fmt: skip

    def allowed() -> bool:
        got = cp.kubectl("get", "secret", "s1", "-n", ns, kubeconfig=kubeconfig, check=False)
        return got.returncode == 0

    wait_for(allowed, "RBAC to allow the granted Secret", timeout=30)


def test_versions_and_clients(control_plane: ControlPlane) -> None:
    cp = control_plane
    want = kubernetes_version()
    version = cp.kubectl_json("version")
    assert version["serverVersion"]["gitVersion"] == want
    assert version["clientVersion"]["gitVersion"] == want
    proxy = subprocess.run(
        [str(cp.bin / "kube-proxy"), "--version"], capture_output=True, text=True, check=True
    )
    assert proxy.stdout.strip() == f"Kubernetes {want}"
    assert cp.helm("version", "--short").stdout.startswith("v3.")
    # helm reaches the cluster with the admin kubeconfig (nothing installed yet)
    assert cp.helm("list", "--all-namespaces", "-o", "json").stdout.strip() == "[]"


def test_restart_apiserver_keeps_state(control_plane: ControlPlane) -> None:
    cp = control_plane
    ns = "e2e-restart"
    cp.create_namespace(ns)
    cp.kubectl("create", "configmap", "kept", "-n", ns, "--from-literal=k=v")
    before = cp.processes["kube-apiserver"]
    cp.restart_apiserver()
    assert cp.processes["kube-apiserver"] != before
    got = cp.kubectl_json("get", "configmap", "kept", "-n", ns)
    assert got["data"] == {"k": "v"}
    # the controller manager reconnects: a new namespace still gets its account
    cp.create_namespace(f"{ns}-after")
