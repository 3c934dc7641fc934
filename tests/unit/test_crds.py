"""The CRDs (crds/), their copies in the helm chart, and the model parser agree.

- crds/ is the source of truth; deploy/helm/veer/crds/ holds byte-identical
  copies (helm packages only what is inside the chart directory).
- Every example in examples/trafficpolicies/ fits the CRD's schema, and
  agent/model/parse.py accepts it as written and as the API server stores it
  (defaults filled in), to the same model: the schema's defaults are the
  parser's.
- Every case of tests/trafficpolicies-invalid.yaml is refused by the parser
  naming the field the API server names (tests/e2e/test_chart.py sends the
  same cases to a real API server), and by the schema unless only a CEL rule
  catches it.
- The enums of the schema are the model's enums.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from crd_schema import crd_schema, errors, walk, with_defaults

from agent.errors import ModelError
from agent.model.objects import AccessAction, Algorithm, RedirectMode, SessionAffinity
from agent.model.parse import parse_object, parse_traffic_policy

REPO = Path(__file__).resolve().parents[2]
CRDS = REPO / "crds"
CHART_CRDS = REPO / "deploy" / "helm" / "veer" / "crds"
EXAMPLES = REPO / "examples" / "trafficpolicies"
INVALID = yaml.safe_load((REPO / "tests" / "trafficpolicies-invalid.yaml").read_text())["cases"]

TP_CRD = CRDS / "trafficpolicies.veer.dev.yaml"
VN_CRD = CRDS / "veernodes.veer.dev.yaml"
TP = crd_schema(TP_CRD)
VN = crd_schema(VN_CRD)


def _examples() -> list[Any]:
    out = []
    for path in sorted(EXAMPLES.glob("*.yaml")):
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc is not None:
                out.append(pytest.param(doc, id=f"{path.stem}-{i}" if i else path.stem))
    return out


def _policy(spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "veer.dev/v1alpha1",
        "kind": "TrafficPolicy",
        "metadata": {"name": "p", "namespace": "shop"},
        "spec": copy.deepcopy(spec),
    }


# ---- one source of truth ---------------------------------------------------------


def test_chart_crds_are_byte_identical_copies_of_crds_dir() -> None:
    ours = {p.name for p in CRDS.glob("*.yaml")}
    chart = {p.name for p in CHART_CRDS.glob("*.yaml")}
    assert ours == {"trafficpolicies.veer.dev.yaml", "veernodes.veer.dev.yaml"}
    assert chart == ours, (
        f"deploy/helm/veer/crds/ must hold exactly the files of crds/ "
        f"(missing {sorted(ours - chart)}, extra {sorted(chart - ours)}): "
        "cp crds/*.yaml deploy/helm/veer/crds/"
    )
    for name in sorted(ours):
        assert (CHART_CRDS / name).read_bytes() == (CRDS / name).read_bytes(), (
            f"deploy/helm/veer/crds/{name} differs from crds/{name}, the source of truth: "
            "cp crds/*.yaml deploy/helm/veer/crds/"
        )
        assert not (CHART_CRDS / name).is_symlink(), "helm package needs real files"


# ---- the CRDs' shape -------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "plural", "kind", "scope", "short"),
    [
        (TP_CRD, "trafficpolicies", "TrafficPolicy", "Namespaced", ["tp"]),
        (VN_CRD, "veernodes", "VeerNode", "Cluster", ["vn"]),
    ],
)
def test_crd_names_and_version(
    path: Path, plural: str, kind: str, scope: str, short: list[str]
) -> None:
    crd = yaml.safe_load(path.read_text())
    assert crd["metadata"]["name"] == f"{plural}.veer.dev"
    assert path.name == f"{plural}.veer.dev.yaml"
    spec = crd["spec"]
    assert spec["group"] == "veer.dev"
    assert spec["scope"] == scope
    assert spec["names"]["plural"] == plural
    assert spec["names"]["kind"] == kind
    assert spec["names"]["shortNames"] == short
    [version] = spec["versions"]
    assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
    assert version["subresources"] == {"status": {}}


def test_trafficpolicy_printer_columns() -> None:
    crd = yaml.safe_load(TP_CRD.read_text())
    version = crd["spec"]["versions"][0]
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns == {
        "Targets": ".spec.targetRefs[*].name",
        "Algorithm": ".spec.loadBalancing.algorithm",
        "Accepted": '.status.conditions[?(@.type=="Accepted")].status',
        "Programmed": ".status.programmed",
        "Age": ".metadata.creationTimestamp",
    }


@pytest.mark.parametrize("path", [TP_CRD, VN_CRD], ids=["TrafficPolicy", "VeerNode"])
def test_printer_columns_name_fields_of_the_schema(path: Path) -> None:
    crd = yaml.safe_load(path.read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    fields = {p for p, _ in walk(schema)}
    for column in crd["spec"]["versions"][0]["additionalPrinterColumns"]:
        json_path = column["jsonPath"]
        if json_path == ".metadata.creationTimestamp":
            continue
        # .status.conditions[?(@.type=="Ready")].status -> status.conditions[*].status
        plain = json_path.lstrip(".")
        if "[?(" in plain:
            head, _, tail = plain.partition("[?(")
            plain = head + "[*]" + tail.split(")]", 1)[1]
        assert plain in fields, f"{column['name']}: {json_path} is not in the schema"


def test_schema_enums_are_the_models() -> None:
    props = TP["properties"]["spec"]["properties"]
    lb = props["loadBalancing"]["properties"]
    assert lb["algorithm"]["enum"] == [a.value for a in Algorithm]
    assert lb["sessionAffinity"]["properties"]["type"]["enum"] == [s.value for s in SessionAffinity]
    access = props["access"]["properties"]
    assert access["defaultAction"]["enum"] == [a.value for a in AccessAction]
    assert access["rules"]["items"]["properties"]["action"]["enum"] == [
        a.value for a in AccessAction
    ]
    assert props["redirect"]["properties"]["mode"]["enum"] == [m.value for m in RedirectMode]


def test_every_cel_rule_has_a_message_and_sits_in_spec() -> None:
    """A CEL rule's error names the field it sits on (or its fieldPath):
    keep them on the field they check, with a message."""
    for path, sub in walk(TP):
        for rule in sub.get("x-kubernetes-validations", []):
            assert rule.get("message"), f"{path}: a CEL rule without a message"
            assert path.startswith("spec."), f"{path}: CEL rule outside spec"


# ---- examples: schema and parser agree --------------------------------------------


@pytest.mark.parametrize("doc", _examples())
def test_example_fits_the_schema_and_parses_with_or_without_defaults(doc: dict[str, Any]) -> None:
    assert doc["apiVersion"] == "veer.dev/v1alpha1" and doc["kind"] == "TrafficPolicy"
    assert list(errors(TP, doc)) == []
    stored = with_defaults(TP, doc)  # what a watch on the API server delivers
    assert list(errors(TP, stored)) == []
    as_written = parse_object(doc)
    assert as_written is not None
    assert parse_traffic_policy(stored) == as_written


def test_examples_cover_every_spec_field() -> None:
    seen: set[str] = set()

    def visit(value: Any, path: str) -> None:
        seen.add(path)
        if isinstance(value, dict):
            for k, v in value.items():
                visit(v, f"{path}.{k}")
        elif isinstance(value, list):
            for v in value:
                visit(v, f"{path}[*]")

    for param in _examples():
        visit(param.values[0]["spec"], "spec")
    fields = {p for p, s in walk(TP["properties"]["spec"], "spec") if "properties" not in s}
    assert fields - seen == set(), "fields no example in examples/trafficpolicies/ shows"


def test_schema_defaults_are_the_parsers() -> None:
    sparse = _policy(
        {
            "targetRefs": [{"name": "web"}],
            "loadBalancing": {},
            "access": {"rules": [{"action": "Deny", "sources": ["10.0.0.0/8"]}]},
            "redirect": {"port": 15001},
            "acceleration": {},
        }
    )
    stored = with_defaults(TP, sparse)
    assert stored["spec"]["loadBalancing"] == {"algorithm": "Random"}
    assert stored["spec"]["access"]["defaultAction"] == "Allow"
    assert stored["spec"]["redirect"] == {"port": 15001, "mode": "Auto"}
    assert stored["spec"]["acceleration"] == {"sockmap": False}
    assert parse_traffic_policy(stored) == parse_traffic_policy(sparse)
    minimal = _policy({"targetRefs": [{"name": "web"}]})
    assert parse_traffic_policy(with_defaults(TP, minimal)) == parse_traffic_policy(minimal)


def test_largest_policy_the_schema_allows_parses() -> None:
    spec = {
        "targetRefs": [{"name": f"s{i}"} for i in range(16)],
        "split": [{"service": f"s{i}", "weight": 1000} for i in range(16)],
        "access": {
            "defaultAction": "Deny",
            "rules": [
                {"action": "Allow", "sources": [f"10.{i}.{j}.0/24" for j in range(32)]}
                for i in range(32)
            ],
        },
        "loadBalancing": {"sessionAffinity": {"type": "ClientIP", "timeoutSeconds": 86400}},
        "redirect": {"port": 65535, "mode": "EBPF"},
    }
    doc = _policy(spec)
    doc["spec"]["targetRefs"][0]["name"] = "a" + "-b" * 31  # 63 characters
    doc["spec"]["split"][0]["service"] = doc["spec"]["targetRefs"][0]["name"]
    assert list(errors(TP, doc)) == []
    policy = parse_traffic_policy(doc)
    assert len(policy.target_refs) == 16 and len(policy.split) == 16
    one_more = copy.deepcopy(doc)
    one_more["spec"]["targetRefs"].append({"name": "extra"})
    assert ("spec.targetRefs", "more than 16 items") in errors(TP, one_more)
    with pytest.raises(ModelError) as refused:
        parse_traffic_policy(one_more)
    assert refused.value.field == "spec.targetRefs"


# ---- invalid policies: refused, naming the same field ------------------------------


@pytest.mark.parametrize("case", INVALID, ids=[c["id"] for c in INVALID])
def test_invalid_policy_is_refused_by_the_parser_naming_the_field(case: dict[str, Any]) -> None:
    with pytest.raises(ModelError) as refused:
        parse_traffic_policy(_policy(case["spec"]))
    assert refused.value.field == case["field"], str(refused.value)
    assert refused.value.obj == "TrafficPolicy/shop/p"


SCHEMA_CASES = [c for c in INVALID if not c.get("cel")]


@pytest.mark.parametrize("case", SCHEMA_CASES, ids=[c["id"] for c in SCHEMA_CASES])
def test_invalid_policy_is_refused_by_the_schema_naming_the_field(case: dict[str, Any]) -> None:
    found = list(errors(TP, _policy(case["spec"])))
    assert case["field"] in [path for path, _ in found], found


def test_invalid_cases_cover_what_the_issue_names() -> None:
    ids = {c["id"] for c in INVALID}
    assert {
        "empty-targetRefs", "weight-1001", "all-weights-0", "bad-cidr", "port-0",
        "unknown-algorithm", "affinity-timeout-0",
    } <= ids  # fmt: skip


# ---- status: what the operator and the agents write fits ---------------------------

TP_STATUS = {
    "observedGeneration": 3,
    "programmed": "2/3",
    "nodes": {
        "total": 3,
        "programmed": 2,
        "notProgrammed": [
            {"name": "node-c", "reason": "Pending", "message": "the node reports generation 2"}
        ],
    },
    "conditions": [
        {"type": t, "status": s, "reason": r, "message": "", "observedGeneration": 3,
         "lastTransitionTime": "2026-11-25T10:00:00Z"}
        for t, s, r in [
            ("Accepted", "True", "Accepted"),
            ("ResolvedRefs", "True", "ResolvedRefs"),
            ("Programmed", "False", "Pending"),
        ]
    ],
}  # fmt: skip

VN_STATUS = {
    "nodeUID": "0b7c2c4e-8a35-4c4e-9d1e-4d1f2a3b4c5d",
    "podName": "veer-agent-x7k2p",
    "agentVersion": "0.1.0",
    "mode": "EBPF",
    "modeReason": "the kernel has cgroup sock_addr, sched_cls and sockmap support",
    "heartbeatTime": "2026-11-25T10:00:00Z",
    "heartbeatSeconds": 60,
    "services": 42,
    "trafficPolicies": [
        {"namespace": "shop", "name": "web-canary", "uid": "u1", "generation": 3,
         "mode": "EBPF", "programmed": True},
        {"namespace": "shop", "name": "api-proxy", "uid": "u2", "generation": 1,
         "mode": "TPROXY", "programmed": False, "reason": "Unsupported",
         "message": "LeastConnections is not in the datapath yet"},
    ],
    "conditions": [
        {"type": "Ready", "status": "True", "reason": "Synced", "message": "",
         "lastTransitionTime": "2026-11-25T10:00:00Z"}
    ],
}  # fmt: skip


def test_documented_statuses_fit_the_schemas() -> None:
    assert list(errors(TP["properties"]["status"], TP_STATUS, "status")) == []
    assert list(errors(VN["properties"]["status"], VN_STATUS, "status")) == []
    bad = copy.deepcopy(VN_STATUS)
    bad["trafficPolicies"].append(dict(bad["trafficPolicies"][0]))
    assert ("status.trafficPolicies[2]", "duplicate value") in errors(
        VN["properties"]["status"], bad, "status"
    )
    # A report with an unknown field would lose it (the API server prunes it):
    # the schema names every field the agents and the operator write.
    assert ("status.programmed", "unknown field") in errors(
        VN["properties"]["status"], {**VN_STATUS, "programmed": "1/1"}, "status"
    )


def test_crds_readme_documents_every_status_field() -> None:
    readme = (CRDS / "README.md").read_text()
    for schema in (TP["properties"]["status"], VN["properties"]["status"]):
        for path, _ in walk(schema):
            leaf = path.rsplit(".", 1)[-1].replace("[*]", "")
            if leaf:
                assert f"`{leaf}`" in readme, f"crds/README.md does not document {leaf}"
