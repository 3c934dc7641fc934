"""The manifest-directory source: Kubernetes objects from YAML/JSON files.

Every *.yaml, *.yml and *.json file under the directory (recursively, hidden
files and directories skipped) is read; a file may hold several documents
(`---`) and `kind: List` objects. The directory is polled: each scan stats
every file and re-reads only those whose size, mtime or inode changed, so a
scan of an unchanged directory costs a few stat calls.

Errors never lose state:
- a file that cannot be parsed is reported with its name; if it parsed before,
  its last good objects stay in force (an editor's half-written save must not
  drop Services), if it is new, nothing from it is applied;
- an object that is malformed is reported (file, object, field) and skipped;
  the rest of its file is applied;
- the same object in two files: the first file in path order wins, reported;
- anything a file makes the parser raise (nesting too deep for the stack, a
  YAML alias that refers to itself, a 5,000-digit number) is that file's
  reported problem like a syntax error, never a failed scan;
- symbolic links are followed, but every directory and every file is visited
  once (by device and inode), so a link back up the tree neither loops nor
  makes a file a duplicate of itself; a FIFO or device named *.yaml is
  reported, not read (reading it could block the scan for ever);
- a subdirectory that cannot be listed is reported, and the files last seen
  in it keep their objects;
- a changed file is read only once it has stayed unchanged for SETTLE_S (by
  its mtime, or by two looks that far apart), and it is taken only if it is
  still unchanged after the read: a writer that truncates a file and then
  writes it (an editor saving in place) leaves a moment in which the file is
  empty or cut short, and that must not drop the Services it held. Until
  then the file keeps its previous objects. A file emptied waits
  EMPTIED_SETTLE_S (a shell's `cmd > f` empties f before cmd has written
  anything). A file that has not settled after UNSETTLED_REPORT_S is
  reported. No wait covers a writer that pauses longer mid-file: writing to
  a hidden name and renaming is the safe way to change a manifest.

What a scan read is remembered only once the store holds it: a scan that
fails part-way is repeated in full by the next one, so no change is lost.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any

import yaml

from agent.errors import ManifestError, ModelError
from agent.model.objects import ObjectRef
from agent.model.parse import Model, parse_object
from agent.model.snapshot import Store

log = logging.getLogger(__name__)

SUFFIXES = (".yaml", ".yml", ".json")

# How long a changed file must stay unchanged before it is read. A program
# rewriting a file in place does so within milliseconds; the cost is this
# much delay on every change.
SETTLE_S = 0.2
# A file that held objects and is now empty waits this long: emptying is
# mostly the first step of `cmd > f`, whose output may take a while to come.
EMPTIED_SETTLE_S = 2.0
# A file still changing after this long is reported (it is not read meanwhile).
UNSETTLED_REPORT_S = 5.0
# start() waits at most this long for files that are being written, so that
# the first view is not one cut short; past it, such files are left out.
START_SETTLE_WAIT_S = 2.0

Signature = tuple[int, int, int]  # size, mtime_ns, inode


def _signature(st: os.stat_result) -> Signature:
    return (st.st_size, st.st_mtime_ns, st.st_ino)


@dataclass
class _FileState:
    signature: Signature
    objects: list[Model] = field(default_factory=list)
    error: str = ""  # the current problem with the file, if any


@dataclass(frozen=True)
class _Unsettled:
    """A changed file not read yet, because it may still be being written."""

    signature: Signature  # as last seen
    due: float  # monotonic time it has settled if that signature holds till then
    since: float  # monotonic time the file was first seen changing


@dataclass(frozen=True)
class ScanReport:
    files: int
    objects: int
    problems: tuple[str, ...]


def _documents(path: str, text: str) -> list[Any]:
    if path.endswith(".json"):
        try:
            return [json.loads(text)]
        except json.JSONDecodeError as err:
            raise ManifestError(path, f"invalid JSON at line {err.lineno}: {err.msg}") from None
    try:
        docs = list(yaml.safe_load_all(text))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ManifestError(path, f"invalid YAML{where}: {problem}") from None
    return [d for d in docs if d is not None]


def _expand(path: str, doc: Any, lists: frozenset[int] = frozenset()) -> Iterator[Any]:
    """Flatten `kind: List` (and *List kinds) into their items.

    `lists` holds the Lists being expanded: a YAML alias can make a List its
    own item, which would otherwise recurse until the stack runs out.
    """
    if isinstance(doc, dict) and isinstance(doc.get("kind"), str) and doc["kind"].endswith(
        "List"
    ) and isinstance(doc.get("items"), list):
        if id(doc) in lists:
            raise ManifestError(path, f"a {doc['kind']} contains itself (through a YAML alias)")
        for item in doc["items"]:
            yield from _expand(path, item, lists | {id(doc)})
    else:
        yield doc


def _rfc3339(value: date) -> str:
    if isinstance(value, datetime):
        # YAML reads a timestamp without a zone as UTC.
        utc = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    else:
        utc = datetime(value.year, value.month, value.day, tzinfo=UTC)
    # Seconds, as the API server writes metav1.Time: a fraction would also
    # break the text ordering ('.' sorts before 'Z').
    return (f"{utc.year:04d}-{utc.month:02d}-{utc.day:02d}"
            f"T{utc.hour:02d}:{utc.minute:02d}:{utc.second:02d}Z")


def _normalize_created(doc: Any) -> None:
    """Give metadata.creationTimestamp the API server's RFC 3339 UTC text.

    YAML turns an unquoted timestamp into a datetime, whose str() ('2024-05-01
    10:00:00+00:00') does not sort against the text of a JSON file or the API
    ('2024-05-01T09:00:00Z'); the older of two conflicting TrafficPolicies is
    chosen by comparing that text (agent/operator/conditions.py).
    """
    if not isinstance(doc, dict) or not isinstance(doc.get("metadata"), dict):
        return
    meta = doc["metadata"]
    created = meta.get("creationTimestamp")
    if isinstance(created, date):  # datetime is a date too
        meta["creationTimestamp"] = _rfc3339(created)


def _parse_text(path: str, text: str) -> tuple[list[Model], list[str]]:
    objects: list[Model] = []
    problems: list[str] = []
    for doc in _documents(path, text):
        for item in _expand(path, doc):
            _normalize_created(item)
            try:
                obj = parse_object(item)
            except ModelError as err:
                problems.append(f"{path}: {err}")
                continue
            if obj is not None:
                objects.append(obj)
    return objects, problems


def parse_file(path: str) -> tuple[list[Model], list[str]]:
    """Objects of one file and the problems with individual objects.

    Raises ManifestError when the file as a whole cannot be read or parsed,
    whatever the parser raised: one file must not stop the others.
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as err:
        raise ManifestError(path, f"cannot read: {err}") from None
    try:
        return _parse_text(path, text)
    except ManifestError:
        raise
    except RecursionError:
        # Both parsers recurse once per level of [ or {.
        raise ManifestError(path, "cannot be parsed: nested too deeply") from None
    except Exception as err:  # e.g. ValueError: an integer of more than 4300 digits
        raise ManifestError(path, f"cannot be parsed: {type(err).__name__}: {err}") from None


class ManifestSource:
    """Follows a directory and keeps a Store equal to what it holds."""

    kind = "manifests"

    def __init__(self, directory: str, store: Store, interval: float = 0.5, *,
                 settle: float = SETTLE_S,
                 clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], int] = time.time_ns) -> None:
        self.directory = directory
        self.store = store
        self.interval = interval
        self.settle = settle
        self._clock = clock
        self._wall_clock = wall_clock
        self._files: dict[str, _FileState] = {}
        # Changed files not read yet (see the module's docstring), and those
        # of them reported as still changing.
        self._unsettled: dict[str, _Unsettled] = {}
        self._overdue: frozenset[str] = frozenset()
        # Files read by a first scan that start() held back (see _scan), kept
        # so that the next one neither reads them again nor forgets that
        # they had settled.
        self._read_ahead: dict[str, _FileState] = {}
        self._reported: set[str] = set()
        self._scanned = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_report = ScanReport(0, 0, ())

    @property
    def location(self) -> str:
        return self.directory

    def _walk(self) -> tuple[dict[str, os.stat_result], dict[str, str]]:
        """The manifest files, each real file once, in walk order; and the
        directories that could not be listed, with why."""
        found: dict[str, os.stat_result] = {}
        unreadable: dict[str, str] = {}

        def note(err: OSError) -> None:
            unreadable[str(err.filename)] = err.strerror or str(err)

        # Links are followed (a directory may be a link to a config volume),
        # so a link back up the tree would be walked again and again: every
        # directory and file is taken once, by (device, inode).
        try:
            top = os.stat(self.directory)
        except OSError as err:
            # Not an empty view: that would remove every object.
            raise ManifestError(self.directory, f"cannot be read: {err}") from None
        dirs_seen = {(top.st_dev, top.st_ino)}
        files_seen: set[tuple[int, int]] = set()
        for root, dirs, files in os.walk(self.directory, onerror=note, followlinks=True):
            kept = []
            for name in sorted(dirs):
                if name.startswith("."):
                    continue
                try:
                    st = os.stat(os.path.join(root, name))
                except OSError:
                    continue  # removed between listing and stat
                if (st.st_dev, st.st_ino) not in dirs_seen:
                    dirs_seen.add((st.st_dev, st.st_ino))
                    kept.append(name)
            dirs[:] = kept
            for name in sorted(files):
                if name.startswith(".") or not name.endswith(SUFFIXES):
                    continue
                path = os.path.join(root, name)
                try:
                    st = os.stat(path)
                except OSError:
                    continue  # removed between listing and stat
                if (st.st_dev, st.st_ino) not in files_seen:
                    files_seen.add((st.st_dev, st.st_ino))
                    found[path] = st
        return found, unreadable

    def _unsettled_since(self, path: str, st: os.stat_result, previous: _FileState | None,
                         now: float, wall: int) -> _Unsettled | None:
        """None if the changed file has settled and may be read; else what
        is known of its settling."""
        signature = _signature(st)
        emptied = st.st_size == 0 and previous is not None and bool(previous.objects)
        settle = max(self.settle, EMPTIED_SETTLE_S) if emptied else self.settle
        # The mtime says how long the file has been quiet only if the file
        # system keeps it finer than a second: a whole-second mtime may have
        # been rounded down by most of one, so such a file needs two looks.
        # (A file server whose clock is behind ours can still fool it.)
        fine = st.st_mtime_ns % 1_000_000_000 != 0
        if fine and (wall - st.st_mtime_ns) / 1e9 >= settle:  # < 0 for a future mtime
            return None
        earlier = self._unsettled.get(path)
        if earlier is not None and earlier.signature == signature:
            return None if now >= earlier.due else earlier
        return _Unsettled(signature, now + settle, earlier.since if earlier is not None else now)

    def _due_in(self, now: float) -> float:
        """Seconds until the next unsettled file may have settled."""
        if not self._unsettled:
            return self.interval
        due = min(u.due for u in self._unsettled.values()) - now
        return min(self.interval, max(0.01, due))

    @staticmethod
    def _read(path: str, st: os.stat_result, previous: _FileState | None) -> _FileState | None:
        """The file's state; None if it changed while being read."""
        signature = _signature(st)
        regular = stat.S_ISREG(st.st_mode)
        try:
            if not regular:
                # Opening a FIFO blocks until a writer comes; a device may never end.
                raise ManifestError(path, "is not a regular file; not read")
            objects, problems = parse_file(path)
            error = "; ".join(problems)
        except ManifestError as err:
            # Keep the last good objects of a file that turned bad.
            objects = previous.objects if previous is not None else []
            error = str(err) + (" (keeping its previous content)" if objects else "")
        if regular:
            # A read that raced a write, parsed or not, is not the file.
            try:
                if _signature(os.stat(path)) != signature:
                    return None
            except OSError:
                return None  # removed meanwhile: the next walk will say so
        return _FileState(signature, objects, error)

    def scan(self) -> ScanReport:
        """Re-read what changed and push the whole view into the store."""
        report = self._scan(hold_first=False)
        assert report is not None
        return report

    def _scan(self, hold_first: bool) -> ScanReport | None:
        """scan(); with hold_first, a first view that leaves out a file not
        yet settled is not pushed (None is returned)."""
        if not os.path.isdir(self.directory):
            raise ManifestError(self.directory, "is not a directory")
        found, unreadable = self._walk()
        # Built aside and committed only once the store holds it: were
        # anything below to raise, the next scan would otherwise take the
        # files read here for applied and never apply them.
        files: dict[str, _FileState] = {}
        # A directory that cannot be listed is not an empty one: the files
        # last seen in it keep their content, reported, rather than their
        # objects being removed.
        for path, known in self._files.items():
            why = next((why for d, why in unreadable.items()
                        if path not in found and path.startswith(d.rstrip(os.sep) + os.sep)),
                       None)
            if why is not None:
                files[path] = _FileState(known.signature, known.objects,
                                         f"{path}: its directory cannot be listed ({why}); "
                                         "keeping its previous content")
        changed = not self._scanned or any(
            path not in found and files.get(path) != known for path, known in self._files.items())
        now, wall = self._clock(), self._wall_clock()
        unsettled: dict[str, _Unsettled] = {}
        for path, st in found.items():
            state = self._files.get(path)
            if state is not None and state.signature == _signature(st):
                files[path] = state
                continue
            ahead = self._read_ahead.get(path)
            if ahead is not None and ahead.signature == _signature(st):
                changed = True
                files[path] = ahead
                continue
            # Only a regular file's content can be cut short (anything else
            # is reported, not read).
            waiting = (self._unsettled_since(path, st, state, now, wall)
                       if stat.S_ISREG(st.st_mode) else None)
            if waiting is None:
                read = self._read(path, st, state)
                if read is not None:
                    changed = True
                    files[path] = read
                    continue
                # Written to while being read: wait for it afresh.
                earlier = self._unsettled.get(path)
                waiting = _Unsettled(_signature(st), now + self.settle,
                                     earlier.since if earlier is not None else now)
            unsettled[path] = waiting
            if state is not None:
                files[path] = state  # its previous objects stay meanwhile
        self._unsettled = unsettled
        overdue = frozenset(path for path, u in unsettled.items()
                            if now - u.since >= UNSETTLED_REPORT_S)
        if hold_first and not self._scanned and unsettled:
            self._read_ahead = files
            return None
        changed = changed or overdue != self._overdue
        if not changed:
            # Nothing on disk changed: skip re-merging (it costs real CPU at
            # 10,000 Services, every interval).
            return self.last_report

        merged: dict[ObjectRef, Model] = {}
        owner: dict[ObjectRef, str] = {}
        problems = [s.error for s in files.values() if s.error]
        problems += [f"{path}: still changing after {UNSETTLED_REPORT_S:g} s; not read until "
                     f"it stays unchanged for {self.settle:g} s"
                     + (" (keeping its previous content)"
                        if path in files and files[path].objects else "")
                     for path in sorted(overdue)]
        for path in sorted(files):
            for obj in files[path].objects:
                if obj.ref in merged:
                    problems.append(
                        f"{path}: {obj.ref} is also defined in {owner[obj.ref]}; ignored here"
                    )
                    continue
                merged[obj.ref] = obj
                owner[obj.ref] = path
        self.store.replace(merged.values())
        self._files = files
        self._overdue = overdue
        self._read_ahead = {}
        self._scanned = True
        self._report(problems)
        self.last_report = ScanReport(len(files), len(merged), tuple(problems))
        return self.last_report

    def _report(self, problems: list[str]) -> None:
        current = set(problems)
        for problem in sorted(current - self._reported):
            log.error("manifest problem: %s", problem)
        for problem in sorted(self._reported - current):
            log.info("manifest problem resolved: %s", problem)
        self._reported = current

    def start(self) -> None:
        # The first view is waited for until every file in it has settled,
        # for a while: an agent that starts from a view cut short would
        # remove, then restore, the Services the missing part holds.
        deadline = self._clock() + START_SETTLE_WAIT_S
        while self._scan(hold_first=self._clock() < deadline) is None:
            time.sleep(self._due_in(self._clock()))
        self._thread = threading.Thread(target=self._loop, name="manifests", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self._due_in(self._clock())):
            try:
                self.scan()
            except Exception:  # a source must survive anything on disk
                log.exception("scanning %s failed", self.directory)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
