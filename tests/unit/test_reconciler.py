"""The reconciler against FakeDatapath: full and incremental passes, write
order, failures, pruning and repair.

Addresses as in test_compute.py: Services 10.96.0.<n>, pods 10.244.<node>.<n>.
"""

from __future__ import annotations

import itertools
import re
from ipaddress import ip_address, ip_network
from types import MappingProxyType

import pytest

from agent.compute.types import (
    DesiredState,
    Frontend,
    FrontendKind,
    L4Addr,
    ServicePortName,
    ServiceProblem,
)
from agent.datapath.fake import FakeDatapath
from agent.datapath.interface import ProgrammedFrontend
from agent.model.objects import Protocol
from agent.reconcile.reconciler import Reconciler

CIDR_V4 = ip_network("10.96.0.0/16")
CIDR_V6 = ip_network("fd00:96::/112")


def l4(text: str) -> L4Addr:
    """'10.96.0.1:80/TCP' or '[fd00::1]:80/UDP' -> L4Addr."""
    m = re.fullmatch(r"\[?([^\]]+?)\]?:(\d+)/(TCP|UDP|SCTP)", text)
    assert m, text
    return L4Addr(ip_address(m[1]), int(m[2]), Protocol(m[3]))


def state(
    frontends: dict[str, list[str]],
    cidrs: tuple[object, ...] = (CIDR_V4,),
    problems: tuple[ServiceProblem, ...] = (),
) -> DesiredState:
    fes = {}
    for i, (key, backends) in enumerate(sorted(frontends.items())):
        k = l4(key)
        fes[k] = Frontend(k, ServicePortName("default", f"svc{i}", "p"), FrontendKind.CLUSTER_IP,
                          tuple(sorted(l4(b) for b in backends)))
    return DesiredState(
        frontends=MappingProxyType(fes),
        vips=frozenset(k.address for k in fes),
        service_cidrs=frozenset(cidrs),  # type: ignore[arg-type]
        problems=problems,
    )


class Desired:
    """What compute would return; tests swap `current` between passes."""

    def __init__(self, current: DesiredState) -> None:
        self.current = current

    def __call__(self) -> DesiredState:
        return self.current


def setup(initial: DesiredState) -> tuple[FakeDatapath, Desired, Reconciler]:
    dp, desired = FakeDatapath(), Desired(initial)
    return dp, desired, Reconciler(dp, desired)


def programmed(dp: FakeDatapath) -> dict[str, list[str]]:
    return {str(k): [str(b) for b in v.backends] for k, v in dp.state.frontends.items()}


def assert_holds(dp: FakeDatapath, want: DesiredState) -> None:
    assert programmed(dp) == {
        str(k): [str(b) for b in f.backends] for k, f in want.frontends.items()
    }
    assert dp.state.vips == set(want.vips)
    assert dp.state.service_cidrs == set(want.service_cidrs)


A = {"10.96.0.1:80/TCP": ["10.244.1.2:8080/TCP", "10.244.1.3:8080/TCP"]}
B = {"10.96.0.2:53/UDP": ["10.244.1.2:9053/UDP"]}
C = {"[fd00:96::3]:80/TCP": ["[fd00:10:244:1::2]:8080/TCP"]}
EMPTY = {"10.96.0.4:80/TCP": []}
ABC = {**A, **B, **C}


def test_first_pass_is_full_and_programs_everything() -> None:
    want = state({**ABC, **EMPTY}, cidrs=(CIDR_V4, CIDR_V6))
    dp, _, rec = setup(want)
    result = rec.sync()
    assert result.full and result.ok
    assert dp.calls[0] == ("dump", "")
    assert_holds(dp, want)
    # 2 CIDRs + 4 frontends + 4 VIPs
    assert result.changed == 10
    assert rec.last_result is result


def test_incremental_pass_does_not_dump_and_unchanged_state_writes_nothing() -> None:
    dp, desired, rec = setup(state(ABC))
    rec.sync()
    dp.calls.clear()

    result = rec.sync()
    assert not result.full and result.ok and result.changed == 0
    assert dp.calls == []

    desired.current = state({**ABC, "10.96.0.1:80/TCP": ["10.244.1.2:8080/TCP"]})
    result = rec.sync()
    assert not result.full
    assert dp.calls == [("upsert_frontend", "10.96.0.1:80/TCP")]
    assert result.changed == 1
    assert_holds(dp, desired.current)


