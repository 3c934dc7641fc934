"""libnftables through its JSON interface (Debian's python3-nftables).

Commands are Python dicts in libnftables-json(5)'s schema, never command
strings: nothing a Service carries is ever parsed as nftables syntax. One
`run()` is one netlink transaction: the kernel applies all of it or none.

The library's context is not thread-safe and `veer maps` reads from the API
thread while the reconciler writes, so every call holds one lock.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Sequence
from typing import Any

from agent.errors import DatapathError, EnvironmentProblem

Command = dict[str, Any]


def _load() -> Any:
    try:
        module = importlib.import_module("nftables")
    except ImportError as err:
        raise EnvironmentProblem(
            "TPROXY mode needs libnftables' Python binding (Debian: apt-get install "
            "python3-nftables; scripts/setup.sh installs it and links it into .venv)"
        ) from err
    try:
        return module.Nftables()
    except OSError as err:  # libnftables.so.1 itself is missing
        raise EnvironmentProblem(f"cannot load libnftables: {err} (apt-get install "
                                 "libnftables1)") from err


class Nft:
    def __init__(self) -> None:
        self._ctx = _load()
        self._lock = threading.Lock()

    def run(self, commands: Sequence[Command], what: str) -> None:
        """Apply `commands` in one transaction; DatapathError names `what` on failure."""
        if not commands:
            return
        with self._lock:
            rc, _, error = self._ctx.json_cmd({"nftables": list(commands)})
        if rc != 0:
            raise DatapathError(f"nftables refused {what}: {_first_lines(error)}")

    def query(self, command: Command) -> list[dict[str, Any]]:
        """Run one `list` command; the objects it returned (metainfo dropped).
        A missing object is an empty answer, not an error."""
        with self._lock:
            rc, output, error = self._ctx.json_cmd({"nftables": [command]})
        if rc != 0:
            if "No such file or directory" in error:
                return []
            raise DatapathError(f"nftables: listing {command}: {_first_lines(error)}")
        if not output:
            return []
        return [o for o in output.get("nftables", []) if "metainfo" not in o]


def _first_lines(error: str, limit: int = 6) -> str:
    lines = [line for line in error.strip().splitlines() if line.strip()]
    return " | ".join(lines[:limit]) + (" | ..." if len(lines) > limit else "")
