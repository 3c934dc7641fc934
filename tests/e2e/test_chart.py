"""The helm chart and the CRDs against a real kube-apiserver.

- `helm lint` is clean; the rendered chart grants no Secrets and no
  wildcards, and `kubectl apply --dry-run=server` accepts it (default and
  non-default values);
- values.schema.json refuses bad values, naming them;
- `helm install` succeeds, the CRDs are Established;
- the examples are accepted, every case of tests/trafficpolicies-invalid.yaml
  is refused with the field named in kubectl's error;
- the agent's and the operator's ServiceAccount tokens get exactly their
  grants (RBAC checked with real requests); an agent writes only its own
  node's VeerNode (the ValidatingAdmissionPolicy);
- `helm uninstall` removes every object the release made (the CRDs stay, as
  helm never deletes CRDs), and the two facts the agent's uninstall
  detection rests on hold: a watch opened on the DaemonSet before the
  uninstall sees it deleted, and the agent's token no longer authenticates
  afterwards (deploy/helm/veer/README.md, "Uninstalling").

The release is "veer-e2e" in namespace "e2e-chart", so its cluster-scoped
objects (veer-e2e-agent, ...) do not meet those of other tests' releases.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.e2e.controlplane import REPO_ROOT, CommandError, ControlPlane, wait_for

pytestmark = pytest.mark.e2e

CHART = "deploy/helm/veer"
RELEASE = "veer-e2e"
NS = "e2e-chart"
AGENT = f"{RELEASE}-agent"
OPERATOR = f"{RELEASE}-operator"
NODE = "chart-node-a"
OTHER_NODE = "chart-node-b"
CRDS = ("trafficpolicies.veer.dev", "veernodes.veer.dev")
EXAMPLES = REPO_ROOT / "examples" / "trafficpolicies"
INVALID = yaml.safe_load((REPO_ROOT / "tests" / "trafficpolicies-invalid.yaml").read_text())[
    "cases"
]


def _render(cp: ControlPlane, *args: str) -> list[dict[str, Any]]:
    out = cp.helm("template", RELEASE, CHART, "-n", NS, *args).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def _one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    [doc] = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def _policy(name: str, spec: dict[str, Any]) -> str:
    return json.dumps(
        {"apiVersion": "veer.dev/v1alpha1", "kind": "TrafficPolicy",
         "metadata": {"name": name}, "spec": spec}
    )  # fmt: skip


def _node_token(cp: ControlPlane, sa: str, node: str) -> Path:
    """A kubeconfig for `sa` whose token names `node`, as the token a kubelet
    mounts into a Pod on that node does (user extra node-name)."""
    token = cp.kubectl(
        "create", "token", sa, "-n", NS, "--duration=1h",
        "--bound-object-kind=Node", f"--bound-object-name={node}",
    ).stdout.strip()  # fmt: skip
    return cp.kubeconfig_for_token(token, f"{sa}-on-{node}", NS)


def _refused(cp: ControlPlane, *args: str, kubeconfig: Path, input: str | None = None) -> str:
    got = cp.kubectl(*args, kubeconfig=kubeconfig, input=input, check=False)
    assert got.returncode != 0, f"kubectl {' '.join(args)} was allowed: {got.stdout}"
    return got.stderr


def _allowed(cp: ControlPlane, *args: str, kubeconfig: Path, input: str | None = None) -> str:
    return cp.kubectl(*args, kubeconfig=kubeconfig, input=input).stdout


# ---- the chart, rendered -----------------------------------------------------------


def test_helm_lint_is_clean(control_plane: ControlPlane) -> None:
    out = control_plane.helm("lint", "--strict", CHART).stdout
    assert "1 chart(s) linted, 0 chart(s) failed" in out
    assert "[WARNING]" not in out and "[ERROR]" not in out, out


def test_packaged_chart_carries_the_crds(control_plane: ControlPlane) -> None:
    cp = control_plane
    out = cp.dir / "packaged"
    cp.helm("package", CHART, "-d", str(out))
    [tgz] = out.glob("veer-*.tgz")
    rendered = cp.helm("template", RELEASE, str(tgz), "-n", NS, "--include-crds").stdout
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    crds = [d for d in docs if d["kind"] == "CustomResourceDefinition"]
    assert sorted(d["metadata"]["name"] for d in crds) == sorted(CRDS)
    for doc in crds:
        source = REPO_ROOT / "crds" / f"{doc['metadata']['name']}.yaml"
        assert doc == yaml.safe_load(source.read_text())


def test_rendered_rbac_grants_no_secrets_and_no_wildcards(control_plane: ControlPlane) -> None:
    docs = _render(control_plane)
    roles = [d for d in docs if d["kind"] in ("ClusterRole", "Role")]
    assert {(d["kind"], d["metadata"]["name"]) for d in roles} == {
        ("ClusterRole", AGENT), ("ClusterRole", OPERATOR), ("Role", AGENT), ("Role", OPERATOR),
    }  # fmt: skip
    for role in roles:
        for rule in role["rules"]:
            for key in ("apiGroups", "resources", "verbs", "resourceNames"):
                assert "*" not in rule.get(key, []), f"{role['metadata']['name']}: {rule}"
            assert not {"secrets", "pods/exec", "serviceaccounts/token"} & set(rule["resources"])
            assert not {"escalate", "bind", "impersonate"} & set(rule["verbs"])


def test_rendered_agent_daemonset(control_plane: ControlPlane) -> None:
    ds = _one(_render(control_plane), "DaemonSet", AGENT)
    pod = ds["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True
    assert pod["priorityClassName"] == "system-node-critical"
    assert pod["tolerations"] == [{"operator": "Exists"}]
    assert pod["serviceAccountName"] == AGENT
    [agent] = pod["containers"]
    assert agent["command"] == ["veer"]
    assert agent["args"][:3] == ["agent", "--kubernetes", "--node-name=$(NODE_NAME)"]
    assert "--cleanup-on-uninstall" in agent["args"]
    assert f"--owner-daemonset=$(POD_NAMESPACE)/{AGENT}" in agent["args"]
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in agent["env"]}
    assert env == {"NODE_NAME": "spec.nodeName", "POD_NAME": "metadata.name",
                   "POD_NAMESPACE": "metadata.namespace"}  # fmt: skip
    sc = agent["securityContext"]
    assert sc["privileged"] is False
    assert sc["capabilities"] == {
        "drop": ["ALL"],
        "add": ["BPF", "NET_ADMIN", "SYS_ADMIN", "PERFMON", "SYS_RESOURCE", "SYS_PTRACE"],
    }
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert agent[probe]["httpGet"] == {"path": "/healthz", "port": 10256}
    host = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    assert host == {"bpffs": "/sys/fs/bpf", "cgroup": "/sys/fs/cgroup", "modules": "/lib/modules",
                    "kernel-sources": "/usr/src", "run": "/run/veer"}  # fmt: skip
    mounts = {m["name"]: m for m in agent["volumeMounts"]}
    for name in ("cgroup", "modules", "kernel-sources"):
        assert mounts[name].get("readOnly") is True, name
    assert "--cgroup=" + mounts["cgroup"]["mountPath"] in agent["args"]

    # The cgroup2 path is a value (hybrid hosts mount it under /unified).
    ds = _one(
        _render(control_plane, "--set", "agent.hostPaths.cgroup=/sys/fs/cgroup/unified"),
        "DaemonSet", AGENT,
    )  # fmt: skip
    [cgroup] = [v for v in ds["spec"]["template"]["spec"]["volumes"] if v["name"] == "cgroup"]
    assert cgroup["hostPath"]["path"] == "/sys/fs/cgroup/unified"


def _downward(args: list[str]) -> list[str]:
    """The container's args as the kubelet expands them from the env."""
    env = {"$(NODE_NAME)": NODE, "$(POD_NAMESPACE)": NS, "$(POD_NAME)": f"{AGENT}-x7k2p"}
    out = []
    for arg in args:
        for var, value in env.items():
            arg = arg.replace(var, value)
        out.append(arg)
    return out


