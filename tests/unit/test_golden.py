"""Golden tests: manifests in, the rendered DesiredState out.

Each directory tests/unit/golden/<case>/ holds input manifests (*.yaml, read
in name order) and expected.txt, the text `agent.compute.render` makes of
compute_desired's result for node-1 (with the addresses and zone of its Node
object, when the case has one) and the Service CIDRs below. The
expected files are reviewed by hand against kube-proxy's behaviour; the
comments at the top of each case's manifests say what to look for.

    VEER_UPDATE_GOLDEN=1 pytest tests/unit/test_golden.py

rewrites the expected files from the current code; review the diff before
committing it.
"""

from __future__ import annotations

import os
from ipaddress import ip_network
from pathlib import Path

import pytest

from agent.compute import ComputeConfig, NodeIdentity, compute_desired
from agent.compute.node import identity_of
from agent.compute.render import render_desired
from agent.model.parse import Model
from agent.model.snapshot import ClusterSnapshot
from agent.sources.manifests import parse_file

GOLDEN = Path(__file__).parent / "golden"
CASES = sorted(p.name for p in GOLDEN.iterdir() if (p / "expected.txt").exists())
NODE = NodeIdentity("node-1")
CONFIG = ComputeConfig(
    service_cidrs=frozenset({ip_network("10.96.0.0/16"), ip_network("fd00:96::/112")})
)
UPDATE = os.environ.get("VEER_UPDATE_GOLDEN") == "1"


def render_case(case: Path) -> str:
    objects: list[Model] = []
    for manifest in sorted(case.glob("*.yaml")):
        found, problems = parse_file(str(manifest))
        assert not problems, f"fixture {manifest} has malformed objects: {problems}"
        objects.extend(found)
    assert objects, f"golden case {case.name} has no objects"
    snapshot = ClusterSnapshot.of(objects)
    # node-1 as its Node object (if the case has one) describes it, as the agent does.
    return render_desired(compute_desired(snapshot, identity_of(snapshot, NODE.name), CONFIG))


def test_there_are_golden_cases() -> None:
    assert {"sandbox", "dual-stack", "skipped", "endpoints"} <= set(CASES)


@pytest.mark.parametrize("name", CASES)
def test_golden(name: str) -> None:
    case = GOLDEN / name
    actual = render_case(case)
    expected_file = case / "expected.txt"
    if UPDATE:
        expected_file.write_text(actual)
        return
    expected = expected_file.read_text()
    assert actual == expected, (
        f"golden case {name} differs from {expected_file}; "
        "if the change is intended, rerun with VEER_UPDATE_GOLDEN=1 and review the diff"
    )


def test_sandbox_case_matches_the_examples() -> None:
    """The sandbox case is a copy of examples/sandbox: keep them in step."""
    examples = Path(__file__).parents[2] / "examples" / "sandbox"
    ours = {p.name: p.read_text() for p in (GOLDEN / "sandbox").glob("*.yaml")}
    theirs = {p.name: p.read_text() for p in examples.glob("*.yaml")}
    assert ours == theirs, "copy examples/sandbox/*.yaml to tests/unit/golden/sandbox/"
