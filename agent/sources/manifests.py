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
- the same object in two files: the first file in path order wins, reported.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import yaml

from agent.errors import ManifestError, ModelError
from agent.model.objects import ObjectRef
from agent.model.parse import Model, parse_object
from agent.model.snapshot import Store

log = logging.getLogger(__name__)

SUFFIXES = (".yaml", ".yml", ".json")


@dataclass
class _FileState:
    signature: tuple[int, int, int]  # size, mtime_ns, inode
    objects: list[Model] = field(default_factory=list)
    error: str = ""  # the current problem with the file, if any


@dataclass(frozen=True)
class ScanReport:
    files: int
    objects: int
    problems: tuple[str, ...]


def _documents(path: str, text: str) -> Iterator[Any]:
    if path.endswith(".json"):
        try:
            yield json.loads(text)
        except json.JSONDecodeError as err:
            raise ManifestError(path, f"invalid JSON at line {err.lineno}: {err.msg}") from None
        return
    try:
        docs = list(yaml.safe_load_all(text))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ManifestError(path, f"invalid YAML{where}: {problem}") from None
    yield from (d for d in docs if d is not None)


def _expand(doc: Any) -> Iterator[Any]:
    """Flatten `kind: List` (and *List kinds) into their items."""
    if isinstance(doc, dict) and isinstance(doc.get("kind"), str) and doc["kind"].endswith(
        "List"
    ) and isinstance(doc.get("items"), list):
        for item in doc["items"]:
            yield from _expand(item)
    else:
        yield doc


def parse_file(path: str) -> tuple[list[Model], list[str]]:
    """Objects of one file and the problems with individual objects.

    Raises ManifestError when the file as a whole cannot be read or parsed.
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as err:
        raise ManifestError(path, f"cannot read: {err}") from None
    objects: list[Model] = []
    problems: list[str] = []
    for doc in _documents(path, text):
        for item in _expand(doc):
            try:
                obj = parse_object(item)
            except ModelError as err:
                problems.append(f"{path}: {err}")
                continue
            if obj is not None:
                objects.append(obj)
    return objects, problems


class ManifestSource:
    """Follows a directory and keeps a Store equal to what it holds."""

    kind = "manifests"

    def __init__(self, directory: str, store: Store, interval: float = 0.5) -> None:
        self.directory = directory
        self.store = store
        self.interval = interval
        self._files: dict[str, _FileState] = {}
        self._reported: set[str] = set()
        self._scanned = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_report = ScanReport(0, 0, ())

    @property
    def location(self) -> str:
        return self.directory

    def _walk(self) -> dict[str, tuple[int, int, int]]:
        found: dict[str, tuple[int, int, int]] = {}
        for root, dirs, files in os.walk(self.directory, followlinks=True):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(files):
                if name.startswith(".") or not name.endswith(SUFFIXES):
                    continue
                path = os.path.join(root, name)
                try:
                    st = os.stat(path)
                except OSError:
                    continue  # removed between listing and stat
                found[path] = (st.st_size, st.st_mtime_ns, st.st_ino)
        return found

    def scan(self) -> ScanReport:
        """Re-read what changed and push the whole view into the store."""
        if not os.path.isdir(self.directory):
            raise ManifestError(self.directory, "is not a directory")
        found = self._walk()
        changed = not self._scanned
        for path in list(self._files):
            if path not in found:
                del self._files[path]
                changed = True
        for path, sig in found.items():
            state = self._files.get(path)
            if state is not None and state.signature == sig:
                continue
            changed = True
            try:
                objects, problems = parse_file(path)
                error = "; ".join(problems)
            except ManifestError as err:
                # Keep the last good objects of a file that turned bad.
                objects = state.objects if state is not None else []
                error = str(err) + (" (keeping its previous content)" if objects else "")
            self._files[path] = _FileState(sig, objects, error)
        if not changed:
            # Nothing on disk changed: skip re-merging (it costs real CPU at
            # 10,000 Services, every interval).
            return self.last_report
        self._scanned = True

        merged: dict[ObjectRef, Model] = {}
        owner: dict[ObjectRef, str] = {}
        problems = [s.error for s in self._files.values() if s.error]
        for path in sorted(self._files):
            for obj in self._files[path].objects:
                if obj.ref in merged:
                    problems.append(
                        f"{path}: {obj.ref} is also defined in {owner[obj.ref]}; ignored here"
                    )
                    continue
                merged[obj.ref] = obj
                owner[obj.ref] = path
        self._report(problems)
        self.store.replace(merged.values())
        self.last_report = ScanReport(len(self._files), len(merged), tuple(problems))
        return self.last_report

    def _report(self, problems: list[str]) -> None:
        current = set(problems)
        for problem in sorted(current - self._reported):
            log.error("manifest problem: %s", problem)
        for problem in sorted(self._reported - current):
            log.info("manifest problem resolved: %s", problem)
        self._reported = current

    def start(self) -> None:
        self.scan()
        self._thread = threading.Thread(target=self._loop, name="manifests", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.scan()
            except Exception:  # a source must survive anything on disk
                log.exception("scanning %s failed", self.directory)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