def test_rendered_agent_args_are_what_veer_agent_accepts(
    control_plane: ControlPlane, monkeypatch: pytest.MonkeyPatch
) -> None:
    from agent.cli import main as cli

    every_value = [
        "--set", "agent.serviceCIDRs={10.96.0.0/16,fd00:96::/108}",
        "--set", "agent.clusterCIDRs={10.244.0.0/16}", "--set", "agent.devices={eth0,eth1}",
        "--set", "agent.nodePortAddresses={192.0.2.0/24}", "--set", "agent.verbose=true",
        "--set", "agent.serviceProxyName=veer",
    ]  # fmt: skip
    parsed: list[Any] = []
    monkeypatch.setattr(cli, "run_agent", lambda args: parsed.append(args) or 0)
    for values in ([], every_value, ["--set", "agent.cleanupOnUninstall=false"]):
        ds = _one(_render(control_plane, *values), "DaemonSet", AGENT)
        [container] = ds["spec"]["template"]["spec"]["containers"]
        parsed.clear()
        assert container["command"] == ["veer"]
        assert cli.main(_downward(container["args"])) == 0, container["args"]
        [args] = parsed
        assert args.kubernetes and args.node_name == NODE
        assert args.cgroup == "/host/cgroup" and args.bpffs == "/sys/fs/bpf/veer"
        if values == every_value:
            assert args.service_cidr == "10.96.0.0/16,fd00:96::/108"
            assert args.devices == "eth0,eth1" and args.service_proxy_name == "veer"
        if "agent.cleanupOnUninstall=false" in values:
            assert args.cleanup_on_uninstall is False and not args.owner_daemonset
        else:
            assert args.cleanup_on_uninstall is True
            assert args.owner_daemonset == f"{NS}/{AGENT}"


