"""A small client of the Kubernetes API: JSON in, JSON out, one error type.

    KubeClient.load(kubeconfig)      a kubeconfig file, or the in-cluster
                                     ServiceAccount when None
    get / create / replace / patch / delete(path)      one object
    list(path)                       every object (paginated), and the list's
                                     resourceVersion
    watch(path, resource_version)    a WatchStream of events, closable from
                                     another thread

Requests go through the `kubernetes` package's ApiClient (kubeconfig and
in-cluster loading, TLS, bearer tokens and their refresh), but objects stay
plain dicts: the model parses them itself (agent/model/parse.py), so nothing
is converted twice and nothing depends on generated model classes.

Every failure leaves this module as KubeApiError with the HTTP status (0 when
no answer came: refused, reset, timed out) and the API's message, so the
callers above (sources, reports, the operator) handle one error type.

`Api` is the interface they use; tests hand them a fake that implements it
(tests/unit/kubefake.py) instead of patching this module.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import quote

from agent.errors import ConfigError, KubeApiError

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
    server: str
    ca_path: str | None = None
    insecure: bool = False
    scheme: str | None = None  # "Bearer"
    token: str | None = None
    certificate_path: str | None = None
    private_key_path: str | None = None


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


class _Watch:
    """A streaming watch response read line by line (one JSON event a line)."""

    def __init__(self, response: Any, what: str) -> None:
        self._response = response
        self._what = what
        self._lock = threading.Lock()
        self._closed = False

    def __iter__(self) -> Iterator[Obj]:
        buffer = bytearray()
        try:
            for chunk in self._response.stream(amt=None, decode_content=True):
                buffer.extend(chunk)
                while (end := buffer.find(b"\n")) >= 0:
                    line, buffer = bytes(buffer[:end]), buffer[end + 1:]
                    if line.strip():
                        yield json.loads(line)
        except ValueError as err:
            if not self._closed:
                raise KubeApiError(self._what, 0, f"malformed watch event: {err}") from None
        except Exception as err:  # urllib3/ssl/socket errors: the stream broke
            if not self._closed:
                raise KubeApiError(self._what, 0, f"watch broken: {err}") from None
        finally:
            self.close()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        # shutdown() unblocks a reader stuck in recv() in another thread.
        for step in ("shutdown", "release_conn"):
            try:
                getattr(self._response, step)()
            except Exception:  # already closed or never opened: nothing to undo
                log.debug("closing watch of %s: %s failed", self._what, step)


class KubeClient:
    """Api over the `kubernetes` package's ApiClient."""

    def __init__(self, api_client: Any) -> None:
        self._api = api_client

    @staticmethod
    def load(kubeconfig: str | None = None) -> KubeClient:
        """From a kubeconfig file, or from the Pod's ServiceAccount when None."""
        from kubernetes import client, config

        configuration = client.Configuration()
        try:
            if kubeconfig:
                config.load_kube_config(  # type: ignore[no-untyped-call]
                    config_file=kubeconfig, client_configuration=configuration)
            else:
                config.load_incluster_config(  # type: ignore[no-untyped-call]
                    client_configuration=configuration)
        except (config.ConfigException, OSError) as err:
            where = kubeconfig or "the in-cluster ServiceAccount (use --kubeconfig outside a Pod)"
            raise ConfigError(f"cannot load Kubernetes credentials from {where}: {err}") from None
        # A failed request surfaces to the caller, who retries on its own terms.
        configuration.retries = False
        return KubeClient(client.ApiClient(configuration))

    @property
    def server(self) -> str:
        return str(self._api.configuration.host)

    def credentials(self) -> Credentials:
        """How to reach the API server, for another client (kopf's login).
        The token is read afresh each time (an in-cluster one rotates)."""
        c = self._api.configuration
        header = c.get_api_key_with_prefix("BearerToken", alias="authorization") or ""
        scheme, _, token = str(header).partition(" ")
        return Credentials(
            server=str(c.host),
            ca_path=c.ssl_ca_cert or None,
            insecure=not c.verify_ssl,
            scheme=scheme if token else None,
            token=token or None,
            certificate_path=c.cert_file or None,
            private_key_path=c.key_file or None,
        )

    def _call(
        self,
        method: str,
        path: str,
        query: Sequence[tuple[str, str]] = (),
        body: Mapping[str, Any] | None = None,
        content_type: str = "application/json",
        timeout: tuple[float, float] = REQUEST_TIMEOUT,
    ) -> Any:
        """The urllib3 response of one request with status 2xx, unread."""
        what = f"{method} {path}"
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        try:
            request = self._api.param_serialize(
                method=method, resource_path=path, query_params=list(query),
                header_params=headers, body=dict(body) if body is not None else None,
                auth_settings=["BearerToken"],
            )
            response = self._api.call_api(*request, _request_timeout=timeout).response
        except Exception as err:  # urllib3, ssl, socket, ApiException(status=0)
            raise KubeApiError(what, int(getattr(err, "status", 0) or 0),
                               str(getattr(err, "reason", None) or err)) from None
        if not 200 <= response.status <= 299:
            try:
                data = response.data
            except Exception:
                data = b""
            finally:
                response.release_conn()
            message, reason = _message(response.status, data)
            raise KubeApiError(what, response.status, message, reason)
        return response

    def _json(self, method: str, path: str, **kwargs: Any) -> Obj:
        response = self._call(method, path, **kwargs)
        what = f"{method} {path}"
        try:
            data = response.data
        except Exception as err:
            raise KubeApiError(what, 0, f"reading the answer: {err}") from None
        finally:
            response.release_conn()
        try:
            out = json.loads(data) if data else {}
        except ValueError as err:
            raise KubeApiError(what, 0, f"malformed answer: {err}") from None
        if not isinstance(out, dict):
            raise KubeApiError(what, 0, "malformed answer: not an object")
        return out

    def get(self, path: str) -> Obj:
        return self._json("GET", path)

    def list(self, path: str, field_selector: str = "") -> tuple[list[Obj], str]:
        items: list[Obj] = []
        token = ""
        while True:
            query = [("limit", str(LIST_PAGE))] + ([("continue", token)] if token else [])
            if field_selector:
                query.append(("fieldSelector", field_selector))
            page = self._json("GET", path, query=query, timeout=(5.0, 60.0))
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
        # The server ends the watch after timeout_seconds; reading longer than
        # that without a byte means the connection is dead.
        response = self._call("GET", path, query=query, timeout=(5.0, timeout_seconds + 30.0))
        return _Watch(response, f"watch {path}")

    def create(self, path: str, body: Mapping[str, Any]) -> Obj:
        return self._json("POST", path, body=body)

    def replace(self, path: str, body: Mapping[str, Any]) -> Obj:
        return self._json("PUT", path, body=body)

    def patch(self, path: str, body: Mapping[str, Any]) -> Obj:
        """A JSON merge patch (RFC 7386)."""
        return self._json("PATCH", path, body=body, content_type="application/merge-patch+json")

    def delete(self, path: str) -> Obj:
        return self._json("DELETE", path)
