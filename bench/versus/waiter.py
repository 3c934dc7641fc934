"""Wait, inside a client pod, until every given address answers HTTP.

    python bench/versus/waiter.py TARGETS_FILE        (TARGETS_FILE: "ip port" lines)

Started before the change it times, so that its start-up is not counted: it
prints "armed", waits for a line on stdin (the bench writes one when the
last object was created), then tries each target that has not answered yet,
round after round, and prints one JSON line when all have: the monotonic
time (the same clock as the bench's: CLOCK_MONOTONIC is system-wide) at
which the last one first answered, and how many rounds it took.

"Answered" means an HTTP 200 from the backend's nginx over a new connection,
not just a connect(): a transparent proxy accepts before it has a backend.
A target without rules yet fails fast (refused, or unreachable: the node
has no route for the Service range), so a round is quick.
"""

from __future__ import annotations

import json
import socket
import sys
import time

REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"


def answers(ip: str, port: int) -> bool:
    try:
        with socket.create_connection((ip, port), timeout=0.5) as sock:
            sock.sendall(REQUEST)
            data = b""
            while len(data) < 12:
                chunk = sock.recv(256)
                if not chunk:
                    break
                data += chunk
            return data.startswith(b"HTTP/1.1 200")
    except OSError:
        return False


def main() -> int:
    with open(sys.argv[1]) as f:
        pending = [(line.split()[0], int(line.split()[1])) for line in f if line.strip()]
    print("armed", flush=True)
    sys.stdin.readline()
    rounds = 0
    done = time.monotonic()
    while pending:
        rounds += 1
        left = []
        for ip, port in pending:
            if answers(ip, port):
                done = time.monotonic()
            else:
                left.append((ip, port))
        pending = left
        if pending:
            time.sleep(0.005)
    print(json.dumps({"done": done, "rounds": rounds}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
