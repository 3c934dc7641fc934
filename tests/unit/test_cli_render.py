"""Golden tests of the `veer` debug commands' tables.

Each tests/unit/cli_golden/<case>.json holds a real API answer, captured with
`veer <command> -o json` from a sandbox agent (see docs/debugging.md), the
renderer to use and its arguments; <case>.txt is the expected text.

    VEER_UPDATE_GOLDEN=1 pytest tests/unit/test_cli_render.py

rewrites the expected files from the current code; review the diff before
committing it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from agent.cli import render

GOLDEN = Path(__file__).parent / "cli_golden"
CASES = sorted(p.stem for p in GOLDEN.glob("*.json"))
UPDATE = os.environ.get("VEER_UPDATE_GOLDEN") == "1"


def draw(case: dict[str, Any]) -> str:
    data, args = case["data"], case["args"]
    kind = case["render"]
    if kind == "status":
        return render.render_status(data, args["now"])
    if kind == "services":
        return render.render_services(data["services"])
    if kind == "service":
        return render.render_service(data)
    if kind == "conntrack":
        return render.render_conntrack(data)
    if kind == "explain":
        return render.render_explain(data, args["destination"], args.get("source", ""))
    if kind == "maps":
        return render.render_maps(data, args["diff"])
    if kind == "resync":
        return render.render_resync(data, args["now"])
    if kind == "observe":
        return render.render_flows(data["events"])
    raise AssertionError(f"unknown renderer {kind}")


def test_every_command_has_a_golden_case() -> None:
    kinds = {json.loads((GOLDEN / f"{c}.json").read_text())["render"] for c in CASES}
    assert kinds == {"status", "services", "service", "conntrack", "explain", "maps", "resync",
                     "observe"}


@pytest.mark.parametrize("name", CASES)
def test_golden(name: str) -> None:
    case = json.loads((GOLDEN / f"{name}.json").read_text())
    actual = draw(case)
    expected_file = GOLDEN / f"{name}.txt"
    if UPDATE:
        expected_file.write_text(actual)
        return
    assert expected_file.exists(), f"no {expected_file.name}; run with VEER_UPDATE_GOLDEN=1"
    assert actual == expected_file.read_text(), (
        f"{name}: rendering differs from {expected_file.name}; if the change is intended, "
        "rerun with VEER_UPDATE_GOLDEN=1 and review the diff"
    )


def test_table_aligns_columns_and_leaves_the_last_unpadded() -> None:
    assert render.table(["A", "LONGER"], [["xyz", "1"], ["q", "22"]]) == (
        "A    LONGER\n"
        "xyz  1\n"
        "q    22\n"
    )


def test_times_are_absolute_with_their_age() -> None:
    assert render.when(0, 100) == "never"
    assert render.when(1795644374, 1795644374 + 3725) == "2026-11-25 22:06:14 UTC (1h02m ago)"
    assert render.age(59) == "59s" and render.age(125) == "2m05s" and render.age(200000) == "2d07h"


def test_host_port_brackets_ipv6() -> None:
    assert render.host_port("fd00::1", 80) == "[fd00::1]:80"
    assert render.l4("10.0.0.1", 53, "UDP") == "10.0.0.1:53/UDP"


def test_json_and_yaml_print_the_answer_itself() -> None:
    data = {"b": [1, 2], "a": {"x": None}}
    assert json.loads(render.render_data(data, "json")) == data
    assert render.render_data(data, "yaml") == "a:\n  x: null\nb:\n- 1\n- 2\n"


def test_flow_lines_name_the_outside_client_flags_and_lost_events() -> None:
    event = {
        "time": 1795644374.25, "verdict": "VERDICT_TRANSLATE", "reason": "nat_new",
        "reason_text": "new flow from outside the node translated to a backend", "errno": "",
        "hook": "tc-ingress", "source": "2001:db8::7", "source_port": 40000,
        "destination": "10.0.0.1", "port": 30080, "protocol": "TCP",
        "backend_address": "10.244.2.2", "backend_port": 8080,
        "service_port": "default/web:http", "pid": 0, "comm": "",
        "flags": ["snat"], "lost_before": 12,
    }
    assert render.render_flow(event) == (
        "... 12 events lost here: this client read too slowly\n"
        "22:06:14.250  translate    default/web:http        10.0.0.1:30080/TCP    "
        "10.244.2.2:8080       [2001:db8::7]:40000     new flow from outside the node "
        "translated to a backend (tc-ingress); source-NATed to the node\n"
    )
    assert render.render_flows([]).startswith("no flow events kept that match.")
