"""The gRPC server inside the agent: veer.v1.Agent on a Unix socket and,
if asked, on a loopback TCP port.

The socket is root-only: it is bound inside a fresh 0700 directory next to
its final path, made 0600, and only then renamed into place, so there is no
moment at which another user could connect. Its directory is created 0700
when missing. A socket file left by an agent that is gone is replaced; a
socket some live agent still answers on is an error (two agents on one node
would fight over the maps). On stop the socket file is removed if it is
still ours.

Every call reads; only Resync asks for work (a full reconcile pass), and it
goes through the runner like any other pass. Calls run on a small thread
pool, concurrently with the reconciler: map reads are single syscalls and
the write order keeps every published frontend complete. A following
Observe holds one thread for as long as its client listens, so the pool has
room for the most followers the flow hub accepts on top of the other calls.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import logging
import math
import os
import shutil
import socket
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import TYPE_CHECKING, Any

import grpc

from agent import __version__
from agent.api import proto, views
from agent.api.explain import explain
from agent.compute import compute_desired
from agent.compute.types import DesiredState
from agent.datapath.flows import MAX_SUBSCRIBERS, TooManySubscribers
from agent.datapath.inspect import DatapathReader, reader_for
from agent.errors import ConfigError, VeerError

if TYPE_CHECKING:
    from agent.daemon import Agent
    from agent.datapath.ebpf.programs import AttachedProgram

log = logging.getLogger(__name__)

RESYNC_TIMEOUT = 30.0
# The longest Resync wait asked for: a day, as `veer resync --timeout`
# allows; far longer would overflow the wait (threading.TIMEOUT_MAX).
RESYNC_TIMEOUT_MAX = 86400.0
UNIX_PATH_MAX = 107  # sun_path holds 108 bytes, NUL included
CALL_WORKERS = 4  # threads for the short calls
FOLLOW_POLL = 0.5  # how often a follower's stream notices that its client left
# Per-packet flows one Conntrack answer carries unless asked for more: the
# map holds 262,144, which would take seconds to decode and overflow a
# gRPC message.
DEFAULT_FLOW_LIMIT = 1000


def _alive(path: str) -> bool:
    """Whether some process accepts connections on the Unix socket `path`."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except OSError:
            return False
    return True


def parse_loopback(address: str, flag: str) -> tuple[str, int]:
    """HOST:PORT with HOST a loopback address (the API has no authentication)."""
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    try:
        if not sep or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(f"{flag}: expected IP:PORT, got {address!r}") from None
    if not ip.is_loopback:
        raise ConfigError(
            f"{flag}: {host} is not a loopback address; the API has no authentication, "
            "so it listens on loopback only (use 127.0.0.1 or ::1)"
        )
    return host, int(port)


def _rpc(method: Callable[[_Servicer, Any, Any], Any]) -> Callable[[_Servicer, Any, Any], Any]:
    """Errors veer raises on purpose become a status with their message."""

    @functools.wraps(method)
    def call(self: _Servicer, request: Any, context: Any) -> Any:
        try:
            return method(self, request, context)
        except VeerError as err:
            context.abort(grpc.StatusCode.INTERNAL, str(err))

    return call


def _sockmap_status(datapath: Any) -> str:
    usable, why = getattr(datapath, "sockmap", (False, "not offered by this datapath"))
    return f"usable ({why})" if usable else f"off: {why}"


