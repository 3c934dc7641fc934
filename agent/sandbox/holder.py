"""Hold TCP connections open on command, for tests of LeastConnections.

Runs in a client namespace (inside the served cgroup) and reads commands on
stdin, one per line, answering each with one JSON line on stdout:

    open ADDR PORT     connect, send a keep-alive request, read the answer
                       (the backend's name), keep the connection:
                       {"backend": "web-a:8080"} or {"error": "ECONNREFUSED"}
    close BACKEND      close every held connection that BACKEND answered:
                       {"closed": 2}
    quit               close everything and exit

`Holder` is the test side: it starts this program in a namespace and speaks
the commands.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Callable
from types import TracebackType
from typing import Any

from agent.sandbox.probe import KEEPALIVE_REQUEST, _errname, _family, _read_http


def main() -> None:
    held: list[tuple[str, socket.socket]] = []
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        reply: dict[str, object]
        if words[0] == "open":
            sock = socket.socket(_family(words[1]), socket.SOCK_STREAM)
            sock.settimeout(5)
            try:
                sock.connect((words[1], int(words[2])))
                sock.sendall(KEEPALIVE_REQUEST)
                backend = _read_http(sock)
            except OSError as err:
                sock.close()
                reply = {"error": _errname(err)}
            else:
                held.append((backend, sock))
                reply = {"backend": backend}
        elif words[0] == "close":
            keep = []
            closed = 0
            for backend, sock in held:
                if backend == words[1]:
                    sock.close()
                    closed += 1
                else:
                    keep.append((backend, sock))
            held = keep
            reply = {"closed": closed}
        else:
            break
        print(json.dumps(reply), flush=True)
    for _, sock in held:
        sock.close()


class Holder:
    """This program, running in network namespace `netns` (in a cgroup when
    `preexec` joins one); a context manager that makes it close everything
    and exit at the end."""

    def __init__(self, netns: str, preexec: Callable[[], None] | None = None) -> None:
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", netns, sys.executable, "-m", "agent.sandbox.holder"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, preexec_fn=preexec)

    def say(self, line: str) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return dict(json.loads(self.proc.stdout.readline()))

    def open(self, address: str, port: int) -> str:
        """Open one held connection; the backend that answered it."""
        reply = self.say(f"open {address} {port}")
        assert "backend" in reply, reply
        return str(reply["backend"])

    def close(self, backend: str) -> int:
        """Close the held connections `backend` answered; how many."""
        return int(self.say(f"close {backend}")["closed"])

    def __enter__(self) -> Holder:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()  # the holder closes its connections and exits
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


if __name__ == "__main__":
    main()
