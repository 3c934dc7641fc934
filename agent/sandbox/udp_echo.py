"""A UDP server for the sandbox and tests: answers every datagram with
"<name> <payload>" from the port it was sent to (IPv4 and IPv6)."""

from __future__ import annotations

import argparse
import select
import socket


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--name", required=True)
    parser.add_argument("--port", type=int, action="append", required=True)
    args = parser.parse_args()
    socks = []
    for port in args.port:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(("::", port))
        socks.append(sock)
    prefix = args.name.encode() + b" "
    while True:
        ready, _, _ = select.select(socks, [], [])
        for sock in ready:
            data, peer = sock.recvfrom(65535)
            sock.sendto(prefix + data, peer)


if __name__ == "__main__":
    main()
