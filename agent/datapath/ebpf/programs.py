"""Compile, load, attach, pin and remove veer's socket-LB programs.

Lifecycle, and why each step is where it is:
- BCC compiles and loads in a short-lived child (agent/datapath/ebpf/loader.py):
  clang/LLVM never stay in the agent, which keeps only file descriptors:
  every program, and the unpinned maps it uses (veer_events, veer_config,
  the sockmap's veer_sock_hash, and veer_tc_tail, whose entries the kernel
  clears once no process holds it). The child loads the TC programs too and
  fills veer_tc_tail; a TC program that failed to load fails attach_tc(), as
  when it was loaded there.
- Maps are pinned by BCC itself (BPF_TABLE_PINNED): a pinned map that already
  exists is reused, so a restarted agent adopts its predecessor's state.
- Programs are attached to the cgroup with plain BPF_PROG_ATTACH (no
  ALLOW_MULTI): attaching replaces the program already there atomically, so a
  restart swaps code without a moment in which sockets go unbalanced.
- Legacy cgroup attachments hold their own reference on the program, so the
  datapath outlives the agent process (SIGTERM or SIGKILL alike).
- Each attached program is also pinned (`prog_<hook>`) so `--cleanup` can
  find and detach exactly what veer attached.
- Hooks that only some TrafficPolicies use (sockops and getsockopt for
  redirect and sockmap, sock_release for LeastConnections) are attached on
  demand: before the first frontend that needs one is written, and detached
  at the end of the pass after the last such frontend went. An attached
  cgroup hook runs for every socket in the cgroup at each of its events,
  used or not: sockops at every connect and handshake, sock_release at every
  close, each a share of every short connection's cost.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from agent.datapath.ebpf import syscall
from agent.datapath.ebpf.loader import LoadedObject, LoadRequest, ProgramSpec, load_in_child
from agent.datapath.ebpf.maps import retire_other_layouts
from agent.datapath.ebpf.structs import ConfigValue, IndexKey
from agent.errors import DatapathError, EnvironmentProblem

if TYPE_CHECKING:
    from agent.datapath.ebpf.events import EventConsumer, Sink

log = logging.getLogger(__name__)

BPF_SRC_DIR = Path(__file__).resolve().parents[3] / "bpf"
# Parts of the one BPF object, concatenated in this order (BCC rewrites map
# calls only in the text it is given, never in included files).
SOURCES = ("veer_helpers.c", "sockmap.c", "sock_lb.c", "tc_nat.c")

# enum bpf_attach_type values (uapi/linux/bpf.h).
CGROUP_INET4_CONNECT = 10
CGROUP_INET6_CONNECT = 11
CGROUP_UDP4_SENDMSG = 14
CGROUP_UDP6_SENDMSG = 15
CGROUP_UDP4_RECVMSG = 19
CGROUP_UDP6_RECVMSG = 20
CGROUP_INET4_GETPEERNAME = 29
CGROUP_INET6_GETPEERNAME = 30
CGROUP_INET_SOCK_RELEASE = 34
CGROUP_SOCK_OPS = 3
CGROUP_GETSOCKOPT = 21

BPF_PROG_TYPE_CGROUP_SOCK = 9
BPF_PROG_TYPE_SOCK_OPS = 13
BPF_PROG_TYPE_CGROUP_SOCKOPT = 25
BPF_PROG_TYPE_SK_MSG = 16
SK_MSG_VERDICT = 7  # enum bpf_attach_type: BPF_SK_MSG_VERDICT

BPF_PROG_TYPE_CGROUP_SOCK_ADDR = 18
BPF_PROG_TYPE_SCHED_CLS = 3
# veer_tc_ingress's tail calls: index in veer_tc_tail (VEER_TAIL_* in bpf/tc_nat.c) -> program.
TAIL_CALLS = ((0, "veer_tc_reject"), (1, "veer_tc_dsr"))
TAIL_MAP = "veer_tc_tail"
TAIL_PIN = "veer_tc_tail_held"  # not BCC's: an unpinned BPF_PROG_ARRAY, pinned by us
SK_MSG = "veer_sk_msg"
# Unpinned maps the agent uses after loading (flow events, runtime switches,
# the sockmap's hash for attaching sk_msg) or must hold (the tail calls).
EVENTS_MAP = "veer_events"
CONFIG_MAP = "veer_config"
SOCK_HASH_MAP = "veer_sock_hash"


# What a frontend may need beyond the hooks that are always attached.
NEEDS_REDIRECT = "redirect"  # SO_ORIGINAL_DST for the node-local proxy
NEEDS_SOCKMAP = "sockmap"  # established connections offered to splicing
NEEDS_LEAST_CONN = "least-connections"  # a socket's count given back at close


@dataclass(frozen=True)
class Hook:
    function: str  # the C function in bpf/sock_lb.c
    attach_type: int
    pin: str  # file name under the bpffs directory
    prog_type: int = BPF_PROG_TYPE_CGROUP_SOCK_ADDR
    # Empty: always attached. Else attached only while a frontend needs one
    # of these (see the module's docstring).
    needed_for: frozenset[str] = frozenset()

    @property
    def hook(self) -> str:
        return self.pin.removeprefix("prog_")


SOCK_HOOKS: tuple[Hook, ...] = (
    Hook("veer_connect4", CGROUP_INET4_CONNECT, "prog_connect4"),
    Hook("veer_sendmsg4", CGROUP_UDP4_SENDMSG, "prog_sendmsg4"),
    Hook("veer_recvmsg4", CGROUP_UDP4_RECVMSG, "prog_recvmsg4"),
    Hook("veer_getpeername4", CGROUP_INET4_GETPEERNAME, "prog_getpeername4"),
    Hook("veer_connect6", CGROUP_INET6_CONNECT, "prog_connect6"),
    Hook("veer_sendmsg6", CGROUP_UDP6_SENDMSG, "prog_sendmsg6"),
    Hook("veer_recvmsg6", CGROUP_UDP6_RECVMSG, "prog_recvmsg6"),
    Hook("veer_getpeername6", CGROUP_INET6_GETPEERNAME, "prog_getpeername6"),
    Hook("veer_sock_release", CGROUP_INET_SOCK_RELEASE, "prog_sock_release",
         BPF_PROG_TYPE_CGROUP_SOCK, frozenset({NEEDS_LEAST_CONN})),
    Hook("veer_sockops", CGROUP_SOCK_OPS, "prog_sockops", BPF_PROG_TYPE_SOCK_OPS,
         frozenset({NEEDS_REDIRECT, NEEDS_SOCKMAP})),
    Hook("veer_getsockopt", CGROUP_GETSOCKOPT, "prog_getsockopt",
         BPF_PROG_TYPE_CGROUP_SOCKOPT, frozenset({NEEDS_REDIRECT})),
)
ALWAYS_HOOKS = tuple(h for h in SOCK_HOOKS if not h.needed_for)
ON_DEMAND_HOOKS = tuple(h for h in SOCK_HOOKS if h.needed_for)


@dataclass(frozen=True)
class AttachedProgram:
    hook: str
    prog_id: int
    name: str


def check_headers() -> None:
    build = Path("/lib/modules") / os.uname().release / "build"
    if not build.exists():
        raise EnvironmentProblem(
            f"BCC needs kernel headers at {build}; install linux-headers and link them "
            "there (scripts/setup.sh does both)"
        )


@contextlib.contextmanager
def open_dir(path: str) -> Iterator[int]:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield fd
    finally:
        os.close(fd)


class SockLbPrograms:
    """The compiled socket-LB object: its programs and pinned maps.

    `dsr` (--nodeport-mode dsr) is compiled in: bpf/tc_nat.c's
    VEER_NODEPORT_DSR."""

    def __init__(self, bpffs_dir: str, map_sizes: dict[str, int] | None = None,
                 sockmap: bool = False, dsr: bool = False) -> None:
        self.bpffs_dir = bpffs_dir
        self.map_sizes = map_sizes or {}
        # Compile and attach sockmap acceleration (bpf/sockmap.c): only where
        # the start-up probe passed. `sockmap_error` says why it is off after
        # all when attaching it failed.
        self.sockmap = sockmap
        self.sockmap_error = ""
        self.dsr = dsr
        self._loaded: LoadedObject | None = None
        self.cgroup = ""  # where the socket hooks are attached, once attached
        self._on_demand: set[Hook] = set()  # on-demand hooks attached now

    def load(self) -> None:
        """Compile sock_lb.c and load its programs (in a child); create or
        adopt the pinned maps."""
        from agent.datapath.ebpf import tc

        check_headers()
        os.makedirs(self.bpffs_dir, exist_ok=True)
        retired = retire_other_layouts(self.bpffs_dir)
        if retired:
            log.warning("replaced pinned map(s) of another veer version with another layout "
                        "(their entries are lost; the agent rewrites its own): %s",
                        ", ".join(retired))
        cflags = (
            f"-I{BPF_SRC_DIR}",
            f'-DVEER_PIN_DIR="{self.bpffs_dir}"',
            *(f"-DVEER_{name.upper()}_MAX={size}" for name, size in self.map_sizes.items()),
            *(["-DVEER_SOCKMAP"] if self.sockmap else []),
            f"-DVEER_NODEPORT_DSR={int(self.dsr)}",
        )
        programs = [ProgramSpec(h.function, h.prog_type, h.attach_type) for h in SOCK_HOOKS]
        if self.sockmap:
            programs.append(ProgramSpec(SK_MSG, BPF_PROG_TYPE_SK_MSG, required=False))
        programs += [ProgramSpec(name, BPF_PROG_TYPE_SCHED_CLS, required=False)
                     for name in (*(h.function for h in tc.TC_HOOKS),
                                  *(name for _, name in TAIL_CALLS))]
        maps = (EVENTS_MAP, CONFIG_MAP, TAIL_MAP, *([SOCK_HASH_MAP] if self.sockmap else []))
        try:
            text = "\n".join(
                f'#line 1 "{name}"\n' + (BPF_SRC_DIR / name).read_text() for name in SOURCES
            )
            self._loaded = load_in_child(LoadRequest(
                text, cflags, tuple(programs), maps, TAIL_MAP, TAIL_CALLS))
        except (OSError, DatapathError) as err:
            raise DatapathError(f"loading veer's BPF programs failed: {err}") from err
        if self.sockmap:
            self._attach_sk_msg(self._loaded)

    def _attach_sk_msg(self, loaded: LoadedObject) -> None:
        """The sk_msg program goes on the sockhash itself (not on a cgroup)."""
        try:
            if SK_MSG in loaded.failed:
                raise DatapathError(loaded.failed[SK_MSG])
            map_fd = loaded.maps.get(SOCK_HASH_MAP)
            if map_fd is None:
                raise DatapathError(f"the {SOCK_HASH_MAP} map was not created")
            syscall.prog_attach(loaded.programs[SK_MSG], map_fd, SK_MSG_VERDICT)
        except DatapathError as err:
            self.sockmap = False
            self.sockmap_error = f"attaching the sk_msg program failed: {err}"
            log.warning("sockmap acceleration off: %s", self.sockmap_error)

    def _program(self, name: str) -> int:
        """The fd of a loaded program; DatapathError if it did not load."""
        if self._loaded is None:
            raise DatapathError("the BPF programs are not loaded")
        if name in self._loaded.failed:
            raise DatapathError(f"loading {name} failed: {self._loaded.failed[name]}")
        return self._loaded.programs[name]

    def _map(self, name: str) -> int | None:
        return self._loaded.maps.get(name) if self._loaded is not None else None

    def attach(self, cgroup: str) -> None:
        """Attach every always-attached hook to `cgroup` (replacing what is
        there) and pin it. An on-demand hook that a previous agent left
        attached is replaced too, so its old code does not linger: the first
        pass's end detaches it if no frontend needs it."""
        with open_dir(cgroup) as cgroup_fd:
            for hook in SOCK_HOOKS:
                if hook.needed_for and not _veer_programs(cgroup_fd, hook):
                    continue
                self._attach_hook(cgroup_fd, hook)
        self.cgroup = cgroup
        log.info("attached %d socket hooks to %s (%d on demand)",
                 len(ALWAYS_HOOKS) + len(self._on_demand), cgroup, len(self._on_demand))

    def _attach_hook(self, cgroup_fd: int, hook: Hook) -> None:
        prog_fd = self._program(hook.function)
        syscall.prog_attach(prog_fd, cgroup_fd, hook.attach_type)
        pin = os.path.join(self.bpffs_dir, hook.pin)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(pin)
        syscall.obj_pin(prog_fd, pin)
        if hook.needed_for:
            self._on_demand.add(hook)

    def require(self, needs: frozenset[str]) -> None:
        """Attach the on-demand hooks that `needs` call for and are not
        attached yet. Called before a frontend with those needs is written,
        so no connection of it can miss its hook."""
        missing = [h for h in ON_DEMAND_HOOKS if h.needed_for & needs and h not in self._on_demand]
        if not missing or not self.cgroup:
            return
        with open_dir(self.cgroup) as cgroup_fd:
            for hook in missing:
                self._attach_hook(cgroup_fd, hook)
                log.info("attached %s to %s: a frontend needs %s", hook.function, self.cgroup,
                         " or ".join(sorted(hook.needed_for & needs)))

    def attached_for(self, need: str) -> bool:
        """Whether an on-demand hook serving `need` is attached now."""
        return any(need in hook.needed_for for hook in self._on_demand)

    def retain(self, needs: frozenset[str]) -> None:
        """Detach the on-demand hooks that no frontend needs any more."""
        spare = [h for h in self._on_demand if not h.needed_for & needs]
        if not spare:
            return
        with open_dir(self.cgroup) as cgroup_fd:
            for hook in spare:
                try:
                    syscall.prog_detach(self._program(hook.function), cgroup_fd,
                                        hook.attach_type)
                except DatapathError as err:
                    # Detached meanwhile (--cleanup, or the cgroup's own end).
                    if getattr(err, "errno", None) != errno.ENOENT:
                        raise
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.bpffs_dir, hook.pin))
                self._on_demand.discard(hook)
                log.info("detached %s from %s: no frontend needs it any more",
                         hook.function, self.cgroup)

    def attach_tc(self, devices: list[str]) -> None:
        """Attach the per-packet programs to each device (replacing veer's own)."""
        from agent.datapath.ebpf import tc

        progs = [(hook, self._program(hook.function), hook.function) for hook in tc.TC_HOOKS]
        # veer_tc_ingress works only with its tail calls in place.
        for _, name in TAIL_CALLS:
            self._program(name)
        self._hold_tail_calls()
        for device in devices:
            tc.attach(device, progs)

    def _hold_tail_calls(self) -> None:
        """Pin veer_tc_tail (as TAIL_PIN) before its programs are attached.

        The kernel empties a program array once no file descriptor or pin
        holds it (the programs that call into it do not count), so without
        the pin, refusing from outside and DSR would stop the moment the
        agent exits, while every other per-packet path keeps working. A new
        agent's array replaces the pin; `--cleanup` removes it.
        """
        fd = self._map(TAIL_MAP)
        if fd is None:
            raise DatapathError("the BPF programs are not loaded: no tail-call array to hold")
        pin = os.path.join(self.bpffs_dir, TAIL_PIN)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(pin)
        syscall.obj_pin(fd, pin)

    def map_path(self, name: str) -> str:
        return os.path.join(self.bpffs_dir, name)

    # ---- flow events (the live agent's own, unpinned maps) ------------------

    def event_consumer(self, sink: Sink) -> EventConsumer:
        """A consumer of veer_events for this loaded object (not started)."""
        from agent.datapath.ebpf.events import EventConsumer

        fd = self._map(EVENTS_MAP)
        if fd is None:
            raise DatapathError("the BPF programs are not loaded: no flow events to read")
        return EventConsumer(fd, sink)

    def set_trace_translations(self, on: bool) -> None:
        """Whether the programs report translations too (veer_config[0])."""
        fd = self._map(CONFIG_MAP)
        if fd is None:
            return
        syscall.map_update(fd, IndexKey(0), ConfigValue(trace_translations=int(on)),
                           "write veer_config")


