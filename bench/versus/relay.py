"""A TCP relay that lets processes in node namespaces reach the API server.

    python bench/versus/relay.py --target 127.0.0.1:PORT --port 6443 NETNS...

The real kube-apiserver listens on 127.0.0.1 of the root namespace (as
tests/e2e/controlplane.py starts it), which a node namespace cannot reach,
and the proxies under test must run in their node namespaces (their rules
and programs act there). Giving the namespaces a route to the root one
would put bench addresses outside the namespaces the bench made. Instead,
this one process opens a listening socket on 127.0.0.1:PORT *inside* each
named namespace (a socket keeps the namespace it was made in) and, back in
its own namespace, connects each accepted connection to the API server and
copies bytes both ways. TLS goes end to end: the relay sees only ciphertext,
and the server certificate's 127.0.0.1 name stays right.

Every proxy (veer and kube-proxy alike) goes through it, so it costs them
the same. It prints "ready" once every listener is open.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import os
import socket
import sys

CLONE_NEWNET = 0x40000000
CHUNK = 256 * 1024


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def listen_in(netns: str, port: int) -> socket.socket:
    """A listening socket on 127.0.0.1:port inside `netns`; the calling thread
    is back in its own namespace on return."""
    home = os.open("/proc/self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{netns}", os.O_RDONLY)
    try:
        _setns(target)
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", port))
            sock.listen(128)
            sock.setblocking(False)
        finally:
            _setns(home)
    finally:
        os.close(home)
        os.close(target)
    return sock


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


async def serve(sockets: list[socket.socket], host: str, port: int) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(host, port, limit=CHUNK)
        except OSError:
            writer.close()
            return
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))

    servers = [await asyncio.start_server(handle, sock=s, limit=CHUNK) for s in sockets]
    print("ready", flush=True)
    await asyncio.gather(*(s.serve_forever() for s in servers))


def main() -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--target", required=True, help="HOST:PORT of the API server")
    p.add_argument("--port", type=int, required=True, help="port to listen on in each netns")
    p.add_argument("netns", nargs="+")
    args = p.parse_args()
    host, _, port = args.target.rpartition(":")
    sockets = [listen_in(ns, args.port) for ns in args.netns]
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(sockets, host, int(port)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