def test_full_pass_with_nothing_to_do_only_dumps() -> None:
    dp, _, rec = setup(state(ABC))
    rec.sync()
    dp.calls.clear()
    result = rec.sync(full=True)
    assert result.full and result.changed == 0
    assert dp.calls == [("dump", "")]


def test_order_of_writes() -> None:
    dp, desired, rec = setup(state({**A, **B}, cidrs=(CIDR_V4,)))
    rec.sync()
    dp.calls.clear()

    # One pass that does every kind of write: a new CIDR and the old one gone,
    # B changed, C new (new VIP), A removed (its VIP goes too).
    desired.current = state(
        {**C, "10.96.0.2:53/UDP": ["10.244.1.3:9053/UDP"]}, cidrs=(CIDR_V6,)
    )
    result = rec.sync()
    assert result.ok
    groups = [name for name, _ in itertools.groupby(call for call, _ in dp.calls)]
    assert groups == [
        "upsert_service_cidr",
        "upsert_frontend",
        "upsert_vip",
        "delete_frontend",
        "delete_vip",
        "delete_service_cidr",
    ]
    assert sorted(dp.calls) == sorted([
        ("upsert_service_cidr", "fd00:96::/112"),
        ("upsert_frontend", "10.96.0.2:53/UDP"),
        ("upsert_frontend", "[fd00:96::3]:80/TCP"),
        ("upsert_vip", "fd00:96::3"),
        ("delete_frontend", "10.96.0.1:80/TCP"),
        ("delete_vip", "10.96.0.1"),
        ("delete_service_cidr", "10.96.0.0/16"),
    ])
    assert_holds(dp, desired.current)


def test_error_on_one_frontend_leaves_the_others_applied_and_forces_a_full_pass() -> None:
    want = state(ABC)
    dp, _, rec = setup(want)
    bad = l4("10.96.0.2:53/UDP")
    dp.fail_on.add(bad)

    result = rec.sync()
    assert not result.ok
    assert len(result.errors) == 1 and "10.96.0.2:53/UDP" in result.errors[0]
    assert set(rec.failed_frontends) == {bad}
    assert programmed(dp) == {**A, **C}
    # The failed frontend's VIP is still written: the address is a Service.
    assert dp.state.vips == set(want.vips)

    # Still failing: the next pass is full and reports it again.
    dp.calls.clear()
    result = rec.sync()
    assert result.full and not result.ok
    assert dp.calls[0] == ("dump", "")
    assert dp.calls[1:] == [("upsert_frontend", "10.96.0.2:53/UDP")]

    # The kernel recovers: the full pass applies it and clears the failure.
    dp.fail_on.clear()
    dp.calls.clear()
    result = rec.sync()
    assert result.full and result.ok
    assert rec.failed_frontends == {}
    assert_holds(dp, want)

    # Everything applied: back to cheap incremental passes.
    dp.calls.clear()
    result = rec.sync()
    assert not result.full and dp.calls == []


def test_failed_update_keeps_the_old_version_and_is_retried() -> None:
    dp, desired, rec = setup(state(A))
    rec.sync()
    key = l4("10.96.0.1:80/TCP")
    dp.fail_on.add(key)
    desired.current = state({"10.96.0.1:80/TCP": ["10.244.2.2:8080/TCP"]})

    result = rec.sync()
    assert not result.ok and key in rec.failed_frontends
    assert programmed(dp) == A  # the old, consistent version

    dp.fail_on.clear()
    result = rec.sync()
    assert result.full and result.ok
    assert programmed(dp) == {"10.96.0.1:80/TCP": ["10.244.2.2:8080/TCP"]}


def test_failed_frontend_no_longer_desired_is_forgotten() -> None:
    dp, desired, rec = setup(state(ABC))
    dp.fail_on.add(l4("10.96.0.2:53/UDP"))
    rec.sync()
    assert rec.failed_frontends
    desired.current = state({**A, **C})
    result = rec.sync()
    assert result.ok and rec.failed_frontends == {}


