"""The --status-file: a JSON summary of the programmed state, rewritten after
every reconcile pass (tests, the sandbox and the benches read it).

    {"frontends": {"10.96.0.10:80/TCP": ["10.244.1.2:8080/TCP", ...], ...},
     "external_frontends": {"192.168.1.10:30080/TCP": {"backends": [...],
                            "local": false, "sources": [], "affinity": 0}, ...},
     "ok": true, "errors": [], "problems": [...], "counters": {...}, ...}

Cost: it lists every frontend, so a pass that changed one Service must not
render N of them again (with 10,000 Services that was most of the agent's
CPU). Each frontend's entries are rendered once and kept while compute hands
back the very same Frontend object (its cache does for a Service that did
not change); a pass then only joins the kept strings. The file is replaced
atomically (written aside, then renamed), so a reader never sees half of it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection, Mapping
from typing import Any

from agent.compute.types import Frontend, L4Addr


def _frontend_entry(key: L4Addr, fe: Frontend) -> str:
    return f"{json.dumps(str(key))}:{json.dumps([str(b) for b in fe.backends])}"


def _external_entry(key: L4Addr, fe: Frontend) -> str:
    return f"{json.dumps(str(key))}:" + json.dumps({
        "affinity": fe.affinity_timeout,
        "backends": [str(b) for b in fe.external_backends],
        "local": fe.external_local,
        "sources": [str(c) for c in fe.source_ranges],
    }, sort_keys=True)


class StatusFile:
    """Writes the status file; remembers each frontend's rendered entries."""

    def __init__(self, path: str) -> None:
        self.path = path
        # key -> (the Frontend rendered, its "frontends" entry, its
        # "external_frontends" entry or "" when it is not external)
        self._rendered: dict[L4Addr, tuple[Frontend, str, str]] = {}

    def _entries(self, key: L4Addr, fe: Frontend) -> tuple[str, str]:
        held = self._rendered.get(key)
        if held is None or held[0] is not fe:
            external = _external_entry(key, fe) if fe.kind.external else ""
            held = (fe, _frontend_entry(key, fe), external)
            self._rendered[key] = held
        return held[1], held[2]

    def write(self, fields: Mapping[str, Any], frontends: Mapping[L4Addr, Frontend],
              failed: Collection[L4Addr]) -> None:
        """`fields` (small, JSON-ready) and every frontend not in `failed`,
        in `frontends`' order."""
        internal: list[str] = []
        external: list[str] = []
        for key, fe in frontends.items():
            if failed and key in failed:
                continue
            entry, ext = self._entries(key, fe)
            internal.append(entry)
            if ext:
                external.append(ext)
        if len(self._rendered) > len(frontends):
            for gone in [k for k in self._rendered if k not in frontends]:
                del self._rendered[gone]
        values = {k: json.dumps(v, sort_keys=True) for k, v in fields.items()}
        values["frontends"] = "{" + ",".join(internal) + "}"
        values["external_frontends"] = "{" + ",".join(external) + "}"
        text = "{" + ",\n".join(f"{json.dumps(k)}:{values[k]}" for k in sorted(values)) + "}"
        tmp = f"{self.path}.tmp"
        with open(tmp, "w") as f:
            f.write(text)
            f.write("\n")
        os.replace(tmp, self.path)
