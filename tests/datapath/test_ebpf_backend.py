"""EbpfDatapath against real pinned maps (no traffic): slot layout, ids,
adoption by a second instance, and a full map that loses nothing."""

from __future__ import annotations

import ctypes
import dataclasses
import ipaddress
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator

import pytest

from agent.compute.types import Frontend, FrontendKind, L4Addr, ServicePortName
from agent.datapath.ebpf import syscall
from agent.datapath.ebpf.backend import EbpfDatapath
from agent.datapath.ebpf.maps import SockLbMaps, _possible_cpus
from agent.datapath.ebpf.programs import SockLbPrograms, cleanup
from agent.datapath.ebpf.structs import (
    COUNTER_NAMES,
    FAMILY_IPV4,
    SCOPE_SOCKET,
    AffinityMatchKey,
    BackendKey,
    ConnsSweptValue,
    ConnsValue,
    IndexKey,
    RuleKey,
    ServiceKey,
    ServiceValue,
    Tuple,
    service_key,
    service_slot_keys,
)
from agent.errors import MapFullError
from agent.model.objects import Algorithm, Protocol
from agent.sandbox.topology import BPFFS_MOUNT, ensure_mounts
from tests.datapath.conftest import require_datapath

TCP = Protocol.TCP


def fe(vip: str, port: int, *backends: str) -> Frontend:
    return Frontend(
        key=L4Addr(ipaddress.ip_address(vip), port, TCP),
        service=ServicePortName("default", "svc", "p"),
        kind=FrontendKind.CLUSTER_IP,
        backends=tuple(sorted(L4Addr(ipaddress.ip_address(b), 8080, TCP) for b in backends)),
    )


def open_datapath(sizes: dict[str, int]) -> Iterator[tuple[str, EbpfDatapath]]:
    require_datapath()
    ensure_mounts()
    pins = f"{BPFFS_MOUNT}/t{uuid.uuid4().hex[:8]}"
    try:
        SockLbPrograms(pins, sizes).load()
        dp = EbpfDatapath(SockLbMaps.open(pins))
        dp.dump()
        yield pins, dp
        dp.close()
    finally:
        cleanup("/nonexistent", pins)
        shutil.rmtree(pins, ignore_errors=True)


@pytest.fixture
def small() -> Iterator[tuple[str, EbpfDatapath]]:
    yield from open_datapath({"services": 8})


def settle(dp: EbpfDatapath) -> None:
    """Delete what a shrink or removal retired, as a pass RETIRE_AFTER_S
    later does."""
    dp._delete_retired(everything=True)


def slots(dp: EbpfDatapath, frontend: Frontend) -> list[str]:
    """Backend addresses by slot, read from the kernel map: the slots its
    socket scope's count lets a program reach (a shrink's old tail waits a
    moment before it is deleted)."""
    out = []
    key_of = {v: k for k, v in dp._backend_ids.items()}  # id -> backend
    master = dp.maps.services.get(service_key(frontend.key, 0, SCOPE_SOCKET))
    count = master.count if master is not None else 0
    for key, value in dp.maps.services.items():
        if (0 < key.slot <= count and key.scope == SCOPE_SOCKET
                and bytes(key.addr[:4]) == frontend.key.address.packed):
            out.append((key.slot, str(key_of[value.backend_id].address)))
    return [b for _, b in sorted(out)]


def test_slots_stay_in_place_when_a_backend_leaves(small: tuple[str, EbpfDatapath]) -> None:
    _, dp = small
    dp.upsert_frontend(fe("10.96.0.1", 80, "10.0.0.1", "10.0.0.2", "10.0.0.3"))
    assert slots(dp, fe("10.96.0.1", 80)) == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
    dp.upsert_frontend(fe("10.96.0.1", 80, "10.0.0.1", "10.0.0.3"))
    # The last slot moved into the hole; slot 1 was not rewritten.
    assert slots(dp, fe("10.96.0.1", 80)) == ["10.0.0.1", "10.0.0.3"]
    dp.upsert_frontend(fe("10.96.0.1", 80, "10.0.0.1", "10.0.0.3", "10.0.0.4"))
    assert slots(dp, fe("10.96.0.1", 80)) == ["10.0.0.1", "10.0.0.3", "10.0.0.4"]
    assert not dp.upsert_frontend(fe("10.96.0.1", 80, "10.0.0.1", "10.0.0.3", "10.0.0.4"))


