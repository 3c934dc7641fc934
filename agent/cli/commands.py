"""The `veer` debug commands: ask the node's agent over its API, print the answer.

    veer status                                  the agent at a glance
    veer services [-n NAMESPACE]                 every Service, its frontends and backends
    veer service NS/NAME                         one Service in detail
    veer conntrack [--address IP] [--port N]     translated sockets and per-packet flows
    veer explain --dst IP --port N [--src IP] [--protocol TCP|UDP]
                 [--from-pid PID | --from-netns PATH]
                                                 what the kernel does with that connection
    veer maps [--diff]                           desired vs actual map contents
    veer resync                                  force a full reconcile pass
    veer observe [--follow] [--namespace NS] [--service NAME] [--verdict V ...] [--last N]
                                                 flow events: refusals, drops, denials,
                                                 and translations while followed

Each takes --socket PATH (default /run/veer/veer.sock) or --api-address
IP:PORT, and -o table|json|yaml. Exit codes: 0 done, 1 the agent answered
with an error, 2 bad usage, 3 no agent reachable.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from agent.cli import render
from agent.cli.options import PORT, PORT_OR_ANY, UINT32_MAX, integer, seconds
from agent.defaults import DEFAULT_SOCKET
from agent.errors import ConfigError

if TYPE_CHECKING:
    from agent.cli.client import Client

SO_NETNS_COOKIE = 71  # <asm-generic/socket.h>, Linux 5.14+

_COOKIE_PROGRAM = (
    "import socket; s = socket.socket(); "
    f"print(int.from_bytes(s.getsockopt(socket.SOL_SOCKET, {SO_NETNS_COOKIE}, 8), 'little'))"
)


def netns_cookie(pid: int | None, netns: str | None) -> int:
    """The cookie of a process's (or a namespace file's) network namespace,
    read from a socket made inside it; 0 when neither is given."""
    if pid is None and not netns:
        return 0
    target = f"/proc/{pid}/ns/net" if pid is not None else str(netns)
    try:
        res = subprocess.run(
            ["nsenter", f"--net={target}", sys.executable, "-c", _COOKIE_PROGRAM],
            capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as err:  # no nsenter(1), or it hung
        raise ConfigError(f"cannot enter the network namespace {target}: {err}") from None
    if res.returncode != 0:
        raise ConfigError(f"cannot enter the network namespace {target}: "
                       f"{res.stderr.strip() or res.returncode}")
    return int(res.stdout.strip())


COMMANDS = ("status", "services", "service", "conntrack", "explain", "maps", "resync",
            "observe")
# Verdict classes of flow events (the API's Verdict enum); other --verdict
# values are reasons (FlowEvent.reason), which the agent checks.
FLOW_VERDICTS = ("translate", "refuse", "unreachable", "drop", "deny")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--socket", metavar="PATH", default=DEFAULT_SOCKET,
                   help=f"the agent's API socket (default {DEFAULT_SOCKET})")
    p.add_argument("--api-address", metavar="IP:PORT", default="",
                   help="reach the agent's API on this TCP address instead of the socket")
    p.add_argument("-o", "--output", choices=render.FORMATS, default="table",
                   help="output format (default: table)")


def add_debug_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    _common(sub.add_parser("status", help="the node's agent at a glance"))
    p = sub.add_parser("services", help="Services with their frontends and backends")
    p.add_argument("-n", "--namespace", default="", help="only this namespace")
    _common(p)
    p = sub.add_parser("service", help="one Service in detail")
    p.add_argument("name", metavar="NAMESPACE/NAME")
    _common(p)
    p = sub.add_parser("conntrack", help="translated sockets and per-packet flows")
    p.add_argument("--address", default="", metavar="IP",
                   help="only entries with IP among their addresses (a socket's backend or "
                        "Service; a flow's client, frontend, source or backend)")
    p.add_argument("--port", type=PORT_OR_ANY, default=0,
                   help="only entries with this port among theirs (default 0: any)")
    p.add_argument("--limit", type=integer(1, UINT32_MAX), default=1000, metavar="N",
                   help="at most N per-packet flows (default 1000; the count says how many "
                        "matched)")
    _common(p)
    p = sub.add_parser("explain", help="what the kernel does with a connection, from the maps")
    p.add_argument("--src", default="", metavar="IP", help="the client's address")
    p.add_argument("--dst", required=True, metavar="IP", help="the address dialled")
    p.add_argument("--port", type=PORT, required=True, help="the port dialled (1-65535)")
    p.add_argument("--protocol", type=str.upper, choices=("TCP", "UDP"), default="TCP")
    who = p.add_mutually_exclusive_group()
    who.add_argument("--from-pid", type=integer(1), metavar="PID",
                     help="the client is this process (its network namespace keys ClientIP "
                     "affinity): name the backend its affinity entry will pick")
    who.add_argument("--from-netns", metavar="PATH",
                     help="the same for a network namespace file (/run/netns/NAME, "
                     "/proc/PID/ns/net)")
    _common(p)
    p = sub.add_parser("maps", help="desired vs actual map contents")
    p.add_argument("--diff", action="store_true", help="only their difference")
    _common(p)
    p = sub.add_parser("resync", help="force a full reconcile pass and wait for it")
    p.add_argument("--timeout", type=seconds(), default=30.0, metavar="SECONDS",
                   help="how long to wait for the pass (default 30, at most a day)")
    _common(p)
    p = sub.add_parser(
        "observe", help="flow events from the kernel: refusals, drops, denials, translations",
        description="Without --follow: the flow events the agent keeps (the last 1,000 "
        "refusals, drops and denials, and the last 1,000 translations). "
        "With --follow: new events until Ctrl-C; translations are traced while a follower's "
        "--verdict filter admits them (refusals, drops and denials are always reported).")
    p.add_argument("-f", "--follow", action="store_true",
                   help="stream new events until interrupted")
    p.add_argument("-n", "--namespace", default="", help="only Services in this namespace")
    p.add_argument("--service", default="", metavar="[NS/]NAME[:PORT]",
                   help="only this Service (PORT: the Service port's name)")
    p.add_argument("--verdict", nargs="+", action="extend", default=[], metavar="V",
                   type=lambda v: v.lower().replace("-", "_"),
                   help=f"only these verdicts ({', '.join(FLOW_VERDICTS)}) or reasons "
                   "(refused_no_backend, nat_drop, ...)")
    # The API's field is a uint32: a larger N would not fit the request.
    p.add_argument("--last", type=integer(0, UINT32_MAX), default=0, metavar="N",
                   help="without --follow: only the last N events (default: all kept)")
    _common(p)


def _emit(args: argparse.Namespace, data: Any, draw: Callable[[], str]) -> None:
    sys.stdout.write(draw() if args.output == "table" else render.render_data(data, args.output))


def run_debug_command(args: argparse.Namespace) -> int:
    """Run one debug command; VeerErrors (unreachable, API errors) go to the caller."""
    from agent.cli.client import Client

    now = time.time()
    with Client(args.socket, args.api_address) as client:
        cmd = args.command
        if cmd == "status":
            data = client.status()
            _emit(args, data, lambda: render.render_status(data, now))
        elif cmd == "services":
            data = client.services(args.namespace)
            _emit(args, data, lambda: render.render_services(data["services"]))
        elif cmd == "service":
            namespace, sep, name = args.name.partition("/")
            if not sep or not namespace or not name:
                print("veer service: expected NAMESPACE/NAME, e.g. default/web", file=sys.stderr)
                return 2
            data = client.service(namespace, name)
            _emit(args, data, lambda: render.render_service(data))
        elif cmd == "conntrack":
            data = client.conntrack(args.address, args.port, args.limit)
            _emit(args, data, lambda: render.render_conntrack(data))
        elif cmd == "explain":
            cookie = netns_cookie(args.from_pid, args.from_netns)
            data = client.explain(args.src, args.dst, args.port, args.protocol, cookie)
            dialled = render.l4(args.dst, args.port, args.protocol)
            _emit(args, data, lambda: render.render_explain(data, dialled, args.src))
        elif cmd == "maps":
            data = client.maps()
            _emit(args, data, lambda: render.render_maps(data, args.diff))
            if args.diff and not data["in_sync"]:
                return 1  # as diff(1): 1 means "they differ"
        elif cmd == "resync":
            data = client.resync(args.timeout)
            _emit(args, data, lambda: render.render_resync(data, time.time()))
        elif cmd == "observe":
            return _observe(args, client)
    return 0


def _observe(args: argparse.Namespace, client: Client) -> int:
    verdicts = [v for v in args.verdict if v in FLOW_VERDICTS]
    reasons = [v for v in args.verdict if v not in FLOW_VERDICTS]
    if not args.follow:
        events = list(client.observe(args.namespace, args.service, verdicts, reasons,
                                     last=args.last))
        _emit(args, {"events": events}, lambda: render.render_flows(events))
        return 0

    def started(translations: str) -> None:
        sys.stderr.write(render.render_follow_start(translations))
        sys.stderr.flush()
        if args.output == "table":
            sys.stdout.write(render.render_flow_header())
            sys.stdout.flush()

    try:
        for event in client.observe(args.namespace, args.service, verdicts, reasons,
                                    follow=True, on_start=started):
            if args.output == "json":  # one object per line
                sys.stdout.write(json.dumps(event, sort_keys=True) + "\n")
            elif args.output == "yaml":
                sys.stdout.write("---\n" + render.render_data(event, "yaml"))
            else:
                sys.stdout.write(render.render_flow(event))
            sys.stdout.flush()
    except BrokenPipeError:  # `veer observe -f | head`: the reader is done
        with contextlib.suppress(OSError):
            sys.stdout.close()
    return 0
