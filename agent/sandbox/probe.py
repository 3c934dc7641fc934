"""A traffic client for the sandbox and tests, run inside a client pod.

    python -m agent.sandbox.probe tcp ADDR PORT --count N        one request per connection
    python -m agent.sandbox.probe tcp ADDR PORT --duration S     as many as fit in S seconds
    python -m agent.sandbox.probe tcp ADDR PORT --persistent N   N requests on one connection
    python -m agent.sandbox.probe udp ADDR PORT --count N [--connect] [--size BYTES]
    python -m agent.sandbox.probe udp ADDR PORT --persistent N [--connect]   one socket

It prints one JSON object: which backend answered how often ("answers"),
failures by errno name ("errors"), how often getpeername()/recvfrom() showed
an address other than the one dialled ("peer_mismatch"), and per-request
latencies in microseconds (p50/p99). Backends identify themselves in their
answers (nginx: "pod:port", UDP echo: "pod payload").
"""

from __future__ import annotations

import argparse
import errno
import json
import socket
import struct
import time
from collections import Counter
from typing import Any

REQUEST = b"GET {path} HTTP/1.1\r\nHost: veer\r\nConnection: close\r\n\r\n"
KEEPALIVE_REQUEST = b"GET / HTTP/1.1\r\nHost: veer\r\n\r\n"


def _family(addr: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def _errname(err: OSError) -> str:
    if isinstance(err, TimeoutError):  # socket.timeout is an alias
        return "TIMEOUT"
    return errno.errorcode.get(err.errno or 0, str(err.errno))


def _percentiles(samples: list[float]) -> dict[str, float]:
    if not samples:
        return {}
    ordered = sorted(samples)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)

    return {"p50": at(0.50), "p90": at(0.90), "p99": at(0.99), "n": len(ordered)}


