"""The side-by-side bench's eraser (bench/versus/apiload.py EtcdEraser),
against a small stand-in for etcd's JSON gateway: which keys it deletes, in
which order, in transactions etcd accepts, and what it counts. Its use on a
real etcd is exercised by tests/datapath/test_bench_compare.py."""

from __future__ import annotations

import base64
import json
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from versus.apiload import Erased, EtcdEraser, ServiceSpec, batch


class FakeEtcd:
    """Holds a set of keys; answers /v3/kv/txn of requestDeleteRange ops as
    etcd's gateway does (each op's count, as a string), and refuses a
    transaction of more than 128 ops, as etcd's default --max-txn-ops does."""

    def __init__(self, keys: set[str]) -> None:
        self.keys = set(keys)
        self.deleted: list[str] = []  # in the order the deletions arrived
        self.txn_sizes: list[int] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                ops = body["success"]
                if self.path != "/v3/kv/txn" or len(ops) > 128:
                    self.send_response(400)
                    self.end_headers()
                    return
                fake.txn_sizes.append(len(ops))
                responses = []
                for op in ops:
                    key = base64.b64decode(op["requestDeleteRange"]["key"]).decode()
                    hit = key in fake.keys
                    fake.keys.discard(key)
                    fake.deleted.append(key)
                    responses.append({"response_delete_range": {"deleted": str(int(hit))}})
                data = json.dumps({"succeeded": True, "responses": responses}).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def specs() -> list[ServiceSpec]:
    return batch(300, "10.96.128.0/17", ("10.244.9.3",), "node", prefix="load")


def keys_of(specs: list[ServiceSpec], namespace: str) -> set[str]:
    out: set[str] = set()
    for s in specs:
        out |= {f"/registry/services/specs/{namespace}/{s.name}",
                f"/registry/endpointslices/{namespace}/{s.name}-1",
                f"/registry/ipaddresses/{s.cluster_ip}"}
    return out


@pytest.fixture
def etcd(specs: list[ServiceSpec]) -> Iterator[FakeEtcd]:
    # One key that is not the load's, in the same prefixes: it must stay.
    fake = FakeEtcd(keys_of(specs, "load") | {"/registry/services/specs/bench/bench",
                                              "/registry/ipaddresses/10.96.0.1"})
    yield fake
    fake.close()


def test_erases_every_key_of_the_load_and_nothing_else(
    etcd: FakeEtcd, specs: list[ServiceSpec],
) -> None:
    n = len(specs)
    assert EtcdEraser(etcd.url).erase(specs, "load") == Erased(n, n, n)
    assert etcd.keys == {"/registry/services/specs/bench/bench",
                         "/registry/ipaddresses/10.96.0.1"}
    assert max(etcd.txn_sizes) <= 128 and sum(etcd.txn_sizes) == 3 * len(specs)


def test_services_go_before_any_ipaddress(etcd: FakeEtcd, specs: list[ServiceSpec]) -> None:
    # The API server's ClusterIP repair recreates the IPAddress of a Service
    # that still exists: every Service must be gone first.
    EtcdEraser(etcd.url).erase(specs, "load")
    kinds = [k.split("/")[2] for k in etcd.deleted]
    last_service = max(i for i, k in enumerate(kinds) if k == "services")
    first_ip = min(i for i, k in enumerate(kinds) if k == "ipaddresses")
    assert last_service < first_ip


def test_counts_only_what_was_there(etcd: FakeEtcd, specs: list[ServiceSpec]) -> None:
    # A second erase finds nothing: the bench stops when a Service or slice
    # it wrote is not found, so a wrong key layout cannot pass unnoticed.
    eraser = EtcdEraser(etcd.url)
    eraser.erase(specs, "load")
    assert eraser.erase(specs, "load") == Erased(0, 0, 0)


def test_counts_each_kind_apart(etcd: FakeEtcd, specs: list[ServiceSpec]) -> None:
    # The API server removed two IPAddress objects: the others and every
    # Service and slice are still erased, and the count says which kind fell short.
    for s in specs[:2]:
        etcd.keys.discard(f"/registry/ipaddresses/{s.cluster_ip}")
    n = len(specs)
    assert EtcdEraser(etcd.url).erase(specs, "load") == Erased(n, n, n - 2)
    assert etcd.keys == {"/registry/services/specs/bench/bench",
                         "/registry/ipaddresses/10.96.0.1"}
