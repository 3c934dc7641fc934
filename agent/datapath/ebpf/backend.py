"""EbpfDatapath: DesiredState's frontends as socket-LB map entries.

Ids. Backends get ids from a free list, with a reference count per frontend
slot that names them; frontends get stable service ids. Both are rebuilt
from the pinned maps by `dump()` (which the reconciler calls first), so a
restarted agent keeps every id and rewrites nothing that is already right.

Slots. A frontend's backends occupy slots 1..count. Slot positions are kept
stable: a removed backend's slot is filled by a new backend or by the last
slot, so a change touches as few entries as possible.

Write order (the invariant readers rely on, see bpf/veer_structs.h): backend
entries, then slots, then the frontend entry with the new count, then slots
beyond the count and unreferenced backends are deleted. A failure at any step
leaves the frontend entry as it was, pointing at complete slots.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from agent.compute.policy import (
    FEATURE_ACCESS,
    FEATURE_AFFINITY,
    FEATURE_ALGORITHM,
    FEATURE_REDIRECT,
    FEATURE_REDIRECT_TPROXY,
    FEATURE_SOCKMAP,
    FEATURE_SPLIT,
)
from agent.compute.types import EmptyVerdict, Frontend, L4Addr
from agent.datapath.ebpf.clients import ClientNamespaces
from agent.datapath.ebpf.lc_sweep import LeastConnSweeper, open_connections, open_count
from agent.datapath.ebpf.maps import SockLbMaps
from agent.datapath.ebpf.programs import (
    NEEDS_LEAST_CONN,
    NEEDS_REDIRECT,
    NEEDS_SOCKMAP,
    SockLbPrograms,
)
from agent.datapath.ebpf.structs import (
    ACCESS_ALLOW,
    ACCESS_DENY,
    ALGORITHM_CODES,
    ALGORITHM_OF_CODE,
    CIDR_KEY_PREFIX_BITS,
    IPPROTO,
    PROTOCOL_OF,
    SCOPE_EXTERNAL,
    SCOPE_SOCKET,
    SOURCE_KEY_PREFIX_BITS,
    SVC_ALG_MASK,
    SVC_ALG_SHIFT,
    SVC_F_ACCESS,
    SVC_F_ACCESS_DENY,
    SVC_F_AFFINITY,
    SVC_F_DROP_EMPTY,
    SVC_F_EXT_LOCAL,
    SVC_F_PASS,
    SVC_F_REDIRECT,
    SVC_F_SOCKMAP,
    SVC_F_SOURCE_RANGES,
    SVC_F_TABLE,
    TC_ADDR_BACKEND,
    TC_ADDR_FRONTEND,
    TC_ADDR_SNAT,
    AccessValue,
    AffinityMatchKey,
    AffinityMatchValue,
    BackendKey,
    BackendValue,
    CidrKey,
    CidrValue,
    IndexKey,
    NodeValue,
    ProxyValue,
    ServiceKey,
    ServiceValue,
    SourceKey,
    Tuple,
    VipKey,
    VipValue,
    addr_bytes,
    addr_from,
    family_of,
    port_be,
    port_host,
    service_key,
    service_slot_keys,
)
from agent.datapath.ebpf.tproxy_redirect import TproxyRedirects
from agent.datapath.interface import (
    AccessEntry,
    Datapath,
    DatapathState,
    MapUsage,
    ProgrammedFrontend,
)
from agent.errors import DatapathError
from agent.model.objects import IPAddress, IPNetwork, Protocol

if TYPE_CHECKING:
    from agent.datapath.ebpf.events import EventConsumer
    from agent.datapath.flows import FlowEvent

log = logging.getLogger(__name__)

FrontendId = tuple[bytes, int, int, int, int]  # addr, port (be), proto, family, scope
Scoped = tuple[L4Addr, int]  # a frontend in one scope (SCOPE_SOCKET or SCOPE_EXTERNAL)


# A slot past a frontend's new count, and a backend no slot names any more,
# are deleted only at the end of a pass at least this long after: a program
# that read the frontend's count just before it shrank may still look up the
# old tail slot, and the backend it names, for a moment (microseconds).
# Deleted at once, that connection would be refused (counted `inconsistent`).
RETIRE_AFTER_S = 0.05


def _hook_needs(scope: int, flags: int) -> frozenset[str]:
    """The on-demand socket hooks a frontend's entry relies on (programs.py)."""
    if scope != SCOPE_SOCKET:
        return frozenset()
    needs = set()
    if flags & SVC_F_REDIRECT:
        needs.add(NEEDS_REDIRECT)
    if flags & SVC_F_SOCKMAP:
        needs.add(NEEDS_SOCKMAP)
    if (flags & SVC_ALG_MASK) >> SVC_ALG_SHIFT == ALGORITHM_CODES["LeastConnections"]:
        needs.add(NEEDS_LEAST_CONN)
    return frozenset(needs)


@dataclass
class _FrontendEntry:
    """One scope of one frontend as the maps hold it."""

    service_id: int
    slots: list[int]  # backend id per slot (slot i + 1); 0 marks a missing slot
    flags: int = 0
    affinity_timeout: int = 0
    sources: frozenset[IPNetwork] = frozenset()  # loadBalancerSourceRanges (external)
    weights: list[int] | None = None  # per slot, LeastConnections only

    @property
    def affinity_backends(self) -> set[int]:
        """Backends that veer_affinity_match must list for this frontend."""
        return {i for i in self.slots if i} if self.flags & SVC_F_AFFINITY else set()


@dataclass(frozen=True)
class _ScopeSpec:
    """What one scope of a frontend should hold."""

    backends: tuple[L4Addr, ...]
    flags: int
    affinity_timeout: int
    sources: frozenset[IPNetwork] = frozenset()
    table: tuple[L4Addr, ...] = ()  # the exact slots, when they form a table
    weights: tuple[int, ...] = ()  # LeastConnections weights, parallel to backends


def _policy_flags(frontend: Frontend, programmed: ProgrammedFrontend) -> int:
    flags = ALGORITHM_CODES[frontend.algorithm.value] << SVC_ALG_SHIFT
    if programmed.access_default:
        flags |= SVC_F_ACCESS
        if programmed.access_default == "Deny":
            flags |= SVC_F_ACCESS_DENY
    return flags


