"""Compile, load, attach, pin and remove veer's socket-LB programs.

Lifecycle, and why each step is where it is:
- Maps are pinned by BCC itself (BPF_TABLE_PINNED): a pinned map that already
  exists is reused, so a restarted agent adopts its predecessor's state.
- Programs are attached to the cgroup with plain BPF_PROG_ATTACH (no
  ALLOW_MULTI): attaching replaces the program already there atomically, so a
  restart swaps code without a moment in which sockets go unbalanced.
- Legacy cgroup attachments hold their own reference on the program, so the
  datapath outlives the agent process (SIGTERM or SIGKILL alike).
- Each attached program is also pinned (`prog_<hook>`) so `--cleanup` can
  find and detach exactly what veer attached.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.datapath.ebpf import syscall
from agent.datapath.ebpf.structs import COUNTER_NAMES, ConfigValue, IndexKey
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


@dataclass(frozen=True)
class Hook:
    function: str  # the C function in bpf/sock_lb.c
    attach_type: int
    pin: str  # file name under the bpffs directory
    prog_type: int = BPF_PROG_TYPE_CGROUP_SOCK_ADDR

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
         BPF_PROG_TYPE_CGROUP_SOCK),
    Hook("veer_sockops", CGROUP_SOCK_OPS, "prog_sockops", BPF_PROG_TYPE_SOCK_OPS),
    Hook("veer_getsockopt", CGROUP_GETSOCKOPT, "prog_getsockopt",
         BPF_PROG_TYPE_CGROUP_SOCKOPT),
)

# Map name -> pin file name (BCC pins under the names given in veer_maps.h).
MAP_NAMES = (
    "veer_services",
    "veer_backends",
    "veer_vips",
    "veer_service_cidrs",
    "veer_sock_revnat",
    "veer_affinity",
    "veer_affinity_match",
    "veer_nat_fwd",
    "veer_nat_rev",
    "veer_node",
    "veer_lb_sources",
    "veer_ext_affinity",
    "veer_cluster_cidrs",
    "veer_counters",
    "veer_access",
    "veer_access_hits",
    "veer_netns_addrs",
    "veer_rr_cursor",
    "veer_backend_conns",
    "veer_lc_socks",
    "veer_lc_flows",
    "veer_backend_conns_swept",
    "veer_redirects",
    "veer_proxy",
    "veer_redirect_socks",
    "veer_orig_dst",
)


@dataclass(frozen=True)
class AttachedProgram:
    hook: str
    prog_id: int
    name: str


def _import_bcc() -> Any:
    try:
        import bcc
    except ImportError as err:
        raise EnvironmentProblem(
            "the BCC Python package is missing: install Debian's python3-bpfcc and run "
            "veer from the virtualenv made by scripts/setup.sh"
        ) from err
    return bcc


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
        self._bpf: Any = None
        self._fns: dict[str, Any] = {}
        self._tc_fns: dict[str, Any] = {}
        self.cgroup = ""  # where the socket hooks are attached, once attached

    def load(self) -> None:
        """Compile sock_lb.c and load its programs; create or adopt the pinned maps."""
        bcc = _import_bcc()
        check_headers()
        os.makedirs(self.bpffs_dir, exist_ok=True)
        self._retire_short_counters()
        cflags = [
            f"-I{BPF_SRC_DIR}",
            f'-DVEER_PIN_DIR="{self.bpffs_dir}"',
            *(f"-DVEER_{name.upper()}_MAX={size}" for name, size in self.map_sizes.items()),
            *(["-DVEER_SOCKMAP"] if self.sockmap else []),
            f"-DVEER_NODEPORT_DSR={int(self.dsr)}",
        ]
        try:
            text = "\n".join(
                f'#line 1 "{name}"\n' + (BPF_SRC_DIR / name).read_text() for name in SOURCES
            )
            self._bpf = bcc.BPF(text=text.encode(), cflags=cflags)
            for hook in SOCK_HOOKS:
                self._fns[hook.pin] = self._bpf.load_func(
                    hook.function.encode(),
                    hook.prog_type,
                    attach_type=hook.attach_type,
                )
        except Exception as err:  # BCC raises bare Exception for compile/load errors
            raise DatapathError(f"loading veer's BPF programs failed: {err}") from err
        if self.sockmap:
            self._attach_sk_msg()

    def _attach_sk_msg(self) -> None:
        """The sk_msg program goes on the sockhash itself (not on a cgroup)."""
        try:
            fn = self._bpf.load_func(b"veer_sk_msg", BPF_PROG_TYPE_SK_MSG)
            # BCC's Python has no table class for a sockhash: ask libbcc.
            from bcc.libbcc import lib

            map_fd = lib.bpf_table_fd(self._bpf.module, b"veer_sock_hash")
            if map_fd < 0:
                raise DatapathError("the veer_sock_hash map was not created")
            syscall.prog_attach(int(fn.fd), int(map_fd), SK_MSG_VERDICT)
        except Exception as err:  # BCC's bare Exception, or DatapathError
            self.sockmap = False
            self.sockmap_error = f"attaching the sk_msg program failed: {err}"
            log.warning("sockmap acceleration off: %s", self.sockmap_error)

    def _retire_short_counters(self) -> None:
        """Unpin a veer_counters left by a version with fewer counters.

        BCC adopts a pinned map without comparing its size, and counters past
        its end would never count (events_sent, events_lost, ...). The old
        programs keep their map until they are replaced; the counts restart
        from 0, which their metric ("since the map was created") allows.
        """
        path = self.map_path("veer_counters")
        try:
            fd = syscall.obj_get(path)
        except DatapathError:
            return  # not there yet
        try:
            entries = syscall.map_info(fd).max_entries
        finally:
            os.close(fd)
        if entries < len(COUNTER_NAMES):
            log.info("veer_counters holds %d counters, this version has %d: replacing it "
                     "(the counts restart from 0)", entries, len(COUNTER_NAMES))
            os.unlink(path)

    def attach(self, cgroup: str) -> None:
        """Attach every hook to `cgroup` (replacing what is there) and pin it."""
        with open_dir(cgroup) as cgroup_fd:
            for hook in SOCK_HOOKS:
                fn = self._fns[hook.pin]
                prog_fd = int(fn.fd)
                syscall.prog_attach(prog_fd, cgroup_fd, hook.attach_type)
                pin = os.path.join(self.bpffs_dir, hook.pin)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(pin)
                syscall.obj_pin(prog_fd, pin)
        self.cgroup = cgroup
        log.info("attached %d socket hooks to %s", len(SOCK_HOOKS), cgroup)

    def attach_tc(self, devices: list[str]) -> None:
        """Attach the per-packet programs to each device (replacing veer's own)."""
        from agent.datapath.ebpf import tc

        progs = []
        for hook in tc.TC_HOOKS:
            fn = self._tc_fns.get(hook.function)
            if fn is None:
                try:
                    fn = self._bpf.load_func(hook.function.encode(), BPF_PROG_TYPE_SCHED_CLS)
                except Exception as err:  # BCC raises bare Exception
                    raise DatapathError(f"loading {hook.function} failed: {err}") from err
                self._tc_fns[hook.function] = fn
            progs.append((hook, int(fn.fd), hook.function))
        self._link_tail_calls()
        for device in devices:
            tc.attach(device, progs)

    def _link_tail_calls(self) -> None:
        """Fill veer_tc_tail: the programs veer_tc_ingress tail-calls."""
        import ctypes

        for index, name in TAIL_CALLS:
            if name in self._tc_fns:
                continue
            try:
                fn = self._bpf.load_func(name.encode(), BPF_PROG_TYPE_SCHED_CLS)
                self._bpf["veer_tc_tail"][ctypes.c_int(index)] = ctypes.c_int(int(fn.fd))
            except Exception as err:  # BCC raises bare Exception
                raise DatapathError(f"loading {name} failed: {err}") from err
            self._tc_fns[name] = fn

    def map_path(self, name: str) -> str:
        return os.path.join(self.bpffs_dir, name)

    # ---- flow events (the live agent's own, unpinned maps) ------------------

    def event_consumer(self, sink: Sink) -> EventConsumer:
        """A consumer of veer_events for this loaded object (not started)."""
        from agent.datapath.ebpf.events import EventConsumer

        if self._bpf is None:
            raise DatapathError("the BPF programs are not loaded: no flow events to read")
        return EventConsumer(self._bpf, sink)

    def set_trace_translations(self, on: bool) -> None:
        """Whether the programs report translations too (veer_config[0])."""
        if self._bpf is None:
            return
        fd = int(self._bpf["veer_config"].map_fd)
        syscall.map_update(fd, IndexKey(0), ConfigValue(trace_translations=int(on)),
                           "write veer_config")


def attached_programs(cgroup: str) -> list[AttachedProgram]:
    """What is attached to `cgroup` at veer's hooks, read from the kernel."""
    out = []
    with open_dir(cgroup) as cgroup_fd:
        for hook in SOCK_HOOKS:
            for prog_id in syscall.prog_query(cgroup_fd, hook.attach_type):
                fd = syscall.prog_get_fd_by_id(prog_id)
                try:
                    name = syscall.prog_info(fd).name.decode(errors="replace")
                finally:
                    os.close(fd)
                out.append(AttachedProgram(hook.hook, prog_id, name))
    return out


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
                for prog_id in syscall.prog_query(cgroup_fd, hook.attach_type):
                    fd = syscall.prog_get_fd_by_id(prog_id)
                    try:
                        name = syscall.prog_info(fd).name.decode(errors="replace")
                        # The kernel truncates names to 15 characters.
                        if not hook.function.startswith(name) or not name.startswith("veer_"):
                            continue
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
