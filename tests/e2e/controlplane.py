"""A real Kubernetes control plane on this machine, for end-to-end tests.

`ControlPlane` runs the real etcd, kube-apiserver and kube-controller-manager
(built from Go modules by scripts/build-k8s.sh into a cache outside the
repository) as child processes listening on 127.0.0.1 only, with everything
they need (a CA, serving certificate, service-account keys, a token file,
kubeconfigs, etcd's data) in one temporary directory:

    with ControlPlane() as cp:
        cp.create_namespace("demo")
        cp.kubectl("apply", "-f", "deploy.yaml")
        cp.helm("install", "veer", "deploy/helm/veer", "-n", "veer-system")
        token = cp.token_for_service_account("veer-system", "veer-agent")
        kubeconfig = cp.kubeconfig_for_token(token, "veer-agent")
        # ... run the agent as a process with KUBECONFIG=kubeconfig ...

There is no kubelet, scheduler or container runtime. Tests make Nodes with
`add_node` and play the kubelet for Pods with `set_pod_status` (podIP, phase,
Ready condition); the real kube-controller-manager then writes the
EndpointSlices, exactly as on a real cluster.

On exit every process it started is stopped (by its pid) and the temporary
directory is removed, also when starting failed. Set VEER_E2E_KEEP=1 to keep
the directory (logs, certificates, kubeconfigs) for debugging.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import IO, Any, TypeVar

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
CLUSTER_MODULE = REPO_ROOT / "tests" / "e2e" / "cluster"
BUILD_SCRIPT = REPO_ROOT / "scripts" / "build-k8s.sh"

BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-proxy", "kubectl", "helm")

SERVICE_CIDR = "10.96.0.0/16"
KUBERNETES_SERVICE_IP = "10.96.0.1"
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"

# The controllers that turn API objects into what kube-proxy (and veer) read,
# and that give ServiceAccounts their tokens. Names as `kube-controller-manager
# --help` lists them. The node lifecycle controller is left out on purpose:
# with no kubelet it would mark every Node NotReady and evict its Pods.
CONTROLLERS = (
    "endpointslice-controller",
    "endpointslice-mirroring-controller",
    "serviceaccount-token-controller",
    "serviceaccount-controller",
    "root-ca-certificate-publisher-controller",
    "namespace-controller",
    "garbage-collector-controller",
)

T = TypeVar("T")


class ControlPlaneError(RuntimeError):
    """The control plane could not start, or a command against it failed."""


class CommandError(ControlPlaneError):
    """A kubectl or helm command exited non-zero; stderr is in the message."""

    def __init__(self, argv: Sequence[str], returncode: int, stdout: str, stderr: str) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        super().__init__(
            f"{' '.join(self.argv)} exited {returncode}: {stderr.strip() or stdout.strip()}"
        )


# --- where the binaries are -------------------------------------------------


def kubernetes_version() -> str:
    """The k8s.io/kubernetes version that tests/e2e/cluster/go.mod requires."""
    text = (CLUSTER_MODULE / "go.mod").read_text()
    match = re.search(r"^\s*(?:require\s+)?k8s\.io/kubernetes\s+(v\S+)", text, re.MULTILINE)
    if not match:
        raise ControlPlaneError(f"no k8s.io/kubernetes requirement in {CLUSTER_MODULE}/go.mod")
    return match.group(1)


def cache_dir() -> Path:
    return Path(os.environ.get("VEER_CACHE") or Path.home() / ".cache" / "veer")


def bin_dir() -> Path:
    """Where scripts/build-k8s.sh puts the binaries (VEER_K8S_BIN overrides)."""
    override = os.environ.get("VEER_K8S_BIN")
    if override:
        return Path(override)
    return cache_dir() / f"k8s-{kubernetes_version()}" / "bin"


def missing_binaries(directory: Path | None = None) -> list[str]:
    directory = directory or bin_dir()
    return [name for name in BINARIES if not os.access(directory / name, os.X_OK)]


def build_binaries(log: Path | None = None, timeout: float = 3 * 3600) -> None:
    """Run scripts/build-k8s.sh (seconds when cached, tens of minutes cold).

    Its output goes to `log` (default: <cache>/build-k8s.log); on failure the
    error carries the last lines.
    """
    log = log or cache_dir() / "build-k8s.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        proc = subprocess.run(
            [str(BUILD_SCRIPT)], stdout=out, stderr=subprocess.STDOUT, timeout=timeout, check=False
        )
    if proc.returncode != 0:
        raise ControlPlaneError(
            f"{BUILD_SCRIPT} exited {proc.returncode} (log: {log}):\n{_tail(log, 30)}"
        )


# --- small helpers ----------------------------------------------------------


def free_ports(count: int) -> list[int]:
    """Distinct free TCP ports on 127.0.0.1 (held open together while chosen)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def wait_for(
    check: Callable[[], T | None],
    what: str,
    timeout: float = 60.0,
    interval: float = 0.25,
) -> T:
    """Call `check` until it returns something other than None (or False).

    Exceptions from `check` count as "not yet"; the last one is reported if
    the time runs out.
    """
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            result = check()
            if result is not None and result is not False:
                return result
        except ControlPlaneError as err:
            if isinstance(err, _Fatal):
                raise
            last_error = err
        except (
            OSError,
            ValueError,
            KeyError,
            IndexError,
            TypeError,
            subprocess.SubprocessError,
        ) as err:
            last_error = err
        if time.monotonic() >= deadline:
            detail = f": last error: {last_error}" if last_error else ""
            raise ControlPlaneError(f"timed out after {timeout:.0f}s waiting for {what}{detail}")
        time.sleep(interval)


