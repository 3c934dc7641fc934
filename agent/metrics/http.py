"""The agent's HTTP endpoints, as kube-proxy serves them.

    --metrics-bind-address (default 0.0.0.0:10249)
        /metrics     Prometheus text format (agent/metrics/collect.py)
        /healthz     "ok": the process answers
        /proxyMode   the datapath mode ("ebpf")
    --healthz-bind-address (default 0.0.0.0:10256)
        /healthz, /livez   200 while no change has waited longer than the health
                           timeout (twice --max-sync-interval, as kube-proxy uses
                           twice its sync period) for a successful pass; 503 after.
                           JSON body with lastUpdated and currentTime, as kube-proxy's.

Each listener is a ThreadingHTTPServer on its own thread; a scrape never
blocks the reconciler (it reads counters and map sizes, no compute).
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import logging
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING

from agent.errors import ConfigError
from agent.metrics import exposition
from agent.metrics.collect import Gatherer, families

if TYPE_CHECKING:
    from agent.daemon import Agent

log = logging.getLogger(__name__)

Route = Callable[[], tuple[int, str, str]]  # -> (status, content type, body)


def parse_bind_address(value: str, flag: str) -> tuple[str, int]:
    """IP:PORT ([v6]:PORT); an empty IP means all IPv4 addresses, as kube-proxy."""
    host, sep, port = value.rpartition(":")
    host = host.strip("[]") or "0.0.0.0"
    try:
        if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
            raise ValueError
        ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(f"{flag}: expected IP:PORT, got {value!r}") from None
    return host, int(port)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class _Server6(_Server):
    address_family = socket.AF_INET6


class HttpEndpoint:
    """One listener serving a few fixed paths."""

    def __init__(self, name: str, bind: str, flag: str, routes: dict[str, Route]) -> None:
        self.name = name
        self.flag = flag
        self.host, self.port = parse_bind_address(bind, flag)
        self.routes = routes
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        routes = self.routes

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                route = routes.get(self.path.split("?", 1)[0])
                if route is None:
                    status, ctype, body = 404, "text/plain", f"no such path: {self.path}\n"
                else:
                    try:
                        status, ctype, body = route()
                    except Exception as err:  # a scrape must not kill the listener
                        log.exception("serving %s failed", self.path)
                        status, ctype, body = 500, "text/plain", f"{err}\n"
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: object) -> None:
                log.debug("%s: " + format, self.address_string(), *args)

        server_class = _Server6 if ":" in self.host else _Server
        try:
            self._server = server_class((self.host, self.port), Handler)
        except OSError as err:
            raise ConfigError(f"{self.flag} {self.host}:{self.port}: cannot listen: "
                              f"{err.strerror or err}") from None
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, name=self.name, daemon=True
        )
        self._thread.start()
        log.info("%s serving on %s:%d", self.name, self.host, self.port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None


def metrics_endpoint(agent: Agent, bind: str) -> HttpEndpoint:
    gatherer = Gatherer(agent)

    def metrics() -> tuple[int, str, str]:
        return 200, exposition.CONTENT_TYPE, exposition.render(families(gatherer.gather()))

    return HttpEndpoint("metrics", bind, "--metrics-bind-address", {
        "/metrics": metrics,
        "/healthz": lambda: (200, "text/plain", "ok"),
        "/proxyMode": lambda: (200, "text/plain", agent.mode[0]),
    })


def _rfc3339(timestamp: float) -> str:
    if not timestamp:
        return ""
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).isoformat().replace(
        "+00:00", "Z")


def health(agent: Agent, timeout: float, now: float | None = None) -> tuple[int, str, str]:
    """kube-proxy's proxier health: healthy unless a change has waited longer
    than `timeout` for a successful pass."""
    t = agent.telemetry.snapshot()
    now = time.time() if now is None else now
    pending = t.oldest_pending_time
    healthy = not pending or now - pending < timeout
    body = {
        "lastUpdated": _rfc3339(t.last_success_time),
        "currentTime": _rfc3339(now),
        "nodeEligible": True,
        "healthy": healthy,
    }
    if not healthy:
        body["reason"] = (
            f"a change has waited {now - pending:.0f}s (more than {timeout:.0f}s) "
            "for a successful sync"
        )
    return (200 if healthy else 503), "application/json", json.dumps(body) + "\n"


def healthz_endpoint(agent: Agent, bind: str) -> HttpEndpoint:
    timeout = 2 * agent.config.max_sync_interval

    def check() -> tuple[int, str, str]:
        return health(agent, timeout)

    return HttpEndpoint("healthz", bind, "--healthz-bind-address",
                        {"/healthz": check, "/livez": check})
