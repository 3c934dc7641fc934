"""The helm chart's files agree with each other and with the package (no
helm needed; tests/e2e/test_chart.py renders and installs the chart).

- Chart version and appVersion are the veer package's version;
- values.schema.json describes every key of values.yaml and closes every
  object it describes (an unknown key is an error, not silently ignored);
- NOTES.txt says how to check the install and debug a node.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "helm" / "veer"


def _resolve(schema: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    if ref:
        node: Any = root
        for part in ref.removeprefix("#/").split("/"):
            node = node[part]
        return _resolve(node, root)
    return schema


def test_chart_version_is_the_package_version() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert chart["version"] == version
    assert chart["appVersion"] == version
    assert chart["name"] == "veer" and chart["apiVersion"] == "v2"


def test_schema_describes_every_value() -> None:
    root = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    free_form = {"resources", "affinity", "nodeSelector", "podAnnotations", "updateStrategy",
                 "tolerations"}  # fmt: skip

    def check(schema: dict[str, Any], value: Any, path: str) -> None:
        schema = _resolve(schema, root)
        if isinstance(value, dict) and path.rsplit(".", 1)[-1] not in free_form:
            assert schema.get("additionalProperties") is False, f"{path or '.'} is not closed"
            for key, sub in value.items():
                assert key in schema["properties"], f"{path}.{key} is not in values.schema.json"
                check(schema["properties"][key], sub, f"{path}.{key}".lstrip("."))
            for key in schema["properties"]:
                assert key in value, f"values.schema.json describes {path}.{key}: not in values"

    check(root, values, "")


def test_notes_say_how_to_check_and_debug() -> None:
    notes = (CHART / "templates" / "NOTES.txt").read_text()
    for text in ("rollout status daemonset", "kubectl get veernodes", "kubectl get trafficpolicies",
                 "kubectl veer --node NODE status", "exec <pod> -- veer status",
                 "helm uninstall"):  # fmt: skip
        assert text in notes


def test_agent_capabilities_are_each_justified() -> None:
    template = (CHART / "templates" / "agent-daemonset.yaml").read_text()
    lines = template.splitlines()
    start = lines.index("              add:")
    caps = []
    for i in range(start + 1, len(lines)):
        line = lines[i].strip()
        if line.startswith("- "):
            caps.append(line[2:])
            assert lines[i - 1].strip().startswith("#"), f"{line[2:]} has no comment saying why"
        elif not line.startswith("#"):
            break
    assert caps == ["BPF", "NET_ADMIN", "SYS_ADMIN", "PERFMON", "SYS_RESOURCE", "SYS_PTRACE"]
