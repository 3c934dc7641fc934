"""Fixtures for end-to-end tests: a real etcd, kube-apiserver and
kube-controller-manager (see controlplane.py), started once per session.

The binaries come from scripts/build-k8s.sh, which this conftest runs once,
after collection and before the first test, when an e2e test is selected:
seconds when they are cached under ~/.cache/veer, tens of minutes on a new
machine (outside the per-test timeout).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.e2e.controlplane import (
    ControlPlane,
    ControlPlaneError,
    bin_dir,
    build_binaries,
    cache_dir,
    missing_binaries,
)

_build_error: str | None = None


def _not_root() -> str:
    if os.geteuid() != 0:
        return "end-to-end tests need root (they run a control plane and the agent's datapath)"
    return ""


def pytest_collection_finish(session: pytest.Session) -> None:
    global _build_error
    if session.config.option.collectonly or _not_root():
        return
    if not any(item.get_closest_marker("e2e") for item in session.items):
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None and missing_binaries():
        reporter.write_line(
            f"e2e: building the Kubernetes control plane into {bin_dir()} "
            f"(tens of minutes the first time; log: {cache_dir() / 'build-k8s.log'})"
        )
    try:
        build_binaries()
    except (ControlPlaneError, OSError) as err:
        _build_error = str(err)


@pytest.fixture(scope="session")
def control_plane() -> Iterator[ControlPlane]:
    """A running control plane shared by the session's e2e tests."""
    reason = _not_root()
    if reason:
        pytest.skip(reason)
    if _build_error:
        pytest.fail(f"building the control plane failed: {_build_error}", pytrace=False)
    if missing_binaries():
        build_binaries()
    with ControlPlane() as cp:
        yield cp
