"""healthCheckNodePort servers, answering as kube-proxy's do.

For each Service with externalTrafficPolicy: Local and a healthCheckNodePort,
an HTTP server on that port answers every GET with

    200 (local endpoints > 0) or 503 (none, or the proxy is unhealthy)
    Content-Type: application/json
    X-Content-Type-Options: nosniff
    X-Load-Balancing-Endpoint-Weight: <local endpoints>
    {"service": {"namespace": ..., "name": ...}, "localEndpoints": N,
     "serviceProxyHealthy": true|false}

so a cloud load balancer sends traffic only to nodes that can serve it.
Servers follow DesiredState.health_checks: started when a port appears,
stopped when it goes, their count swapped in place otherwise.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from agent.compute.types import HealthCheck

log = logging.getLogger(__name__)


class _Server:
    def __init__(self, check: HealthCheck, healthy: Callable[[], bool], bind: str) -> None:
        self.check = check
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                current = owner.check
                proxy_ok = healthy()
                body = json.dumps({
                    "service": {"namespace": current.namespace, "name": current.name},
                    "localEndpoints": current.local_endpoints,
                    "serviceProxyHealthy": proxy_ok,
                }).encode() + b"\n"
                ok = current.local_endpoints > 0 and proxy_ok
                self.send_response(200 if ok else 503)
                self.send_header("Content-Type", "application/json")
                self.send_header("X-Content-Type-Options", "nosniff")
                self.send_header("X-Load-Balancing-Endpoint-Weight",
                                 str(current.local_endpoints))
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                del format, args  # one line per load-balancer probe is noise

        self.httpd = ThreadingHTTPServer((bind, check.port), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever,
                                       name=f"healthcheck-{check.port}", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class ServiceHealthServers:
    def __init__(self, healthy: Callable[[], bool], bind: str = "0.0.0.0") -> None:
        self._healthy = healthy
        self._bind = bind
        self._servers: dict[int, _Server] = {}

    def sync(self, checks: Iterable[HealthCheck]) -> list[str]:
        """Make the running servers match `checks`; returns problems (ports
        that could not be bound), which do not stop the others."""
        problems = []
        wanted = {c.port: c for c in checks}
        for port in [p for p in self._servers if p not in wanted]:
            self._servers.pop(port).stop()
            log.info("stopped health check server on :%d", port)
        for port, check in wanted.items():
            server = self._servers.get(port)
            if server is not None:
                server.check = check
                continue
            try:
                self._servers[port] = _Server(check, self._healthy, self._bind)
                log.info("health check for %s/%s on :%d", check.namespace, check.name, port)
            except OSError as err:
                problems.append(f"healthCheckNodePort {port} of {check.namespace}/"
                                f"{check.name}: {err}")
        return problems

    def stop(self) -> None:
        for server in self._servers.values():
            server.stop()
        self._servers.clear()
