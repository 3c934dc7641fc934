"""A small client of the Kubernetes API: JSON in, JSON out, one error type.

    KubeClient.load(kubeconfig)      a kubeconfig file, or the in-cluster
                                     ServiceAccount when None
    get / create / replace / patch / delete(path)      one object
    list(path)                       every object (paginated), and the list's
                                     resourceVersion
    watch(path, resource_version)    a WatchStream of events, closable from
                                     another thread

Credentials come from kubeconfig.py (a kubeconfig, or the ServiceAccount
with its rotating token) and requests go over transport.py (http.client and
ssl, kept-alive connections, watches on connections of their own): the
standard library only, since the `kubernetes` package and what it imports
cost the agent about 19 MiB of its resident memory. Objects stay plain dicts:
the model parses them itself (agent/model/parse.py), so nothing is converted
twice and nothing depends on generated model classes.

Every failure leaves this module as KubeApiError with the HTTP status (0 when
no answer came: refused, reset, timed out) and the API's message, so the
callers above (sources, reports, the operator) handle one error type.

`Api` is the interface they use; tests hand them a fake that implements it
(tests/unit/kubefake.py) instead of patching this module.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import quote, urlencode

from agent.errors import KubeApiError
from agent.kube import kubeconfig
from agent.kube.kubeconfig import Access
from agent.kube.transport import Stream, Transport

log = logging.getLogger(__name__)

Obj = dict[str, Any]

# (connect, read) seconds for one ordinary request.
REQUEST_TIMEOUT = (5.0, 30.0)
LIST_PAGE = 500


@dataclass(frozen=True)
class Resource:
    """One kind of the API, and how to build its paths."""

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def path(self, namespace: str | None = None, name: str | None = None,
             subresource: str | None = None) -> str:
        """/api/v1/namespaces/NS/services/NAME[/status]; without `namespace`,
        the cluster-wide collection (or a cluster-scoped object)."""
        base = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        if self.namespaced and namespace:
            base += f"/namespaces/{quote(namespace, safe='')}"
        base += f"/{self.plural}"
        if name:
            base += f"/{quote(name, safe='')}"
            if subresource:
                base += f"/{subresource}"
        return base

    def __str__(self) -> str:
        return f"{self.plural}.{self.group}" if self.group else self.plural


SERVICES = Resource("", "v1", "services", "Service", True)
ENDPOINT_SLICES = Resource("discovery.k8s.io", "v1", "endpointslices", "EndpointSlice", True)
NODES = Resource("", "v1", "nodes", "Node", False)
PODS = Resource("", "v1", "pods", "Pod", True)
DAEMON_SETS = Resource("apps", "v1", "daemonsets", "DaemonSet", True)
LEASES = Resource("coordination.k8s.io", "v1", "leases", "Lease", True)
TRAFFIC_POLICIES = Resource("veer.dev", "v1alpha1", "trafficpolicies", "TrafficPolicy", True)
VEER_NODES = Resource("veer.dev", "v1alpha1", "veernodes", "VeerNode", False)


@dataclass(frozen=True)
class Credentials:
    """How to reach the API server, for another client (kopf's login). TLS
    material is a path or PEM text (from a kubeconfig's -data), never both."""

    server: str
    ca_path: str | None = None
    ca_data: str | None = None
    insecure: bool = False
    scheme: str | None = None  # "Bearer"
    token: str | None = None
    certificate_path: str | None = None
    certificate_data: str | None = None
    private_key_path: str | None = None
    private_key_data: str | None = None


class WatchStream(Protocol):
    """Events of one watch request ({"type": ..., "object": {...}}), until the
    server ends it; `close()` (from any thread) ends it early."""

    def __iter__(self) -> Iterator[Obj]: ...

    def close(self) -> None: ...


class Api(Protocol):
    """What veer needs from the API server (KubeClient, or a fake in tests)."""

    @property
    def server(self) -> str: ...

    def get(self, path: str) -> Obj: ...

    def list(self, path: str, field_selector: str = "") -> tuple[list[Obj], str]: ...

    def watch(self, path: str, resource_version: str, timeout_seconds: int,
              field_selector: str = "") -> WatchStream: ...

    def create(self, path: str, body: Mapping[str, Any]) -> Obj: ...

    def replace(self, path: str, body: Mapping[str, Any]) -> Obj: ...

    def patch(self, path: str, body: Mapping[str, Any]) -> Obj: ...

    def delete(self, path: str) -> Obj: ...


def _message(status: int, data: bytes) -> tuple[str, str]:
    """(message, reason) from an API Status body, or the raw text."""
    try:
        body = json.loads(data)
    except ValueError:
        return data.decode(errors="replace").strip()[:500] or f"HTTP {status}", ""
    if isinstance(body, dict):
        return str(body.get("message") or f"HTTP {status}"), str(body.get("reason") or "")
    return f"HTTP {status}", ""


def _ok(status: int) -> bool:
    return 200 <= status <= 299


class _Watch:
    """A watch response: one JSON event a line."""

    def __init__(self, stream: Stream, what: str) -> None:
        self._stream = stream
        self._what = what

    def __iter__(self) -> Iterator[Obj]:
        for line in self._stream.lines():
            try:
                event = json.loads(line)
            except ValueError as err:
                self._stream.close()
                raise KubeApiError(self._what, 0, f"malformed watch event: {err}") from None
            if not isinstance(event, dict):
                self._stream.close()
                raise KubeApiError(self._what, 0, "malformed watch event: not an object")
            yield event

    def close(self) -> None:
        self._stream.close()


class KubeClient:
    """Api over one Transport to the API server of `access`."""

    def __init__(self, access: Access) -> None:
        self._access = access
        self._transport = Transport(access)

    @staticmethod
    def load(kubeconfig_path: str | None = None) -> KubeClient:
        """From a kubeconfig file, or from the Pod's ServiceAccount when None;
        ConfigError (naming the file and field) when they cannot be used."""
        if kubeconfig_path:
            return KubeClient(kubeconfig.from_kubeconfig(kubeconfig_path))
        return KubeClient(kubeconfig.in_cluster())

    @property
    def server(self) -> str:
        return self._access.server

    def credentials(self) -> Credentials:
        """How to reach the API server, for another client (kopf's login).
        The token is read afresh each time (an in-cluster one rotates)."""
        a = self._access
        token = a.token()
        return Credentials(
            server=a.server,
            ca_path=a.ca.path if a.ca else None,
            ca_data=a.ca.data if a.ca else None,
            insecure=a.insecure,
            scheme="Bearer" if token else None,
            token=token or None,
            certificate_path=a.certificate.path if a.certificate else None,
            certificate_data=a.certificate.data if a.certificate else None,
            private_key_path=a.private_key.path if a.private_key else None,
            private_key_data=a.private_key.data if a.private_key else None,
        )

    def close(self) -> None:
        """Close the idle connections."""
        self._transport.close()

    def _json(
        self,
        method: str,
        path: str,
        query: Sequence[tuple[str, str]] = (),
        body: Mapping[str, Any] | None = None,
        content_type: str = "application/json",
        timeout: tuple[float, float] = REQUEST_TIMEOUT,
    ) -> Obj:
        """The JSON object answered to one request; KubeApiError unless 2xx."""
        what = f"{method} {path}"
        target = f"{path}?{urlencode(query)}" if query else path
        data = json.dumps(body).encode() if body is not None else None
        answer = self._transport.request(what, method, target, data,
                                         content_type if data is not None else None, timeout)
        if not _ok(answer.status):
            message, reason = _message(answer.status, answer.body)
            raise KubeApiError(what, answer.status, message, reason)
        try:
            out = json.loads(answer.body) if answer.body else {}
        except ValueError as err:
            raise KubeApiError(what, 0, f"malformed answer: {err}") from None
        if not isinstance(out, dict):
            raise KubeApiError(what, 0, "malformed answer: not an object")
        return out

    def get(self, path: str) -> Obj:
        return self._json("GET", path)

    def list(self, path: str, field_selector: str = "") -> tuple[list[Obj], str]:
        """Every object, in pages of LIST_PAGE, and the list's resourceVersion.

        A continue token lives as long as etcd keeps the list's revision (about
        five minutes): a list paged slower than that gets 410 Gone for its next
        page. Listing again from the first page could expire again the same
        way, so it is fetched whole in one answer instead, as client-go's
        pager does (FullListIfExpired)."""
        items: list[Obj] = []
        token = ""
        selector = [("fieldSelector", field_selector)] if field_selector else []
        while True:
            query = [("limit", str(LIST_PAGE))] + ([("continue", token)] if token else [])
            try:
                page = self._json("GET", path, query=query + selector, timeout=(5.0, 60.0))
            except KubeApiError as err:
                if err.status != 410 or not token:
                    raise
                log.info("list of %s: page token expired (%s); listing it whole", path,
                         err.message)
                page = self._json("GET", path, query=selector, timeout=(5.0, 300.0))
                items = []
            items.extend(page.get("items") or [])
            meta = page.get("metadata") or {}
            token = meta.get("continue") or ""
            if not token:
                return items, str(meta.get("resourceVersion") or "")

    def watch(self, path: str, resource_version: str, timeout_seconds: int,
              field_selector: str = "") -> WatchStream:
        query = [
            ("watch", "true"),
            ("allowWatchBookmarks", "true"),
            ("resourceVersion", resource_version),
            ("timeoutSeconds", str(timeout_seconds)),
        ]
        if field_selector:
            query.append(("fieldSelector", field_selector))
        what = f"watch {path}"
        # The server ends the watch after timeout_seconds; reading longer than
        # that without a byte means the connection is dead. (A server gone
        # silent is noticed sooner, by TCP keepalive: transport.KEEPALIVE.)
        stream = self._transport.stream(what, f"{path}?{urlencode(query)}",
                                        (5.0, timeout_seconds + 30.0))
        if not _ok(stream.status):
            message, reason = _message(stream.status, stream.body())
            raise KubeApiError(what, stream.status, message, reason)
        return _Watch(stream, what)

    def create(self, path: str, body: Mapping[str, Any]) -> Obj:
        return self._json("POST", path, body=body)

    def replace(self, path: str, body: Mapping[str, Any]) -> Obj:
        return self._json("PUT", path, body=body)

    def patch(self, path: str, body: Mapping[str, Any]) -> Obj:
        """A JSON merge patch (RFC 7386)."""
        return self._json("PATCH", path, body=body, content_type="application/merge-patch+json")

    def delete(self, path: str) -> Obj:
        return self._json("DELETE", path)
