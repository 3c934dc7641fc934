"""Hold TCP connections open on command, for tests of LeastConnections.

Runs in a client namespace (inside the served cgroup) and reads commands on
stdin, one per line, answering each with one JSON line on stdout:

    open ADDR PORT     connect, send a keep-alive request, read the answer
                       (the backend's name), keep the connection:
                       {"backend": "web-a:8080"} or {"error": "ECONNREFUSED"}
    close BACKEND      close every held connection that BACKEND answered:
                       {"closed": 2}
    quit               close everything and exit
"""

from __future__ import annotations

import json
import socket
import sys

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


if __name__ == "__main__":
    main()