class _Servicer:
    """veer.v1.Agent; method names are the RPC names."""

    def __init__(self, agent: Agent, reader: DatapathReader) -> None:
        self.agent = agent
        self.reader = reader
        self.pb = proto.load().pb2

    # ---- helpers -----------------------------------------------------------

    def _desired(self) -> DesiredState:
        """The desired state for the current snapshot (compute is pure and cheap),
        so backends' conditions and frontends always describe the same view."""
        agent = self.agent
        return compute_desired(agent.store.snapshot(), agent.node_identity(),
                               agent.compute_config)

    def _cgroup(self) -> str:
        from agent.datapath.ebpf.env import cgroup2_root

        return self.agent.config.cgroup or cgroup2_root()

    def _programs(self) -> list[AttachedProgram]:
        if self.agent.datapath.name != "ebpf":
            return []
        from agent.datapath.ebpf.programs import attached_programs

        return attached_programs(self._cgroup())

    # ---- calls -------------------------------------------------------------

    @_rpc
    def Status(self, request: Any, context: Any) -> Any:
        pb, agent = self.pb, self.agent
        desired = self._desired()
        failed = dict(agent.reconciler.failed_frontends)
        mode, why = agent.mode
        report = agent.source.last_report
        msg = pb.StatusResponse(
            version=__version__,
            node_name=agent.config.node_name,
            mode=mode,
            mode_reason=why,
            datapath=agent.datapath.name,
            kernel=views.kernel_release(),
            cgroup=self._cgroup() if agent.datapath.name == "ebpf" else "",
            bpffs=agent.config.bpffs,
            skipped=[views.problem_message(pb, p) for p in desired.problems],
            frontends=len(desired.frontends),
            frontends_failed=len([k for k in failed if k in desired.frontends]),
            start_time=agent.telemetry.snapshot().start_time,
            features_found=list(agent.kernel_features[0]),
            features_missing=list(agent.kernel_features[1]),
            sockmap=_sockmap_status(agent.datapath),
            source=pb.SourceStatus(
                kind=agent.source.kind,
                location=agent.source.location,
                synced=agent.store.synced,
                files=report.files,
                objects=report.objects,
                problems=list(report.problems),
            ),
        )
        for program in self._programs():
            msg.programs.append(
                pb.AttachedProgram(hook=program.hook, id=program.prog_id, name=program.name)
            )
        for usage in agent.datapath.usage():
            msg.maps.append(pb.MapUsage(name=usage.name, entries=usage.entries,
                                        capacity=usage.capacity))
        for name, value in agent.datapath.counters().items():
            msg.counters.append(pb.Counter(name=name, value=value))
        sync = views.sync_message(pb, agent.telemetry.snapshot())
        if sync is not None:
            msg.sync.CopyFrom(sync)
        return msg

    @_rpc
    def ListServices(self, request: Any, context: Any) -> Any:
        agent = self.agent
        services = views.service_messages(
            self.pb, agent.store.snapshot(), self._desired(), self.reader.read(),
            dict(agent.reconciler.failed_frontends), agent.compute_config,
            namespace=request.namespace,
        )
        return self.pb.ListServicesResponse(services=services)

    @_rpc
    def GetService(self, request: Any, context: Any) -> Any:
        agent = self.agent
        if not request.namespace or not request.name:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "namespace and name are required")
        found = views.service_messages(
            self.pb, agent.store.snapshot(), self._desired(), self.reader.read(),
            dict(agent.reconciler.failed_frontends), agent.compute_config,
            namespace=request.namespace, name=request.name,
        )
        if not found:
            context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"no Service {request.namespace}/{request.name} in this agent's view "
                f"(source: {agent.source.location})",
            )
        return found[0]

    @_rpc
    def Conntrack(self, request: Any, context: Any) -> Any:
        address = None
        if request.address:
            try:
                address = ipaddress.ip_address(request.address)
            except ValueError:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                              f"{request.address!r} is not an IP address")
        actual, desired = self.reader.read(), self._desired()
        entries = views.socket_messages(
            self.pb, self.reader.sockets(), actual, desired,
            address=address, port=request.port,
        )
        matching, total = self.reader.nat_flows(address, request.port,
                                                request.limit or DEFAULT_FLOW_LIMIT)
        flows = views.flow_messages(self.pb, matching, actual, desired,
                                    address=address, port=request.port)
        return self.pb.ConntrackResponse(sockets=entries,
                                         capacity=self.reader.sockets_capacity(),
                                         flows=flows, flows_total=total,
                                         flows_capacity=self.reader.nat_flows_capacity())

    @_rpc
    def Explain(self, request: Any, context: Any) -> Any:
        try:
            destination = ipaddress.ip_address(request.destination)
            if request.source:
                ipaddress.ip_address(request.source)
        except ValueError as err:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        if not 0 < request.port < 65536:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "port must be in 1..65535")
        result = explain(
            self.reader, destination, request.port, request.protocol or "TCP",
            self._desired().frontends, request.client_netns_cookie,
            ipaddress.ip_address(request.source) if request.source else None,
        )
        return views.explain_message(self.pb, result)

    @_rpc
    def Maps(self, request: Any, context: Any) -> Any:
        return views.maps_message(self.pb, self._desired(), self.reader.read(),
                                  self.agent.config.bpffs)

    @_rpc
    def Resync(self, request: Any, context: Any) -> Any:
        agent = self.agent
        # Any client may call, not only the CLI (which checks too): a NaN
        # deadline never passes and never fails, an infinite one overflows.
        asked_timeout = request.timeout_seconds
        if not (math.isfinite(asked_timeout) and 0 <= asked_timeout <= RESYNC_TIMEOUT_MAX):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"timeout_seconds must be in 0..{RESYNC_TIMEOUT_MAX:g} "
                          f"(0: {RESYNC_TIMEOUT:g}), not {asked_timeout}")
        if not agent.store.synced:
            context.abort(
                grpc.StatusCode.UNAVAILABLE,
                "the source has not delivered a complete view yet; nothing is programmed "
                "until it has",
            )
        timeout = asked_timeout or RESYNC_TIMEOUT
        deadline = time.monotonic() + timeout
        asked = time.time()
        # A pass already running when we ask may clear the request for a full
        # pass when it ends; ask again until a full pass ends after our request.
        while True:
            before = agent.telemetry.passes
            agent.reconciler.request_full()
            agent.runner.run()
            record = agent.telemetry.wait_for_pass(before, deadline - time.monotonic())
            if record is None:
                context.abort(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"no full reconcile pass completed within {timeout:g}s",
                )
            if record is not None and record.full and record.end_time >= asked:
                break
        return self.pb.ResyncResponse(
            sync=views.sync_message(self.pb, agent.telemetry.snapshot())
        )

    def Observe(self, request: Any, context: Any) -> Iterator[Any]:
        # A generator: errors are turned into statuses here, not by @_rpc.
        pb, hub = self.pb, self.agent.flows
        try:
            flow_filter = views.flow_filter(pb, request)
        except ValueError as err:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        if not request.follow:
            for event in hub.recent(flow_filter, request.last):
                yield views.flow_message(pb, event)
            return
        try:
            sub = hub.subscribe(flow_filter)
        except TooManySubscribers as err:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(err))
        with sub:
            # Registered (and translations traced if wanted): tell the client,
            # so that it knows events from now on will reach it.
            context.send_initial_metadata(
                (("veer-translations", "traced" if sub.translations else "off"),))
            while context.is_active():
                delivery = sub.get(FOLLOW_POLL)
                lost = delivery.lost
                for event in delivery.events:
                    yield views.flow_message(pb, event, lost)
                    lost = 0


