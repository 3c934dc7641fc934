"""agent/status.py: the --status-file lists what compute wants minus what
failed, and renders a frontend again only when it changed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from builders import ep, eport, eps, models, port, service

from agent.compute import ComputeConfig, NodeIdentity, compute_desired
from agent.compute.desired import ComputeCache
from agent.compute.types import DesiredState, L4Addr
from agent.model.snapshot import ClusterSnapshot
from agent.status import StatusFile

NODE = NodeIdentity("node-1")


def _docs(web_ip: str = "10.244.1.2") -> list[dict[str, Any]]:
    return [
        service("web", port("http", 80, 8080), ips="10.96.0.10"),
        eps("web-1", "web", ep(web_ip), ports=[eport("http", 8080)]),
        service("lb", port("http", 80, 8080), ips="10.96.0.11", externalIPs=["203.0.113.7"],
                externalTrafficPolicy="Local", sessionAffinity="ClientIP"),
        eps("lb-1", "lb", ep("10.244.1.3"), ports=[eport("http", 8080)]),
    ]


def _expected(desired: DesiredState, failed: set[L4Addr]) -> dict[str, Any]:
    """What the status file said before StatusFile (daemon.py rendered it whole)."""
    return {
        "frontends": {str(k): [str(b) for b in fe.backends]
                      for k, fe in desired.frontends.items() if k not in failed},
        "external_frontends": {
            str(k): {"backends": [str(b) for b in fe.external_backends],
                     "local": fe.external_local,
                     "sources": [str(c) for c in fe.source_ranges],
                     "affinity": fe.affinity_timeout}
            for k, fe in desired.frontends.items() if fe.kind.external and k not in failed
        },
    }


def test_status_file_matches_the_desired_state_pass_after_pass(tmp_path: Path) -> None:
    path = tmp_path / "status.json"
    status, cache, config = StatusFile(str(path)), ComputeCache(), ComputeConfig()
    fields = {"ok": True, "errors": ["a \"quoted\" error"], "node": "node-1"}

    first = compute_desired(ClusterSnapshot.of(models(*_docs())), NODE, config, cache)
    assert any(fe.kind.external for fe in first.frontends.values())
    status.write(fields, first.frontends, set())
    got = json.loads(path.read_text())
    assert got == {**fields, **_expected(first, set())}

    # web's endpoint moves: its entry is rendered again, lb's is kept as it was.
    second = compute_desired(ClusterSnapshot.of(models(*_docs("10.244.1.9"))), NODE, config,
                             cache)
    failed = {next(k for k, fe in second.frontends.items() if fe.service.name == "lb")}
    status.write(fields, second.frontends, failed)
    got = json.loads(path.read_text())
    assert got == {**fields, **_expected(second, failed)}
    assert got["frontends"]["10.96.0.10:80/TCP"] == ["10.244.1.9:8080/TCP"]

    # A Service gone: its entries go too.
    only_web = compute_desired(ClusterSnapshot.of(models(*_docs()[:2])), NODE, config, cache)
    status.write(fields, only_web.frontends, set())
    assert json.loads(path.read_text()) == {**fields, **_expected(only_web, set())}
    assert not (tmp_path / "status.json.tmp").exists()
