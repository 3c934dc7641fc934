"""Services and EndpointSlices written straight to the API server, fast.

The bench creates the EndpointSlices itself (Services have no selector, so
the EndpointSlice controller leaves them alone): 10,000 Services with 10
endpoints each would otherwise need Pods and the controller's client rate
limits would set the pace, not the proxies. Each slice carries the
`endpoints.kubernetes.io/last-change-trigger-time` annotation the controller
would write (the time the bench sent it), so that both proxies' network
programming latency metric sees every change.

Objects go through a few keep-alive HTTPS connections in parallel threads
(kubectl, one request per process or object, is far slower); the admin
token is used, since what is measured is the proxies, not the writer.

Between two proxies' runs, while no proxy is running, a load is erased from
etcd directly (EtcdEraser), not DELETEd through the API server: nothing is
measured then, and the API server's DELETE path grows with N (each freed
ClusterIP has its allocator count every IPAddress object for a metric):
removing 10,000 Services took it 104.7-121.9 s per proxy in run
compare-20261126-183729 (bench/reports/), twice in each run.
The API server learns of the erasure through its etcd watch, as of any
change, and the next proxy starts from that state.
"""

from __future__ import annotations

import base64
import http.client
import ipaddress
import json
import queue
import ssl
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Any

TRIGGER = "endpoints.kubernetes.io/last-change-trigger-time"
SERVICES = "/api/v1/namespaces/{ns}/services"
SLICES = "/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices"
IPADDRESSES = "/apis/networking.k8s.io/v1/ipaddresses"
# Where the API server keeps them in etcd (its default --etcd-prefix).
ETCD_SERVICE = "/registry/services/specs/{ns}/{name}"
ETCD_SLICE = "/registry/endpointslices/{ns}/{name}"
ETCD_IPADDRESS = "/registry/ipaddresses/{ip}"

Body = dict[str, Any] | Callable[[], dict[str, Any]] | None
Job = tuple[str, str, Body]  # method, path, body


@dataclass(frozen=True)
class Port:
    name: str
    port: int
    target: int
    node_port: int = 0


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    cluster_ip: str
    ports: tuple[Port, ...]
    endpoints: tuple[str, ...]
    node: str  # the endpoints' nodeName
    node_port: bool = False

    def service(self, namespace: str) -> dict[str, Any]:
        ports = []
        for p in self.ports:
            port: dict[str, Any] = {"name": p.name, "protocol": "TCP", "port": p.port,
                                    "targetPort": p.target}
            if self.node_port and p.node_port:
                port["nodePort"] = p.node_port
            ports.append(port)
        spec: dict[str, Any] = {
            "type": "NodePort" if self.node_port else "ClusterIP",
            "clusterIP": self.cluster_ip, "clusterIPs": [self.cluster_ip],
            "ipFamilies": ["IPv4"], "ports": ports,
        }
        if self.node_port:
            spec["externalTrafficPolicy"] = "Cluster"
        return {"apiVersion": "v1", "kind": "Service",
                "metadata": {"name": self.name, "namespace": namespace}, "spec": spec}

    def slice(self, namespace: str) -> dict[str, Any]:
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        return {
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"{self.name}-1", "namespace": namespace,
                         "labels": {"kubernetes.io/service-name": self.name,
                                    "endpointslice.kubernetes.io/managed-by": "veer-bench"},
                         "annotations": {TRIGGER: now}},
            "addressType": "IPv4",
            "ports": [{"name": p.name, "protocol": "TCP", "port": p.target} for p in self.ports],
            "endpoints": [{"addresses": [a], "nodeName": self.node,
                           "conditions": {"ready": True, "serving": True, "terminating": False}}
                          for a in self.endpoints],
        }

    def frontends(self) -> list[tuple[str, int]]:
        return [(self.cluster_ip, p.port) for p in self.ports]


def batch(count: int, cidr: str, endpoints: Sequence[str], node: str,
          prefix: str = "svc") -> list[ServiceSpec]:
    """`count` one-port Services with fixed ClusterIPs from `cidr` (so that
    the addresses to probe are known before anything is created)."""
    hosts = ipaddress.ip_network(cidr).hosts()
    http = (Port("http", 80, 8080),)
    return [ServiceSpec(f"{prefix}-{i:05d}", str(next(hosts)), http, tuple(endpoints), node)
            for i in range(count)]


