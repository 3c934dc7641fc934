"""Compile and load a BPF object in a short-lived child; keep only its fds.

    agent ── request (stdin, JSON) ──> child: python -m agent.datapath.ebpf.bcc_child
          <── one message: JSON + fds (SCM_RIGHTS, a socketpair) ──
          waits for the child (its CPU counts as the agent's children's)

The agent never imports BCC: clang/LLVM's libraries and the compiler's heap
end with the child, and the agent holds file descriptors only (programs, and
the unpinned maps it reads or writes). Errors keep BCC's text: a failed
compilation or a required program the verifier refused becomes
DatapathError, a missing BCC EnvironmentProblem, as when BCC ran in-process.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.errors import DatapathError, EnvironmentProblem

log = logging.getLogger(__name__)

CHILD_MODULE = "agent.datapath.ebpf.bcc_child"
# Where the `agent` package is, for the child's sys.path (the agent may run
# from a checkout rather than an installed package).
PACKAGE_ROOT = Path(__file__).resolve().parents[3]
MAX_FDS = 128
MAX_REPLY = 1 << 20


@dataclass(frozen=True)
class ProgramSpec:
    name: str  # the C function
    prog_type: int
    attach_type: int | None = None  # expected_attach_type, for the hooks that need it
    required: bool = True  # False: a failure is reported in `failed`, not raised


@dataclass(frozen=True)
class LoadRequest:
    text: str
    cflags: tuple[str, ...]
    programs: tuple[ProgramSpec, ...]
    maps: tuple[str, ...] = ()  # unpinned maps whose fds the agent keeps
    tail_map: str = ""  # a program array to fill with ...
    tail_calls: tuple[tuple[int, str], ...] = ()  # ... (index, program) pairs

    def to_json(self) -> bytes:
        return json.dumps({
            "text": self.text,
            "cflags": list(self.cflags),
            "programs": [{"name": p.name, "prog_type": p.prog_type,
                          "attach_type": p.attach_type, "required": p.required}
                         for p in self.programs],
            "maps": list(self.maps),
            "tail_calls": {"map": self.tail_map, "entries": [list(e) for e in self.tail_calls]}
            if self.tail_map else None,
        }).encode()


@dataclass
class LoadedObject:
    """The fds of a loaded object, owned here: closed by close() or when
    this object is garbage-collected (as BCC closed its own)."""

    programs: dict[str, int]
    maps: dict[str, int]
    failed: dict[str, str] = field(default_factory=dict)  # optional programs that did not load

    def __post_init__(self) -> None:
        self._finalizer = weakref.finalize(
            self, _close_all, [*self.programs.values(), *self.maps.values()])

    def close(self) -> None:
        self._finalizer()


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def load_in_child(request: LoadRequest) -> LoadedObject:
    """Run the child for `request` and return what it loaded."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(PACKAGE_ROOT), env.get("PYTHONPATH", "")) if p)
    started = time.monotonic()
    with ours:
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", CHILD_MODULE, str(theirs.fileno())],
                stdin=subprocess.PIPE, pass_fds=(theirs.fileno(),), env=env,
            )
        except OSError as err:
            raise DatapathError(f"starting the BPF loader process: {err}") from err
        finally:
            # Only the child holds its end now: its exit is our end-of-file.
            theirs.close()
        try:
            try:
                assert proc.stdin is not None
                proc.stdin.write(request.to_json())
                proc.stdin.close()
            except BrokenPipeError:
                pass  # it died first; its exit status says why
            msg, fds, flags, _ = socket.recv_fds(ours, MAX_REPLY, MAX_FDS)
        finally:
            status, usage = _wait(proc)
    took = time.monotonic() - started
    log.info("BPF loader child %d: exit status %d after %.1f s (CPU %.1f s, peak RSS %.0f MiB)",
             proc.pid, status, took, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024)
    if flags & socket.MSG_CTRUNC:
        _close_all(fds)
        raise DatapathError("the BPF loader sent more file descriptors than expected")
    if not msg:
        _close_all(fds)
        raise DatapathError(f"the BPF loader process exited with status {status} without "
                            "answering (its error is in the log above)")
    return _loaded(json.loads(msg), fds)


def _wait(proc: subprocess.Popen[bytes]) -> tuple[int, Any]:
    """Reap the child with its resource usage (CPU, peak RSS) for the log."""
    _, raw, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(raw)
    return proc.returncode, usage


def _loaded(body: dict[str, Any], fds: list[int]) -> LoadedObject:
    names = [*body.get("programs", []), *body.get("maps", [])]
    if body.get("error") or len(names) != len(fds):
        _close_all(fds)
        if body.get("environment"):
            raise EnvironmentProblem(
                f"{body['error']}: install Debian's python3-bpfcc and run veer from the "
                "virtualenv made by scripts/setup.sh")
        raise DatapathError(body.get("error") or
                            f"the BPF loader named {len(names)} objects but sent {len(fds)} fds")
    programs = dict(zip(body["programs"], fds, strict=False))
    maps = dict(zip(body["maps"], fds[len(programs):], strict=True))
    return LoadedObject(programs, maps, dict(body.get("failed", {})))