def test_rendered_operator_args_are_what_veer_operator_accepts(
    control_plane: ControlPlane, monkeypatch: pytest.MonkeyPatch
) -> None:
    from agent.cli import main as cli

    deploy = _one(_render(control_plane), "Deployment", OPERATOR)
    [container] = deploy["spec"]["template"]["spec"]["containers"]
    parsed: list[Any] = []
    monkeypatch.setattr(cli, "run_operator", lambda args: parsed.append(args) or 0)
    assert cli.main(_downward(container["args"])) == 0, container["args"]
    assert len(parsed) == 1


def test_agent_and_operator_agree_on_the_agents_ports(
    control_plane: ControlPlane, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A TrafficPolicy redirect onto an agent's port is refused by both the
    agent and the operator, which must name the same ports: moved by the
    chart's values, they move for both."""
    from agent.cli import main as cli
    from agent.operator.conditions import agent_ports

    docs = _render(control_plane, "--set", "agent.metricsPort=19249",
                   "--set", "agent.healthzPort=19256")
    parsed: list[Any] = []
    monkeypatch.setattr(cli, "run_agent", lambda args: parsed.append(args) or 0)
    monkeypatch.setattr(cli, "run_operator", lambda args: parsed.append(args) or 0)
    for kind, name in (("DaemonSet", AGENT), ("Deployment", OPERATOR)):
        [container] = _one(docs, kind, name)["spec"]["template"]["spec"]["containers"]
        assert cli.main(_downward(container["args"])) == 0, container["args"]
    agent, operator = parsed
    expected = {19249: "metrics", 19256: "health"}
    assert dict(cli._agent_ports(agent.metrics_bind_address,
                                 agent.healthz_bind_address)) == expected
    assert agent_ports(operator.agent_metrics_port, operator.agent_healthz_port) == expected


def test_rendered_operator_deployment(control_plane: ControlPlane) -> None:
    deploy = _one(_render(control_plane), "Deployment", OPERATOR)
    assert deploy["spec"]["replicas"] == 2
    [op] = deploy["spec"]["template"]["spec"]["containers"]
    assert op["args"][:2] == ["operator", "--leader-elect"]
    assert f"--leader-elect-resource-name={OPERATOR}" in op["args"]
    assert op["securityContext"]["capabilities"] == {"drop": ["ALL"]}


@pytest.mark.parametrize(
    "values",
    [
        pytest.param([], id="defaults"),
        pytest.param(
            ["--set", "operator.enabled=false", "--set", "agent.cleanupOnUninstall=false",
             "--set", "agent.restrictNodeReports=false", "--set", "agent.verbose=true",
             "--set", "agent.serviceCIDRs={10.96.0.0/16,fd00:96::/108}",
             "--set", "agent.devices={eth0}", "--set", "agent.nodePortAddresses={192.0.2.0/24}",
             "--set", "kubernetes.apiServerHost=10.0.0.1", "--set", "image.tag=0.1.0-dev",
             "--set", "agent.extraArgs={--scan-interval=1}"],
            id="non-default",
        ),
    ],
)
def test_rendered_chart_is_valid_for_the_api_server(
    control_plane: ControlPlane, values: list[str]
) -> None:
    cp = control_plane
    cp.create_namespace(NS)
    out = cp.helm("template", RELEASE, CHART, "-n", NS, "--include-crds", *values).stdout
    applied = cp.kubectl("apply", "--dry-run=server", "-f", "-", input=out).stdout
    kinds = {line.split("/")[0].split(".")[0] for line in applied.splitlines()}
    assert "daemonset" in kinds and "customresourcedefinition" in kinds
    assert ("deployment" in kinds) == (not values)


@pytest.mark.parametrize(
    ("setting", "named"),
    [
        ("agent.mode=fast", "/agent/mode"),
        ("operator.replicas=0", "/operator/replicas"),
        ("agent.hostPaths.cgroup=sys/fs/cgroup", "/agent/hostPaths/cgroup"),
        ("agent.serviceCIDRs={10.96.0.0/33}", "/agent/serviceCIDRs/0"),
        ("agent.healthzPort=0", "/agent/healthzPort"),
        ("agent.tolerance=1", "tolerance"),
        ("image.pullPolicy=Sometimes", "/image/pullPolicy"),
    ],
)
def test_bad_values_are_refused_by_the_schema(
    control_plane: ControlPlane, setting: str, named: str
) -> None:
    cp = control_plane
    got = cp.helm("install", "veer-bad", CHART, "-n", "e2e-chart-bad", "--create-namespace",
                  "--set", setting, check=False)  # fmt: skip
    assert got.returncode != 0
    assert "values don't meet the specifications of the schema" in got.stderr, got.stderr
    assert named in got.stderr, got.stderr
    assert cp.helm("list", "-n", "e2e-chart-bad", "-q").stdout.strip() == ""


# ---- installed ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def installed(control_plane: ControlPlane) -> Iterator[ControlPlane]:
    """The chart installed as RELEASE in NS, with two Nodes; uninstalled at
    the end if the uninstall test did not."""
    cp = control_plane
    cp.create_namespace(NS)
    cp.add_node(NODE, "192.0.2.21")
    cp.add_node(OTHER_NODE, "192.0.2.22")
    out = cp.helm("install", RELEASE, CHART, "-n", NS).stdout
    assert "STATUS: deployed" in out
    assert "kubectl veer --node NODE status" in out  # NOTES.txt
    try:
        yield cp
    finally:
        if cp.helm("list", "-n", NS, "-q").stdout.split() == [RELEASE]:
            cp.helm("uninstall", RELEASE, "-n", NS)
        cp.kubectl("delete", "veernodes", NODE, OTHER_NODE, "--ignore-not-found")
        cp.kubectl("delete", "nodes", NODE, OTHER_NODE, "--ignore-not-found")


def test_install_establishes_the_crds(installed: ControlPlane) -> None:
    cp = installed
    for crd in CRDS:
        cp.kubectl("wait", "--for=condition=Established", f"crd/{crd}", "--timeout=30s")
    names = cp.kubectl("api-resources", "--api-group=veer.dev", "-o", "wide").stdout
    assert "trafficpolicies" in names and " tp " in names and "TrafficPolicy" in names
    assert "veernodes" in names and " vn " in names and "VeerNode" in names
    release = json.loads(cp.helm("status", RELEASE, "-n", NS, "-o", "json").stdout)
    assert release["info"]["status"] == "deployed"
    for kind, name in (("daemonset", AGENT), ("deployment", OPERATOR),
                       ("serviceaccount", AGENT), ("serviceaccount", OPERATOR)):  # fmt: skip
        cp.kubectl("get", kind, name, "-n", NS)


def test_examples_are_accepted(installed: ControlPlane) -> None:
    cp = installed
    cp.kubectl("apply", "-n", NS, "-f", str(EXAMPLES))
    table = cp.kubectl("get", "tp", "-n", NS).stdout.splitlines()
    assert table[0].split() == ["NAME", "TARGETS", "ALGORITHM", "ACCEPTED", "PROGRAMMED", "AGE"]
    rows = {line.split()[0]: line.split() for line in table[1:]}
    assert rows["web-canary"][1:3] == ["web", "RoundRobin"]
    assert rows["web"][1:3] == ["web", "Random"]  # the schema's default
    stored = cp.kubectl_json("get", "tp", "web", "-n", NS)
    assert stored["spec"] == {
        "targetRefs": [{"name": "web"}],
        "loadBalancing": {"algorithm": "Random"},
        "acceleration": {"sockmap": False},
    }
    proxy = cp.kubectl_json("get", "tp", "api-proxy", "-n", NS)
    assert proxy["spec"]["redirect"] == {"port": 15001, "mode": "TPROXY"}


@pytest.mark.parametrize("case", INVALID, ids=[c["id"] for c in INVALID])
def test_invalid_policy_is_refused_naming_the_field(
    installed: ControlPlane, case: dict[str, Any]
) -> None:
    cp = installed
    name = f"bad-{case['id']}"
    got = cp.kubectl("apply", "-n", NS, "-f", "-", input=_policy(name, case["spec"]),
                     check=False)  # fmt: skip
    assert got.returncode != 0, f"accepted: {got.stdout}"
    assert case["field"] in got.stderr, got.stderr
    assert cp.kubectl("get", "tp", name, "-n", NS, check=False).returncode != 0


def test_agent_token_grants(installed: ControlPlane) -> None:
    cp = installed
    kc = cp.kubeconfig_for_service_account(NS, AGENT)
    cp.kubectl("create", "secret", "generic", "s1", "-n", NS, "--from-literal=k=v")
    cp.kubectl("apply", "-n", NS, "-f", str(EXAMPLES / "minimal.yaml"))

    for args in (("get", "secret", "s1", "-n", NS), ("get", "secrets", "-A"),
                 ("get", "secrets", "-n", "kube-system")):  # fmt: skip
        assert "forbidden" in _refused(cp, *args, kubeconfig=kc).lower()
    for resource in ("services", "endpointslices.discovery.k8s.io", "trafficpolicies.veer.dev"):
        _allowed(cp, "get", resource, "-A", kubeconfig=kc)
    _allowed(cp, "get", "nodes", kubeconfig=kc)
    _allowed(cp, "get", "veernodes", kubeconfig=kc)
    _allowed(cp, "get", "tp", "web", "-n", NS, "-o", "name", kubeconfig=kc)

    # It never changes a TrafficPolicy, its spec or its status.
    patch = '{"spec":{"loadBalancing":{"algorithm":"Maglev"}}}'
    _refused(cp, "patch", "tp", "web", "-n", NS, "--type=merge", "-p", patch, kubeconfig=kc)
    _refused(cp, "label", "tp", "web", "-n", NS, "x=y", kubeconfig=kc)
    _refused(cp, "patch", "tp", "web", "-n", NS, "--subresource=status", "--type=merge",
             "-p", '{"status":{"programmed":"1/1"}}', kubeconfig=kc)  # fmt: skip
    _refused(cp, "delete", "tp", "web", "-n", NS, kubeconfig=kc)
    mine = _policy("mine", {"targetRefs": [{"name": "x"}]})
    _refused(cp, "apply", "-n", NS, "-f", "-", input=mine, kubeconfig=kc)
    # ... nor Services, Pods or Nodes.
    _refused(cp, "create", "service", "clusterip", "x", "--tcp=80", "-n", NS, kubeconfig=kc)
    _refused(cp, "get", "pods", "-n", NS, kubeconfig=kc)
    _refused(cp, "label", "node", NODE, "x=y", kubeconfig=kc)

    # Its own DaemonSet, by name (get and a one-object watch), and nothing else.
    _allowed(cp, "get", "daemonset", AGENT, "-n", NS, kubeconfig=kc)
    listed = _allowed(cp, "get", "daemonsets", "-n", NS, "-o", "name",
                      f"--field-selector=metadata.name={AGENT}", kubeconfig=kc)  # fmt: skip
    assert listed.split() == [f"daemonset.apps/{AGENT}"]
    _refused(cp, "get", "daemonsets", "-n", NS, kubeconfig=kc)
    _refused(cp, "get", "daemonsets", "-n", "kube-system", kubeconfig=kc)

    assert _grants(cp, kc) == SELF_REVIEWS | {
        ("services", "[]", "[get list watch]"),
        ("nodes", "[]", "[get list watch]"),
        ("endpointslices.discovery.k8s.io", "[]", "[get list watch]"),
        ("trafficpolicies.veer.dev", "[]", "[get list watch]"),
        ("veernodes.veer.dev", "[]", "[get list watch create]"),
        ("veernodes.veer.dev/status", "[]", "[get update patch]"),
        ("events", "[]", "[create]"),
        ("events.events.k8s.io", "[]", "[create]"),
        ("daemonsets.apps", f"[{AGENT}]", "[get list watch]"),
    }


def test_agent_writes_only_its_own_veernode(installed: ControlPlane) -> None:
    cp = installed
    mine = _node_token(cp, AGENT, NODE)
    theirs = {"apiVersion": "veer.dev/v1alpha1", "kind": "VeerNode",
              "metadata": {"name": OTHER_NODE}}  # fmt: skip
    own = {**theirs, "metadata": {"name": NODE}}
    status = json.dumps({"status": {"mode": "EBPF", "services": 3, "trafficPolicies": [
        {"namespace": NS, "name": "web", "generation": 1, "programmed": True, "mode": "EBPF"}]}})

    _allowed(cp, "create", "-f", "-", input=json.dumps(own), kubeconfig=mine)
    _allowed(cp, "patch", "veernode", NODE, "--subresource=status", "--type=merge", "-p", status,
             kubeconfig=mine)  # fmt: skip
    assert cp.kubectl_json("get", "veernode", NODE)["status"]["services"] == 3
    # The spec is not the agent's (the status subresource is).
    _refused(cp, "label", "veernode", NODE, "x=y", kubeconfig=mine)

    err = _refused(cp, "create", "-f", "-", input=json.dumps(theirs), kubeconfig=mine)
    assert f"may write only VeerNode {NODE}, not {OTHER_NODE}" in err
    cp.kubectl("create", "-f", "-", input=json.dumps(theirs))  # as admin
    err = _refused(cp, "patch", "veernode", OTHER_NODE, "--subresource=status", "--type=merge",
                   "-p", status, kubeconfig=mine)  # fmt: skip
    assert "ValidatingAdmissionPolicy" in err
    # A token that names no node (not mounted by a kubelet) writes nothing.
    anywhere = cp.kubeconfig_for_service_account(NS, AGENT)
    err = _refused(cp, "patch", "veernode", NODE, "--subresource=status", "--type=merge",
                   "-p", status, kubeconfig=anywhere)  # fmt: skip
    assert "this token names no node" in err


def test_operator_token_grants(installed: ControlPlane) -> None:
    cp = installed
    kc = cp.kubeconfig_for_service_account(NS, OPERATOR)
    cp.kubectl("apply", "-n", NS, "-f", str(EXAMPLES / "canary.yaml"))
    status = {"status": {"observedGeneration": 1, "programmed": "0/2", "conditions": [
        {"type": "Accepted", "status": "True", "reason": "Accepted", "message": "",
         "lastTransitionTime": "2026-01-01T00:00:00Z", "observedGeneration": 1}]}}  # fmt: skip
    _allowed(cp, "patch", "tp", "web-canary", "-n", NS, "--subresource=status", "--type=merge",
             "-p", json.dumps(status), kubeconfig=kc)  # fmt: skip
    table = cp.kubectl("get", "tp", "web-canary", "-n", NS, "--no-headers").stdout.split()
    assert table[3:5] == ["True", "0/2"]  # Accepted, Programmed columns

    _refused(cp, "get", "secrets", "-n", NS, kubeconfig=kc)
    _refused(cp, "get", "secrets", "-A", kubeconfig=kc)
    _refused(cp, "patch", "tp", "web-canary", "-n", NS, "--type=merge",
             "-p", '{"spec":{"split":[{"service":"web","weight":1}]}}', kubeconfig=kc)  # fmt: skip
    _refused(cp, "patch", "veernode", NODE, "--subresource=status", "--type=merge",
             "-p", '{"status":{"services":0}}', kubeconfig=kc)  # fmt: skip
    for resource in ("tp", "veernodes", "services", "nodes"):
        _allowed(cp, "get", resource, "-A", kubeconfig=kc)

    # Its Lease: create, and then only that one.
    lease = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
             "metadata": {"name": OPERATOR, "namespace": NS},
             "spec": {"holderIdentity": "op-1", "leaseDurationSeconds": 15}}  # fmt: skip
    _allowed(cp, "create", "-f", "-", input=json.dumps(lease), kubeconfig=kc)
    _allowed(cp, "patch", "lease", OPERATOR, "-n", NS, "--type=merge",
             "-p", '{"spec":{"holderIdentity":"op-2"}}', kubeconfig=kc)  # fmt: skip
    cp.kubectl("create", "-f", "-", input=json.dumps({**lease, "metadata": {"name": "other",
                                                                         "namespace": NS}}))
    _refused(cp, "patch", "lease", "other", "-n", NS, "--type=merge",
             "-p", '{"spec":{"holderIdentity":"op-2"}}', kubeconfig=kc)  # fmt: skip
    _refused(cp, "get", "leases", "-n", "kube-system", kubeconfig=kc)
    cp.kubectl("delete", "lease", "other", "-n", NS)

    assert _grants(cp, kc) == SELF_REVIEWS | {
        ("trafficpolicies.veer.dev", "[]", "[get list watch]"),
        ("veernodes.veer.dev", "[]", "[get list watch]"),
        ("services", "[]", "[get list watch]"),
        ("nodes", "[]", "[get list watch]"),
        ("trafficpolicies.veer.dev/status", "[]", "[get update patch]"),
        ("events", "[]", "[create patch]"),
        ("events.events.k8s.io", "[]", "[create patch]"),
        ("leases.coordination.k8s.io", "[]", "[create]"),
        ("leases.coordination.k8s.io", f"[{OPERATOR}]", "[get list watch update patch]"),
    }