# How long a create waits for the ClusterIP of a just-deleted Service to be
# released (the API server frees IPAddress objects after the Service).
ALLOCATED_WAIT = 120.0
# After this long, the IPAddress object that holds it is taken for one left
# behind (see ApiWriter.free_address) and freed.
ALLOCATED_GRACE = 3.0


class ApiWriter:
    """POSTs and DELETEs through `threads` keep-alive connections."""

    def __init__(self, url: str, ca_file: str, token: str, threads: int = 6,
                 free_address: Callable[[str], None] | None = None) -> None:
        host, _, port = url.removeprefix("https://").rpartition(":")
        self.host, self.port = host, int(port)
        self.ctx = ssl.create_default_context(cafile=ca_file)
        self.headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json",
                        "Accept": "application/json"}
        self.threads = threads
        # Frees a ClusterIP of the bench's that an IPAddress object still
        # holds with no Service of the bench's left on it: the API server's
        # ClusterIP repair can make one again for a Service its view still
        # held when the bench erased it (compare-20261127-102731 stopped on
        # one, 120 s after the last look of compare.py's remove() found none).
        self.free_address = free_address

    def _conn(self) -> http.client.HTTPSConnection:
        return http.client.HTTPSConnection(self.host, self.port, context=self.ctx, timeout=60)

    def request(self, conn: http.client.HTTPSConnection, method: str, path: str,
                body: dict[str, Any] | None = None, ok: Sequence[int] = (200, 201, 202)
                ) -> dict[str, Any]:
        data = json.dumps(body).encode() if body is not None else None
        attempt = 0
        started = time.monotonic()
        deadline = started + ALLOCATED_WAIT
        freed = False
        while True:
            conn.request(method, path, body=data, headers=self.headers)
            resp = conn.getresponse()
            raw = resp.read()
            if resp.status in ok:
                return dict(json.loads(raw)) if raw else {}
            if resp.status in (429, 500, 503, 504) and attempt < 4:
                attempt += 1
                time.sleep(0.2 * attempt)  # the API server asks to slow down
                continue
            if (resp.status == 422 and b"already allocated" in raw
                    and time.monotonic() < deadline):
                # The ClusterIP of a Service deleted moments ago: its IPAddress
                # object is released asynchronously, after the Service is gone.
                # Held past the grace, it is one left behind: free it (once).
                address = ((body or {}).get("spec") or {}).get("clusterIP")
                if (not freed and self.free_address is not None and address
                        and time.monotonic() - started > ALLOCATED_GRACE):
                    self.free_address(str(address))
                    freed = True
                time.sleep(0.5)
                continue
            raise RuntimeError(f"{method} {path}: {resp.status} {raw[:300]!r}")

    def run(self, jobs: Sequence[Job], ok: Sequence[int] = (200, 201, 202)) -> float:
        """Send every (method, path, body); a body may be a function, called
        just before its request is sent (so that a time it holds is the
        send time). Returns the monotonic time at which the last request was
        answered."""
        work: queue.Queue[Job] = queue.Queue()
        for job in jobs:
            work.put(job)
        errors: list[BaseException] = []
        last = [0.0]
        lock = threading.Lock()

        def worker() -> None:
            conn = self._conn()
            try:
                while not errors:
                    try:
                        method, path, body = work.get_nowait()
                    except queue.Empty:
                        return
                    self.request(conn, method, path, body() if callable(body) else body, ok)
                    with lock:
                        last[0] = max(last[0], time.monotonic())
            except BaseException as err:  # reported by the caller
                errors.append(err)
            finally:
                conn.close()

        workers = [threading.Thread(target=worker, daemon=True)
                   for _ in range(max(1, min(self.threads, len(jobs))))]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        if errors:
            raise errors[0]
        return last[0]

    def create(self, specs: Sequence[ServiceSpec], namespace: str) -> float:
        """Every Service and its EndpointSlice (in parallel: a slice may exist
        before its Service, as it can in a cluster); returns when the last
        object was created."""
        jobs: list[Job] = []
        for spec in specs:
            jobs.append(("POST", SERVICES.format(ns=namespace), spec.service(namespace)))
            # The trigger-time annotation: when the slice is sent, not queued.
            jobs.append(("POST", SLICES.format(ns=namespace), partial(spec.slice, namespace)))
        return self.run(jobs)

    def delete(self, specs: Sequence[ServiceSpec], namespace: str) -> float:
        jobs: list[Job] = []
        for spec in specs:
            jobs.append(("DELETE", f"{SERVICES.format(ns=namespace)}/{spec.name}", None))
            jobs.append(("DELETE", f"{SLICES.format(ns=namespace)}/{spec.name}-1", None))
        return self.run(jobs, ok=(200, 202, 404))

    def wait_gone(self, namespace: str, timeout: float = 300.0,
                  alive: Callable[[], None] = lambda: None) -> None:
        """Until the API server lists no Service and no EndpointSlice in
        `namespace`."""
        conn = self._conn()
        deadline = time.monotonic() + timeout
        try:
            while True:
                if not any(self.request(conn, "GET", kind.format(ns=namespace) + "?limit=1")
                           .get("items") for kind in (SERVICES, SLICES)):
                    return
                alive()
                if time.monotonic() > deadline:
                    raise TimeoutError(f"Services or EndpointSlices in {namespace} still there "
                                       f"after {timeout} s")
                time.sleep(0.5)
        finally:
            conn.close()


    def addresses_held(self, ips: set[str]) -> set[str]:
        """Which of `ips` the API server lists an IPAddress object for (the
        ClusterIP allocator's record that an address is taken)."""
        conn = self._conn()
        held: set[str] = set()
        token = ""
        try:
            while True:
                query = f"?limit=5000&continue={token}" if token else "?limit=5000"
                page = self.request(conn, "GET", IPADDRESSES + query)
                held |= {item["metadata"]["name"] for item in page.get("items") or ()} & ips
                token = (page.get("metadata") or {}).get("continue") or ""
                if not token:
                    return held
        finally:
            conn.close()


