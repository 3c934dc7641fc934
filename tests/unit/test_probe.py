"""The kernel-feature check behind --mode: bpftool's report in, found and
missing features out."""

from __future__ import annotations

from typing import Any

from agent.datapath.ebpf.probe import HELPERS, MAP_TYPES, PROGRAM_TYPES, evaluate, needed


def full_report() -> dict[str, Any]:
    return {
        "program_types": {f"have_{p}_prog_type": True for p in PROGRAM_TYPES},
        "map_types": {f"have_{m}_map_type": True for m in MAP_TYPES},
        "helpers": {f"{p}_available_helpers": list(h) for p, h in HELPERS.items()},
    }


def test_a_kernel_with_everything_is_ready() -> None:
    features = evaluate(full_report())
    assert features.ebpf_ready and set(features.found) == set(needed())


def test_each_kind_of_missing_feature_is_named() -> None:
    report = full_report()
    report["program_types"]["have_sched_cls_prog_type"] = False
    del report["map_types"]["have_ringbuf_map_type"]
    report["helpers"]["cgroup_sock_addr_available_helpers"].remove("bpf_set_retval")
    features = evaluate(report)
    assert not features.ebpf_ready
    assert set(features.missing) == {
        "program:sched_cls", "map:ringbuf", "helper:cgroup_sock_addr:bpf_set_retval"}


def test_hidden_features_count_as_missing() -> None:
    features = evaluate(full_report(), hidden=["helper:sched_cls:bpf_redirect_neigh"])
    assert features.missing == ("helper:sched_cls:bpf_redirect_neigh",)
