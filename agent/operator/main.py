"""`veer operator`: elect a leader, then run kopf until told to stop.

    veer operator [--kubeconfig PATH] [--leader-elect
                  --leader-elect-resource-namespace NS --leader-elect-resource-name NAME
                  --leader-elect-identity ID] [--healthz-bind-address IP:PORT]

    main thread:  signals, the Lease (lease.py): wait to lead, then renew
    kopf thread:  its own event loop; kopf.run(standalone=True, clusterwide=True)
                  with the handlers of handlers.py, until its stop flag is set

Without --leader-elect the operator acts at once (one replica). With it, a
replica acts only while it holds the Lease: when it cannot renew, it stops
kopf and exits with status 1 (its Pod restarts as a candidate), so two
replicas never write statuses at once. SIGTERM stops kopf, releases the
Lease and exits 0. /healthz answers 200 while the process does what its role
needs (waiting, or leading with kopf running), 503 otherwise.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Mapping
from types import FrameType
from typing import Any

from agent.cli.options import PORT_OR_ANY
from agent.defaults import DEFAULT_AGENT_PORTS
from agent.kube.client import KubeClient
from agent.operator.conditions import AGENT_PORTS, agent_ports
from agent.operator.lease import LeaderElector

log = logging.getLogger("veer.operator")

KOPF_STOP_TIMEOUT = 20.0


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("operator", help="run the cluster-wide TrafficPolicy operator")
    p.add_argument("--kubeconfig", metavar="PATH",
                   help="the API server and credentials of this kubeconfig (default: the "
                   "Pod's ServiceAccount)")
    p.add_argument("--leader-elect", action="store_true",
                   help="act only while holding a coordination.k8s.io Lease (for several "
                   "replicas)")
    p.add_argument("--leader-elect-resource-namespace", metavar="NS",
                   default=os.environ.get("POD_NAMESPACE") or "veer-system",
                   help="the Lease's namespace (default: $POD_NAMESPACE, or veer-system)")
    p.add_argument("--leader-elect-resource-name", metavar="NAME", default="veer-operator",
                   help="the Lease's name (default veer-operator)")
    p.add_argument("--leader-elect-identity", metavar="ID", default="",
                   help="this replica's name in the Lease (default: $POD_NAME, or "
                   "host_pid_random)")
    p.add_argument("--leader-elect-lease-duration", type=float, default=15.0,
                   metavar="SECONDS", help=argparse.SUPPRESS)
    p.add_argument("--leader-elect-renew-deadline", type=float, default=10.0,
                   metavar="SECONDS", help=argparse.SUPPRESS)
    p.add_argument("--leader-elect-retry-period", type=float, default=2.0,
                   metavar="SECONDS", help=argparse.SUPPRESS)
    p.add_argument("--healthz-bind-address", metavar="IP:PORT", default="",
                   help="serve /healthz here (default: off)")
    defaults = {what: port for port, what in DEFAULT_AGENT_PORTS}
    p.add_argument("--agent-metrics-port", type=PORT_OR_ANY, default=defaults["metrics"],
                   metavar="PORT",
                   help="the port of the agents' --metrics-bind-address, which a "
                        "TrafficPolicy redirect cannot take (0: none; default %(default)s)")
    p.add_argument("--agent-healthz-port", type=PORT_OR_ANY, default=defaults["health"],
                   metavar="PORT",
                   help="the port of the agents' --healthz-bind-address (0: none; "
                        "default %(default)s)")
    p.add_argument("-v", "--verbose", action="store_true")


def default_identity() -> str:
    return (os.environ.get("POD_NAME")
            or f"{socket.gethostname()}_{os.getpid()}_{uuid.uuid4().hex[:6]}")


class KopfThread:
    """kopf in a thread of its own, with its own event loop and stop flag."""

    def __init__(self, api: KubeClient, identity: str, verbose: bool = False,
                 agent: Mapping[int, str] = AGENT_PORTS) -> None:
        self.api = api
        self.identity = identity
        self.verbose = verbose
        self.agent = agent
        self.stop_flag = threading.Event()
        self.thread = threading.Thread(target=self._run, name="kopf", daemon=True)
        self.error: BaseException | None = None

    def _run(self) -> None:
        import kopf

        from agent.operator.handlers import StatusWriter, make_registry

        writer = StatusWriter(self.api, agent=self.agent)
        registry = make_registry(writer)
        api = self.api

        @kopf.on.login(registry=registry)
        def login(**_: Any) -> kopf.ConnectionInfo:
            c = api.credentials()
            return kopf.ConnectionInfo(
                server=c.server, ca_path=c.ca_path, ca_data=c.ca_data, insecure=c.insecure,
                scheme=c.scheme, token=c.token, certificate_path=c.certificate_path,
                certificate_data=c.certificate_data, private_key_path=c.private_key_path,
                private_key_data=c.private_key_data,
            )

        settings = kopf.OperatorSettings()
        settings.posting.reporting_component = "veer-operator"
        settings.posting.reporting_instance = self.identity
        # Notice a silently dead connection: the server ends a watch within
        # 5 minutes, so no byte for longer means it is gone.
        settings.watching.server_timeout = 300
        settings.watching.client_timeout = 330
        settings.watching.connect_timeout = 5
        settings.networking.connect_timeout = 5
        # Do not watch CRDs for resources added later: the chart installs the
        # CRDs before the operator and grants it no access to CRDs.
        settings.scanning.disabled = True
        if not self.verbose:  # "Handler ... succeeded" on every Service event
            logging.getLogger("kopf.objects").setLevel(logging.WARNING)
        try:
            kopf.run(registry=registry, settings=settings, standalone=True, clusterwide=True,
                     stop_flag=self.stop_flag)
        except BaseException as err:  # reported by the main thread
            self.error = err
            log.exception("kopf stopped with an error")

    def start(self) -> None:
        self.thread.start()

    def stop(self, elector: LeaderElector | None = None) -> None:
        """Stop kopf and wait for it; a leader keeps renewing its Lease
        meanwhile, so no other replica acts before this one has stopped."""
        self.stop_flag.set()
        deadline = time.monotonic() + KOPF_STOP_TIMEOUT
        while self.thread.is_alive() and time.monotonic() < deadline:
            self.thread.join(elector.retry_period if elector is not None else 1.0)
            if elector is not None and elector.leading:
                elector.renew()
        if self.thread.is_alive():
            log.warning("kopf did not stop within %.0fs", KOPF_STOP_TIMEOUT)

    def alive(self) -> bool:
        return self.thread.is_alive()


def run(args: argparse.Namespace) -> int:
    """The operator's main loop; returns the exit status."""
    client = KubeClient.load(args.kubeconfig)
    identity = args.leader_elect_identity or default_identity()
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s; stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    elector: LeaderElector | None = None
    if args.leader_elect:
        elector = LeaderElector(
            client, args.leader_elect_resource_namespace, args.leader_elect_resource_name,
            identity, lease_duration=args.leader_elect_lease_duration,
            renew_deadline=args.leader_elect_renew_deadline,
            retry_period=args.leader_elect_retry_period,
        )
    kopf_thread: KopfThread | None = None

    def healthy() -> tuple[int, str, str]:
        if kopf_thread is not None and not kopf_thread.alive() and not stop.is_set():
            return 503, "text/plain", "kopf is not running\n"
        role = "leading" if kopf_thread is not None else "waiting for the Lease"
        return 200, "text/plain", f"ok ({role})\n"

    health = None
    if args.healthz_bind_address:
        from agent.metrics.http import HttpEndpoint

        health = HttpEndpoint("operator-healthz", args.healthz_bind_address,
                              "--healthz-bind-address", {"/healthz": healthy})
        health.start()
    status = 0
    try:
        log.info("veer operator %s starting against %s", identity, client.server)
        if elector is not None and not elector.acquire(stop):
            return 0
        kopf_thread = KopfThread(client, identity, args.verbose,
                                 agent_ports(args.agent_metrics_port, args.agent_healthz_port))
        kopf_thread.start()
        period = elector.retry_period if elector is not None else 1.0
        while not stop.wait(period):
            if not kopf_thread.alive():
                log.error("kopf stopped; exiting")
                status = 1
                break
            if elector is not None and not elector.renew():
                status = 1  # lost: stop acting before another replica takes over
                break
    finally:
        if kopf_thread is not None:
            kopf_thread.stop(elector)
        if elector is not None and status == 0:
            elector.release()
        if health is not None:
            health.stop()
    return status
