#!/usr/bin/env python3
"""What a TrafficPolicy redirect adds: one HTTP request per new connection to
a node-local HAProxy, reached through a redirected Service versus dialled
directly, latency p50/p99 per connection.

    .venv/bin/python bench/redirect.py [--quick]        (make bench-redirect)

Setup: the single-node sandbox (agent/sandbox/cluster.py), the agent with
--proxy-uid 65534; HAProxy on the node's address 10.0.0.1:15001, running as
nobody, forwarding each request to the client's original destination
(`server 0.0.0.0:0`, which it learns with SO_ORIGINAL_DST); Service `redir`
(10.96.4.1:80 -> web-a, web-b) with a TrafficPolicy `redirect: {port: 15001}`.
The client pod opens connections one after another, each carrying one
request (agent.sandbox.probe), to

  direct     10.0.0.1:15002   HAProxy dialled directly (its second frontend)
  redirected 10.96.4.1:80     connect() is sent to HAProxy by veer; HAProxy
                              asks SO_ORIGINAL_DST and connects to 10.96.4.1:80,
                              which veer balances to web-a/web-b

For the direct path to do the same work, HAProxy's second frontend on
10.0.0.1:15002 forwards to 10.96.4.2:80, a plain Service over the same pods:
so both paths are client -> HAProxy -> a balanced Service -> nginx, and the
difference is what the redirect itself costs (the connect() rewrite, the
sockops and getsockopt programs). Paths interleave round by round.

Results: a Markdown table on stdout and in bench/results/redirect-<time>.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchlib import write_results  # noqa: E402

from agent.sandbox.cluster import SandboxCluster  # noqa: E402
from tests.datapath.manifests import POD_IPS  # noqa: E402

NODE_IP, PROXY_UID = "10.0.0.1", 65534
REDIRECTED, PLAIN = "10.96.4.1", "10.96.4.2"
HAPROXY = """\
global
    user nobody
    group nogroup
    maxconn 4096
defaults
    mode http
    timeout connect 3s
    timeout client 10s
    timeout server 10s
frontend redirected
    bind {node}:15001
    default_backend original
backend original
    server original 0.0.0.0:0
frontend direct
    bind {node}:15002
    default_backend plain
backend plain
    server plain {plain}:80
"""


def manifests() -> str:
    docs: list[dict[str, Any]] = []
    for name, vip in (("redir", REDIRECTED), ("plain", PLAIN)):
        docs.append({"apiVersion": "v1", "kind": "Service",
                     "metadata": {"name": name, "namespace": "default"},
                     "spec": {"clusterIP": vip, "ports": [
                         {"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080}]}})
        docs.append({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                     "metadata": {"name": f"{name}-1", "namespace": "default",
                                  "labels": {"kubernetes.io/service-name": name}},
                     "addressType": "IPv4",
                     "ports": [{"name": "http", "protocol": "TCP", "port": 8080}],
                     "endpoints": [{"addresses": [POD_IPS[p]], "conditions": {"ready": True}}
                                   for p in ("web-a", "web-b")]})
    docs.append({"apiVersion": "veer.dev/v1alpha1", "kind": "TrafficPolicy",
                 "metadata": {"name": "redir", "namespace": "default"},
                 "spec": {"targetRefs": [{"name": "redir"}],
                          "redirect": {"port": 15001, "mode": "EBPF"}}})
    return "\n---\n".join(json.dumps(d) for d in docs) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="one round of 200 connections")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--count", type=int, default=2000, help="connections per path per round")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = p.parse_args()
    if args.quick:
        args.rounds, args.count = 1, 200
    started = time.monotonic()
    paths = {"direct": (NODE_IP, "15002"), "redirected": (REDIRECTED, "80")}
    got: dict[str, dict[str, list[float]]] = {n: {"p50": [], "p99": []} for n in paths}
    with SandboxCluster() as c:
        c.start_agent(extra=["--proxy-uid", str(PROXY_UID)])
        topo = c.topo
        topo.ns(topo.node_ns, "ip", "addr", "add", f"{NODE_IP}/32", "dev", "lo")
        cfg = Path(topo.workdir) / "haproxy.cfg"
        cfg.write_text(HAPROXY.format(node=NODE_IP, plain=PLAIN))
        topo.spawn(topo.node_ns, ["haproxy", "-db", "-f", str(cfg)])
        deadline = time.monotonic() + 30
        while "15002" not in topo.ns(topo.node_ns, "ss", "-ltn").stdout:
            if time.monotonic() > deadline:
                raise RuntimeError("haproxy did not start")
            time.sleep(0.1)
        c.write_manifest("bench.yaml", manifests())
        for vip in (REDIRECTED, PLAIN):
            c.wait_frontend(f"{vip}:80/TCP", [f"{POD_IPS[x]}:8080/TCP" for x in ("web-a",
                                                                                  "web-b")])
        c.wait_status(lambda s: "default/redir" in s.get("policies", {}), what="redir in force")
        for rnd in range(args.rounds):
            order = list(paths) if rnd % 2 == 0 else list(reversed(paths))
            for name in order:
                addr, port = paths[name]
                res = c.probe("tcp", addr, port, "--count", str(args.count))
                if res["errors"] or sum(res["answers"].values()) != args.count:
                    raise RuntimeError(f"{name}: {res['errors']} {res['answers']}")
                got[name]["p50"].append(res["latency_us"]["p50"])
                got[name]["p99"].append(res["latency_us"]["p99"])
                print(f"round {rnd + 1} {name:10} p50 {res['latency_us']['p50']:7.1f} us  "
                      f"p99 {res['latency_us']['p99']:7.1f} us", flush=True)

    def med(name: str, q: str) -> float:
        return statistics.median(got[name][q])

    lines = ["# veer: what a TrafficPolicy redirect adds to a new connection", "",
             "| path | latency p50 (us, median of rounds) | p99 |", "|---|---:|---:|"]
    for name in paths:
        lines.append(f"| {name} | {med(name, 'p50'):.1f} | {med(name, 'p99'):.1f} |")
    added50 = med("redirected", "p50") - med("direct", "p50")
    added99 = med("redirected", "p99") - med("direct", "p99")
    lines += ["", f"Added by the redirect: p50 {added50:+.1f} us, p99 {added99:+.1f} us.", "",
              f"One HTTP request per new connection (connect, request, response, close) from "
              f"the client pod, {args.count} connections per path per round, {args.rounds} "
              f"round(s), paths interleaved; both paths are client -> HAProxy (node-local, "
              f"uid nobody) -> a Service balanced by veer -> nginx. Total time "
              f"{time.monotonic() - started:.0f} s."]
    text = "\n".join(lines) + "\n"
    print(text)
    write_results(args, "redirect", text, {"latency_us": got})
    return 0


if __name__ == "__main__":
    sys.exit(main())
