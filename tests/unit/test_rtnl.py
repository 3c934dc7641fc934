"""rtnetlink attributes as veer's client writes and reads them: lengths,
4-byte padding, the nested flag, and a truncated run (no root needed)."""

from __future__ import annotations

import struct

from agent.datapath.ebpf import rtnl


def test_attributes_round_trip_with_padding_and_nesting() -> None:
    options = rtnl._u32(rtnl.TCA_BPF_FD, 7) + rtnl._string(rtnl.TCA_BPF_NAME, "veer_tc_ingress")
    raw = rtnl._string(rtnl.TCA_KIND, "bpf") + rtnl._attr(
        rtnl.TCA_OPTIONS | rtnl.NLA_F_NESTED, options)
    # "bpf\0" is 4 bytes: no padding; the name (16 bytes with its NUL) neither,
    # the u32 is 8 bytes with its header: every attribute starts 4-aligned.
    assert len(raw) % 4 == 0 and len(rtnl._string(1, "clsact")) == 12
    attrs = rtnl.attributes(raw)
    assert rtnl._text(attrs[rtnl.TCA_KIND]) == "bpf"
    inner = rtnl.attributes(attrs[rtnl.TCA_OPTIONS])  # the nested flag is masked off
    assert struct.unpack("=I", inner[rtnl.TCA_BPF_FD]) == (7,)
    assert rtnl._text(inner[rtnl.TCA_BPF_NAME]) == "veer_tc_ingress"


def test_a_truncated_run_stops_at_the_last_whole_attribute() -> None:
    raw = rtnl._u32(rtnl.TCA_BPF_FD, 1) + rtnl._u32(rtnl.TCA_BPF_FLAGS, 1)[:3]
    assert set(rtnl.attributes(raw)) == {rtnl.TCA_BPF_FD}
    bad_length = struct.pack("=HH", 2, rtnl.TCA_KIND) + b"junk"
    assert rtnl.attributes(bad_length) == {}