class ApiServer:
    """veer.v1.Agent served on a Unix socket (and optionally loopback TCP)."""

    def __init__(self, agent: Agent, socket_path: str, address: str = "") -> None:
        if not socket_path and not address:
            raise ConfigError("the API needs a socket path or an address")
        if socket_path and len(os.fsencode(socket_path)) > UNIX_PATH_MAX - 20:
            raise ConfigError(
                f"--api-socket {socket_path}: too long for a Unix socket "
                f"(at most {UNIX_PATH_MAX - 20} bytes here)"
            )
        self.address = parse_loopback(address, "--api-address") if address else None
        self.agent = agent
        self.socket_path = socket_path
        self.port = 0
        self._server: Any = None
        self._inode: int | None = None

    def start(self) -> None:
        gen = proto.load()
        reader = reader_for(self.agent.datapath)
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=CALL_WORKERS + MAX_SUBSCRIBERS,
                                       thread_name_prefix="api"),
            options=[("grpc.so_reuseport", 0)],
        )
        gen.grpc.add_AgentServicer_to_server(_Servicer(self.agent, reader), server)
        try:
            if self.socket_path:
                self._bind_unix(server, self.socket_path)
            if self.address:
                host, port = self.address
                target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
                try:
                    self.port = server.add_insecure_port(target)
                except RuntimeError as err:
                    raise ConfigError(f"--api-address {target}: cannot listen: {err}") from None
            server.start()
        except BaseException:
            server.stop(0)
            self._remove_socket()
            raise
        self._server = server
        where = [p for p in (self.socket_path,
                             self.address and f"{self.address[0]}:{self.port}") if p]
        log.info("API serving on %s", " and ".join(str(w) for w in where))

    def _bind_unix(self, server: Any, path: str) -> None:
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            os.makedirs(parent, mode=0o700)
            os.chmod(parent, 0o700)  # makedirs' mode is filtered by the umask
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            mode = None
        if mode is not None:
            if not stat.S_ISSOCK(mode):
                raise ConfigError(f"--api-socket {path}: exists and is not a socket")
            if _alive(path):
                raise ConfigError(
                    f"--api-socket {path}: another veer agent answers there; stop it first "
                    "(one agent per node owns the maps)"
                )
            os.unlink(path)  # stale: its agent is gone
        private = tempfile.mkdtemp(prefix=".veer-api-", dir=parent)  # mode 0700
        try:
            staged = os.path.join(private, "sock")
            try:
                server.add_insecure_port(f"unix:{staged}")
            except RuntimeError as err:
                raise ConfigError(f"--api-socket {path}: cannot bind: {err}") from None
            os.chmod(staged, 0o600)
            os.rename(staged, path)
            self._inode = os.lstat(path).st_ino
        finally:
            shutil.rmtree(private, ignore_errors=True)

    def _remove_socket(self) -> None:
        if self._inode is None:
            return
        with contextlib.suppress(FileNotFoundError):
            if os.lstat(self.socket_path).st_ino == self._inode:
                os.unlink(self.socket_path)
        self._inode = None

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=1.0).wait(5)
            self._server = None
        self._remove_socket()

