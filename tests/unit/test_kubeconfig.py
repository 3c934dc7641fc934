"""agent/kube/kubeconfig.py: a kubeconfig's context, cluster and user in both
their path and -data forms, relative paths, tokens (and a token file that
rotates), the in-cluster ServiceAccount, and bad files refused with the file
and the field named."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.errors import ConfigError
from agent.kube.kubeconfig import Pem, TokenFile, from_kubeconfig, in_cluster

CA = "-----BEGIN CERTIFICATE-----\nQ0E=\n-----END CERTIFICATE-----\n"
CERT = "-----BEGIN CERTIFICATE-----\nQ0VSVA==\n-----END CERTIFICATE-----\n"
KEY = "-----BEGIN PRIVATE KEY-----\nS0VZ\n-----END PRIVATE KEY-----\n"


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def write(tmp_path: Path, cluster: dict[str, Any], user: dict[str, Any] | None,
          **top: Any) -> str:
    """A kubeconfig with one context "c" (current unless `top` says otherwise),
    cluster "k" and user "u"; a second context "other" on cluster "k2"."""
    doc: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "k", "cluster": cluster},
                     {"name": "k2", "cluster": {"server": "https://other.example:443"}}],
        "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}},
                     {"name": "other", "context": {"cluster": "k2"}}],
        "users": [{"name": "u", "user": user}] if user is not None else [],
        "current-context": "c",
        **top,
    }
    path = tmp_path / "config"
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def test_path_forms_resolve_relative_to_the_kubeconfig(tmp_path: Path) -> None:
    (tmp_path / "pki").mkdir()
    for name, text in (("ca.crt", CA), ("c.crt", CERT), ("c.key", KEY)):
        (tmp_path / "pki" / name).write_text(text)
    path = write(tmp_path, {"server": "https://10.0.0.1:6443/", "certificate-authority":
                            "pki/ca.crt"},
                 {"client-certificate": "pki/c.crt", "client-key": str(tmp_path / "pki/c.key")})
    access = from_kubeconfig(path)
    assert access.server == "https://10.0.0.1:6443"
    assert access.ca == Pem("clusters[name=k].cluster.certificate-authority",
                            path=str(tmp_path / "pki" / "ca.crt"))
    assert access.certificate is not None and access.certificate.path == str(
        tmp_path / "pki" / "c.crt")
    assert access.private_key is not None and access.private_key.path == str(
        tmp_path / "pki" / "c.key")
    assert access.token() == ""
    assert not access.insecure


def test_data_forms_are_decoded_and_preferred_over_paths(tmp_path: Path) -> None:
    path = write(tmp_path,
                 {"server": "https://k.example", "certificate-authority-data": b64(CA),
                  "certificate-authority": "/nonexistent/ca.crt", "tls-server-name": "api"},
                 {"client-certificate-data": b64(CERT), "client-key-data": b64(KEY)})
    access = from_kubeconfig(path)
    assert access.ca == Pem("clusters[name=k].cluster.certificate-authority-data", data=CA)
    assert access.certificate == Pem("users[name=u].user.client-certificate-data", data=CERT)
    assert access.private_key == Pem("users[name=u].user.client-key-data", data=KEY)
    assert access.tls_server_name == "api"
    assert not list(tmp_path.glob("*.pem")), "parsing writes no file"


def test_a_token_and_insecure_skip_tls_verify(tmp_path: Path) -> None:
    path = write(tmp_path, {"server": "https://k.example", "insecure-skip-tls-verify": True},
                 {"token": "abc.def"})
    access = from_kubeconfig(path)
    assert access.token() == "abc.def"
    assert access.insecure and access.ca is None


def test_a_token_file_wins_over_a_token_and_is_read_again(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("first\n")
    path = write(tmp_path, {"server": "https://k.example"},
                 {"token": "static", "tokenFile": "token"})
    access = from_kubeconfig(path)
    assert isinstance(access.token, TokenFile)
    assert access.token() == "first"


def test_an_explicit_context(tmp_path: Path) -> None:
    path = write(tmp_path, {"server": "https://k.example"}, {"token": "t"})
    access = from_kubeconfig(path, context="other")
    assert access.server == "https://other.example:443"
    assert access.token() == ""  # that context names no user


@pytest.mark.parametrize(("cluster", "user", "top", "expected"), [
    ({"server": "https://k"}, {"exec": {"command": "aws"}}, {},
     "users[name=u].user.exec: not supported"),
    ({"server": "https://k"}, {"auth-provider": {"name": "gcp"}}, {},
     "users[name=u].user.auth-provider: not supported"),
    ({"server": "https://k"}, {"username": "a", "password": "b"}, {},
     "users[name=u].user.username: not supported"),
    ({"server": "https://k", "proxy-url": "http://p"}, {}, {},
     "clusters[name=k].cluster.proxy-url: not supported"),
    ({}, {}, {}, "clusters[name=k].cluster.server: not set"),
    ({"server": "k.example:6443"}, {}, {}, "clusters[name=k].cluster.server: 'k.example:6443' "
     "is not an http(s):// URL"),
    ({"server": "https://k", "certificate-authority-data": "not base64!"}, {}, {},
     "clusters[name=k].cluster.certificate-authority-data: not base64-encoded PEM"),
    ({"server": "https://k", "certificate-authority-data": b64("hello")}, {}, {},
     "clusters[name=k].cluster.certificate-authority-data: no PEM block in it"),
    ({"server": "https://k", "certificate-authority": "missing.crt"}, {}, {},
     "clusters[name=k].cluster.certificate-authority: cannot read"),
    ({"server": "https://k", "insecure-skip-tls-verify": "yes"}, {}, {},
     "clusters[name=k].cluster.insecure-skip-tls-verify: expected a boolean"),
    ({"server": "https://k"}, {"client-certificate-data": b64(CERT)}, {},
     "users[name=u].user.client-key: not set"),
    ({"server": "https://k"}, {"token": 42}, {}, "users[name=u].user.token: expected a string"),
    ({"server": "https://k"}, {"tokenFile": "gone"}, {},
     "users[name=u].user.tokenFile: cannot read the token file"),
    ({"server": "https://k"}, {}, {"current-context": ""}, "current-context: not set"),
    ({"server": "https://k"}, {}, {"current-context": "nope"}, "contexts: no entry named 'nope'"),
    ({"server": "https://k"}, None, {}, "users: no entry named 'u'"),
])
def test_bad_kubeconfigs_name_the_file_and_field(
        tmp_path: Path, cluster: dict[str, Any], user: dict[str, Any] | None,
        top: dict[str, Any], expected: str) -> None:
    path = write(tmp_path, cluster, user, **top)
    with pytest.raises(ConfigError) as err:
        from_kubeconfig(path)
    assert expected in str(err.value)
    assert f"kubeconfig {path}: " in str(err.value)


@pytest.mark.parametrize(("text", "expected"), [
    ("a: [", "not YAML"),
    ("- a\n- b\n", "expected a mapping at the top"),
])
def test_files_that_are_not_kubeconfigs(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "config"
    path.write_text(text)
    with pytest.raises(ConfigError, match=expected):
        from_kubeconfig(str(path))


def test_a_missing_kubeconfig(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"cannot read kubeconfig {tmp_path}/nope"):
        from_kubeconfig(str(tmp_path / "nope"))


def test_a_token_file_is_read_again_after_its_period_and_survives_a_miss(
        tmp_path: Path) -> None:
    now = [100.0]
    path = tmp_path / "token"
    path.write_text("one")
    token = TokenFile(str(path), period=60.0, clock=lambda: now[0])
    assert token() == "one"
    path.write_text("two")
    now[0] += 59.0
    assert token() == "one"  # within the period: not read
    now[0] += 2.0
    assert token() == "two"
    path.unlink()  # between the kubelet's writes
    now[0] += 61.0
    assert token() == "two"
    path.write_text("")
    now[0] += 61.0
    assert token() == "two"


def test_in_cluster(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("sa-token\n")
    (tmp_path / "ca.crt").write_text(CA)
    access = in_cluster({"KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "443"},
                        tmp_path)
    assert access.server == "https://[fd00::1]:443"
    assert access.ca == Pem(str(tmp_path / "ca.crt"), path=str(tmp_path / "ca.crt"))
    assert access.token() == "sa-token"


@pytest.mark.parametrize(("env", "files", "expected"), [
    ({}, ("token", "ca.crt"), "KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT are not set"),
    ({"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}, ("token",),
     "ca.crt"),
    ({"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}, ("ca.crt",),
     "token"),
])
def test_in_cluster_without_what_it_needs(
        tmp_path: Path, env: dict[str, str], files: tuple[str, ...], expected: str) -> None:
    for name in files:
        (tmp_path / name).write_text("x")
    with pytest.raises(ConfigError, match=expected):
        in_cluster(env, tmp_path)
