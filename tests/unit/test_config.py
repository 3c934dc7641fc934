"""AgentConfig validation and --service-cidr parsing."""

from __future__ import annotations

from ipaddress import ip_network
from typing import Any

import pytest

from agent.config import DEFAULT_BPFFS, AgentConfig, parse_cidrs
from agent.errors import ConfigError, VeerError


def test_defaults() -> None:
    config = AgentConfig(node_name="node-1")
    assert config.mode == "auto"
    assert config.bpffs == DEFAULT_BPFFS
    assert config.service_cidrs == frozenset()
    assert config.service_proxy_name is None
    assert config.nodeport_mode == "snat"
    assert 0 <= config.min_sync_interval <= config.max_sync_interval


def test_dsr_mode_with_the_pod_ranges() -> None:
    pods = frozenset({ip_network("10.244.0.0/16")})
    config = AgentConfig(node_name="n", nodeport_mode="dsr", cluster_cidrs=pods)
    assert config.nodeport_mode == "dsr"


@pytest.mark.parametrize("mode", ["auto", "ebpf", "tproxy"])
def test_modes(mode: str) -> None:
    assert AgentConfig(node_name="n", mode=mode).mode == mode


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        pytest.param({"node_name": ""}, "--node-name", id="no-node-name"),
        pytest.param({"node_name": "n", "mode": "iptables"}, "--mode", id="bad-mode"),
        pytest.param({"node_name": "n", "mode": "EBPF"}, "--mode", id="mode-is-case-sensitive"),
        pytest.param({"node_name": "n", "max_sync_interval": 0}, "interval", id="max-zero"),
        pytest.param({"node_name": "n", "min_sync_interval": -1}, "interval", id="min-negative"),
        pytest.param({"node_name": "n", "min_sync_interval": 5, "max_sync_interval": 1},
                     "--min-sync-interval", id="min-above-max"),
        pytest.param({"node_name": "n", "nodeport_mode": "masquerade"}, "--nodeport-mode",
                     id="bad-nodeport-mode"),
        # DSR must know which clients are pods: their replies never pass a device
        # veer serves, so they are source-NATed instead.
        pytest.param({"node_name": "n", "nodeport_mode": "dsr"}, "--cluster-cidr",
                     id="dsr-without-cluster-cidr"),
        pytest.param({"node_name": "n", "nodeport_mode": "dsr", "mode": "tproxy",
                      "cluster_cidrs": frozenset({ip_network("10.244.0.0/16")})},
                     "--mode tproxy", id="dsr-is-ebpf-only"),
    ],
)
def test_invalid_config(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        AgentConfig(**kwargs)
    assert message in str(info.value)
    assert isinstance(info.value, VeerError)


def test_equal_min_and_max_intervals_are_fine() -> None:
    assert AgentConfig(node_name="n", min_sync_interval=2, max_sync_interval=2)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("", set()),
        ("10.96.0.0/16", {"10.96.0.0/16"}),
        ("10.96.0.0/16,fd00:96::/112", {"10.96.0.0/16", "fd00:96::/112"}),
        (" 10.96.0.0/16 , fd00:96::/112 ,", {"10.96.0.0/16", "fd00:96::/112"}),
        ("10.96.0.0/16,10.96.0.0/16", {"10.96.0.0/16"}),
        ("10.96.0.1", {"10.96.0.1/32"}),
    ],
)
def test_parse_cidrs(value: str, expected: set[str]) -> None:
    assert parse_cidrs(value, "--service-cidr") == {ip_network(c) for c in expected}


@pytest.mark.parametrize(
    "bad",
    [
        "10.96.0.1/16",  # host bits set: almost always a typo for 10.96.0.0/16
        "10.96.0.0/33",
        "fd00:96::/129",
        "service-range",
        "10.96.0.0/16,nope",
    ],
)
def test_parse_cidrs_errors_name_the_flag_and_the_value(bad: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_cidrs(bad, "--service-cidr")
    message = str(info.value)
    assert message.startswith("--service-cidr: ")
    wrong = next(part for part in bad.split(",") if part != "10.96.0.0/16")
    assert repr(wrong) in message