# What every authenticated user may do (system:basic-user).
SELF_REVIEWS = {
    ("selfsubjectreviews.authentication.k8s.io", "[]", "[create]"),
    ("selfsubjectaccessreviews.authorization.k8s.io", "[]", "[create]"),
    ("selfsubjectrulesreviews.authorization.k8s.io", "[]", "[create]"),
}


def _grants(cp: ControlPlane, kubeconfig: Path) -> set[tuple[str, str, str]]:
    """(resource, resource names, verbs) rows of `kubectl auth can-i --list`
    in NS: what the API server says this identity may do there."""
    out = cp.kubectl("auth", "can-i", "--list", "-n", NS, kubeconfig=kubeconfig).stdout
    grants = set()
    for line in out.splitlines()[1:]:
        if line[:1].strip():  # a resource row (non-resource URL rows start blank)
            resource, _urls, names, *verbs = line.split()
            grants.add((resource, names, " ".join(verbs)))
    return grants


def _release_objects(cp: ControlPlane) -> list[tuple[str, str, str]]:
    """(resource, namespace, name) of every object of the release's manifest."""
    manifest = cp.helm("get", "manifest", RELEASE, "-n", NS).stdout
    out = []
    for doc in yaml.safe_load_all(manifest):
        if doc:
            group = doc["apiVersion"].rpartition("/")[0]
            resource = doc["kind"].lower() + (f".{group}" if group else "")
            out.append((resource, doc["metadata"].get("namespace", ""), doc["metadata"]["name"]))
    return out


