"""veer's TC filters through its own rtnetlink client, checked with `tc`.

In a scratch network namespace with one veth: attach twice (the second
replaces, never adds), list, find the device by address, remove. Two tiny
programs named as veer's stand for them (compiled in the loader child).
"""

from __future__ import annotations

import ctypes
import os
import secrets
import subprocess
import threading
from collections.abc import Callable, Iterator
from ipaddress import ip_address
from typing import TypeVar

import pytest

from agent.datapath.ebpf import tc
from agent.datapath.ebpf.loader import LoadedObject, LoadRequest, ProgramSpec, load_in_child
from agent.errors import DatapathError

T = TypeVar("T")
TEXT = """
int veer_tc_ingress(struct __sk_buff *skb) { return 0; }
int veer_tc_egress(struct __sk_buff *skb) { return 0; }
"""
ADDRESS = "198.51.100.7"  # TEST-NET-2, only inside the scratch namespace


@pytest.fixture
def netns() -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.skip("network namespaces and TC need root")
    name = f"vr-tc-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        for argv in (["ip", "link", "add", "vrtc0", "type", "veth", "peer", "name", "vrtc1"],
                     ["ip", "link", "set", "vrtc0", "up"],
                     ["ip", "addr", "add", f"{ADDRESS}/24", "dev", "vrtc0"]):
            subprocess.run(["ip", "netns", "exec", name, *argv], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.fixture
def programs() -> Iterator[LoadedObject]:
    if os.geteuid() != 0:
        pytest.skip("loading BPF programs needs root")
    loaded = load_in_child(LoadRequest(TEXT, (), tuple(
        ProgramSpec(h.function, 3) for h in tc.TC_HOOKS)))
    yield loaded
    loaded.close()


def inside(netns: str, fn: Callable[[], T]) -> T:
    """Run `fn` on a thread that joined `netns` (ours is untouched)."""
    out: dict[str, object] = {}

    def run() -> None:
        fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
        try:
            assert ctypes.CDLL(None).setns(fd, 0x40000000) == 0  # CLONE_NEWNET
        finally:
            os.close(fd)
        try:
            out["result"] = fn()
        except BaseException as err:
            out["error"] = err

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if "error" in out:
        raise out["error"]  # type: ignore[misc]
    return out["result"]  # type: ignore[return-value]


def tc_show(netns: str, direction: str) -> list[str]:
    res = subprocess.run(["ip", "netns", "exec", netns, "tc", "filter", "show", "dev", "vrtc0",
                          direction], capture_output=True, text=True, check=True)
    return [line for line in res.stdout.splitlines() if "handle" in line]


def test_attach_replace_list_and_remove(netns: str, programs: LoadedObject) -> None:
    hooks = [(h, programs.programs[h.function], h.function) for h in tc.TC_HOOKS]
    assert inside(netns, lambda: tc.devices_with([ip_address(ADDRESS)])) == ["vrtc0"]
    inside(netns, lambda: tc.attach("vrtc0", hooks))
    inside(netns, lambda: tc.attach("vrtc0", hooks))  # a restarted agent: replaced in place
    for direction in ("ingress", "egress"):
        [line] = tc_show(netns, direction)
        assert f"veer_tc_{direction}" in line and "direct-action" in line
        assert "protocol all pref 30309" in line  # ETH_P_ALL, VEER_PRIO
        assert "handle 0x7665" in line  # VEER_HANDLE
    assert sorted(inside(netns, tc.attached)) == [
        ("vrtc0", "egress", "veer_tc_egress"), ("vrtc0", "ingress", "veer_tc_ingress")]
    assert len(inside(netns, tc.detach_all)) == 2
    assert tc_show(netns, "ingress") == [] and tc_show(netns, "egress") == []
    assert inside(netns, tc.attached) == []
    assert inside(netns, tc.detach_all) == []  # idempotent


def test_a_missing_device_is_named(netns: str, programs: LoadedObject) -> None:
    with pytest.raises(DatapathError, match="'nosuch0' does not exist"):
        inside(netns, lambda: tc.attach("nosuch0", []))