@dataclass(frozen=True)
class Erased:
    """Keys EtcdEraser.erase found and deleted, by kind."""

    services: int
    slices: int
    addresses: int  # IPAddress objects: the API server's, which it may have removed


class EtcdEraser:
    """Erases what ApiWriter.create made, straight from etcd (see the module's
    docstring for why), while no proxy runs: the Services first, so that
    the API server's ClusterIP repair never meets a Service whose IPAddress
    object is gone (it would make it again), then their EndpointSlices and
    IPAddress objects. Through etcd's JSON gateway, in transactions of at
    most 128 deletions (etcd's default --max-txn-ops)."""

    TXN_OPS = 128

    def __init__(self, etcd_url: str) -> None:
        self.url = etcd_url.rstrip("/")

    def erase(self, specs: Sequence[ServiceSpec], namespace: str) -> Erased:
        """Deletes each Service's keys; counts, per kind, those that were there."""
        return Erased(
            services=self._delete([ETCD_SERVICE.format(ns=namespace, name=s.name)
                                   for s in specs]),
            slices=self._delete([ETCD_SLICE.format(ns=namespace, name=f"{s.name}-1")
                                 for s in specs]),
            addresses=self._delete([ETCD_IPADDRESS.format(ip=s.cluster_ip) for s in specs]),
        )

    def erase_addresses(self, ips: Sequence[str]) -> int:
        """The IPAddress objects of `ips`; how many were there."""
        return self._delete([ETCD_IPADDRESS.format(ip=ip) for ip in ips])

    def _delete(self, keys: Sequence[str]) -> int:
        deleted = 0
        for start in range(0, len(keys), self.TXN_OPS):
            ops = [{"requestDeleteRange": {"key": base64.b64encode(k.encode()).decode()}}
                   for k in keys[start:start + self.TXN_OPS]]
            answer = self._post("/v3/kv/txn", {"success": ops})
            for response in answer.get("responses", []):
                deleted += int(response.get("response_delete_range", {}).get("deleted", 0))
        return deleted

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"},
                                     method="POST")
        with urllib.request.urlopen(req, timeout=60) as resp:
            return dict(json.load(resp))