def test_backend_entries_are_shared_and_released(small: tuple[str, EbpfDatapath]) -> None:
    _, dp = small
    dp.upsert_frontend(fe("10.96.0.1", 80, "10.0.0.1"))
    dp.upsert_frontend(fe("10.96.0.2", 80, "10.0.0.1"))
    assert len(dp.maps.backends) == 1
    dp.delete_frontend(fe("10.96.0.1", 80).key)
    settle(dp)
    assert len(dp.maps.backends) == 1
    dp.delete_frontend(fe("10.96.0.2", 80).key)
    settle(dp)
    assert len(dp.maps.backends) == 0 and len(dp.maps.services) == 0
    assert not dp.delete_frontend(fe("10.96.0.2", 80).key)


def test_a_second_instance_adopts_ids_and_state(small: tuple[str, EbpfDatapath]) -> None:
    pins, dp = small
    a = fe("10.96.0.1", 80, "10.0.0.1", "10.0.0.2")
    b = fe("10.96.0.2", 80, "10.0.0.2", "10.0.0.3")
    dp.upsert_frontend(a)
    dp.upsert_frontend(b)
    before = {bytes(k): bytes(v) for k, v in dp.maps.services.items()}
    ids = (dp.service_id(a.key), dp.service_id(b.key))

    adopted = EbpfDatapath(SockLbMaps.open(pins))
    try:
        state = adopted.dump()
        assert {k: v.backends for k, v in state.frontends.items()} == {
            a.key: a.backends, b.key: b.backends}
        assert (adopted.service_id(a.key), adopted.service_id(b.key)) == ids
        assert not adopted.upsert_frontend(a) and not adopted.upsert_frontend(b)
        assert {bytes(k): bytes(v) for k, v in adopted.maps.services.items()} == before
    finally:
        adopted.close()


def test_full_map_refuses_one_frontend_and_keeps_the_rest(
    small: tuple[str, EbpfDatapath],
) -> None:
    _, dp = small
    a = fe("10.96.0.1", 80, "10.0.0.1", "10.0.0.2", "10.0.0.3")  # 4 of 8 entries
    dp.upsert_frontend(a)
    too_big = fe("10.96.0.2", 80, "10.0.0.4", "10.0.0.5", "10.0.0.6", "10.0.0.7", "10.0.0.8")
    with pytest.raises(MapFullError) as err:
        dp.upsert_frontend(too_big)
    assert "10.96.0.2:80/TCP" in str(err.value)
    # No frontend entry was written for it, so no reader can reach its slots;
    # the next dump removes the unreachable ones and their backends.
    state = dp.dump()
    assert {k: v.backends for k, v in state.frontends.items()} == {a.key: a.backends}
    assert len(dp.maps.services) == 4
    assert len(dp.maps.backends) == 3
    # Growing an existing frontend past the limit leaves its old version whole.
    grown = fe("10.96.0.1", 80, *[f"10.0.0.{i}" for i in range(1, 10)])
    with pytest.raises(MapFullError):
        dp.upsert_frontend(grown)
    assert {k: v.backends for k, v in dp.dump().frontends.items()} == {a.key: a.backends}


@pytest.fixture
def medium() -> Iterator[tuple[str, EbpfDatapath]]:
    yield from open_datapath({"services": 64})