def test_failed_delete_is_retried_by_the_next_full_pass() -> None:
    dp, desired, rec = setup(state(ABC))
    rec.sync()
    dp.fail_on.add(l4("10.96.0.2:53/UDP"))
    desired.current = state({**A, **C})

    result = rec.sync()
    assert not result.ok and "remove frontend 10.96.0.2:53/UDP" in result.errors[0]
    assert "10.96.0.2:53/UDP" in programmed(dp)

    dp.fail_on.clear()
    dp.calls.clear()
    result = rec.sync()
    assert result.full and result.ok
    assert ("delete_frontend", "10.96.0.2:53/UDP") in dp.calls
    assert_holds(dp, desired.current)


def test_dump_failure_writes_nothing_and_stays_full() -> None:
    dp, _, rec = setup(state(ABC))
    dp.fail_dump = True
    result = rec.sync()
    assert result.full and not result.ok
    assert dp.calls == [("dump", "")]
    assert programmed(dp) == {}

    dp.fail_dump = False
    result = rec.sync()
    assert result.full and result.ok
    assert programmed(dp) == ABC


def test_full_pass_prunes_what_nobody_wants() -> None:
    """Entries of a previous agent (or a crash mid-pass) are removed."""
    dp = FakeDatapath()
    stale = l4("10.96.0.9:80/TCP")
    dp.state.frontends[stale] = ProgrammedFrontend((l4("10.244.9.9:8080/TCP"),))
    dp.state.vips.add(stale.address)
    dp.state.service_cidrs.add(ip_network("10.100.0.0/16"))
    want = state(A)
    rec = Reconciler(dp, Desired(want))

    result = rec.sync()
    assert result.full and result.ok
    assert ("delete_frontend", "10.96.0.9:80/TCP") in dp.calls
    assert ("delete_vip", "10.96.0.9") in dp.calls
    assert ("delete_service_cidr", "10.100.0.0/16") in dp.calls
    assert_holds(dp, want)


def test_restart_adopts_matching_state_without_writes() -> None:
    want = state(ABC, cidrs=(CIDR_V4, CIDR_V6))
    dp, _, first = setup(want)
    first.sync()
    dp.calls.clear()

    # A new agent (a new Reconciler) over the same datapath.
    result = Reconciler(dp, Desired(want)).sync()
    assert result.full and result.ok and result.changed == 0
    assert dp.calls == [("dump", "")]


def test_incremental_pass_trusts_memory_full_pass_repairs() -> None:
    want = state(ABC)
    dp, _, rec = setup(want)
    rec.sync()

    # Someone changes the datapath behind the reconciler's back.
    a = l4("10.96.0.1:80/TCP")
    dp.state.frontends[a] = ProgrammedFrontend((l4("10.244.6.6:8080/TCP"),))
    del dp.state.frontends[l4("[fd00:96::3]:80/TCP")]
    dp.state.vips.discard(ip_address("10.96.0.2"))

    dp.calls.clear()
    result = rec.sync()
    assert not result.full and dp.calls == []  # cheap passes do not read the kernel

    result = rec.sync(full=True)
    assert result.full and result.ok
    assert result.changed == 3
    assert_holds(dp, want)


def test_request_full() -> None:
    dp, _, rec = setup(state(A))
    rec.sync()
    rec.request_full()
    dp.calls.clear()
    assert rec.sync().full
    assert dp.calls == [("dump", "")]
    assert not rec.sync().full


def test_problems_do_not_block_the_pass(caplog: pytest.LogCaptureFixture) -> None:
    problem = ServiceProblem("default", "sig", "UnsupportedProtocol", "SCTP")
    dp, _, rec = setup(state(A, problems=(problem,)))
    with caplog.at_level("WARNING"):
        assert rec.sync().ok
        rec.sync()
    assert programmed(dp) == A
    # Reported once, not on every pass.
    assert sum("Service/default/sig" in r.getMessage() for r in caplog.records) == 1
