"""agent/kube/client.py (the standard-library client) against the real API
server: every way of authenticating it supports (a token, a client
certificate as files and as -data, the in-cluster ServiceAccount layout),
TLS verification (a wrong CA refused as status 0; tls-server-name;
insecure-skip-tls-verify), and a watch that sees writes and is closed from
another thread. Its use by the agent and the operator is in
test_kube_agent.py and test_operator.py."""

from __future__ import annotations

import base64
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.errors import KubeApiError
from agent.kube.client import NODES, SERVICES, KubeClient
from agent.kube.kubeconfig import in_cluster
from tests.e2e.controlplane import ControlPlane

pytestmark = pytest.mark.e2e


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """admin.crt/.key: a client certificate in system:masters signed by the
    cluster's CA; other-ca.crt: a CA that signed nothing of the cluster's."""
    out = tmp_path_factory.mktemp("vr-kc-pki")
    ca = control_plane.ca_file
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl("req", "-new", *ec, "-keyout", "admin.key", "-out", "admin.csr",
             "-subj", "/O=system:masters/CN=veer-e2e-cert-admin", cwd=out)
    (out / "admin.ext").write_text("extendedKeyUsage=clientAuth\n")
    _openssl("x509", "-req", "-in", "admin.csr", "-CA", str(ca),
             "-CAkey", str(ca.with_name("ca.key")), "-CAcreateserial", "-CAserial",
             "admin.srl", "-days", "1", "-extfile", "admin.ext", "-out", "admin.crt", cwd=out)
    _openssl("req", "-x509", "-new", *ec, "-keyout", "other-ca.key", "-out", "other-ca.crt",
             "-days", "1", "-subj", "/CN=not-the-cluster-ca", cwd=out)
    return out


def kubeconfig(path: Path, cluster: dict[str, Any], user: dict[str, Any]) -> str:
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "e2e", "cluster": cluster}],
        "users": [{"name": "u", "user": user}],
        "contexts": [{"name": "c", "context": {"cluster": "e2e", "user": "u"}}],
        "current-context": "c",
    }))
    return str(path)


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def can_list_nodes(api: KubeClient) -> bool:
    _, version = api.list(NODES.path())
    return bool(version)


def test_a_token_kubeconfig(control_plane: ControlPlane) -> None:
    api = KubeClient.load(str(control_plane.kubeconfig))
    assert api.server == control_plane.url
    assert can_list_nodes(api)
    with pytest.raises(KubeApiError) as err:
        api.get(SERVICES.path("default", "no-such-service"))
    assert (err.value.status, err.value.reason) == (404, "NotFound")


@pytest.mark.parametrize("form", ["paths", "data"])
def test_a_client_certificate(control_plane: ControlPlane, pki: Path, tmp_path: Path,
                              form: str) -> None:
    if form == "paths":
        cluster = {"server": control_plane.url,
                   "certificate-authority": str(control_plane.ca_file)}
        user = {"client-certificate": str(pki / "admin.crt"),
                "client-key": str(pki / "admin.key")}
    else:
        cluster = {"server": control_plane.url,
                   "certificate-authority-data": b64(control_plane.ca_file)}
        user = {"client-certificate-data": b64(pki / "admin.crt"),
                "client-key-data": b64(pki / "admin.key")}
    api = KubeClient.load(kubeconfig(tmp_path / "config", cluster, user))
    assert can_list_nodes(api)
    review = api.create("/apis/authentication.k8s.io/v1/selfsubjectreviews",
                        {"apiVersion": "authentication.k8s.io/v1",
                         "kind": "SelfSubjectReview"})
    assert review["status"]["userInfo"]["username"] == "veer-e2e-cert-admin"
    credentials = api.credentials()
    if form == "data":  # for kopf, as PEM text: no file was left behind
        assert credentials.certificate_data == (pki / "admin.crt").read_text()
        assert credentials.certificate_path is None
    else:
        assert credentials.certificate_path == str(pki / "admin.crt")


def test_tls_verification(control_plane: ControlPlane, pki: Path, tmp_path: Path) -> None:
    token = {"token": control_plane.tokens["admin"]}
    wrong = KubeClient.load(kubeconfig(tmp_path / "wrong", {
        "server": control_plane.url, "certificate-authority": str(pki / "other-ca.crt")}, token))
    with pytest.raises(KubeApiError) as err:
        can_list_nodes(wrong)
    assert err.value.status == 0 and "CERTIFICATE_VERIFY_FAILED" in err.value.message

    insecure = KubeClient.load(kubeconfig(tmp_path / "insecure", {
        "server": control_plane.url, "certificate-authority": str(pki / "other-ca.crt"),
        "insecure-skip-tls-verify": True}, token))
    assert can_list_nodes(insecure)

    # tls-server-name is the name checked against the certificate, which has
    # "kubernetes" but not "elsewhere".
    for name, works in (("kubernetes", True), ("elsewhere", False)):
        named = KubeClient.load(kubeconfig(tmp_path / name, {
            "server": control_plane.url, "certificate-authority": str(control_plane.ca_file),
            "tls-server-name": name}, token))
        if works:
            assert can_list_nodes(named)
            continue
        with pytest.raises(KubeApiError) as err:
            can_list_nodes(named)
        assert err.value.status == 0 and "elsewhere" in err.value.message


def test_in_cluster(control_plane: ControlPlane, tmp_path: Path) -> None:
    (tmp_path / "token").write_text(control_plane.tokens["admin"])
    (tmp_path / "ca.crt").write_bytes(control_plane.ca_file.read_bytes())
    host, port = control_plane.url.removeprefix("https://").rsplit(":", 1)
    access = in_cluster({"KUBERNETES_SERVICE_HOST": host, "KUBERNETES_SERVICE_PORT": port},
                        tmp_path)
    assert can_list_nodes(KubeClient(access))


@pytest.fixture
def api(control_plane: ControlPlane) -> Iterator[KubeClient]:
    client = KubeClient.load(str(control_plane.kubeconfig))
    yield client
    client.close()


def test_a_watch_sees_writes_and_is_closed_from_another_thread(api: KubeClient) -> None:
    namespace = "vr-kc-watch"
    api.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                      "metadata": {"name": namespace}})
    try:
        _, version = api.list(SERVICES.path(namespace))
        stream = api.watch(SERVICES.path(namespace), version, 300)
        seen: list[tuple[str, str]] = []
        errors: list[BaseException] = []
        modified = threading.Event()

        def read() -> None:
            try:
                for event in stream:
                    seen.append((event["type"], event["object"]["metadata"]["name"]))
                    if event["type"] == "MODIFIED":
                        modified.set()
            except BaseException as err:
                errors.append(err)

        reader = threading.Thread(target=read)
        reader.start()
        api.create(SERVICES.path(namespace), {
            "apiVersion": "v1", "kind": "Service", "metadata": {"name": "w"},
            "spec": {"ports": [{"port": 80}]}})
        api.patch(SERVICES.path(namespace, "w"), {"metadata": {"labels": {"a": "b"}}})
        assert modified.wait(30)
        stream.close()  # the server would end it only after 300 s
        reader.join(30)
        assert not reader.is_alive()
        assert seen[:2] == [("ADDED", "w"), ("MODIFIED", "w")]
        assert errors == []
    finally:
        api.delete(f"/api/v1/namespaces/{namespace}")
