"""`veer explain` agrees with reality under ClientIP affinity: asked where a
client's connection will go, it names a backend, and the connections the
client then makes are answered by exactly that backend."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from agent.sandbox.cluster import SandboxCluster
from tests.datapath.manifests import backends, service_with_endpoints

VIP = "10.96.0.44"


def explain(cluster: SandboxCluster, *extra: str) -> dict[str, Any]:
    res = subprocess.run(
        [sys.executable, "-m", "agent.cli.main", "explain", "--socket", cluster.api_socket,
         "--dst", VIP, "--port", "80", "-o", "json", *extra],
        capture_output=True, text=True, timeout=60,
    )
    assert res.returncode == 0, res.stderr
    return dict(json.loads(res.stdout))


def test_explain_names_the_backend_a_client_keeps(cluster: SandboxCluster) -> None:
    text = service_with_endpoints("aff", VIP, ["web-a", "web-b", "web-c"])
    spec = '"ports":'
    text = text.replace(spec, '"sessionAffinity": "ClientIP", "sessionAffinityConfig": '
                              '{"clientIP": {"timeoutSeconds": 300}}, ' + spec, 1)
    cluster.write_manifest("aff.yaml", text)
    cluster.wait_frontend(f"{VIP}:80/TCP", backends(["web-a", "web-b", "web-c"]))
    netns = f"/run/netns/{cluster.client}"

    # Before the client's first connection: any of the three.
    before = explain(cluster, "--from-netns", netns)
    assert len(before["candidates"]) == 3, before

    # One connection creates the client's affinity entry...
    first = cluster.probe("tcp", VIP, "80", "--count", "1")
    (chosen,) = first["answers"]
    # ...which Explain now reads and names,
    predicted = explain(cluster, "--from-netns", netns)
    assert len(predicted["candidates"]) == 1, predicted
    cand = predicted["candidates"][0]
    assert chosen == {"10.244.1.2": "web-a", "10.244.1.3": "web-b",
                      "10.244.1.4": "web-c"}[cand["address"]] + ":8080", (chosen, predicted)
    # ...and the client's next connections all go there.
    after = cluster.probe("tcp", VIP, "80", "--count", "40")
    assert after["answers"] == {chosen: 40}, after

    # Another client (the host's namespace, no entry) is not bound by it.
    other = explain(cluster)
    assert len(other["candidates"]) == 3, other
