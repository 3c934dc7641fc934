"""The `veer` command.

    veer agent --manifests DIR --node-name NAME [--cgroup PATH] [--bpffs PATH]
               [--mode auto|ebpf|tproxy] [--service-cidr CIDR,...]
    veer agent --cleanup [--cgroup PATH] [--bpffs PATH]
    veer agent --kubernetes [--kubeconfig PATH] --node-name NAME [...]
    veer operator [--kubeconfig PATH] [--leader-elect ...]   (agent/operator/main.py)
    veer sandbox [--keep] [--nodes N]
    veer status | services | service NS/NAME | conntrack | explain | maps | resync | observe
                                  ask this node's agent (agent/cli/commands.py)
    veer version

Errors veer raises on purpose (VeerError) end the command with their message
and exit code 2 (3 when no agent answers the debug commands, 1 when it
answers with an error); anything else is a bug and shows its traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from agent import __version__
from agent.cli.commands import COMMANDS, add_debug_commands, run_debug_command
from agent.cli.options import UID_MAX, integer, seconds
from agent.config import DEFAULT_BPFFS, NODEPORT_MODES, AgentConfig, parse_cidrs
from agent.defaults import DEFAULT_HEALTHZ, DEFAULT_METRICS, DEFAULT_SOCKET
from agent.errors import ConfigError, VeerError
from agent.operator.main import add_parser as add_operator_parser

if TYPE_CHECKING:
    from agent.kube.runtime import KubeRuntime
    from agent.model.snapshot import Store
    from agent.sources import Source

log = logging.getLogger("veer")


def _agent_ports(metrics: str, healthz: str) -> tuple[tuple[int, str], ...]:
    """The ports this agent serves on, by what (a bind address "" is off)."""
    from agent.metrics.http import parse_bind_address
    from agent.operator.conditions import agent_ports

    ports = (parse_bind_address(metrics, "--metrics-bind-address")[1] if metrics else 0,
             parse_bind_address(healthz, "--healthz-bind-address")[1] if healthz else 0)
    return tuple(agent_ports(*ports).items())


def _agent_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("agent", help="run the node agent (or remove what it made)")
    p.add_argument("--manifests", metavar="DIR", help="read Kubernetes objects from DIR")
    p.add_argument("--kubernetes", action="store_true",
                   help="follow the Kubernetes API server (the Pod's ServiceAccount unless "
                   "--kubeconfig)")
    p.add_argument("--kubeconfig", metavar="PATH",
                   help="with --kubernetes: the API server and credentials of this kubeconfig")
    p.add_argument("--cleanup-on-uninstall", action=argparse.BooleanOptionalAction,
                   default=None,
                   help="with --kubernetes (default on): on SIGTERM, if the agent's DaemonSet "
                   "is being deleted (veer is uninstalled), do what --cleanup does")
    p.add_argument("--owner-daemonset", metavar="NAMESPACE/NAME", default="",
                   help="the agent's DaemonSet, for --cleanup-on-uninstall (default: the "
                   "owner of the Pod POD_NAMESPACE/POD_NAME)")
    p.add_argument("--node-name", metavar="NAME", help="this node's name (its Node object)")
    p.add_argument(
        "--cgroup",
        metavar="PATH",
        help="cgroup2 directory whose sockets are served (default: the cgroup2 root)",
    )
    p.add_argument("--bpffs", metavar="PATH", default=DEFAULT_BPFFS,
                   help=f"bpffs directory for pins (default {DEFAULT_BPFFS})")
    p.add_argument("--mode", choices=("auto", "ebpf", "tproxy"), default="auto")
    p.add_argument("--service-cidr", metavar="CIDR,...", default="",
                   help="Service ranges: addresses in them without a Service are refused")
    p.add_argument("--devices", metavar="IFACE,...", default="",
                   help="network devices that get the per-packet (NodePort/ExternalIP/LB) "
                   "programs (default: those holding the node's addresses)")
    p.add_argument("--cluster-cidr", metavar="CIDR,...", default="",
                   help="the cluster's pod ranges, as for kube-proxy: a pod on another node "
                   "reaching an externalTrafficPolicy: Local NodePort/LB is served cluster-wide")
    p.add_argument("--nodeport-mode", choices=NODEPORT_MODES, default="snat",
                   help="a flow from outside to a backend on another node is source-NATed "
                   "to this node, so that the replies come back through it (snat, the "
                   "default), or sent on without SNAT, the backend's node answering the "
                   "client itself from the frontend's address (dsr, direct server return; "
                   "every node must run it, and it needs --cluster-cidr)")
    p.add_argument("--hide-kernel-feature", action="append", default=[], metavar="NAME",
                   help="pretend the kernel lacks this feature (e.g. helper:sched_cls:"
                   "bpf_redirect_neigh), to test --mode auto's choice; repeatable")
    p.add_argument("--nodeport-addresses", metavar="CIDR,...", default="",
                   help="NodePorts answer only on the node's addresses inside these ranges "
                   "(default: all of the node's addresses, from its Node object)")
    p.add_argument("--service-proxy-name", metavar="NAME", default=None,
                   help="also serve Services whose label "
                   "service.kubernetes.io/service-proxy-name is NAME")
    p.add_argument("--min-sync-interval", type=seconds(zero=True), default=0.0,
                   metavar="SECONDS",
                   help="pace reconcile passes: after a burst of 4 back to back, at most "
                   "one per this long; passes that find nothing to do are not counted "
                   "(default 0: a pass per change)")
    p.add_argument("--max-sync-interval", type=seconds(), default=60.0, metavar="SECONDS",
                   help="a full reconcile pass at least this often (default 60, at most "
                   "a day)")
    p.add_argument("--status-file", metavar="PATH",
                   help="write a JSON summary of the programmed state after every sync "
                   "(at most every 0.5 s; the last one of a burst always)")
    p.add_argument("--api-socket", metavar="PATH", default=DEFAULT_SOCKET,
                   help=f"serve the veer API (the `veer` debug commands) on this Unix socket, "
                   f"root only (default {DEFAULT_SOCKET}; '' turns it off)")
    p.add_argument("--api-address", metavar="IP:PORT", default="",
                   help="also serve the API on this loopback TCP address (default: off)")
    p.add_argument("--metrics-bind-address", metavar="IP:PORT", default=DEFAULT_METRICS,
                   help=f"serve /metrics (Prometheus) here (default {DEFAULT_METRICS}, "
                   "kube-proxy's; '' turns it off)")
    p.add_argument("--healthz-bind-address", metavar="IP:PORT", default=DEFAULT_HEALTHZ,
                   help=f"serve /healthz here (default {DEFAULT_HEALTHZ}, kube-proxy's; "
                   "'' turns it off)")
    p.add_argument("--proxy-uid", type=integer(0, UID_MAX), default=None, metavar="UID",
                   help="the uid the node-local proxy of TrafficPolicy redirects runs as: "
                   "its own connections are balanced, never redirected back to it "
                   "(default: none, and redirects are not done)")
    p.add_argument("--sockmap", action="store_true",
                   help="sockmap acceleration for every Service: same-node TCP connections "
                   "are spliced socket to socket where the start-up probe allows it (a "
                   "TrafficPolicy's acceleration.sockmap asks for it per Service)")
    p.add_argument("--cleanup", action="store_true",
                   help="remove every program, pin and rule veer made, then exit")
    p.add_argument("-v", "--verbose", action="store_true")


def _cleanup(cgroup: str | None, bpffs: str) -> list[str]:
    """What `veer agent --cleanup` does; one line per thing removed."""
    from agent.datapath.ebpf.env import cgroup2_root
    from agent.datapath.ebpf.programs import cleanup
    from agent.datapath.tproxy.cleanup import cleanup as cleanup_tproxy

    cgroup = cgroup or cgroup2_root()
    lines = [*cleanup(cgroup, bpffs), *cleanup_tproxy()]
    return [*lines, f"cleanup of {cgroup}, {bpffs} and this namespace's nftables and "
            "routing done"]


def run_agent(args: argparse.Namespace) -> int:
    if args.cleanup:
        for line in _cleanup(args.cgroup, args.bpffs):
            log.info("%s", line)
        return 0

    from agent.collector import pace_for_agent
    from agent.daemon import Agent, choose_mode, open_datapath
    from agent.serve import ServeOptions

    pace_for_agent()

    config = AgentConfig(
        node_name=args.node_name or "",
        manifests=args.manifests,
        cgroup=args.cgroup,
        bpffs=args.bpffs,
        mode=args.mode,
        service_cidrs=parse_cidrs(args.service_cidr, "--service-cidr"),
        nodeport_addresses=parse_cidrs(args.nodeport_addresses, "--nodeport-addresses"),
        devices=tuple(d.strip() for d in args.devices.split(",") if d.strip()),
        cluster_cidrs=parse_cidrs(args.cluster_cidr, "--cluster-cidr"),
        nodeport_mode=args.nodeport_mode,
        service_proxy_name=args.service_proxy_name,
        min_sync_interval=args.min_sync_interval,
        max_sync_interval=args.max_sync_interval,
        kubernetes=args.kubernetes,
        kubeconfig=args.kubeconfig,
        cleanup_on_uninstall=(args.kubernetes if args.cleanup_on_uninstall is None
                              else args.cleanup_on_uninstall),
        proxy_uid=args.proxy_uid,
        sockmap=args.sockmap,
        agent_ports=_agent_ports(args.metrics_bind_address, args.healthz_bind_address),
    )
    choice = choose_mode(config, tuple(args.hide_kernel_feature))
    mode, why = choice.mode, choice.why
    log.info("datapath mode %s (%s)", mode, why)
    serve = ServeOptions(
        api_socket=args.api_socket,
        api_address=args.api_address,
        metrics_bind_address=args.metrics_bind_address,
        healthz_bind_address=args.healthz_bind_address,
    )
    runtimes: list[KubeRuntime] = []
    source: Callable[[Store], Source] | None = None
    if config.kubernetes:
        from agent.kube.client import KubeClient
        from agent.kube.report import Identity
        from agent.kube.runtime import KubeRuntime, Uninstall

        api = KubeClient.load(config.kubeconfig)
        pod_name = os.environ.get("POD_NAME", "")
        identity = Identity(mode, why, pod_name, agent_ports=config.agent_ports)
        uninstall = None
        if config.cleanup_on_uninstall:
            owner = None
            if args.owner_daemonset:
                namespace, _, name = args.owner_daemonset.partition("/")
                if not namespace or not name:
                    raise ConfigError(f"--owner-daemonset: {args.owner_daemonset!r} is not "
                                      "NAMESPACE/NAME")
                owner = (namespace, name)
            uninstall = Uninstall(owner, os.environ.get("POD_NAMESPACE", ""), pod_name)

        def source(store: Store) -> Source:
            runtimes.append(KubeRuntime(api, store, config.node_name, identity, uninstall))
            return runtimes[-1]

    log.info("sockmap acceleration %s (%s)", "usable" if choice.sockmap[0] else "off",
             choice.sockmap[1])
    agent = Agent(config, open_datapath(config, mode, choice.sockmap),
                  status_file=args.status_file,
                  mode=(mode, why), serve=serve, source=source,
                  kernel_features=(choice.found, choice.missing))
    for runtime in runtimes:
        runtime.attach(agent)
    agent.run_forever()
    if config.cleanup_on_uninstall:
        for runtime in runtimes:
            runtime.finish(lambda: _cleanup(config.cgroup, config.bpffs))
    return 0


def run_operator(args: argparse.Namespace) -> int:
    from agent.operator.main import run

    return run(args)


def run_sandbox(args: argparse.Namespace) -> int:
    if args.nodes > 1:
        from agent.sandbox.multinode_demo import run_multinode_demo

        return run_multinode_demo(args.nodes, args.requests, args.keep)
    from agent.sandbox.demo import run_demo

    return run_demo(keep=args.keep, requests=args.requests)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="veer", description="veer: eBPF kube-proxy replacement")
    sub = parser.add_subparsers(dest="command", required=True)
    _agent_parser(sub)
    sb = sub.add_parser("sandbox", help="build a one-machine demo cluster, send traffic, report")
    sb.add_argument("--keep", action="store_true",
                    help="keep the sandbox running until Ctrl-C and print how to reach it")
    sb.add_argument("--nodes", type=integer(1, 8), default=1, metavar="N",
                    help="nodes (1-8); with 2 or more, show NodePort traffic from outside "
                    "under both traffic policies")
    sb.add_argument("--requests", type=integer(1), default=300,
                    help="connections per Service for the report (default 300)")
    sb.add_argument("-v", "--verbose", action="store_true")
    add_operator_parser(sub)
    add_debug_commands(sub)
    sub.add_parser("version", help="print the version")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    logging.basicConfig(
        level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        if args.command == "agent":
            return run_agent(args)
        if args.command == "sandbox":
            return run_sandbox(args)
        if args.command == "operator":
            return run_operator(args)
        if args.command in COMMANDS:
            return run_debug_command(args)
        print(f"veer {__version__}")
        return 0
    except VeerError as err:
        code = getattr(err, "exit_code", 2)
        if code == 3:  # unreachable: the message says it all
            print(err, file=sys.stderr)
        else:
            prefix = f"veer {args.command}" if args.command in COMMANDS else "veer"
            print(f"{prefix}: {err}", file=sys.stderr)
        return int(code)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
