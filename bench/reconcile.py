"""How long the eBPF datapath takes to program N frontends and to read them
back (the reconciler's full pass), on scratch pinned maps. Not a test.

    .venv/bin/python bench/reconcile.py [--services N] [--backends K]

Needs root and a bpffs at /run/veer/bpf (scripts/setup.sh mounts it).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import shutil
import sys
import time
import uuid

from agent.compute.types import Frontend, FrontendKind, L4Addr, ServicePortName
from agent.datapath.ebpf.backend import EbpfDatapath
from agent.datapath.ebpf.maps import SockLbMaps
from agent.datapath.ebpf.programs import SockLbPrograms, cleanup
from agent.model.objects import Protocol

TCP = Protocol.TCP


def frontends(services: int, backends: int) -> list[Frontend]:
    out = []
    base = int(ipaddress.ip_address("10.96.0.0"))
    for i in range(services):
        vip = ipaddress.ip_address(base + i + 1)
        bes = tuple(sorted(
            L4Addr(ipaddress.ip_address(f"10.{244 + (i * backends + j) // 62500 % 8}."
                                        f"{(i * backends + j) // 250 % 250}."
                                        f"{(i * backends + j) % 250 + 1}"), 8080, TCP)
            for j in range(backends)))
        out.append(Frontend(L4Addr(vip, 80, TCP), ServicePortName("bench", f"s{i}", "http"),
                            FrontendKind.CLUSTER_IP, bes))
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--services", type=int, default=10000)
    parser.add_argument("--backends", type=int, default=3)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/reconcile.py needs root (eBPF maps)", file=sys.stderr)
        return 2
    pins = f"/run/veer/bpf/bench-{uuid.uuid4().hex[:8]}"
    try:
        SockLbPrograms(pins).load()
        dp = EbpfDatapath(SockLbMaps.open(pins))
        dp.dump()
        wanted = frontends(args.services, args.backends)
        start = time.perf_counter()
        for fe in wanted:
            dp.upsert_frontend(fe)
        upsert = time.perf_counter() - start
        timings = {}
        for mode in ("batch", "one by one"):
            for m in (dp.maps.services, dp.maps.backends, dp.maps.vips, dp.maps.affinity_match):
                m._batch = mode == "batch"
            start = time.perf_counter()
            state = dp.dump()
            timings[mode] = time.perf_counter() - start
            assert len(state.frontends) == args.services
        entries = len(dp.maps.services)
        dp.close()
        print(f"{args.services} frontends x {args.backends} backends "
              f"({entries} service map entries):")
        print(f"  program all (upsert each):     {upsert:6.2f} s")
        print(f"  read back (full pass), batch:  {timings['batch']:6.2f} s")
        print(f"  read back, one entry at a time: {timings['one by one']:5.2f} s")
    finally:
        cleanup("/nonexistent", pins)
        shutil.rmtree(pins, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
