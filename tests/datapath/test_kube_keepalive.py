"""The API client's connections carry TCP keepalive (agent/kube/transport.py):
a watch whose server went silent without a word breaks when the kernel's
probes go unanswered, not when the watch's read timeout (minutes) passes.

Root: the server and the client run in a network namespace of the test's
own, where nftables then drops everything the server sends."""

from __future__ import annotations

import os
import sys

import pytest

from agent.sandbox.topology import Topology

# In the namespace: a server answers a watch with one event and then stays
# silent; the client reads that event, nftables drops the server's packets
# (its ACKs to keepalive probes too), and the client reads on. Its read
# timeout is an hour, so only keepalive (shortened here) can end the read.
SILENCED_WATCH = r"""
import socket, subprocess, threading, time
from agent.kube import transport
from agent.kube.kubeconfig import Access

transport.KEEPALIVE = (1, 1, 2)
srv = socket.socket()
srv.bind(("127.0.0.1", 0))
srv.listen(1)
port = srv.getsockname()[1]

def serve():
    conn, _ = srv.accept()
    conn.recv(65536)
    event = b'{"type": "ADDED", "object": {}}\n'
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\n"
                 + b"%x\r\n" % len(event) + event + b"\r\n")
    time.sleep(3600)

threading.Thread(target=serve, daemon=True).start()
api = transport.Transport(Access(server=f"http://127.0.0.1:{port}", origin="test",
                                 token=lambda: ""))
stream = api.stream("watch services", "/api/v1/services?watch=true", (5.0, 3600.0))
lines = stream.lines()
print("event", next(lines).decode(), flush=True)
subprocess.run(["nft", "table inet silence {\n chain out {\n"
                " type filter hook output priority 0;\n"
                f" tcp sport {port} drop\n }}\n}}\n"], check=True)
try:
    for line in lines:
        print("event", line.decode(), flush=True)
    print("ended", flush=True)
except Exception as err:
    print("error", err, flush=True)
"""


def test_a_watch_whose_server_went_silent_breaks_on_keepalive() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (a network namespace, nftables)")
    with Topology() as topo:  # only its node namespace is used
        res = topo.exec(topo.node_ns, [sys.executable, "-c", SILENCED_WATCH],
                        in_cgroup=False, timeout=60)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0] == 'event {"type": "ADDED", "object": {}}', res.stdout
    # The kernel's verdict (ETIMEDOUT), not the read timeout's "timed out".
    assert lines[-1] == ("error watch services: stream broken: the server stopped answering "
                         "(connection timed out)"), res.stdout
