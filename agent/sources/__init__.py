"""Sources record cluster state into a Store; they never touch the datapath.

    manifests.py        a directory of YAML/JSON manifests (no cluster)
    agent/kube/         the Kubernetes API server (agent/kube/source.py)

The agent, its API and its metrics see a source through `Source`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


class Report(Protocol):
    """What a source last delivered: counts and the problems it skipped."""

    @property
    def files(self) -> int: ...  # manifest files read (0 for the API server)

    @property
    def objects(self) -> int: ...

    @property
    def problems(self) -> tuple[str, ...]: ...


@dataclass(frozen=True)
class SourceReport:
    files: int
    objects: int
    problems: tuple[str, ...]


class Source(Protocol):
    @property
    def kind(self) -> str: ...  # "manifests" or "kubernetes"

    @property
    def location(self) -> str: ...  # the directory, or the API server's URL

    @property
    def last_report(self) -> Report: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...