def _read_http(sock: socket.socket) -> str:
    """Read one HTTP response; return its body's first line."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("connection closed before the response head")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    while len(body) < length:
        chunk = sock.recv(4096)
        if not chunk:
            break
        body += chunk
    return body.decode(errors="replace").strip().splitlines()[0] if body.strip() else ""


def _peer_matches(peer: Any, addr: str, port: int) -> bool:
    host = peer[0]
    if host.startswith("::ffff:") and "." in addr:
        host = host[7:]
    return bool(host == addr and peer[1] == port)


def tcp_once(addr: str, port: int, timeout: float, path: str = "/",
             source_port: int = 0) -> tuple[str, bool]:
    with socket.socket(_family(addr), socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        if source_port:
            # A fixed source port makes a fixed flow (Maglev hashes it). The
            # next run reuses the port at once: close with a reset (linger 0)
            # so that no TIME_WAIT holds it, whoever closed first.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.bind(("", source_port))
        sock.connect((addr, port))
        peer_ok = _peer_matches(sock.getpeername(), addr, port)
        sock.sendall(REQUEST.replace(b"{path}", path.encode()))
        return _read_http(sock), peer_ok


def run_tcp(args: argparse.Namespace) -> dict[str, Any]:
    answers: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    mismatch = 0
    latencies: list[float] = []
    failed_after: list[float] = []
    sequence: list[str] = []  # the answers in order (connection n -> its backend)
    if args.persistent:
        return run_tcp_persistent(args)
    deadline = time.monotonic() + args.duration if args.duration else None
    n = 0
    while (deadline is None and n < args.count) or (deadline is not None
                                                     and time.monotonic() < deadline):
        n += 1
        start = time.perf_counter()
        try:
            source_port = args.source_port + n - 1 if args.source_port else 0
            body, peer_ok = tcp_once(args.addr, args.port, args.timeout, args.path,
                                     source_port)
        except OSError as err:
            errors[_errname(err)] += 1
            failed_after.append((time.perf_counter() - start) * 1e6)
            if args.interval:
                time.sleep(args.interval)
            continue
        latencies.append((time.perf_counter() - start) * 1e6)
        answers[body] += 1
        sequence.append(body)
        mismatch += not peer_ok
        if args.interval:
            time.sleep(args.interval)
    return {
        "attempts": n,
        "answers": dict(answers),
        "errors": dict(errors),
        "peer_mismatch": mismatch,
        "latency_us": _percentiles(latencies),
        "error_latency_us": _percentiles(failed_after),
        "sequence": sequence,
    }


def run_tcp_persistent(args: argparse.Namespace) -> dict[str, Any]:
    """Many requests over one keep-alive connection, `interval` apart."""
    answers: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    with socket.socket(_family(args.addr), socket.SOCK_STREAM) as sock:
        sock.settimeout(args.timeout)
        sock.connect((args.addr, args.port))
        peer_ok = _peer_matches(sock.getpeername(), args.addr, args.port)
        print(json.dumps({"connected": True}), flush=True)
        for _ in range(args.persistent):
            try:
                sock.sendall(KEEPALIVE_REQUEST)
                answers[_read_http(sock)] += 1
            except OSError as err:
                errors[_errname(err)] += 1
                break
            time.sleep(args.interval)
    return {"answers": dict(answers), "errors": dict(errors), "peer_mismatch": int(not peer_ok)}


def run_udp_persistent(args: argparse.Namespace) -> dict[str, Any]:
    """One long-lived UDP socket (one source port), `persistent` datagrams
    `interval` apart, as a long-lived client would. On an error the socket is
    replaced, as an application would reconnect. Reports the sequence of
    answering backends as runs: [[backend, count], ...]."""
    runs: list[list[Any]] = []
    errors: Counter[str] = Counter()

    def fresh() -> socket.socket:
        sock = socket.socket(_family(args.addr), socket.SOCK_DGRAM)
        sock.settimeout(args.timeout)
        if args.connect:
            sock.connect((args.addr, args.port))
        return sock

    sock = fresh()
    print(json.dumps({"started": True}), flush=True)
    for i in range(args.persistent):
        payload = f"ping-{i}".encode()
        try:
            if args.connect:
                sock.send(payload)
                data = sock.recv(65535)
            else:
                sock.sendto(payload, (args.addr, args.port))
                data, _ = sock.recvfrom(65535)
            name = data.decode(errors="replace").partition(" ")[0]
            if runs and runs[-1][0] == name:
                runs[-1][1] += 1
            else:
                runs.append([name, 1])
        except OSError as err:
            errors[_errname(err)] += 1
            if not isinstance(err, TimeoutError):
                sock.close()
                sock = fresh()
        time.sleep(args.interval)
    sock.close()
    return {"runs": runs, "errors": dict(errors)}


def run_udp(args: argparse.Namespace) -> dict[str, Any]:
    answers: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    mismatch = 0
    latencies: list[float] = []
    for i in range(args.count):
        with socket.socket(_family(args.addr), socket.SOCK_DGRAM) as sock:
            sock.settimeout(args.timeout)
            payload = f"ping-{i}".encode().ljust(args.size, b".")
            start = time.perf_counter()
            try:
                if args.connect:
                    sock.connect((args.addr, args.port))
                    if not _peer_matches(sock.getpeername(), args.addr, args.port):
                        mismatch += 1
                    sock.send(payload)
                    data = sock.recv(65535)
                    src = (args.addr, args.port)
                else:
                    sock.sendto(payload, (args.addr, args.port))
                    data, src = sock.recvfrom(65535)
            except OSError as err:
                errors[_errname(err)] += 1
                continue
            latencies.append((time.perf_counter() - start) * 1e6)
            name, _, echoed = data.decode(errors="replace").partition(" ")
            if echoed != payload.decode():
                errors["BAD_REPLY"] += 1
                continue
            answers[name] += 1
            mismatch += not _peer_matches(src, args.addr, args.port)
    return {
        "attempts": args.count,
        "answers": dict(answers),
        "errors": dict(errors),
        "peer_mismatch": mismatch,
        "latency_us": _percentiles(latencies),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("proto", choices=("tcp", "udp"))
    parser.add_argument("addr")
    parser.add_argument("port", type=int)
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--duration", type=float, default=0.0)
    parser.add_argument("--persistent", type=int, default=0)
    parser.add_argument("--interval", type=float, default=0.0)
    parser.add_argument("--timeout", type=float, default=2.0)
    parser.add_argument("--connect", action="store_true", help="UDP: use connect()")
    parser.add_argument("--source-port", type=int, default=0,
                        help="TCP: bind connection n (from 1) to source port SOURCE_PORT+n-1")
    parser.add_argument("--size", type=int, default=0,
                        help="UDP (--count): pad each datagram's payload to this many bytes")
    parser.add_argument("--path", default="/",
                        help="TCP: the HTTP path (/client also returns the address nginx saw)")
    args = parser.parse_args()
    if args.proto == "tcp":
        result = run_tcp(args)
    elif args.persistent:
        result = run_udp_persistent(args)
    else:
        result = run_udp(args)
    print(json.dumps(result, sort_keys=True), flush=True)


if __name__ == "__main__":
    main()
