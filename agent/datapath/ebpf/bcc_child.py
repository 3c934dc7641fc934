"""The BPF loader's child process: compile with BCC, load, hand back fds, exit.

    python -m agent.datapath.ebpf.bcc_child SOCKET_FD  < request (JSON)

Why a child: BCC compiles in-process with clang/LLVM, whose libraries and
heap (about 100 MiB resident) would stay in the agent for its whole life.
Here they live only as long as one compilation; the agent keeps file
descriptors, which is all the kernel needs.

The request (stdin, JSON; see agent/datapath/ebpf/loader.py, which writes it):
    text        the C source, cflags   BCC's cflags
    programs    [{name, prog_type, attach_type (or null), required}]
    tail_calls  {"map": NAME, "entries": [[index, program name], ...]}
    maps        names of maps whose fds the agent wants

The reply: one SOCK_SEQPACKET message on SOCKET_FD, JSON
{"error", "environment", "programs", "maps", "failed"} with the fds attached
(SCM_RIGHTS) in the order `programs` then `maps` name them. `error` set means
nothing was handed back; `failed` names the optional programs (and tail
calls) that did not load, with BCC's message. A map the object lacks is left
out. Compiler diagnostics go to stderr, which is the agent's.

This module imports nothing of veer's: it is the only place BCC runs.
"""

from __future__ import annotations

import ctypes
import json
import socket
import sys
from typing import Any

# A reply's text is capped so the message always fits the socket's buffer;
# a compiler's full diagnostics are on stderr anyway.
MAX_ERROR = 32 * 1024


def _reply(sock: socket.socket, body: dict[str, Any], fds: list[int]) -> None:
    if len(body.get("error", "")) > MAX_ERROR:
        body["error"] = body["error"][:MAX_ERROR] + " [...]"
    socket.send_fds(sock, [json.dumps(body).encode()], fds)


def load(request: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
    """Compile and load what `request` asks; (reply body, fds to send)."""
    try:
        import bcc
        from bcc.libbcc import lib
    except ImportError as err:
        return {"error": f"the BCC Python package is missing ({err})", "environment": True}, []
    try:
        bpf = bcc.BPF(text=request["text"].encode(), cflags=request["cflags"])
    except Exception as err:  # BCC raises bare Exception for compile errors
        return {"error": str(err)}, []
    programs: dict[str, int] = {}
    failed: dict[str, str] = {}
    for spec in request["programs"]:
        kwargs = {} if spec["attach_type"] is None else {"attach_type": spec["attach_type"]}
        try:
            fn = bpf.load_func(spec["name"].encode(), spec["prog_type"], **kwargs)
        except Exception as err:  # BCC's bare Exception: the verifier said no
            if spec["required"]:
                return {"error": str(err)}, []
            failed[spec["name"]] = str(err)
            continue
        programs[spec["name"]] = int(fn.fd)
    tail = request.get("tail_calls")
    if tail:
        for index, name in tail["entries"]:
            if name not in programs:
                failed.setdefault(name, "not loaded")
                continue
            try:
                bpf[tail["map"]][ctypes.c_int(index)] = ctypes.c_int(programs[name])
            except Exception as err:  # BCC's bare Exception, or KeyError
                failed[name] = f"adding it to {tail['map']}: {err}"
    maps: dict[str, int] = {}
    for name in request["maps"]:
        fd = lib.bpf_table_fd(bpf.module, name.encode())
        if fd >= 0:
            maps[name] = int(fd)
    body = {"error": "", "programs": list(programs), "maps": list(maps), "failed": failed}
    return body, [*programs.values(), *maps.values()]


def main(argv: list[str]) -> int:
    sock = socket.socket(fileno=int(argv[1]))
    request = json.loads(sys.stdin.buffer.read())
    body, fds = load(request)
    _reply(sock, body, fds)
    # The fds in flight hold their objects: exiting now closes only ours.
    sock.close()
    return 1 if body["error"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