def test_map_counts_agree_with_a_walk_of_the_keys(medium: tuple[str, EbpfDatapath]) -> None:
    """len() of a map (the metrics' entries per map) counts by batch lookup:
    in one chunk or many, it must count what walking the keys finds."""
    _, dp = medium
    for i in range(5):
        dp.upsert_frontend(fe(f"10.96.0.{i + 1}", 80, "10.0.0.1", "10.0.0.2", f"10.0.1.{i}"))
    services = dp.maps.services
    walked = sum(1 for _ in services.list_keys())
    assert walked == 5 * 4
    assert len(services) == walked
    # (A chunk must hold a whole hash bucket, or the kernel says ENOSPC;
    # 8 is far above any bucket of 20 keys in 64, and below 20.)
    for chunk in (8, 20, 64):
        assert syscall.map_count_batch(
            services.fd, services.key_type, services.value_type, chunk=chunk) == walked
    assert len(dp.maps.backends) == 1 + 1 + 5
    dp.delete_frontend(fe("10.96.0.1", 80).key)
    settle(dp)
    assert len(services) == 4 * 4


def test_a_per_cpu_map_is_counted_by_walking_its_keys(small: tuple[str, EbpfDatapath]) -> None:
    """A per-CPU map is never read by batch: the kernel would write one value
    per CPU for each key into buffers sized for one. Its entries are still
    counted (a kernel-written entry, with a value per possible CPU)."""
    _, dp = small
    hits = dp.maps.access_hits
    assert dp.maps.services._batch and not hits._batch
    per_cpu = (ctypes.c_uint64 * _possible_cpus())()
    syscall.map_update(hits.fd, RuleKey(service_id=7, rule=1), per_cpu, "test")
    assert len(hits) == 1
    assert not hits._batch  # counted by walking, not by batch


def _slot_entries(frontend: Frontend, count: int) -> tuple[
        ctypes.Array[ServiceKey], ctypes.Array[ServiceValue]]:
    keys = service_slot_keys(frontend.key, list(range(1, count + 1)), SCOPE_SOCKET)
    values = (ServiceValue * count)(*(ServiceValue(backend_id=i, service_id=9)
                                      for i in range(1, count + 1)))
    return keys, values


def test_a_batch_write_writes_every_entry_in_one_call(small: tuple[str, EbpfDatapath]) -> None:
    _, dp = small
    services = dp.maps.services
    keys, values = _slot_entries(fe("10.96.0.1", 80), 6)
    services.put_batch(keys, values)
    assert services._batch_write  # the kernel took it as one batch
    got = {int(k.slot): int(v.backend_id) for k, v in services.items()}
    assert got == {slot: slot for slot in range(1, 7)}


def test_a_batch_write_stops_at_the_entry_that_does_not_fit(
        small: tuple[str, EbpfDatapath]) -> None:
    """As a loop of single writes would: the entries before the full map's
    refusal are written, the ones after are not, and the error says where."""
    _, dp = small
    services = dp.maps.services  # holds 8
    keys, values = _slot_entries(fe("10.96.0.1", 80), 10)
    with pytest.raises(MapFullError, match="entry 9 of 10"):
        services.put_batch(keys, values)
    assert sorted(int(k.slot) for k in services.list_keys()) == list(range(1, 9))


