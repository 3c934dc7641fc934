"""Where the API server is and how to prove who we are: a kubeconfig file, or
the Pod's ServiceAccount.

    from_kubeconfig(path[, context])   the context named, or current-context
    in_cluster()                       KUBERNETES_SERVICE_HOST/PORT and
                                       /var/run/secrets/kubernetes.io/serviceaccount

Both return an Access: the server's URL, the TLS material as PEM (a file's
path, or the decoded text of a `-data` field: nothing is written here) and
a bearer token source. What is supported of a kubeconfig:

    clusters[].cluster   server, certificate-authority(-data),
                         insecure-skip-tls-verify, tls-server-name
    users[].user         token, tokenFile, client-certificate(-data),
                         client-key(-data)

Anything else that changes how to authenticate (exec, auth-provider, basic
auth, impersonation, a proxy) is refused with a ConfigError naming the
field: ignoring it would connect as someone else, or not at all, with a
less clear message. Relative paths are relative to the kubeconfig's
directory, as kubectl resolves them.

A token read from a file (tokenFile, the ServiceAccount's) is read again
after TOKEN_REREAD seconds, as client-go does: bound ServiceAccount tokens
are rotated by the kubelet while the agent runs.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from agent.errors import ConfigError

log = logging.getLogger(__name__)

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")
TOKEN_REREAD = 60.0

# user fields that would change who we are or how we log in, and are not
# implemented: refused rather than ignored.
UNSUPPORTED_USER_FIELDS = ("exec", "auth-provider", "username", "password", "as", "as-uid",
                           "as-groups", "as-user-extra")
UNSUPPORTED_CLUSTER_FIELDS = ("proxy-url",)


@dataclass(frozen=True)
class Pem:
    """TLS material: a file (`path`) or its text (`data`), and `source`, the
    field it came from, to name in errors. Exactly one of path and data is set."""

    source: str
    path: str | None = None
    data: str | None = None


class TokenFile:
    """A bearer token kept in a file that may be replaced (rotated): read at
    most every `period` seconds; thread-safe. Only the first read can fail
    (ConfigError); a later failed or empty read keeps the last token, since
    the kubelet replaces the file atomically and a miss is transient."""

    def __init__(self, path: str, period: float = TOKEN_REREAD,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self._period = period
        self._clock = clock
        self._lock = threading.Lock()
        self._token = ""
        self._read_at = 0.0

    def __call__(self) -> str:
        with self._lock:
            now = self._clock()
            if self._token and now - self._read_at < self._period:
                return self._token
            try:
                token = Path(self.path).read_text().strip()
                problem = "" if token else "it is empty"
            except OSError as err:
                token, problem = "", str(err.strerror or err)
            if problem:
                if not self._token:
                    raise ConfigError(f"cannot read the token file {self.path}: {problem}")
                log.warning("cannot read the token file %s again (%s); keeping the last token",
                            self.path, problem)
                token = self._token
            self._token, self._read_at = token, now
            return token


def _static(token: str) -> Callable[[], str]:
    return lambda: token


@dataclass(frozen=True)
class Access:
    """How to reach one API server as one user."""

    server: str  # scheme://host:port[/prefix], no trailing slash
    origin: str  # where this came from, for messages
    ca: Pem | None = None  # None: the system's CAs
    insecure: bool = False
    tls_server_name: str | None = None
    certificate: Pem | None = None
    private_key: Pem | None = None
    # Returns the bearer token to send, "" for none; may raise ConfigError.
    token: Callable[[], str] = field(default=_static(""), compare=False)


# ---- kubeconfig -------------------------------------------------------------

def _named(doc: Mapping[str, Any], section: str, key: str, name: str,
           where: str) -> tuple[Mapping[str, Any], str]:
    """The `key` mapping of the entry called `name` in the list `section`,
    and its field path for messages."""
    entries = doc.get(section) or []
    if not isinstance(entries, list):
        raise ConfigError(f"{where}: {section}: expected a list")
    for entry in entries:
        if isinstance(entry, Mapping) and entry.get("name") == name:
            body = entry.get(key) or {}
            path = f"{section}[name={name}].{key}"
            if not isinstance(body, Mapping):
                raise ConfigError(f"{where}: {path}: expected a mapping")
            return body, path
    raise ConfigError(f"{where}: {section}: no entry named {name!r}")


def _string(body: Mapping[str, Any], key: str, path: str, where: str) -> str | None:
    value = body.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ConfigError(f"{where}: {path}.{key}: expected a string, got "
                          f"{type(value).__name__}")
    return value


def _pem(body: Mapping[str, Any], key: str, path: str, where: str,
         base: Path) -> Pem | None:
    """`key`-data (base64 of PEM; preferred, as client-go does) or `key` (a
    path that must be readable now, so a typo fails at start)."""
    data = _string(body, f"{key}-data", path, where)
    if data is not None:
        name = f"{path}.{key}-data"
        try:
            text = base64.b64decode(data, validate=True).decode("ascii")
        except (binascii.Error, ValueError):
            raise ConfigError(f"{where}: {name}: not base64-encoded PEM") from None
        if "-----BEGIN" not in text:
            raise ConfigError(f"{where}: {name}: no PEM block in it")
        return Pem(name, data=text)
    file = _string(body, key, path, where)
    if file is None:
        return None
    name = f"{path}.{key}"
    resolved = base / os.path.expanduser(file)
    try:
        resolved.read_bytes()
    except OSError as err:
        raise ConfigError(f"{where}: {name}: cannot read {resolved}: "
                          f"{err.strerror or err}") from None
    return Pem(name, path=str(resolved))


def _server(url: str, name: str, where: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ConfigError(f"{where}: {name}: {url!r} is not an http(s):// URL")
    try:
        parts.port  # noqa: B018 (validates the port)
    except ValueError:
        raise ConfigError(f"{where}: {name}: {url!r} has a bad port") from None
    return url.rstrip("/")


def from_kubeconfig(path: str, context: str | None = None) -> Access:
    """The Access of `context` (default: current-context) in the kubeconfig
    at `path`; ConfigError naming the file and field when it is unusable."""
    import yaml  # only here: the in-cluster agent never parses YAML

    where = f"kubeconfig {path}"
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise ConfigError(f"cannot read {where}: {err.strerror or err}") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{where}: not YAML: {err}") from None
    if not isinstance(doc, Mapping):
        raise ConfigError(f"{where}: expected a mapping at the top")
    name = context or doc.get("current-context")
    if not name or not isinstance(name, str):
        raise ConfigError(f"{where}: current-context: not set")
    ctx, ctx_path = _named(doc, "contexts", "context", name, where)
    cluster_name = _string(ctx, "cluster", ctx_path, where)
    if cluster_name is None:
        raise ConfigError(f"{where}: {ctx_path}.cluster: not set")
    cluster, cluster_path = _named(doc, "clusters", "cluster", cluster_name, where)
    user_name = _string(ctx, "user", ctx_path, where)
    user: Mapping[str, Any] = {}
    user_path = ""
    if user_name is not None:
        user, user_path = _named(doc, "users", "user", user_name, where)

    for key in UNSUPPORTED_CLUSTER_FIELDS:
        if cluster.get(key):
            raise ConfigError(f"{where}: {cluster_path}.{key}: not supported by veer")
    for key in UNSUPPORTED_USER_FIELDS:
        if user.get(key):
            raise ConfigError(f"{where}: {user_path}.{key}: not supported by veer (use a "
                              "kubeconfig with a token or a client certificate)")

    base = Path(path).resolve().parent
    server_url = _string(cluster, "server", cluster_path, where)
    if server_url is None:
        raise ConfigError(f"{where}: {cluster_path}.server: not set")
    insecure = cluster.get("insecure-skip-tls-verify") or False
    if not isinstance(insecure, bool):
        raise ConfigError(f"{where}: {cluster_path}.insecure-skip-tls-verify: expected a "
                          "boolean")
    certificate = _pem(user, "client-certificate", user_path, where, base)
    private_key = _pem(user, "client-key", user_path, where, base)
    if (certificate is None) != (private_key is None):
        missing = "client-key" if private_key is None else "client-certificate"
        raise ConfigError(f"{where}: {user_path}.{missing}: not set (a client certificate "
                          "needs both it and its key)")
    token: Callable[[], str] = _static("")
    token_file = _string(user, "tokenFile", user_path, where)
    static = _string(user, "token", user_path, where)
    if token_file is not None:  # client-go re-reads the file when both are set
        token = TokenFile(str(base / os.path.expanduser(token_file)))
        try:
            token()  # fails now if unreadable
        except ConfigError as err:
            raise ConfigError(f"{where}: {user_path}.tokenFile: {err}") from None
    elif static is not None:
        token = _static(static)
    return Access(
        server=_server(server_url, f"{cluster_path}.server", where),
        origin=f"{where} (context {name})",
        ca=_pem(cluster, "certificate-authority", cluster_path, where, base),
        insecure=insecure,
        tls_server_name=_string(cluster, "tls-server-name", cluster_path, where),
        certificate=certificate,
        private_key=private_key,
        token=token,
    )


# ---- in-cluster -------------------------------------------------------------

def in_cluster(environ: Mapping[str, str] = os.environ,
               root: Path = SERVICE_ACCOUNT) -> Access:
    """The Pod's ServiceAccount: the API server of KUBERNETES_SERVICE_HOST/PORT
    (the chart may point them past the `kubernetes` Service), its CA and its
    token, re-read as it rotates."""
    host = environ.get("KUBERNETES_SERVICE_HOST", "")
    port = environ.get("KUBERNETES_SERVICE_PORT", "")
    where = "the in-cluster ServiceAccount"
    if not host or not port:
        raise ConfigError(f"{where}: KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT are "
                          "not set: not in a Pod? (use --kubeconfig outside a Pod)")
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # an IPv6 address
    ca = root / "ca.crt"
    try:
        ca.read_bytes()
    except OSError as err:
        raise ConfigError(f"{where}: cannot read {ca}: {err.strerror or err}") from None
    token = TokenFile(str(root / "token"))
    token()  # fails now if unreadable or empty
    return Access(
        server=_server(f"https://{host}:{port}", "KUBERNETES_SERVICE_HOST/PORT", where),
        origin=where,
        ca=Pem(str(ca), path=str(ca)),
        token=token,
    )