def _scopes_of(frontend: Frontend, programmed: ProgrammedFrontend) -> dict[int, _ScopeSpec]:
    """The scopes a frontend occupies: the socket scope always; the external
    scope (read by TC) for NodePort/ExternalIP/LoadBalancer frontends."""
    policy_flags = _policy_flags(frontend, programmed)
    socket_flags = policy_flags | (SVC_F_AFFINITY if frontend.affinity_timeout else 0)
    if programmed.redirect is not None:
        socket_flags |= SVC_F_REDIRECT
    if programmed.sockmap:
        socket_flags |= SVC_F_SOCKMAP
    if programmed.redirect_tproxy:
        socket_flags |= SVC_F_PASS
    if frontend.on_empty is EmptyVerdict.DROP:
        socket_flags |= SVC_F_DROP_EMPTY
    if programmed.table:
        socket_flags |= SVC_F_TABLE
    scopes = {
        SCOPE_SOCKET: _ScopeSpec(frontend.backends, socket_flags, frontend.affinity_timeout,
                                 table=programmed.table, weights=programmed.weights)
    }
    if frontend.kind.external:
        flags = policy_flags | (SVC_F_EXT_LOCAL if frontend.external_local else 0)
        if programmed.external_table:
            flags |= SVC_F_TABLE
        if frontend.external_on_empty is EmptyVerdict.DROP:
            flags |= SVC_F_DROP_EMPTY
        if frontend.affinity_timeout:
            flags |= SVC_F_AFFINITY
        if frontend.source_ranges:
            flags |= SVC_F_SOURCE_RANGES
        scopes[SCOPE_EXTERNAL] = _ScopeSpec(
            frontend.external_backends, flags, frontend.affinity_timeout,
            frozenset(frontend.source_ranges),
            table=programmed.external_table, weights=programmed.external_weights,
        )
    return scopes


@dataclass(frozen=True)
class _Found:
    """One scope of a frontend as dump() read it."""

    entry: _FrontendEntry
    backends: tuple[L4Addr, ...]  # sorted, once each
    table: tuple[L4Addr, ...]  # the slots in order, when they form a table
    weights: tuple[int, ...]  # LeastConnections weights parallel to `backends`


def _programmed(
    socket: _Found, external: _Found | None, access: tuple[AccessEntry, ...],
    redirect: L4Addr | None = None,
) -> ProgrammedFrontend:
    entry = socket.entry
    flags = entry.flags
    access_default = ""
    if flags & SVC_F_ACCESS:
        access_default = "Deny" if flags & SVC_F_ACCESS_DENY else "Allow"
    ext = external.entry if external is not None else None
    return ProgrammedFrontend(
        backends=socket.backends,
        drop_when_empty=bool(flags & SVC_F_DROP_EMPTY),
        affinity_timeout=entry.affinity_timeout if flags & SVC_F_AFFINITY else 0,
        external=external is not None,
        external_backends=external.backends if external else (),
        external_drop_when_empty=bool(ext.flags & SVC_F_DROP_EMPTY) if ext else False,
        external_local=bool(ext.flags & SVC_F_EXT_LOCAL) if ext else False,
        external_sources=tuple(sorted(ext.sources, key=_cidr_sort_key)) if ext else (),
        algorithm=ALGORITHM_OF_CODE.get((flags & SVC_ALG_MASK) >> SVC_ALG_SHIFT, "?"),
        table=socket.table,
        weights=socket.weights,
        external_table=external.table if external else (),
        external_weights=external.weights if external else (),
        access=access if access_default else (),
        access_default=access_default,
        redirect=redirect if flags & SVC_F_REDIRECT else None,
        sockmap=bool(flags & SVC_F_SOCKMAP),
        redirect_tproxy=redirect.port if redirect is not None and flags & SVC_F_PASS else 0,
    )


def _backend_value(be: L4Addr) -> BackendValue:
    return BackendValue(
        addr=addr_bytes(be.address),
        port=port_be(be.port),
        proto=IPPROTO[be.protocol],
        family=family_of(be.address),
    )


def _l4(addr: ctypes.Array[ctypes.c_uint8], port: int, proto: int, family: int) -> L4Addr | None:
    protocol = PROTOCOL_OF.get(proto)
    if protocol is None:
        return None
    return L4Addr(addr_from(addr, family), port_host(port), protocol)


