"""The agent process (`veer agent --kubernetes`) does not import the
`kubernetes` package (nor urllib3, pydantic, requests, which come with it):
they cost it resident memory and start-up time (README, Performance). Only the
operator's kopf may use them. Run in a fresh interpreter, since this test
session may have imported anything."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("kubernetes", "urllib3", "pydantic", "requests")

# What agent/cli/main.py's run_agent imports with --kubernetes, then a client
# loaded from a kubeconfig and one request (to a port nobody listens on).
PROGRAM = """
import json, sys
import agent.cli.main, agent.daemon, agent.serve
import agent.kube.client, agent.kube.report, agent.kube.runtime
from agent.errors import KubeApiError
api = agent.kube.client.KubeClient.load(sys.argv[1])
try:
    api.list("/api/v1/services")
except KubeApiError as err:
    assert err.status == 0, err
print(json.dumps(sorted({name.split(".")[0] for name in sys.modules})))
"""


def test_the_agent_process_does_not_import_the_kubernetes_package(tmp_path: Path) -> None:
    kubeconfig = tmp_path / "config"
    kubeconfig.write_text(yaml.safe_dump({
        "clusters": [{"name": "k", "cluster": {"server": "https://127.0.0.1:1"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}],
        "current-context": "c",
    }))
    out = subprocess.run([sys.executable, "-c", PROGRAM, str(kubeconfig)], cwd=REPO,
                         capture_output=True, text=True, timeout=120, check=True)
    modules = json.loads(out.stdout.splitlines()[-1])
    assert "agent" in modules  # the program did import the agent
    assert [m for m in HEAVY if m in modules] == []