class _Fatal(ControlPlaneError):
    """Raised from inside a wait when waiting longer cannot help."""


def _tail(path: Path, lines: int = 40) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            data = f.read().decode(errors="replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(data.splitlines()[-lines:])


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _openssl(*args: str, cwd: Path) -> None:
    proc = subprocess.run(
        ["openssl", *args], cwd=cwd, capture_output=True, text=True, check=False, timeout=60
    )
    if proc.returncode != 0:
        raise ControlPlaneError(f"openssl {' '.join(args)} failed: {proc.stderr.strip()}")


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM if the test process dies."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def write_kubeconfig(
    path: Path,
    server: str,
    ca_file: Path,
    token: str,
    user: str = "user",
    namespace: str | None = None,
) -> Path:
    """Write a kubeconfig that authenticates with a bearer token."""
    context: dict[str, Any] = {"cluster": "veer-e2e", "user": user}
    if namespace:
        context["namespace"] = namespace
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "veer-e2e",
                "cluster": {"server": server, "certificate-authority": str(ca_file)},
            }
        ],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": user, "context": context}],
        "current-context": user,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(config, sort_keys=False))
    tmp.chmod(0o600)
    tmp.replace(path)
    return path


# --- processes --------------------------------------------------------------


@dataclass
class _Process:
    """One child process, its argv and its log file."""

    name: str
    argv: list[str]
    log: Path
    cwd: Path
    popen: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _log_file: IO[bytes] | None = field(default=None, repr=False)

    def start(self) -> None:
        self._log_file = self.log.open("ab")
        self._log_file.write(f"==== {_now()} starting: {' '.join(self.argv)}\n".encode())
        self._log_file.flush()
        self.popen = subprocess.Popen(
            self.argv,
            cwd=self.cwd,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches the test, which stops us in order
            preexec_fn=_die_with_parent,
        )

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen else None

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def check_running(self) -> None:
        if self.popen is not None and self.popen.poll() is not None:
            raise _Fatal(
                f"{self.name} exited with status {self.popen.returncode}; "
                f"last lines of {self.log}:\n{_tail(self.log)}"
            )

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM this one process, SIGKILL it if it lingers, and reap it."""
        popen, self.popen = self.popen, None
        if popen is not None and popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                popen.send_signal(signal.SIGTERM)
            try:
                popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    popen.kill()
                popen.wait(10)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None


# --- the control plane ------------------------------------------------------


class ControlPlane:
    """etcd + kube-apiserver + kube-controller-manager on 127.0.0.1.

    Attributes available once started:
      url             https://127.0.0.1:<port> of the API server
      kubeconfig      admin kubeconfig (token in group system:masters)
      ca_file         the CA that signed the API server's certificate
      dir             the temporary directory holding all of the above
      tokens          static token of each user in the token file
    """

    def __init__(
        self,
        binaries: Path | None = None,
        *,
        users: Mapping[str, Sequence[str]] | None = None,
        controllers: Sequence[str] = CONTROLLERS,
        extra_apiserver_args: Sequence[str] = (),
        start_timeout: float = 180.0,
        keep_dir: bool | None = None,
    ) -> None:
        """`users`: extra static-token users, name -> groups, for tests that
        want an identity without a ServiceAccount."""
        self.bin = binaries or bin_dir()
        missing = missing_binaries(self.bin)
        if missing:
            raise ControlPlaneError(
                f"missing {', '.join(missing)} in {self.bin}: run {BUILD_SCRIPT} first"
            )
        self._extra_users = dict(users or {})
        self._controllers = list(controllers)
        self._extra_apiserver_args = list(extra_apiserver_args)
        self._start_timeout = start_timeout
        self._keep = os.environ.get("VEER_E2E_KEEP") == "1" if keep_dir is None else keep_dir
        self.dir = Path()
        self.url = ""
        self.etcd_url = ""
        self.kubeconfig = Path()
        self.ca_file = Path()
        self.tokens: dict[str, str] = {}
        self._etcd: _Process | None = None
        self._apiserver: _Process | None = None
        self._kcm: _Process | None = None
        self._started = False

    # -- lifecycle --

    def __enter__(self) -> ControlPlane:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        if self._started:
            raise ControlPlaneError("this ControlPlane was already started")
        self._started = True
        self.dir = Path(tempfile.mkdtemp(prefix="veer-e2e-"))
        try:
            self._write_pki()
            self._write_tokens()
            self._start_etcd()
            self._start_apiserver()
            self._write_kubeconfigs()
            self._start_controller_manager()
            # The serviceaccount controller making "default" proves the
            # controller manager is up, authenticated and authorized.
            self.wait_for_service_account("default", "default", timeout=self._start_timeout)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop every process this object started (by pid), newest first,
        and remove the temporary directory. Safe to call more than once."""
        for proc in (self._kcm, self._apiserver, self._etcd):
            if proc is not None:
                proc.stop()
        self._kcm = self._apiserver = self._etcd = None
        if self.dir != Path() and self.dir.exists() and not self._keep:
            shutil.rmtree(self.dir, ignore_errors=True)

    @property
    def processes(self) -> dict[str, int]:
        """name -> pid of each running process."""
        procs = (self._etcd, self._apiserver, self._kcm)
        return {p.name: p.pid for p in procs if p is not None and p.pid is not None}

    def log(self, name: str) -> str:
        """The whole log of "etcd", "kube-apiserver" or "kube-controller-manager"."""
        return (self.dir / "logs" / f"{name}.log").read_text(errors="replace")

    # -- set-up steps --

    def _write_pki(self) -> None:
        pki = self.dir / "pki"
        pki.mkdir()
        ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
        _openssl(
            "req", "-x509", "-new", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "7",
            "-subj", "/CN=veer-e2e-ca",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            cwd=pki,
        )  # fmt: skip
        sans = [
            "IP:127.0.0.1",
            f"IP:{KUBERNETES_SERVICE_IP}",
            "DNS:localhost",
            "DNS:kubernetes",
            "DNS:kubernetes.default",
            "DNS:kubernetes.default.svc",
            "DNS:kubernetes.default.svc.cluster.local",
        ]
        (pki / "apiserver.ext").write_text(
            "basicConstraints=CA:FALSE\n"
            "keyUsage=critical,digitalSignature,keyEncipherment\n"
            "extendedKeyUsage=serverAuth\n"
            f"subjectAltName={','.join(sans)}\n"
        )
        _openssl(
            "req", "-new", *ec, "-keyout", "apiserver.key", "-out", "apiserver.csr",
            "-subj", "/CN=kube-apiserver",
            cwd=pki,
        )  # fmt: skip
        _openssl(
            "x509", "-req", "-in", "apiserver.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "7", "-extfile", "apiserver.ext", "-out", "apiserver.crt",
            cwd=pki,
        )  # fmt: skip
        _openssl(
            "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", "sa.key",
            cwd=pki,
        )  # fmt: skip
        _openssl("pkey", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=pki)
        for key in pki.glob("*.key"):
            key.chmod(0o600)
        self.ca_file = pki / "ca.crt"

    def _write_tokens(self) -> None:
        # user -> groups; the bootstrap RBAC policy already binds the
        # system:kube-controller-manager and system:kube-proxy users.
        users: dict[str, Sequence[str]] = {
            "admin": ["system:masters"],
            "system:kube-controller-manager": [],
            "system:kube-proxy": [],
            **self._extra_users,
        }
        lines = []
        for user, groups in users.items():
            token = os.urandom(24).hex()
            self.tokens[user] = token
            uid = re.sub(r"[^a-z0-9-]", "-", user.lower())
            line = f"{token},{user},{uid}"
            if groups:  # an empty fourth field would mean one group named ""
                line += f',"{",".join(groups)}"'
            lines.append(line)
        path = self.dir / "tokens.csv"
        path.write_text("\n".join(lines) + "\n")
        path.chmod(0o600)

    def _process(self, name: str, args: list[str]) -> _Process:
        logs = self.dir / "logs"
        logs.mkdir(exist_ok=True)
        return _Process(name, [str(self.bin / name), *args], logs / f"{name}.log", self.dir)

    def _start_etcd(self) -> None:
        for attempt in range(3):
            client, peer = free_ports(2)
            self.etcd_url = f"http://127.0.0.1:{client}"
            peer_url = f"http://127.0.0.1:{peer}"
            self._etcd = self._process(
                "etcd",
                [
                    "--name=default",
                    f"--data-dir={self.dir / 'etcd'}",
                    f"--listen-client-urls={self.etcd_url}",
                    f"--advertise-client-urls={self.etcd_url}",
                    f"--listen-peer-urls={peer_url}",
                    f"--initial-advertise-peer-urls={peer_url}",
                    f"--initial-cluster=default={peer_url}",
                    "--initial-cluster-state=new",
                    "--unsafe-no-fsync=true",  # a test cluster: speed over durability
                    "--log-level=warn",
                ],
            )
            self._etcd.start()
            try:
                wait_for(self._etcd_healthy, "etcd to be healthy", self._start_timeout)
                return
            except _Fatal:
                if attempt == 2 or "address already in use" not in _tail(self._etcd.log):
                    raise
                self._etcd.stop()

    def _etcd_healthy(self) -> bool:
        assert self._etcd is not None
        self._etcd.check_running()
        with urllib.request.urlopen(f"{self.etcd_url}/health", timeout=5) as resp:
            return bool(json.load(resp).get("health") == "true")

    def _apiserver_args(self, port: int) -> list[str]:
        pki = self.dir / "pki"
        return [
            "--advertise-address=127.0.0.1",
            "--bind-address=127.0.0.1",
            f"--secure-port={port}",
            f"--cert-dir={self.dir / 'apiserver-certs'}",
            f"--tls-cert-file={pki / 'apiserver.crt'}",
            f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--client-ca-file={pki / 'ca.crt'}",
            f"--etcd-servers={self.etcd_url}",
            f"--token-auth-file={self.dir / 'tokens.csv'}",
            "--authorization-mode=Node,RBAC",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--allow-privileged=true",
            "--profiling=false",
            # On SIGTERM, answer Retry-After until in-flight requests drain,
            # then close watches within 2 s (instead of waiting up to the 60 s
            # request timeout for them), so restart_apiserver() is quick.
            "--shutdown-send-retry-after=true",
            *self._extra_apiserver_args,
        ]

    def _start_apiserver(self, port: int | None = None) -> None:
        for attempt in range(3):
            chosen = port or free_ports(1)[0]
            self.url = f"https://127.0.0.1:{chosen}"
            self._apiserver = self._process("kube-apiserver", self._apiserver_args(chosen))
            self._apiserver.start()
            try:
                wait_for(self._apiserver_ready, "kube-apiserver /readyz", self._start_timeout)
                return
            except _Fatal:
                log = _tail(self._apiserver.log)
                if port is not None or attempt == 2 or "address already in use" not in log:
                    raise
                self._apiserver.stop()

    def _apiserver_ready(self) -> bool:
        assert self._apiserver is not None
        self._apiserver.check_running()
        return self.get("/readyz") == "ok"

    def get(self, path: str, token: str | None = None, timeout: float = 10.0) -> str:
        """GET a path of the API server (admin token unless `token`)."""
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        req = urllib.request.Request(
            self.url + path, headers={"Authorization": f"Bearer {token or self.tokens['admin']}"}
        )
        with urllib.request.urlopen(req, timeout=timeout, context=ctx) as resp:
            body: bytes = resp.read()
        return body.decode()

    def _write_kubeconfigs(self) -> None:
        self.kubeconfig = self.kubeconfig_for_token(self.tokens["admin"], "admin")
        for user in self.tokens:
            if user != "admin":
                self.kubeconfig_for_token(self.tokens[user], user)

    def _start_controller_manager(self) -> None:
        kubeconfig = str(self.dir / "kubeconfigs" / "system-kube-controller-manager.yaml")
        port = free_ports(1)[0]
        self._kcm = self._process(
            "kube-controller-manager",
            [
                f"--kubeconfig={kubeconfig}",
                f"--authentication-kubeconfig={kubeconfig}",
                f"--authorization-kubeconfig={kubeconfig}",
                "--bind-address=127.0.0.1",
                f"--secure-port={port}",
                f"--cert-dir={self.dir / 'kcm-certs'}",
                f"--controllers={','.join(self._controllers)}",
                "--use-service-account-credentials=true",
                f"--service-account-private-key-file={self.dir / 'pki' / 'sa.key'}",
                f"--root-ca-file={self.ca_file}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--leader-elect=false",
                "--profiling=false",
            ],
        )
        self._kcm.start()

    def restart_apiserver(self) -> None:
        """Stop kube-apiserver and start it again on the same port and state."""
        if self._apiserver is None:
            raise ControlPlaneError("kube-apiserver is not running")
        port = int(self.url.rsplit(":", 1)[1])
        self._apiserver.stop()
        self._start_apiserver(port)

    # -- credentials --

    def kubeconfig_for_token(self, token: str, name: str, namespace: str | None = None) -> Path:
        """Write <dir>/kubeconfigs/<name>.yaml for `token` and return its path."""
        safe = re.sub(r"[^A-Za-z0-9_.-]", "-", name)
        return write_kubeconfig(
            self.dir / "kubeconfigs" / f"{safe}.yaml", self.url, self.ca_file, token, safe,
            namespace,
        )  # fmt: skip

    def kubeconfig_for_user(self, user: str) -> Path:
        """Kubeconfig of a static-token user (admin, system:kube-proxy, `users`)."""
        return self.kubeconfig_for_token(self.tokens[user], user)

    def token_for_service_account(
        self,
        namespace: str,
        name: str,
        duration: str = "2h",
        audiences: Sequence[str] = (),
    ) -> str:
        """A bound token for a ServiceAccount, from the TokenRequest API."""
        args = ["create", "token", name, "-n", namespace, f"--duration={duration}"]
        args += [f"--audience={a}" for a in audiences]
        return self.kubectl(*args).stdout.strip()

    def kubeconfig_for_service_account(
        self, namespace: str, name: str, duration: str = "2h"
    ) -> Path:
        """Kubeconfig authenticating as system:serviceaccount:<namespace>:<name>."""
        token = self.token_for_service_account(namespace, name, duration)
        return self.kubeconfig_for_token(token, f"sa-{namespace}-{name}", namespace)

    # -- commands --

    def env(self, kubeconfig: Path | None = None) -> dict[str, str]:
        """Environment for a child process that talks to this cluster."""
        env = dict(os.environ)
        env["KUBECONFIG"] = str(kubeconfig or self.kubeconfig)
        env["KUBECACHEDIR"] = str(self.dir / "kube-cache")
        for var in ("HELM_CACHE_HOME", "HELM_CONFIG_HOME", "HELM_DATA_HOME"):
            env[var] = str(self.dir / "helm" / var.split("_")[1].lower())
        return env

    def _run(
        self,
        argv: list[str],
        input: str | None,
        check: bool,
        timeout: float,
        kubeconfig: Path | None,
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            argv,
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env(kubeconfig),
            cwd=REPO_ROOT,
            check=False,
        )
        if check and proc.returncode != 0:
            raise CommandError(argv, proc.returncode, proc.stdout, proc.stderr)
        return proc

    def kubectl(
        self,
        *args: str,
        input: str | None = None,
        check: bool = True,
        timeout: float = 60.0,
        kubeconfig: Path | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run the built kubectl against this cluster (admin unless `kubeconfig`)."""
        argv = [str(self.bin / "kubectl"), f"--cache-dir={self.dir / 'kube-cache'}", *args]
        return self._run(argv, input, check, timeout, kubeconfig)

    def kubectl_json(self, *args: str, kubeconfig: Path | None = None) -> Any:
        """kubectl ... -o json, parsed."""
        return json.loads(self.kubectl(*args, "-o", "json", kubeconfig=kubeconfig).stdout)

    def helm(
        self,
        *args: str,
        input: str | None = None,
        check: bool = True,
        timeout: float = 300.0,
        kubeconfig: Path | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run the built helm against this cluster, with its own config dirs."""
        return self._run([str(self.bin / "helm"), *args], input, check, timeout, kubeconfig)

    def apply(self, *objects: Mapping[str, Any], namespace: str | None = None) -> None:
        """kubectl apply the given objects (dicts as in a manifest)."""
        items = {"apiVersion": "v1", "kind": "List", "items": [dict(o) for o in objects]}
        args = ["apply", "-f", "-"] + (["-n", namespace] if namespace else [])
        self.kubectl(*args, input=json.dumps(items))

    # -- playing the kubelet --

    def wait_for_service_account(self, namespace: str, name: str, timeout: float = 60.0) -> None:
        def exists() -> bool:
            for proc in (self._etcd, self._apiserver, self._kcm):
                if proc is not None:
                    proc.check_running()
            got = self.kubectl("get", "serviceaccount", name, "-n", namespace, check=False)
            return got.returncode == 0

        wait_for(exists, f"ServiceAccount {namespace}/{name}", timeout)

    def create_namespace(self, name: str, labels: Mapping[str, str] | None = None) -> None:
        """Create a namespace and wait for its "default" ServiceAccount (the
        ServiceAccount admission plugin refuses Pods until it exists)."""
        meta: dict[str, Any] = {"name": name}
        if labels:
            meta["labels"] = dict(labels)
        self.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": meta})
        self.wait_for_service_account(name, "default")

    def add_node(
        self, name: str, internal_ip: str, labels: Mapping[str, str] | None = None
    ) -> None:
        """A Node object with an InternalIP and a Ready condition, as a kubelet
        would register it (the EndpointSlice controller skips Pods whose Node
        does not exist)."""
        meta = {"name": name, "labels": {"kubernetes.io/hostname": name, **(labels or {})}}
        self.apply({"apiVersion": "v1", "kind": "Node", "metadata": meta})
        now = _now()
        status = {
            "status": {
                "addresses": [
                    {"type": "InternalIP", "address": internal_ip},
                    {"type": "Hostname", "address": name},
                ],
                "conditions": [
                    {
                        "type": "Ready",
                        "status": "True",
                        "reason": "KubeletReady",
                        "message": "veer e2e: no kubelet, the test sets this",
                        "lastHeartbeatTime": now,
                        "lastTransitionTime": now,
                    }
                ],
            }
        }
        self.kubectl(
            "patch", "node", name, "--subresource=status", "--type=merge", "-p", json.dumps(status)
        )

    def set_pod_status(
        self,
        namespace: str,
        name: str,
        pod_ip: str,
        ready: bool = True,
        phase: str = "Running",
        host_ip: str | None = None,
    ) -> None:
        """Patch a Pod's status as its kubelet would: phase, IPs, conditions."""
        now = _now()
        flag = "True" if ready else "False"
        conditions = [
            ("PodScheduled", "True"),
            ("Initialized", "True"),
            ("ContainersReady", flag),
            ("Ready", flag),
        ]
        status: dict[str, Any] = {
            "phase": phase,
            "podIP": pod_ip,
            "podIPs": [{"ip": pod_ip}],
            "conditions": [
                {"type": t, "status": s, "lastProbeTime": None, "lastTransitionTime": now}
                for t, s in conditions
            ],
        }
        if host_ip:
            status["hostIP"] = host_ip
            status["hostIPs"] = [{"ip": host_ip}]
        self.kubectl(
            "patch", "pod", name, "-n", namespace, "--subresource=status", "--type=merge",
            "-p", json.dumps({"status": status}),
        )  # fmt: skip

    def endpoint_slices(self, namespace: str, service: str) -> list[dict[str, Any]]:
        """The EndpointSlices of a Service (label kubernetes.io/service-name)."""
        got = self.kubectl_json(
            "get", "endpointslices", "-n", namespace, "-l", f"kubernetes.io/service-name={service}"
        )
        items: list[dict[str, Any]] = got["items"]
        return items

    def __repr__(self) -> str:
        return f"ControlPlane(url={self.url!r}, dir={str(self.dir)!r}, pids={self.processes})"
