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


def test_sockmap_needs_its_features_and_a_verified_kernel_series() -> None:
    from agent.datapath.ebpf.probe import SOCKMAP_NEEDS, kernel_series, sockmap_verdict

    report = full_report()
    report["program_types"]["have_sk_msg_prog_type"] = True
    report["map_types"]["have_sockhash_map_type"] = True
    report["helpers"]["sk_msg_available_helpers"] = ["bpf_msg_redirect_hash"]
    report["helpers"]["sock_ops_available_helpers"].append("bpf_sock_hash_update")
    features = evaluate(report)
    assert features.sockmap_missing == ()
    assert sockmap_verdict(features, "6.18.44-fc")[0] is True
    # A kernel series nobody verified gets no acceleration, however good its probe.
    ok, why = sockmap_verdict(features, "6.6.30")
    assert not ok and "not on veer's list" in why and "6.18" in why
    # A hidden (or missing) feature is named.
    hidden = evaluate(report, hidden=["map:sockhash"])
    ok, why = sockmap_verdict(hidden, "6.18.1")
    assert not ok and "map:sockhash" in why
    assert hidden.ebpf_ready  # sockmap is optional: eBPF mode still runs
    assert "map:sockhash" in SOCKMAP_NEEDS
    assert kernel_series("6.18.44-fc-v657") == (6, 18) and kernel_series("junk") == (0, 0)
