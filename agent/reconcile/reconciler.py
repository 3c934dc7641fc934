"""The reconciler: the only writer of the datapath.

A pass compares the desired state with what the datapath holds and applies
only the difference:
- an *incremental* pass compares against what the reconciler last applied
  (cheap: no kernel reads);
- a *full* pass dumps the real state from the datapath first, so it also
  repairs anything changed behind its back and prunes leftovers (entries of a
  previous agent, of a crash mid-pass).
Any failure makes the next pass full. The first pass is always full, which is
how a restarted agent adopts pinned state: entries that already match are
left untouched, so established traffic notices nothing.

Order within a pass, chosen so that no socket ever sees a half-written
Service: CIDRs; frontends added or changed (each written backends-first by
the datapath); VIPs added; frontends removed; VIPs removed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Iterable, Set
from dataclasses import dataclass, field
from functools import partial

from agent.compute.types import DesiredState, Frontend, L4Addr, ServiceProblem
from agent.datapath.interface import Datapath, DatapathState
from agent.errors import DatapathError
from agent.model.objects import IPAddress

log = logging.getLogger(__name__)


@dataclass
class SyncResult:
    full: bool
    changed: int = 0
    errors: list[str] = field(default_factory=list)
    duration: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.errors


class Reconciler:
    def __init__(
        self,
        datapath: Datapath,
        desired: Callable[[], DesiredState],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._datapath = datapath
        self._desired = desired
        self._clock = clock
        self._applied = DatapathState()
        self._need_full = True
        self._reported: set[ServiceProblem] = set()
        self.last_result: SyncResult | None = None
        self.failed_frontends: dict[L4Addr, str] = {}
        # The Frontend objects the last passes confirmed programmed. compute's
        # cache hands back the very same object for a Service that did not
        # change, so an incremental pass skips those without comparing.
        self._confirmed: dict[L4Addr, Frontend] = {}
        # The desired state the last pass applied (to the end, errors or not).
        self._last: DesiredState | None = None

    def request_full(self) -> None:
        self._need_full = True

    def sync(self, full: bool = False) -> SyncResult:
        """Run one pass; full if asked or if anything earlier failed."""
        start = self._clock()
        full = full or self._need_full
        result = SyncResult(full=full)
        try:
            desired = self._desired()
            self._report_problems(desired)
            if full:
                self._applied = self._datapath.dump()
                self._confirmed = {}
            self._apply(desired, self._visit(desired, full), result)
            self._last = desired
        except DatapathError as err:
            result.errors.append(str(err))
        result.duration = self._clock() - start
        self._need_full = not result.ok
        self.last_result = result
        if result.errors:
            log.warning(
                "sync (%s) had %d error(s); next pass will be full: %s",
                "full" if full else "incremental",
                len(result.errors),
                "; ".join(result.errors[:5]),
            )
        else:
            # A pass that changed nothing is routine (debug): the runner then
            # gives its rate-limit token back.
            log.log(
                logging.INFO if result.changed else logging.DEBUG,
                "sync (%s): %d change(s) in %.1f ms",
                "full" if full else "incremental",
                result.changed,
                result.duration * 1000,
            )
        return result

    def _visit(self, desired: DesiredState, full: bool) -> Collection[L4Addr] | None:
        """The frontend keys this pass must look at; None: every one.

        An incremental pass after a pass that got to its end needs only the
        keys compute says differ from what that pass applied (added, changed
        or removed): every other frontend is the very object that pass
        confirmed or left failed, and any failure made this pass full. That
        keeps a pass O(changes), not O(frontends)."""
        last = self._last
        if full or last is None:
            return None
        if desired is last:
            return ()
        follows = desired.follows
        if follows is not None and last.generation and follows[0] == last.generation:
            return follows[1]
        return None

    def _report_problems(self, desired: DesiredState) -> None:
        current = set(desired.problems)
        for problem in sorted(current - self._reported, key=str):
            log.warning("skipping: %s", problem)
        self._reported = current

    @staticmethod
    def _try(result: SyncResult, what: str, op: Callable[[], bool]) -> bool:
        """Run one datapath operation; record a failure instead of raising."""
        try:
            if op():
                result.changed += 1
        except DatapathError as err:
            result.errors.append(f"{what}: {err}")
            return False
        return True

    def _apply(self, desired: DesiredState, visit: Collection[L4Addr] | None,
               result: SyncResult) -> None:
        dp, applied, attempt = self._datapath, self._applied, self._try

        # A visiting pass follows one that set these (or it would be full):
        # they are read back from the maps only when they changed.
        last = self._last if visit is not None else None
        if last is None or desired.node_addresses != last.node_addresses:
            attempt(result, "set node addresses",
                    partial(dp.set_node_addresses, desired.node_addresses))
        if last is None or desired.cluster_cidrs != last.cluster_cidrs:
            attempt(result, "set cluster CIDRs",
                    partial(dp.set_cluster_cidrs, desired.cluster_cidrs))

        for cidr in desired.service_cidrs - applied.service_cidrs:
            if attempt(result, f"add CIDR {cidr}", partial(dp.upsert_service_cidr, cidr)):
                applied.service_cidrs.add(cidr)

        # Every frontend, or (visit) those that changed; the others stay as
        # confirmed. A visited key that is no longer desired is removed below.
        previous = self._confirmed
        if visit is None:
            confirmed: dict[L4Addr, Frontend] = {}
            wanted: Iterable[tuple[L4Addr, Frontend]] = desired.frontends.items()
        else:
            confirmed = previous  # updated in place
            wanted = [(k, desired.frontends[k]) for k in visit if k in desired.frontends]
        for key, frontend in wanted:
            if previous.get(key) is frontend and key in applied.frontends:
                confirmed[key] = frontend
                continue
            confirmed.pop(key, None)
            programmed = self._datapath.programmed_of(frontend)
            if applied.frontends.get(key) == programmed:
                confirmed[key] = frontend
                continue
            what = f"frontend {key} of {frontend.service}"
            if attempt(result, what, partial(dp.upsert_frontend, frontend)):
                applied.frontends[key] = programmed
                self.failed_frontends.pop(key, None)
                confirmed[key] = frontend
            else:
                # The datapath keeps the old, consistent version; a full pass retries.
                applied.frontends.pop(key, None)
                self.failed_frontends[key] = result.errors[-1]

        self._confirmed = confirmed

        # A VIP comes or goes only with a frontend in force on its address,
        # so a visiting pass looks at the visited keys' addresses only (set
        # differences over every VIP compare addresses in Python, O(VIPs)).
        addresses = None if visit is None else {k.address for k in visit}
        for vip in _differ(desired.vips, applied.vips, addresses):
            if attempt(result, f"add VIP {vip}", partial(dp.upsert_vip, vip)):
                applied.vips.add(vip)

        gone = applied.frontends if visit is None else [k for k in visit if k in applied.frontends]
        for key in [k for k in gone if k not in desired.frontends]:
            confirmed.pop(key, None)
            if attempt(result, f"remove frontend {key}", partial(dp.delete_frontend, key)):
                del applied.frontends[key]
        for key in [k for k in self.failed_frontends if k not in desired.frontends]:
            del self.failed_frontends[key]

        for vip in _differ(applied.vips, desired.vips, addresses):
            if attempt(result, f"remove VIP {vip}", partial(dp.delete_vip, vip)):
                applied.vips.discard(vip)
        for cidr in applied.service_cidrs - desired.service_cidrs:
            if attempt(result, f"remove CIDR {cidr}", partial(dp.delete_service_cidr, cidr)):
                applied.service_cidrs.discard(cidr)

        try:
            for note in dp.finish_pass():
                log.info("%s", note)
        except DatapathError as err:
            result.errors.append(f"finishing the pass: {err}")


def _differ(a: Set[IPAddress], b: Set[IPAddress],
            among: set[IPAddress] | None) -> list[IPAddress]:
    """a - b, or only among `among` when given."""
    if among is None:
        return list(a - b)
    return [x for x in among if x in a and x not in b]