def test_uninstall_removes_what_it_made_and_the_agent_learns_of_it_by_watch(
    installed: ControlPlane,
) -> None:
    cp = installed
    made = _release_objects(cp)
    assert len(made) >= 14, made
    kc = _node_token(cp, AGENT, NODE)

    # The agent's view: a watch on its own DaemonSet, opened while installed.
    events = cp.dir / "agent-ds-watch.json"
    with events.open("w") as out:
        watch = subprocess.Popen(
            [str(cp.bin / "kubectl"), "get", "daemonset", AGENT, "-n", NS, "--watch",
             "--output-watch-events", "-o", "json"],
            stdout=out, stderr=subprocess.STDOUT, env=cp.env(kc), cwd=REPO_ROOT,
        )  # fmt: skip
    try:
        wait_for(lambda: '"ADDED"' in events.read_text(), "the watch to list the DaemonSet", 30)
        cp.helm("uninstall", RELEASE, "-n", NS)
        wait_for(lambda: '"DELETED"' in events.read_text(), "the watch to see it deleted", 30)
    finally:
        watch.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            watch.wait(10)
        if watch.poll() is None:
            watch.kill()
            watch.wait(10)

    # At SIGTERM, after the uninstall, the same token gets no answer: its
    # bindings are gone (403), and once the API server has seen its
    # ServiceAccount deleted it does not authenticate at all (401). Asking
    # then cannot work; the watch has to tell.
    with pytest.raises(CommandError) as refused:
        cp.kubectl("get", "daemonset", AGENT, "-n", NS, kubeconfig=kc)
    assert "(Forbidden)" in refused.value.stderr or "Unauthorized" in refused.value.stderr

    def unauthorized() -> bool:
        got = cp.kubectl("get", "daemonset", AGENT, "-n", NS, kubeconfig=kc, check=False)
        return "must be logged in" in got.stderr

    wait_for(unauthorized, "the agent's token to stop authenticating", 30)

    for resource, namespace, name in made:
        args = ["get", resource, name] + (["-n", namespace] if namespace else [])

        def absent(args: list[str] = args) -> bool:
            got = cp.kubectl(*args, check=False)
            return got.returncode != 0 and "NotFound" in got.stderr

        wait_for(absent, f"{resource} {namespace}/{name} to be deleted", 30)
    assert cp.helm("list", "-n", NS, "-q").stdout.strip() == ""
    # helm never deletes CRDs: they stay, Established, with their objects.
    for crd in CRDS:
        cp.kubectl("wait", "--for=condition=Established", f"crd/{crd}", "--timeout=5s")
    assert cp.kubectl("get", "tp", "web", "-n", NS, "-o", "name").stdout.strip()