class _IdAllocator:
    """Smallest-free-first ids in 1..limit; 0 is never handed out."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used: set[int] = set()
        self._next = 1

    def take(self, wanted: int | None = None) -> int:
        if wanted is not None:
            self.used.add(wanted)
            return wanted
        while self._next in self.used:
            self._next += 1
        if self._next > self.limit:
            raise DatapathError(f"no free id below {self.limit}")
        self.used.add(self._next)
        return self._next

    def release(self, ident: int) -> None:
        self.used.discard(ident)
        self._next = min(self._next, ident)

    def reset(self) -> None:
        self.used.clear()
        self._next = 1


class EbpfDatapath(Datapath):
    name = "ebpf"

    def __init__(self, maps: SockLbMaps, programs: SockLbPrograms | None = None,
                 proxy_uid: int | None = None,
                 sockmap: tuple[bool, str] = (False, "not probed")) -> None:
        self.maps = maps
        # sockmap acceleration: (usable here, why). Frontends that ask for it
        # are spliced only when usable; otherwise they take the normal path
        # and `veer status` says why.
        usable, why = sockmap
        if usable and programs is not None and not programs.sockmap:
            usable, why = False, programs.sockmap_error or "not compiled in"
        self.sockmap = (usable, why)
        # Redirect needs to know the proxy (its own connections are balanced,
        # never redirected back to it); without --proxy-uid it is not done.
        self.proxy_uid = proxy_uid
        # sockmap is always served: spliced where usable, else the normal path.
        features = {FEATURE_ALGORITHM, FEATURE_AFFINITY, FEATURE_SPLIT, FEATURE_ACCESS,
                    FEATURE_SOCKMAP, FEATURE_REDIRECT_TPROXY}
        if proxy_uid is not None:
            features.add(FEATURE_REDIRECT)
        self.policy_features = frozenset(features)
        wanted = ProxyValue(uid=proxy_uid or 0, set=int(proxy_uid is not None))
        current = maps.proxy.get(IndexKey(0))
        if current is None or bytes(current) != bytes(wanted):
            maps.proxy.put(IndexKey(0), wanted)
        self._redirects: dict[int, L4Addr] = {}  # service id -> proxy in veer_redirects
        # Frontends redirected by TPROXY (VEER_SVC_F_PASS) -> the proxy's port;
        # finish_pass() keeps the nftables chain equal to it.
        self._tproxy_ports: dict[L4Addr, int] = {}
        self._tproxy = TproxyRedirects()
        self._lc_sweeper = LeastConnSweeper(maps)
        self.programs = programs
        self.devices: list[str] = []
        self._removed_udp: set[tuple[int, L4Addr]] = set()
        self._resolved_for: tuple[IPAddress, ...] | None = None
        self._backend_ids: dict[L4Addr, int] = {}
        self._backend_refs: Counter[int] = Counter()
        self._backend_alloc = _IdAllocator(maps.backends.capacity)
        # Ids of backends that are gone but still have LeastConnections
        # counts open (veer_backend_conns): taken, so that no new backend
        # inherits those counts (and, as they are given back, loses them),
        # until they drain. Counts exist only once a LeastConnections entry
        # was written, by this agent or (counts found at start) another.
        self._draining: set[int] = set()
        # Unreachable entries waiting out RETIRE_AFTER_S: (frontend, scope,
        # slot position) -> when it last went past the count, and (when,
        # backend id, whose id stays taken).
        self._retired_slots: dict[tuple[L4Addr, int, int], float] = {}
        self._retired_backends: list[tuple[float, int]] = []
        self._counts_possible = bool(open_connections(maps))
        self._service_alloc = _IdAllocator(maps.services.capacity)
        self._frontends: dict[Scoped, _FrontendEntry] = {}
        # veer_tc_addrs as written (address -> TC_ADDR_* flags), starting
        # from what a predecessor left, so that adding a flag keeps the rest.
        self._tc_addrs: dict[IPAddress, int] = {
            addr_from(k.addr, k.family): int(v.flags) for k, v in maps.tc_addrs.items()}
        # The addresses veer_node names, the TC path's SNAT sources.
        self._snat_addrs: tuple[IPAddress, ...] = ()
        # How many entries of _frontends rely on each on-demand hook's need.
        self._hook_users: Counter[str] = Counter()
        self._backend_of_id: dict[int, L4Addr] = {}
        # service id -> frontend, for naming flow events. Read by the event
        # consumer's thread: only ever replaced or changed one key at a time.
        self._frontend_of_id: dict[int, L4Addr] = {}
        self._events: EventConsumer | None = None
        # service id -> the access entries veer_access holds for it
        self._access: dict[int, frozenset[AccessEntry]] = {}
        # Client namespaces' addresses, for access rules and Maglev on the
        # socket path: watched only once some frontend needs them.
        self._clients: ClientNamespaces | None = None
        if programs is not None and programs.cgroup:
            self._clients = ClientNamespaces(maps.netns_addrs, programs.cgroup)

    # ---- reading back ----------------------------------------------------

    def dump(self) -> DatapathState:
        """Read the maps, rebuild ids and caches from them, and delete entries
        no reader can reach (slots past a count, slots without a frontend,
        unreferenced backends): they wait for no RETIRE_AFTER_S here, which
        only full passes, rare, pay for."""
        # What waits to be deleted goes first: the ids rebuilt below must not
        # meet a deletion still pending for an id they reuse.
        self._delete_retired(everything=True)
        backends: dict[int, L4Addr] = {}
        for bkey, bvalue in self.maps.backends.items():
            be = _l4(bvalue.addr, bvalue.port, bvalue.proto, bvalue.family)
            if be is not None:
                backends[bkey.backend_id] = be

        masters: dict[FrontendId, tuple[L4Addr, ServiceValue]] = {}
        slot_values: dict[FrontendId, dict[int, tuple[int, int]]] = {}
        for key, value in self.maps.services.items():
            fid = (bytes(key.addr), key.port, key.proto, key.family, key.scope)
            if key.slot == 0:
                fe = _l4(key.addr, key.port, key.proto, key.family)
                if fe is not None:
                    masters[fid] = (fe, value)
            else:
                slot_values.setdefault(fid, {})[key.slot] = (value.backend_id, value.count)

        self._frontends.clear()
        self._service_alloc.reset()
        self._backend_refs.clear()
        found: dict[Scoped, _Found] = {}
        for fid, (fe, master) in masters.items():
            slots_of = slot_values.get(fid, {})
            pairs = [slots_of.get(i, (0, 0)) for i in range(1, master.count + 1)]
            slots = [ident for ident, _ in pairs]
            lc = (master.flags & SVC_ALG_MASK) >> SVC_ALG_SHIFT == ALGORITHM_CODES[
                "LeastConnections"]
            self._service_alloc.take(master.service_id)
            entry = _FrontendEntry(
                master.service_id, slots, master.flags, master.affinity_timeout,
                weights=[w for _, w in pairs] if lc else None,
            )
            self._frontends[(fe, fid[4])] = entry
            self._backend_refs.update(i for i in slots if i)
            complete = all(i in backends for i in slots)
            present = tuple(sorted({backends[i] for i in slots if i in backends}))
            weight_of = {backends[i]: w for i, w in pairs if i in backends}
            weights = tuple(weight_of[b] for b in present) if lc else ()
            # Slots that repeat a backend are a table whatever the flag says:
            # shown as one, they differ from a desired state without a table,
            # so the reconciler rewrites them.
            as_table = master.flags & SVC_F_TABLE or len(set(slots)) < len(slots)
            found[(fe, fid[4])] = _Found(
                entry, present,
                tuple(backends[i] for i in slots if i in backends) if as_table else (),
                weights if any(w != weights[0] for w in weights) else (),
            )
            if not complete:
                log.warning("frontend %s has missing slots or backends; it will be rewritten", fe)
        self._frontend_of_id = {e.service_id: fe for (fe, _), e in self._frontends.items()}
        self._hook_users = Counter(need for (_, scope), e in self._frontends.items()
                                   for need in _hook_needs(scope, e.flags))
        sources: dict[int, set[IPNetwork]] = {}
        for skey in self.maps.lb_sources.list_keys():
            sources.setdefault(skey.service_id, set()).add(_source_from(skey))
        for (_, scope), got in found.items():
            if scope == SCOPE_EXTERNAL:
                got.entry.sources = frozenset(sources.pop(got.entry.service_id, set()))
        for sid, leftover in sources.items():  # ranges of frontends that are gone
            for cidr in leftover:
                self.maps.lb_sources.delete(_source_key(sid, cidr))
        access: dict[int, set[AccessEntry]] = {}
        for akey, avalue in self.maps.access.items():
            access.setdefault(akey.service_id, set()).add(
                (_source_from(akey), int(avalue.rule), avalue.action == ACCESS_ALLOW))
        live_ids = {e.service_id for e in self._frontends.values()}
        for sid, entries in access.items():
            if sid not in live_ids:  # rules of frontends that are gone
                for cidr, _, _ in entries:
                    self.maps.access.delete(_source_key(sid, cidr))
        self._access = {sid: frozenset(e) for sid, e in access.items() if sid in live_ids}
        self._redirects = {}
        for rkey, rvalue in self.maps.redirects.items():
            proxy = _l4(rvalue.addr, rvalue.port, rvalue.proto, rvalue.family)
            if rkey.index in live_ids and proxy is not None:
                self._redirects[rkey.index] = proxy
            else:
                self.maps.redirects.delete(rkey)
        self._tproxy_ports = {
            fe: self._redirects[got.entry.service_id].port
            for (fe, scope), got in found.items()
            if scope == SCOPE_SOCKET and got.entry.flags & SVC_F_PASS
            and got.entry.service_id in self._redirects
        }
        state = DatapathState()
        for (fe, scope), socket in found.items():
            if scope == SCOPE_SOCKET:
                state.frontends[fe] = _programmed(
                    socket, found.get((fe, SCOPE_EXTERNAL)),
                    _sorted_access(self._access.get(socket.entry.service_id, frozenset())),
                    self._redirects.get(socket.entry.service_id),
                )
        for (fe, scope) in found:
            if scope == SCOPE_EXTERNAL and fe not in state.frontends:
                # An external scope without a socket scope: no desired frontend
                # looks like this, so the reconciler will remove it.
                state.frontends[fe] = ProgrammedFrontend(backends=(), external=True)

        # Garbage: affinity pairs no frontend vouches for.
        wanted_pairs = {
            (b, e.service_id, scope) for (_, scope), e in self._frontends.items()
            for b in e.affinity_backends
        }
        for mkey in self.maps.affinity_match.list_keys():
            if (mkey.backend_id, mkey.service_id, mkey.scope) not in wanted_pairs:
                self.maps.affinity_match.delete(mkey)

        # Garbage: unreachable slots.
        for fid, slots_of in slot_values.items():
            master_entry = masters.get(fid)
            count = master_entry[1].count if master_entry else 0
            for slot in slots_of:
                if slot > count:
                    garbage = ServiceKey()
                    garbage.addr[:] = list(fid[0])
                    garbage.port, garbage.proto, garbage.family = fid[1], fid[2], fid[3]
                    garbage.slot, garbage.scope = slot, fid[4]
                    self.maps.services.delete(garbage)

        self._backend_ids.clear()
        self._backend_of_id.clear()
        self._backend_alloc.reset()
        for ident in self._draining:
            self._backend_alloc.take(ident)
        for ident, be in backends.items():
            if self._backend_refs[ident] == 0 or be in self._backend_ids:
                self.maps.backends.delete(BackendKey(ident))
                if ident not in self._draining:
                    self._backend_alloc.take(ident)
                    self._free_id(ident)
                continue
            self._draining.discard(ident)
            self._backend_ids[be] = ident
            self._backend_of_id[ident] = be
            self._backend_alloc.take(ident)
        # Counts still open against ids whose backends an earlier agent
        # already deleted (it drained them too, until it stopped).
        if self._counts_possible:
            for ident in open_connections(self.maps):
                if ident not in self._backend_of_id and ident not in self._draining:
                    self._backend_alloc.take(ident)
                    self._draining.add(ident)

        for vkey in self.maps.vips.list_keys():
            state.vips.add(addr_from(vkey.addr, vkey.family))
        for ckey in self.maps.service_cidrs.list_keys():
            state.service_cidrs.add(_cidr_from(ckey))
        self._collect_tc_addrs()
        return state

    # ---- frontends ---------------------------------------------------------

    def _acquire_backend(self, be: L4Addr) -> int:
        ident = self._backend_ids.get(be)
        if ident is None:
            ident = self._backend_alloc.take()
            try:
                self.maps.backends.put(BackendKey(ident), _backend_value(be))
            except DatapathError:
                self._backend_alloc.release(ident)
                raise
            self._backend_ids[be] = ident
            self._backend_of_id[ident] = be
        return ident

    def _release_unreferenced(self, candidates: set[int]) -> None:
        for ident in candidates:
            if not ident or self._backend_refs[ident] > 0:
                continue  # 0: a slot dump() found missing, no backend
            del self._backend_refs[ident]
            be = self._backend_of_id.pop(ident, None)
            if be is not None:
                self._backend_ids.pop(be, None)
            self._retired_backends.append((time.monotonic(), ident))

    def _delete_retired(self, everything: bool = False) -> None:
        """Delete the retired slots and backends old enough (or all): a slot
        only if its frontend has not grown back over its position since."""
        cutoff = float("inf") if everything else time.monotonic() - RETIRE_AFTER_S
        slots, self._retired_slots = self._retired_slots, {}
        for retired, when in slots.items():
            if when > cutoff:
                self._retired_slots[retired] = when
                continue
            key, scope, pos = retired
            entry = self._frontends.get((key, scope))
            if entry is None or pos > len(entry.slots):
                self.maps.services.delete(service_key(key, pos, scope))
        backends, self._retired_backends = self._retired_backends, []
        for when, ident in backends:
            if when > cutoff:
                self._retired_backends.append((when, ident))
                continue
            self.maps.backends.delete(BackendKey(ident))
            self._free_id(ident)

    def _free_id(self, ident: int) -> None:
        """Give a gone backend's id back, or keep it while counts drain."""
        if self._counts_possible and open_count(self.maps, ident) > 0:
            self._draining.add(ident)
        else:
            self._backend_alloc.release(ident)

    def _free_drained(self) -> None:
        """Release the draining ids whose counts are all given back."""
        drained = {i for i in self._draining if open_count(self.maps, i) <= 0}
        self._draining -= drained
        for ident in drained:
            self._backend_alloc.release(ident)

    @staticmethod
    def _layout(old: list[int], wanted: list[int]) -> list[int]:
        """New slot contents: keep surviving backends in place, fill holes with
        additions, then compact by moving tail entries into remaining holes."""
        wanted_set = set(wanted)
        # Each backend once: `old` may be a weighted or Maglev table (a
        # backend in many slots) that this frontend no longer uses, and only
        # a backend's first slot stays in place.
        seen: set[int] = set()
        slots: list[int | None] = []
        for i in old:
            keep = i in wanted_set and i not in seen
            slots.append(i if keep else None)
            seen.add(i)
        present = {i for i in slots if i}
        additions = [i for i in wanted if i not in present]
        for pos, ident in enumerate(slots):
            if ident is None and additions:
                slots[pos] = additions.pop(0)
        slots.extend(additions)
        while True:
            while slots and slots[-1] is None:
                slots.pop()
            if None not in slots:
                return [i for i in slots if i is not None]
            # The last entry is a backend: move it into the first hole.
            slots[slots.index(None)] = slots.pop()

    def upsert_frontend(self, frontend: Frontend) -> bool:
        key = frontend.key
        programmed = self.programmed_of(frontend)
        scopes = _scopes_of(frontend, programmed)
        if programmed.access_default or programmed.algorithm == "Maglev":
            self._watch_clients()
        existing = self._frontends.get((key, SCOPE_SOCKET)) or self._frontends.get(
            (key, SCOPE_EXTERNAL)
        )
        fresh_id = existing is None
        service_id = existing.service_id if existing else self._service_alloc.take()
        changed = False
        old_access = self._access.get(service_id, frozenset())
        new_access = frozenset(programmed.access)
        try:
            # Rules before the flag that makes the programs read them.
            for cidr, rule, allow in new_access - old_access:
                self.maps.access.put(_source_key(service_id, cidr), AccessValue(
                    rule=rule, action=ACCESS_ALLOW if allow else ACCESS_DENY))
                changed = True
            self._access[service_id] = old_access | new_access
            # The proxy before the flag that sends connections to it. For a
            # TPROXY redirect the entry only records the port (for dump()).
            proxy = programmed.redirect
            if programmed.redirect_tproxy:
                proxy = L4Addr(key.address, programmed.redirect_tproxy, key.protocol)
            if proxy is not None and self._redirects.get(service_id) != proxy:
                self.maps.redirects.put(IndexKey(service_id), _backend_value(proxy))
                self._redirects[service_id] = proxy
                changed = True
            # The addresses' flags before TC can look for the frontend on them.
            if SCOPE_EXTERNAL in scopes:
                self._hold_tc_addr(key.address, TC_ADDR_FRONTEND)
                for spec in scopes.values():
                    for be in spec.backends:
                        self._hold_tc_addr(be.address, TC_ADDR_BACKEND)
            # The external scope first: TC never sees a frontend whose socket
            # scope is newer than its external one matters less than the
            # reverse, but either order keeps each scope whole.
            for scope in sorted(scopes, reverse=True):
                changed |= self._upsert_scope(frontend, scope, scopes[scope], service_id)
        except DatapathError:
            if fresh_id and not any((key, sc) in self._frontends for sc in scopes):
                self._service_alloc.release(service_id)
            raise
        for scope in (SCOPE_SOCKET, SCOPE_EXTERNAL):
            if scope not in scopes and (key, scope) in self._frontends:
                self._delete_scope(key, scope)
                changed = True
        # Replaced entries were overwritten in place; ranges no rule names any
        # more go once no flag can send a program to them.
        gone = {cidr for cidr, _, _ in old_access} - {cidr for cidr, _, _ in new_access}
        for cidr in gone:
            self.maps.access.delete(_source_key(service_id, cidr))
            changed = True
        self._access[service_id] = new_access
        if (programmed.redirect is None and not programmed.redirect_tproxy
                and self._redirects.pop(service_id, None) is not None):
            self.maps.redirects.delete(IndexKey(service_id))
            changed = True
        if programmed.redirect_tproxy:
            self._tproxy_ports[key] = programmed.redirect_tproxy
        else:
            self._tproxy_ports.pop(key, None)
        return changed

    def _upsert_scope(
        self, frontend: Frontend, scope: int, spec: _ScopeSpec, service_id: int
    ) -> bool:
        key = frontend.key
        entry = self._frontends.get((key, scope))
        wanted = [self._acquire_backend(be) for be in spec.backends]
        old_slots = entry.slots if entry else []
        if spec.table:
            # A table's positions are its meaning (Maglev) or its weights:
            # written exactly as computed.
            new_slots = [self._backend_ids[be] for be in spec.table]
        else:
            new_slots = self._layout(old_slots, wanted)
        new_weights: list[int] | None = None
        if (spec.flags & SVC_ALG_MASK) >> SVC_ALG_SHIFT == ALGORITHM_CODES["LeastConnections"]:
            weight_of = dict(zip(wanted, spec.weights or [1] * len(wanted), strict=True))
            new_weights = [weight_of[i] for i in new_slots]
        old_weights = entry.weights if entry else None
        old_sources = entry.sources if entry else frozenset()
        if (
            entry is not None
            and new_slots == old_slots
            and new_weights == old_weights
            and (entry.flags, entry.affinity_timeout) == (spec.flags, spec.affinity_timeout)
            and old_sources == spec.sources
        ):
            self._release_unreferenced(set(wanted) - set(old_slots))
            return False

        new = _FrontendEntry(service_id, new_slots, spec.flags, spec.affinity_timeout,
                             spec.sources, new_weights)
        if new_weights is not None:
            self._counts_possible = True
        old_pairs = entry.affinity_backends if entry else set()
        try:
            # The hooks the entry's flags rely on before the entry.
            if self.programs is not None:
                self.programs.require(_hook_needs(scope, spec.flags))
            # New source ranges before the flag that makes the program check
            # them; old ones go only after the frontend entry no longer needs them.
            for cidr in spec.sources - old_sources:
                self.maps.lb_sources.put(_source_key(service_id, cidr), CidrValue())
            # Affinity pairs first: a client whose entry names a new backend
            # must find it valid by the time a slot can hand it out.
            for ident in new.affinity_backends - old_pairs:
                self.maps.affinity_match.put(
                    AffinityMatchKey(ident, service_id, scope), AffinityMatchValue()
                )
            # The slots that change, in one batch write (one system call, not
            # one per slot). The master entry, whose count bounds the slots a
            # program reads, comes after them.
            slots: list[int] = []
            values: list[ServiceValue] = []
            for pos, ident in enumerate(new_slots):
                weight = new_weights[pos] if new_weights else 0
                before = old_weights[pos] if old_weights and pos < len(old_weights) else 0
                if pos >= len(old_slots) or old_slots[pos] != ident or weight != before:
                    slots.append(pos + 1)
                    values.append(
                        ServiceValue(backend_id=ident, service_id=service_id, count=weight))
            if slots:
                self.maps.services.put_batch(service_slot_keys(key, slots, scope),
                                             (ServiceValue * len(values))(*values))
            self.maps.services.put(
                service_key(key, 0, scope),
                ServiceValue(count=len(new_slots), flags=spec.flags, service_id=service_id,
                             affinity_timeout=spec.affinity_timeout),
            )
        except DatapathError as err:
            self._release_unreferenced(set(wanted) - set(old_slots))
            raise type(err)(f"frontend {key} ({frontend.service}): {err}") from err

        self._frontends[(key, scope)] = new
        self._hook_users.update(_hook_needs(scope, new.flags))
        if entry is not None:
            self._hook_users.subtract(_hook_needs(scope, entry.flags))
        self._frontend_of_id[service_id] = key
        self._note_removed(frontend.key, service_id, set(old_slots) - set(new_slots))
        now = time.monotonic()
        # The latest time counts: a slot that went past the count, came back
        # and went past it again waits from the last time.
        self._retired_slots.update(
            ((key, scope, pos + 1), now) for pos in range(len(new_slots), len(old_slots)))
        # A removed backend stops being an affinity target of this scope only
        # after no slot of it can hand the backend out any more.
        for ident in old_pairs - new.affinity_backends:
            self.maps.affinity_match.delete(AffinityMatchKey(ident, service_id, scope))
        for cidr in old_sources - spec.sources:
            self.maps.lb_sources.delete(_source_key(service_id, cidr))
        self._backend_refs.update(new_slots)
        self._backend_refs.subtract(i for i in old_slots if i)
        self._release_unreferenced(set(old_slots) | set(wanted))
        return True

    def programmed_of(self, frontend: Frontend) -> ProgrammedFrontend:
        """Without --proxy-uid there is no redirect, and without a usable
        sockmap no splicing: those frontends take the normal path."""
        programmed = ProgrammedFrontend.of(frontend)
        if programmed.redirect is not None and self.proxy_uid is None:
            programmed = dataclasses.replace(programmed, redirect=None)
        if programmed.sockmap and not self.sockmap[0]:
            programmed = dataclasses.replace(programmed, sockmap=False)
        return programmed

    def _watch_clients(self) -> None:
        """Record the client namespaces before the first frontend that reads
        them is written, then keep them current."""
        clients = self._clients
        if clients is None or clients.wanted:
            return
        clients.wanted = True
        try:
            clients.refresh()
        except OSError as err:
            raise DatapathError(f"reading client network namespaces: {err}") from err
        clients.start()

    def _note_removed(self, key: L4Addr, service_id: int, idents: set[int]) -> None:
        """Remember UDP backends that left a frontend, for finish_pass()."""
        if key.protocol is not Protocol.UDP:
            return
        for ident in idents:
            backend = self._backend_of_id.get(ident)
            if backend is not None:
                self._removed_udp.add((service_id, backend))

    def _hold_tc_addr(self, address: IPAddress, flag: int) -> None:
        flags = self._tc_addrs.get(address, 0)
        if not flags & flag:
            self.maps.tc_addrs.put(VipKey(addr=addr_bytes(address), family=family_of(address)),
                                   VipValue(flags=flags | flag))
            self._tc_addrs[address] = flags | flag

    def _collect_tc_addrs(self) -> None:
        """Make veer_tc_addrs flag every address the frontends read back
        and veer_node need, and clear the flags that neither they nor a NAT
        entry need any more: a flow keeps its addresses, as conntrack keeps
        a deleted Service's connections (and a flow source-NATed to an old
        node address its replies). Run at the end of dump(), i.e. on full
        passes: between them a flag only stays too long, which costs
        lookups, never a flow."""
        held = {addr_from(k.addr, k.family): int(v.flags) for k, v in self.maps.tc_addrs.items()}
        wanted: dict[IPAddress, int] = {a: TC_ADDR_SNAT for a in self._snat_addrs}
        for (fe, scope) in self._frontends:
            if scope != SCOPE_EXTERNAL:
                continue
            wanted[fe.address] = wanted.get(fe.address, 0) | TC_ADDR_FRONTEND
            for either in (SCOPE_SOCKET, SCOPE_EXTERNAL):
                entry = self._frontends.get((fe, either))
                for ident in entry.slots if entry else ():
                    be = self._backend_of_id.get(ident)
                    if be is not None:
                        wanted[be.address] = wanted.get(be.address, 0) | TC_ADDR_BACKEND
        spare = {a: f & ~wanted.get(a, 0) for a, f in held.items() if f & ~wanted.get(a, 0)}
        if any(f & TC_ADDR_FRONTEND for f in spare.values()):
            for k in self.maps.nat_fwd.list_keys():
                address = addr_from(k.daddr, k.family)
                if address in spare:
                    spare[address] &= ~TC_ADDR_FRONTEND
        if any(f & (TC_ADDR_BACKEND | TC_ADDR_SNAT) for f in spare.values()):
            for k in self.maps.nat_rev.list_keys():
                source, dest = addr_from(k.saddr, k.family), addr_from(k.daddr, k.family)
                if source in spare:
                    spare[source] &= ~TC_ADDR_BACKEND
                if dest in spare:
                    spare[dest] &= ~TC_ADDR_SNAT
        self._tc_addrs = {}
        for address in held.keys() | wanted.keys():
            flags = (held.get(address, 0) & ~spare.get(address, 0)) | wanted.get(address, 0)
            key = VipKey(addr=addr_bytes(address), family=family_of(address))
            if flags != held.get(address, 0):
                if flags:
                    self.maps.tc_addrs.put(key, VipValue(flags=flags))
                else:
                    self.maps.tc_addrs.delete(key)
            if flags:
                self._tc_addrs[address] = flags

    def _delete_scope(self, key: L4Addr, scope: int) -> bool:
        entry = self._frontends.get((key, scope))
        existed = self.maps.services.delete(service_key(key, 0, scope))
        if entry is None:
            return existed
        self._note_removed(key, entry.service_id, {i for i in entry.slots if i})
        now = time.monotonic()
        self._retired_slots.update(((key, scope, pos + 1), now) for pos in range(len(entry.slots)))
        for ident in entry.affinity_backends:
            self.maps.affinity_match.delete(AffinityMatchKey(ident, entry.service_id, scope))
        for cidr in entry.sources:
            self.maps.lb_sources.delete(_source_key(entry.service_id, cidr))
        del self._frontends[(key, scope)]
        self._hook_users.subtract(_hook_needs(scope, entry.flags))
        self._backend_refs.subtract(i for i in entry.slots if i)
        self._release_unreferenced({i for i in entry.slots if i})
        return True

    def delete_frontend(self, key: L4Addr) -> bool:
        # The socket scope first (connections from this node stop at once),
        # then the external one; the id is free once neither remains.
        entry = self._frontends.get((key, SCOPE_SOCKET)) or self._frontends.get(
            (key, SCOPE_EXTERNAL)
        )
        existed = False
        for scope in (SCOPE_SOCKET, SCOPE_EXTERNAL):
            existed |= self._delete_scope(key, scope)
        if entry is not None:
            for cidr, _, _ in self._access.pop(entry.service_id, frozenset()):
                self.maps.access.delete(_source_key(entry.service_id, cidr))
            if self._redirects.pop(entry.service_id, None) is not None:
                self.maps.redirects.delete(IndexKey(entry.service_id))
            self._service_alloc.release(entry.service_id)
            self._frontend_of_id.pop(entry.service_id, None)
        self._tproxy_ports.pop(key, None)
        return existed

    def finish_pass(self) -> list[str]:
        """Clear UDP flows to backends that left their frontend in this pass.

        UDP has no end: without this, a flow keeps going to a backend that is
        gone (kube-proxy's most reported failure). Per-packet flows lose their
        NAT entries, so their next datagram picks a live backend; sockets on
        this node connected to such a backend are destroyed (SOCK_DESTROY),
        so the application sees an error and reconnects through the Service.
        TCP flows are left alone: they end by themselves.
        """
        notes = []
        if self.programs is not None:
            needs = {n for n, users in self._hook_users.items() if users > 0}
            # A counted socket gives its count back only through sock_release:
            # it stays while any is counted, whatever the frontends say now.
            # (Looked at only while attached: a detached hook counts nothing,
            # and finding an empty hash map empty walks all its buckets.)
            if (NEEDS_LEAST_CONN not in needs
                    and self.programs.attached_for(NEEDS_LEAST_CONN)
                    and not self.maps.lc_socks.empty()):
                needs.add(NEEDS_LEAST_CONN)
            self.programs.retain(frozenset(needs))
        if self._tproxy.sync(self._tproxy_ports):
            notes.append(f"TPROXY redirect chain: {len(self._tproxy_ports)} frontend(s)")
        if self._lc_sweeper.due():
            swept = self._lc_sweeper.sweep()
            if swept:
                notes.append(f"LeastConnections: gave back {swept} flow(s) that ended unseen")
        self._delete_retired()
        if self._draining:
            self._free_drained()
        if not self._removed_udp:
            return notes
        removed, self._removed_udp = self._removed_udp, set()
        targets = {(sid, bytes(addr_bytes(b.address)), port_be(b.port)) for sid, b in removed}
        cleared = 0
        for key, value in self.maps.nat_fwd.items():
            if key.proto != IPPROTO[Protocol.UDP]:
                continue
            if (value.service_id, bytes(value.daddr), value.dport) not in targets:
                continue
            reply = Tuple(saddr=value.daddr, daddr=value.saddr, sport=value.dport,
                          dport=value.sport, proto=key.proto, family=key.family)
            self.maps.nat_rev.delete(reply)
            self.maps.nat_fwd.delete(key)
            cleared += 1
        if cleared:
            notes.append(f"cleared {cleared} UDP flow(s) to removed backends")
        if self.programs is not None and self.programs.cgroup:
            from agent.datapath.ebpf.sockets import destroy_udp_sockets

            gone = sorted({b for _, b in removed})
            notes.extend(destroy_udp_sockets(self.programs.cgroup, gone))
        return notes

    def serve_devices(self, devices: list[str], node_addresses: tuple[IPAddress, ...]) -> None:
        """Attach the per-packet programs to each device not served yet."""
        if self.programs is None:
            return
        if not devices:
            if node_addresses == self._resolved_for:
                return
            from agent.datapath.ebpf.tc import devices_with

            devices = devices_with(node_addresses)
            self._resolved_for = node_addresses
        new = [d for d in devices if d not in self.devices]
        if new:
            self.programs.attach_tc(new)
            self.devices.extend(new)

    def set_cluster_cidrs(self, cidrs: frozenset[IPNetwork]) -> bool:
        current = {_cidr_from(k) for k in self.maps.cluster_cidrs.list_keys()}
        if current == set(cidrs):
            return False
        for cidr in set(cidrs) - current:
            self.maps.cluster_cidrs.put(_cidr_key(cidr), CidrValue())
        for cidr in current - set(cidrs):
            self.maps.cluster_cidrs.delete(_cidr_key(cidr))
        return True

    def set_node_addresses(self, addresses: tuple[IPAddress, ...]) -> bool:
        """This node's first IPv4 and IPv6 address, the TC path's SNAT source."""
        value = NodeValue()
        v4 = next((a for a in addresses if a.version == 4), None)
        v6 = next((a for a in addresses if a.version == 6), None)
        if v4 is not None:
            value.addr4 = addr_bytes(v4)
        if v6 is not None:
            value.addr6 = addr_bytes(v6)
        # Flagged before any flow can be source-NATed to them: veer_tc_ingress
        # looks for replies only at SNAT addresses.
        self._snat_addrs = tuple(a for a in (v4, v6) if a is not None)
        for address in self._snat_addrs:
            self._hold_tc_addr(address, TC_ADDR_SNAT)
        current = self.maps.node.get(IndexKey(0))
        if current is not None and bytes(current) == bytes(value):
            return False
        self.maps.node.put(IndexKey(0), value)
        return True

    # ---- VIPs and CIDRs ----------------------------------------------------

    def upsert_vip(self, address: IPAddress) -> bool:
        key = VipKey(addr=addr_bytes(address), family=family_of(address))
        if self.maps.vips.get(key) is not None:
            return False
        self.maps.vips.put(key, VipValue())
        return True

    def delete_vip(self, address: IPAddress) -> bool:
        return self.maps.vips.delete(VipKey(addr=addr_bytes(address), family=family_of(address)))

    def upsert_service_cidr(self, cidr: IPNetwork) -> bool:
        key = _cidr_key(cidr)
        if self.maps.service_cidrs.get(key) is not None:
            return False
        self.maps.service_cidrs.put(key, CidrValue())
        return True

    def delete_service_cidr(self, cidr: IPNetwork) -> bool:
        return self.maps.service_cidrs.delete(_cidr_key(cidr))

    # ---- introspection -----------------------------------------------------

    def usage(self) -> list[MapUsage]:
        return [
            MapUsage("veer_services", len(self.maps.services), self.maps.services.capacity),
            MapUsage("veer_backends", len(self.maps.backends), self.maps.backends.capacity),
            MapUsage("veer_vips", len(self.maps.vips), self.maps.vips.capacity),
        ]

    def counters(self) -> Mapping[str, int]:
        return self.maps.counters()

    def open_connections(self) -> dict[int, int]:
        """Backend id -> open connections as LeastConnections counts them."""
        return open_connections(self.maps)

    def access_hits(self) -> Mapping[tuple[int, int], int]:
        return self.maps.access_hit_counts()

    def service_id(self, key: L4Addr) -> int | None:
        entry = self._frontends.get((key, SCOPE_SOCKET))
        return entry.service_id if entry else None

    def backend_id(self, backend: L4Addr) -> int | None:
        return self._backend_ids.get(backend)

    # ---- flow events -------------------------------------------------------

    def start_flow_events(self, sink: Callable[[list[FlowEvent]], None]) -> bool:
        if self.programs is None or self._events is not None:
            return False
        clients = self._clients

        def deliver(batch: list[FlowEvent]) -> None:
            if clients is not None and any(e.reason == "access_unknown" for e in batch):
                clients.wake()
            sink(batch)

        consumer = self.programs.event_consumer(deliver)
        consumer.start()
        self._events = consumer
        return True

    def trace_translations(self, on: bool) -> None:
        if self.programs is not None:
            self.programs.set_trace_translations(on)

    def frontend_of(self, service_id: int) -> L4Addr | None:
        return self._frontend_of_id.get(service_id)

    def close(self) -> None:
        self._tproxy.close()
        if self._clients is not None:
            self._clients.stop()
        if self._events is not None:
            self._events.stop()
            self._events = None
            # Programs stay attached after we exit: leave them reporting only
            # the rare verdicts into a buffer nobody reads.
            try:
                self.trace_translations(False)
            except DatapathError as err:
                log.warning("turning translation events off failed: %s", err)
        self.maps.close()


