"""The agent's listening sockets, started first and stopped first.

    --api-socket PATH             veer.v1 gRPC API (agent/api/server.py), root only
    --api-address 127.0.0.1:PORT  the same API on loopback TCP (optional)
    --metrics-bind-address IP:PORT   /metrics in Prometheus format (agent/metrics/)
    --healthz-bind-address IP:PORT   /healthz, kube-proxy's health check

Each is off when its option is empty. A socket that cannot be bound stops
the agent at start with the reason: an agent nobody can ask is a worse
failure than one that does not start.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from agent.daemon import Agent

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeOptions:
    """Where the agent listens; "" turns a listener off (the default here: the
    command line supplies the production defaults)."""

    api_socket: str = ""
    api_address: str = ""
    metrics_bind_address: str = ""
    healthz_bind_address: str = ""


class _Listener(Protocol):
    def start(self) -> None: ...

    def stop(self) -> None: ...


class Servers:
    def __init__(self, agent: Agent, options: ServeOptions) -> None:
        self.options = options
        self._listeners: list[_Listener] = []
        if options.api_socket or options.api_address:
            from agent.api.server import ApiServer

            self.api: ApiServer | None = ApiServer(agent, options.api_socket, options.api_address)
            self._listeners.append(self.api)
        else:
            self.api = None
        if options.metrics_bind_address or options.healthz_bind_address:
            from agent.metrics.http import healthz_endpoint, metrics_endpoint

            if options.metrics_bind_address:
                self._listeners.append(metrics_endpoint(agent, options.metrics_bind_address))
            if options.healthz_bind_address:
                self._listeners.append(healthz_endpoint(agent, options.healthz_bind_address))
        self._started: list[_Listener] = []

    def start(self) -> None:
        for listener in self._listeners:
            try:
                listener.start()
            except BaseException:
                self.stop()
                raise
            self._started.append(listener)

    def stop(self) -> None:
        while self._started:
            listener = self._started.pop()
            try:
                listener.stop()
            except Exception:  # stopping the rest matters more
                log.exception("stopping %s failed", type(listener).__name__)