def test_without_batch_writes_entries_are_written_one_by_one(
        small: tuple[str, EbpfDatapath], monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel before 5.6 has no BPF_MAP_UPDATE_BATCH (bpf(2) says EINVAL,
    having written nothing): put_batch writes the entries one at a time, into
    the real map, and does not try a batch on that map again."""
    _, dp = small
    services = dp.maps.services
    tried: list[int] = []

    def old_kernel(fd: int, keys: object, values: object, what: str) -> None:
        tried.append(fd)
        raise syscall.BatchUnsupported(f"{what}: batch update: Invalid argument")

    monkeypatch.setattr(syscall, "map_update_batch", old_kernel)
    keys, values = _slot_entries(fe("10.96.0.1", 80), 3)
    services.put_batch(keys, values)
    services.put_batch(*_slot_entries(fe("10.96.0.2", 80), 2))
    assert tried == [services.fd]
    assert not services._batch_write
    assert sorted(int(k.slot) for k in services.list_keys()) == [1, 1, 2, 2, 3]


def _tc_flags(dp: EbpfDatapath) -> dict[str, int]:
    """veer_tc_addrs as IPv4 address -> VEER_TC_ADDR_* flags."""
    return {str(ipaddress.ip_address(bytes(k.addr[:4]))): int(v.flags)
            for k, v in dp.maps.tc_addrs.items()}


def _tcp4_tuple(src: str, sport: int, dst: str, dport: int) -> Tuple:
    """A veer_tuple of one IPv4 TCP direction."""
    t = Tuple(proto=6, family=FAMILY_IPV4, sport=sport, dport=dport)
    t.saddr[:4] = list(ipaddress.ip_address(src).packed)
    t.daddr[:4] = list(ipaddress.ip_address(dst).packed)
    return t


def test_tc_addresses_outlive_their_frontend_while_a_flow_names_them(
        small: tuple[str, EbpfDatapath]) -> None:
    """The TC programs look a packet up only for the addresses veer_tc_addrs
    flags: an external frontend's address (ingress) and its backends'
    (egress). Both are flagged before the frontend is written, and stay
    after it goes while a NAT entry names them."""
    from agent.datapath.ebpf.structs import (
        TC_ADDR_BACKEND,
        TC_ADDR_FRONTEND,
        NatValue,
        VipKey,
        VipValue,
    )

    _, dp = small

    node_port = dataclasses.replace(fe("10.0.0.1", 30080, "10.244.1.2"),
                                    kind=FrontendKind.NODE_PORT)
    dp.upsert_frontend(fe("10.96.0.1", 80, "10.244.1.3"))  # a ClusterIP: socket scope only
    dp.upsert_frontend(node_port)
    assert _tc_flags(dp) == {"10.0.0.1": TC_ADDR_FRONTEND, "10.244.1.2": TC_ADDR_BACKEND}
    flow = _tcp4_tuple("10.0.0.100", 1234, "10.0.0.1", 30080)
    reply = _tcp4_tuple("10.244.1.2", 8080, "10.0.0.100", 1234)
    dp.maps.nat_fwd.put(flow, NatValue())
    dp.maps.nat_rev.put(reply, NatValue())
    dp.delete_frontend(node_port.key)
    dp.dump()  # a full pass: the flow still names both addresses
    assert _tc_flags(dp) == {"10.0.0.1": TC_ADDR_FRONTEND, "10.244.1.2": TC_ADDR_BACKEND}
    dp.maps.nat_fwd.delete(flow)
    dp.dump()
    assert _tc_flags(dp) == {"10.244.1.2": TC_ADDR_BACKEND}
    dp.maps.nat_rev.delete(reply)
    dp.dump()
    assert _tc_flags(dp) == {}
    # One the agent never wrote (left by an older agent) goes the same way.
    stale = VipKey(family=FAMILY_IPV4)
    stale.addr[:4] = list(ipaddress.ip_address("10.0.0.7").packed)
    dp.maps.tc_addrs.put(stale, VipValue(flags=TC_ADDR_FRONTEND | TC_ADDR_BACKEND))
    dp.dump()
    assert _tc_flags(dp) == {}


def test_snat_addresses_are_flagged_while_the_node_or_a_flow_names_them(
        small: tuple[str, EbpfDatapath]) -> None:
    """veer_tc_ingress looks for replies only at SNAT addresses: the node's
    address is flagged before veer_node names it, and an old one stays
    flagged after the node's address changes while a source-NATed flow's
    replies still come to it."""
    from agent.datapath.ebpf.structs import TC_ADDR_SNAT, IndexKey, NatValue

    _, dp = small

    old, new = ipaddress.ip_address("10.0.0.1"), ipaddress.ip_address("10.0.0.2")
    assert dp.set_node_addresses((old,))
    assert _tc_flags(dp) == {"10.0.0.1": TC_ADDR_SNAT}
    node = dp.maps.node.get(IndexKey(0))
    assert node is not None and bytes(node.addr4[:4]) == old.packed
    reply = _tcp4_tuple("10.244.1.2", 8080, str(old), 40000)
    dp.maps.nat_rev.put(reply, NatValue())
    dp.set_node_addresses((new,))
    dp.dump()  # a full pass: the flow's replies still come to the old address
    assert _tc_flags(dp) == {"10.0.0.1": TC_ADDR_SNAT, "10.0.0.2": TC_ADDR_SNAT}
    dp.maps.nat_rev.delete(reply)
    dp.dump()
    assert _tc_flags(dp) == {"10.0.0.2": TC_ADDR_SNAT}


@pytest.fixture
def tables() -> Iterator[tuple[str, EbpfDatapath]]:
    yield from open_datapath({"services": 4096})


def test_a_frontend_that_drops_its_table_holds_each_backend_once(
        tables: tuple[str, EbpfDatapath]) -> None:
    """A weighted or Maglev table puts a backend in many slots; once the
    frontend no longer uses one, each backend is in one slot again (and so
    has an equal share), not left in the table's many."""
    _, dp = tables
    plain = fe("10.96.0.1", 80, "10.0.0.1", "10.0.0.2")
    for shaped in (dataclasses.replace(plain, weights=(1, 9)),
                   dataclasses.replace(plain, algorithm=Algorithm.MAGLEV)):
        assert dp.upsert_frontend(shaped)
        assert len(slots(dp, plain)) > 2
        assert dp.upsert_frontend(plain)
        assert sorted(slots(dp, plain)) == ["10.0.0.1", "10.0.0.2"]
        assert dp.dump().frontends[plain.key].table == ()


def test_slots_that_repeat_a_backend_read_back_as_a_table(
        small: tuple[str, EbpfDatapath]) -> None:
    """Pinned slots that repeat a backend without the table flag (as an
    earlier agent could leave them) must not read back as the plain frontend
    they no longer match: dump() shows them as a table, so the reconciler
    rewrites them."""
    _, dp = small
    plain = fe("10.96.0.1", 80, "10.0.0.1", "10.0.0.2")
    dp.upsert_frontend(plain)
    [first] = [v.backend_id for k, v in dp.maps.services.items() if k.slot == 1]
    master = service_key(plain.key, 0, SCOPE_SOCKET)
    value = dp.maps.services.get(master)
    assert value is not None
    dp.maps.services.put(service_key(plain.key, 3, SCOPE_SOCKET),
                         ServiceValue(backend_id=first, service_id=value.service_id))
    value.count = 3
    dp.maps.services.put(master, value)
    state = dp.dump()
    assert state.frontends[plain.key].backends == plain.backends
    assert len(state.frontends[plain.key].table) == 3
    assert dp.upsert_frontend(plain)
    assert sorted(slots(dp, plain)) == ["10.0.0.1", "10.0.0.2"]


def test_a_gone_backends_id_waits_for_its_counts_to_drain(
    small: tuple[str, EbpfDatapath],
) -> None:
    """A LeastConnections backend that leaves with connections still counted
    against its id keeps that id until the counts are given back: a new
    backend given it would start with those counts (and lose them as they
    end), and be passed over meanwhile."""
    _, dp = small
    lc = dataclasses.replace(fe("10.96.0.1", 80, "10.0.0.1", "10.0.0.2"),
                             algorithm=Algorithm.LEAST_CONNECTIONS)
    dp.upsert_frontend(lc)
    gone = dp.backend_id(lc.backends[0])
    assert gone is not None
    dp.maps.backend_conns.put(IndexKey(gone), ConnsValue(open=3))  # as the kernel counts
    dp.maps.backend_conns_swept.put(IndexKey(gone), ConnsSweptValue(swept=1))
    dp.upsert_frontend(dataclasses.replace(lc, backends=(lc.backends[1],)))
    dp.upsert_frontend(dataclasses.replace(lc, backends=(
        lc.backends[1], L4Addr(ipaddress.ip_address("10.0.0.3"), 8080, TCP))))
    newcomer = dp.backend_id(L4Addr(ipaddress.ip_address("10.0.0.3"), 8080, TCP))
    assert newcomer is not None and newcomer != gone
    # Still draining after a pass, and after a restart's reading of the maps.
    dp.finish_pass()
    dp.dump()
    assert gone in dp._draining
    dp.maps.backend_conns_swept.put(IndexKey(gone), ConnsSweptValue(swept=3))  # all ended
    dp.finish_pass()
    assert gone not in dp._draining
    later = L4Addr(ipaddress.ip_address("10.0.0.4"), 8080, TCP)
    dp.upsert_frontend(dataclasses.replace(lc, backends=(lc.backends[1], later)))
    assert dp.backend_id(later) == gone


def _pinned_map_info(path: str) -> syscall.MapInfo:
    fd = syscall.obj_get(path)
    try:
        return syscall.map_info(fd)
    finally:
        os.close(fd)


def _pin_other_layout(pins: str, name: str, key: int, value: int) -> str:
    """Pin in place of `name` a hash map of the given key and value sizes, as
    an earlier veer version with another layout would have left it."""
    path = f"{pins}/{name}"
    os.unlink(path)
    subprocess.run(["bpftool", "map", "create", path, "type", "hash", "key", str(key),
                    "value", str(value), "entries", "64", "name", name[:15]], check=True)
    return path


def test_an_earlier_versions_map_layout_is_replaced_at_load() -> None:
    """An upgrade over pins whose layout changed (veer_affinity_match's key
    gained the scope): BCC would adopt the old map for the new programs, and
    the agent could not open it. The load replaces that map and keeps the
    others with their entries."""
    require_datapath()
    ensure_mounts()
    pins = f"{BPFFS_MOUNT}/t{uuid.uuid4().hex[:8]}"
    try:
        SockLbPrograms(pins, {"services": 8}).load()
        dp = EbpfDatapath(SockLbMaps.open(pins))
        dp.dump()
        dp.upsert_frontend(fe("10.96.0.1", 80, "10.0.0.1"))
        dp.close()
        services = _pinned_map_info(f"{pins}/veer_services").id
        old = _pin_other_layout(pins, "veer_affinity_match", key=8, value=4)
        SockLbPrograms(pins, {"services": 8}).load()
        assert _pinned_map_info(old).key_size == ctypes.sizeof(AffinityMatchKey)
        assert _pinned_map_info(f"{pins}/veer_services").id == services
        dp = EbpfDatapath(SockLbMaps.open(pins))
        assert dp.dump().frontends[fe("10.96.0.1", 80).key].backends == fe(
            "10.96.0.1", 80, "10.0.0.1").backends
        dp.close()
        # A map whose entries name others' goes with its group: counts held
        # against backend ids go with the ids (veer_backends), which a new
        # agent would hand out afresh. The services stay.
        backends = _pinned_map_info(f"{pins}/veer_backends").id
        _pin_other_layout(pins, "veer_lc_socks", key=8, value=4)
        # An earlier version's veer_counters, with fewer counters.
        counters = f"{pins}/veer_counters"
        os.unlink(counters)
        subprocess.run(["bpftool", "map", "create", counters, "type", "percpu_array",
                        "key", "4", "value", "8", "entries", "3", "name", "veer_counters"],
                       check=True)
        SockLbPrograms(pins, {"services": 8}).load()
        assert _pinned_map_info(f"{pins}/veer_backends").id != backends
        assert _pinned_map_info(f"{pins}/veer_services").id == services
        assert _pinned_map_info(counters).max_entries == len(COUNTER_NAMES)
        SockLbMaps.open(pins).close()
    finally:
        cleanup("/nonexistent", pins)
        shutil.rmtree(pins, ignore_errors=True)


def test_a_shrunk_frontends_tail_slot_outlives_the_count_for_a_moment(
    small: tuple[str, EbpfDatapath], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A program that read a frontend's count just before it shrank may
    still look up the old tail slot and its backend: both stay until the end
    of a pass RETIRE_AFTER_S later. A slot the frontend grew back over in
    the meantime is not deleted then."""
    from agent.datapath.ebpf import backend as backend_module

    _, dp = small
    three = fe("10.96.0.1", 80, "10.0.0.1", "10.0.0.2", "10.0.0.3")
    dp.upsert_frontend(three)
    gone = dp.backend_id(three.backends[2])
    assert gone is not None
    tail = service_key(three.key, 3, SCOPE_SOCKET)
    dp.upsert_frontend(dataclasses.replace(three, backends=three.backends[:2]))
    master = dp.maps.services.get(service_key(three.key, 0, SCOPE_SOCKET))
    assert master is not None and master.count == 2
    held = dp.maps.services.get(tail)
    assert held is not None and held.backend_id == gone
    assert dp.maps.backends.get(BackendKey(gone)) is not None
    dp.finish_pass()  # too soon
    assert dp.maps.services.get(tail) is not None
    monkeypatch.setattr(backend_module, "RETIRE_AFTER_S", 0.0)
    dp.finish_pass()
    assert dp.maps.services.get(tail) is None
    assert dp.maps.backends.get(BackendKey(gone)) is None
    # Shrunk, then grown back before the deletion: the new slot stays.
    monkeypatch.setattr(backend_module, "RETIRE_AFTER_S", 3600.0)
    dp.upsert_frontend(dataclasses.replace(three, backends=three.backends[:1]))
    dp.upsert_frontend(three)
    monkeypatch.setattr(backend_module, "RETIRE_AFTER_S", 0.0)
    dp.finish_pass()
    assert slots(dp, three) == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
    # Shrunk, grown back, shrunk again: the slot waits from the last shrink.
    clock = [1000.0]
    monkeypatch.setattr(backend_module, "time", type("Clock", (), {
        "monotonic": staticmethod(lambda: clock[0])}))
    monkeypatch.setattr(backend_module, "RETIRE_AFTER_S", 5.0)
    two = dataclasses.replace(three, backends=three.backends[:2])
    dp.upsert_frontend(two)
    clock[0] += 10
    dp.upsert_frontend(three)
    dp.upsert_frontend(two)
    dp.finish_pass()  # 10 s after the first shrink, 0 after the last
    assert dp.maps.services.get(tail) is not None
    clock[0] += 10
    dp.finish_pass()
    assert dp.maps.services.get(tail) is None


def test_counts_left_by_an_earlier_agent_keep_their_id_taken(
    small: tuple[str, EbpfDatapath],
) -> None:
    """An agent that stopped while a gone backend's counts drained leaves
    them in veer_backend_conns with the backend deleted: the next agent must
    not hand that id out until they are given back."""
    pins, dp = small
    lc = dataclasses.replace(fe("10.96.0.1", 80, "10.0.0.1"),
                             algorithm=Algorithm.LEAST_CONNECTIONS)
    dp.upsert_frontend(lc)
    first = dp.backend_id(lc.backends[0])
    assert first is not None
    spare = first + 1  # an id no backend holds, with counts open
    dp.maps.backend_conns.put(IndexKey(spare), ConnsValue(open=2))
    after = EbpfDatapath(SockLbMaps.open(pins))
    try:
        after.dump()
        newcomer = L4Addr(ipaddress.ip_address("10.0.0.2"), 8080, TCP)
        after.upsert_frontend(dataclasses.replace(lc, backends=(lc.backends[0], newcomer)))
        assert after.backend_id(newcomer) not in (None, spare)
        after.maps.backend_conns.put(IndexKey(spare), ConnsValue(open=0))
        after.finish_pass()
        assert spare not in after._draining
    finally:
        after.close()


def test_pop_returns_what_it_deleted(small: tuple[str, EbpfDatapath]) -> None:
    """PinnedMap.pop: the LeastConnections sweep credits the backend of the
    entry it deleted, so it must get that entry's value."""
    _, dp = small
    frontend = fe("10.96.0.1", 80, "10.0.0.1")
    dp.upsert_frontend(frontend)
    master = service_key(frontend.key, 0, SCOPE_SOCKET)
    held = dp.maps.services.get(master)
    assert held is not None
    popped = dp.maps.services.pop(master)
    assert popped is not None and bytes(popped) == bytes(held)
    assert dp.maps.services.get(master) is None
    assert dp.maps.services.pop(master) is None
    # A kernel without lookup-and-delete for the map type: lookup, then delete.
    dp.maps.services._pop = False
    dp.maps.services.put(master, held)
    fallback = dp.maps.services.pop(master)
    assert fallback is not None and bytes(fallback) == bytes(held)
    assert dp.maps.services.get(master) is None
