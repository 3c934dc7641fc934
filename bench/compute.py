"""How long compute_desired takes for N Services of K endpoints each: from
scratch, and with its cache after one more Service appears (what every event
costs the agent at that size): for snapshots of one Store, as the agent
computes (only the Services its change log names are looked at), and for
unrelated snapshots (every Service is looked at, its result reused). Pure
Python, no root. Not a test.

    .venv/bin/python bench/compute.py [--services N] [--endpoints K]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from agent.compute import ComputeConfig, NodeIdentity, compute_desired  # noqa: E402
from agent.compute.desired import ComputeCache  # noqa: E402
from agent.model.parse import Model, parse_object  # noqa: E402
from agent.model.snapshot import ClusterSnapshot, Store  # noqa: E402


def service(i: int, endpoints: int) -> list[Model]:
    name = f"s{i}"
    svc: dict[str, Any] = {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "bench"},
        "spec": {"clusterIP": f"10.96.{i // 250}.{i % 250 + 1}",
                 "ports": [{"name": "http", "protocol": "TCP", "port": 80,
                            "targetPort": 8080}]}}
    eps: dict[str, Any] = {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": f"{name}-1", "namespace": "bench",
                     "labels": {"kubernetes.io/service-name": name}},
        "addressType": "IPv4", "ports": [{"name": "http", "protocol": "TCP", "port": 8080}],
        "endpoints": [{"addresses": [f"10.{244 + (i * endpoints + j) // 62500 % 8}."
                                     f"{(i * endpoints + j) // 250 % 250}."
                                     f"{(i * endpoints + j) % 250 + 1}"],
                       "conditions": {"ready": True}} for j in range(endpoints)]}
    out = [parse_object(svc), parse_object(eps)]
    return [o for o in out if o is not None]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--services", type=int, default=10000)
    p.add_argument("--endpoints", type=int, default=10)
    args = p.parse_args()
    objects = [o for i in range(args.services) for o in service(i, args.endpoints)]
    node, config, cache = NodeIdentity("node-1"), ComputeConfig(), ComputeCache()
    start = time.perf_counter()
    compute_desired(ClusterSnapshot.of(objects), node, config, cache)
    scratch = time.perf_counter() - start
    more = service(args.services, args.endpoints)
    snapshot = ClusterSnapshot.of([*objects, *more])
    start = time.perf_counter()
    desired = compute_desired(snapshot, node, config, cache)
    cached = time.perf_counter() - start
    assert len(desired.frontends) == args.services + 1

    store, cache = Store(), ComputeCache()
    store.apply(objects)
    compute_desired(store.snapshot(), node, config, cache)
    store.apply(more)
    start = time.perf_counter()
    desired = compute_desired(store.snapshot(), node, config, cache)
    logged = time.perf_counter() - start
    assert len(desired.frontends) == args.services + 1
    print(f"{args.services} Services x {args.endpoints} endpoints:")
    print(f"  compute from scratch:                          {scratch:6.3f} s")
    print(f"  one more Service, cache, unrelated snapshots:  {cached:6.3f} s")
    print(f"  one more Service, cache, the Store's snapshots: {logged:5.3f} s "
          "(the agent's case; with the snapshot)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