def _attached(cgroup_fd: int, hook: Hook) -> Iterator[tuple[int, str]]:
    """(id, name) of each program attached at `hook` of the cgroup."""
    for prog_id in syscall.prog_query(cgroup_fd, hook.attach_type):
        fd = syscall.prog_get_fd_by_id(prog_id)
        try:
            name = syscall.prog_info(fd).name.decode(errors="replace")
        finally:
            os.close(fd)
        yield prog_id, name


def _is_veer(hook: Hook, name: str) -> bool:
    # The kernel truncates names to 15 characters.
    return name.startswith("veer_") and hook.function.startswith(name)


def _veer_programs(cgroup_fd: int, hook: Hook) -> list[int]:
    """Ids of veer's programs attached at `hook` of the cgroup."""
    return [prog_id for prog_id, name in _attached(cgroup_fd, hook) if _is_veer(hook, name)]


def attached_programs(cgroup: str) -> list[AttachedProgram]:
    """What is attached to `cgroup` at veer's hooks, read from the kernel."""
    with open_dir(cgroup) as cgroup_fd:
        return [AttachedProgram(hook.hook, prog_id, name)
                for hook in SOCK_HOOKS for prog_id, name in _attached(cgroup_fd, hook)]


def cleanup(cgroup: str, bpffs_dir: str) -> list[str]:
    """Detach every veer program from `cgroup`, remove veer's TC filters from
    this network namespace's devices, and remove veer's pins in `bpffs_dir`.

    Idempotent. Programs are found both through their pins and by querying
    the cgroup (a veer program attached without a pin is still removed).
    Returns what was removed, for the log.
    """
    removed: list[str] = []
    if os.path.isdir(cgroup):
        with open_dir(cgroup) as cgroup_fd:
            for hook in SOCK_HOOKS:
                for prog_id in _veer_programs(cgroup_fd, hook):
                    fd = syscall.prog_get_fd_by_id(prog_id)
                    try:
                        syscall.prog_detach(fd, cgroup_fd, hook.attach_type)
                        removed.append(f"detached {hook.function} from {cgroup}")
                    except DatapathError as err:
                        if getattr(err, "errno", None) != errno.ENOENT:
                            raise
                    finally:
                        os.close(fd)
    from agent.datapath.ebpf import tc

    removed.extend(tc.detach_all())
    if os.path.isdir(bpffs_dir):
        for name in sorted(os.listdir(bpffs_dir)):
            if name.startswith(("prog_", "veer_")):
                os.unlink(os.path.join(bpffs_dir, name))
                removed.append(f"unpinned {name}")
        with contextlib.suppress(OSError):
            os.rmdir(bpffs_dir)
    return removed