def _cidr_key(cidr: IPNetwork) -> CidrKey:
    return CidrKey(
        prefixlen=CIDR_KEY_PREFIX_BITS + cidr.prefixlen,
        family=family_of(cidr),
        addr=addr_bytes(cidr.network_address),
    )


def _cidr_from(key: CidrKey) -> IPNetwork:
    import ipaddress

    address = addr_from(key.addr, key.family)
    return ipaddress.ip_network(f"{address}/{key.prefixlen - CIDR_KEY_PREFIX_BITS}")


def _source_key(service_id: int, cidr: IPNetwork) -> SourceKey:
    return SourceKey(
        prefixlen=SOURCE_KEY_PREFIX_BITS + cidr.prefixlen,
        service_id=service_id,
        family=family_of(cidr),
        addr=addr_bytes(cidr.network_address),
    )


def _source_from(key: SourceKey) -> IPNetwork:
    import ipaddress

    address = addr_from(key.addr, key.family)
    return ipaddress.ip_network(f"{address}/{key.prefixlen - SOURCE_KEY_PREFIX_BITS}")


def _cidr_sort_key(cidr: IPNetwork) -> tuple[int, int, int]:
    return (cidr.version, int(cidr.network_address), cidr.prefixlen)


def _sorted_access(entries: frozenset[AccessEntry]) -> tuple[AccessEntry, ...]:
    return tuple(sorted(entries, key=lambda e: _cidr_sort_key(e[0])))
