"""The BPF loader child: what it hands back, and how it says it failed.

A tiny object (compiled in seconds) stands for veer's: a program that
loads, one the verifier refuses (unchecked packet access), a tail-call
target, an array and a program array.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys

import pytest

from agent.datapath.ebpf import syscall
from agent.datapath.ebpf.loader import LoadRequest, ProgramSpec, load_in_child
from agent.errors import DatapathError

SCHED_CLS = 3
BPF_MAP_TYPE_ARRAY = 2
BPF_MAP_TYPE_PROG_ARRAY = 3

TEXT = r"""
BPF_ARRAY(counts, u64, 1);
BPF_PROG_ARRAY(jumps, 2);

int good(struct __sk_buff *skb) { return 0; }
int target(struct __sk_buff *skb) { return 1; }
int bad(struct __sk_buff *skb) {
    char *p = (char *)(long)skb->data; /* no bounds check: the verifier says no */
    return *p;
}
"""


def request(*programs: ProgramSpec, text: str = TEXT) -> LoadRequest:
    return LoadRequest(text, (), programs, ("counts", "jumps", "absent"), "jumps",
                       ((0, "target"), (1, "bad")))


@pytest.fixture(autouse=True)
def _root() -> None:
    if os.geteuid() != 0:
        pytest.skip("loading BPF programs needs root")


def test_programs_maps_and_tail_calls_come_back_as_fds() -> None:
    loaded = load_in_child(request(ProgramSpec("good", SCHED_CLS),
                                   ProgramSpec("target", SCHED_CLS, required=False),
                                   ProgramSpec("bad", SCHED_CLS, required=False)))
    try:
        assert set(loaded.programs) == {"good", "target"}
        assert syscall.prog_info(loaded.programs["good"]).name == b"good"
        assert set(loaded.failed) == {"bad"} and "bad" in loaded.failed["bad"]
        assert set(loaded.maps) == {"counts", "jumps"}  # a map the object lacks is left out
        assert syscall.map_info(loaded.maps["counts"]).type == BPF_MAP_TYPE_ARRAY
        assert syscall.map_info(loaded.maps["jumps"]).type == BPF_MAP_TYPE_PROG_ARRAY
        # The child filled the program array (the kernel reads back program ids)
        # and it still holds `target` after the child exited: our fd keeps it.
        slot = ctypes.c_uint32()
        assert syscall.map_lookup(loaded.maps["jumps"], ctypes.c_uint32(0), slot)
        assert slot.value == syscall.prog_info(loaded.programs["target"]).id
        assert not syscall.map_lookup(loaded.maps["jumps"], ctypes.c_uint32(1), slot)
    finally:
        loaded.close()
    with pytest.raises(OSError):
        os.fstat(loaded.programs["good"])


def test_a_required_program_the_verifier_refuses_fails_the_load() -> None:
    with pytest.raises(DatapathError, match="bad"):
        load_in_child(request(ProgramSpec("good", SCHED_CLS), ProgramSpec("bad", SCHED_CLS)))


def test_a_compile_error_is_bccs_message() -> None:
    with pytest.raises(DatapathError, match="Failed to compile BPF module"):
        load_in_child(request(ProgramSpec("good", SCHED_CLS), text="int broken(\n"))


def test_the_loading_process_never_imports_bcc() -> None:
    code = (
        "import sys\n"
        "from agent.datapath.ebpf.loader import LoadRequest, ProgramSpec, load_in_child\n"
        f"loaded = load_in_child(LoadRequest({TEXT!r}, (), (ProgramSpec('good', 3),)))\n"
        "print(sorted(loaded.programs), 'bcc' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, check=True).stdout
    assert out.split() == ["['good']", "False"]
