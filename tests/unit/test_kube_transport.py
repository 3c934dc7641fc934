"""agent/kube/client.py over agent/kube/transport.py against a small local
HTTP server: answers and API Status errors, no answer as status 0 (refused,
timed out, closed), kept-alive connections and their silent closing by the
server, pagination, bearer tokens, and watches: lines split across chunks,
malformed events, and close() from another thread ending a blocked read.
(TLS and a real API server: tests/e2e/test_kube_client.py.)"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from agent.errors import KubeApiError
from agent.kube.client import SERVICES, KubeClient
from agent.kube.kubeconfig import Access
from agent.kube.transport import Transport

Route = Callable[["Handler"], None]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive unless told otherwise
    server: Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.body = self.rfile.read(length) if length else b""
        self.server.requests.append((self.command, self.path, dict(self.headers), self.body))
        self.server.route(urlsplit(self.path).path)(self)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

    def answer(self, status: int, body: Any, close_silently: bool = False) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        # Close without saying so, as a server closing an idle connection.
        self.close_connection = close_silently

    def chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def start_stream(self) -> None:
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.routes: dict[str, Route] = {}
        self.requests: list[tuple[str, str, dict[str, str], bytes]] = []
        self.connections = 0
        self.sockets: list[socket.socket] = []
        self.release = threading.Event()  # lets handlers that hang finish

    def route(self, path: str) -> Route:
        return self.routes.get(path) or (lambda h: h.answer(404, {
            "kind": "Status", "message": f"{path} not found", "reason": "NotFound"}))

    def process_request(self, request: Any, client_address: Any) -> None:
        self.connections += 1
        self.sockets.append(request)
        super().process_request(request, client_address)

    def drop_connections(self) -> None:
        """Close every connection, as a restarted server would have."""
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@pytest.fixture
def server() -> Iterator[Server]:
    srv = Server()
    thread = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield srv
    srv.release.set()
    srv.shutdown()
    srv.server_close()
    thread.join(10)


def client(server: Server, token: str = "") -> KubeClient:
    return KubeClient(Access(server=server.url, origin="test", token=lambda: token))


def test_an_answer_and_an_api_status_error(server: Server) -> None:
    path = SERVICES.path("demo", "web")
    server.routes[path] = lambda h: h.answer(200, {"metadata": {"name": "web"}})
    api = client(server, token="t0k")
    assert api.get(path) == {"metadata": {"name": "web"}}
    _, _, headers, _ = server.requests[-1]
    assert headers["Authorization"] == "Bearer t0k"
    with pytest.raises(KubeApiError) as err:
        api.get(SERVICES.path("demo", "gone"))
    assert (err.value.status, err.value.reason) == (404, "NotFound")
    assert err.value.message == f"{SERVICES.path('demo', 'gone')} not found"


def test_writes_send_json_and_a_merge_patch(server: Server) -> None:
    path = SERVICES.path("demo", "web")
    server.routes[path] = lambda h: h.answer(200, json.loads(h.body))
    api = client(server)
    assert api.patch(path, {"metadata": {"labels": {"a": "b"}}}) == {
        "metadata": {"labels": {"a": "b"}}}
    method, _, headers, _ = server.requests[-1]
    assert (method, headers["Content-Type"]) == ("PATCH", "application/merge-patch+json")
    assert api.replace(path, {"x": 1}) == {"x": 1}
    assert server.requests[-1][0] == "PUT"


def test_a_list_follows_continue_tokens(server: Server) -> None:
    pages = {"": ([1, 2], "next"), "next": ([3], "")}

    def route(h: Handler) -> None:
        query = parse_qs(urlsplit(h.path).query)
        items, token = pages[query.get("continue", [""])[0]]
        assert query["fieldSelector"] == ["metadata.name=n"]
        h.answer(200, {"metadata": {"continue": token, "resourceVersion": "7"},
                       "items": [{"n": i} for i in items]})

    server.routes[SERVICES.path()] = route
    assert client(server).list(SERVICES.path(), "metadata.name=n") == (
        [{"n": 1}, {"n": 2}, {"n": 3}], "7")


def test_a_list_whose_page_token_expired_is_fetched_whole(server: Server) -> None:
    """The second page's token expired (410 Gone): the list is fetched again
    in one answer, without a limit, and its items replace the first page's
    (they may have changed since)."""
    asked: list[dict[str, list[str]]] = []

    def route(h: Handler) -> None:
        query = parse_qs(urlsplit(h.path).query)
        asked.append(query)
        if "limit" not in query:
            h.answer(200, {"metadata": {"resourceVersion": "9"},
                           "items": [{"n": 1}, {"n": 4}]})
        elif "continue" in query:
            h.answer(410, {"kind": "Status", "code": 410, "reason": "Expired",
                           "message": "The provided continue parameter is too old"})
        else:
            h.answer(200, {"metadata": {"continue": "next", "resourceVersion": "7"},
                           "items": [{"n": 1}, {"n": 2}]})

    server.routes[SERVICES.path()] = route
    assert client(server).list(SERVICES.path(), "metadata.name=n") == (
        [{"n": 1}, {"n": 4}], "9")
    assert [("limit" in q, "continue" in q) for q in asked] == [
        (True, False), (True, True), (False, False)]
    assert all(q["fieldSelector"] == ["metadata.name=n"] for q in asked)


def test_a_first_page_that_is_gone_is_an_error(server: Server) -> None:
    """410 without a token is not an expired page: the caller decides."""
    server.routes[SERVICES.path()] = lambda h: h.answer(
        410, {"kind": "Status", "code": 410, "reason": "Gone", "message": "gone"})
    with pytest.raises(KubeApiError) as err:
        client(server).list(SERVICES.path())
    assert err.value.status == 410


def test_requests_share_a_kept_alive_connection(server: Server) -> None:
    server.routes["/a"] = lambda h: h.answer(200, {})
    api = client(server)
    for _ in range(3):
        api.get("/a")
    assert server.connections == 1


def test_a_connection_the_server_closed_while_idle_is_replaced(server: Server) -> None:
    server.routes["/a"] = lambda h: h.answer(200, {"ok": True}, close_silently=True)
    api = client(server)
    assert api.get("/a") == {"ok": True}
    assert api.get("/a") == {"ok": True}  # the kept connection was closed: sent again
    assert server.connections == 2
    # A POST is not sent twice: the server may have acted on it.
    server.routes["/p"] = lambda h: h.answer(201, {}, close_silently=True)
    with pytest.raises(KubeApiError) as err:
        api.create("/p", {})
    assert err.value.status == 0
    assert [r[0] for r in server.requests].count("POST") == 0


def test_after_a_server_restart_no_dead_connection_is_used(server: Server) -> None:
    both = threading.Barrier(2, timeout=10)
    server.routes["/both"] = lambda h: (both.wait(), h.answer(200, {}))[1]
    server.routes["/a"] = lambda h: h.answer(200, {"ok": True})
    api = client(server)
    threads = [threading.Thread(target=api.get, args=("/both",)) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert server.connections == 2  # both kept for reuse
    server.drop_connections()
    assert api.get("/a") == {"ok": True}
    assert server.connections == 3


def test_no_answer_is_status_0() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    api = KubeClient(Access(server=f"http://127.0.0.1:{port}", origin="test"))
    with pytest.raises(KubeApiError) as err:
        api.get("/api")
    assert err.value.status == 0 and "cannot connect" in err.value.message


def test_a_request_without_an_answer_times_out_as_status_0(server: Server) -> None:
    server.routes["/slow"] = lambda h: (server.release.wait(30), h.answer(200, {}))[1]
    transport = Transport(Access(server=server.url, origin="test"))
    with pytest.raises(KubeApiError) as err:
        transport.request("GET /slow", "GET", "/slow", None, None, (5.0, 0.2))
    assert (err.value.status, err.value.message) == (0, "timed out")


def test_a_malformed_answer_is_status_0(server: Server) -> None:
    def route(h: Handler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", "4")
        h.end_headers()
        h.wfile.write(b"nope")

    server.routes["/bad"] = route
    with pytest.raises(KubeApiError) as err:
        client(server).get("/bad")
    assert err.value.status == 0 and "malformed answer" in err.value.message


def events(*names: str) -> bytes:
    return b"".join(json.dumps({"type": "ADDED", "object": {"n": n}}).encode() + b"\n"
                    for n in names)


def test_a_watch_yields_events_split_across_chunks(server: Server) -> None:
    data = events("a", "b", "c")

    def route(h: Handler) -> None:
        query = parse_qs(urlsplit(h.path).query)
        assert (query["watch"], query["resourceVersion"], query["timeoutSeconds"]) == (
            ["true"], ["5"], ["60"])
        h.start_stream()
        for i in range(0, len(data), 7):  # lines cut anywhere
            h.chunk(data[i:i + 7])
        h.chunk(b"")

    server.routes[SERVICES.path()] = route
    got = [e["object"]["n"] for e in client(server).watch(SERVICES.path(), "5", 60)]
    assert got == ["a", "b", "c"]


def test_a_watch_refused_raises_its_status(server: Server) -> None:
    server.routes["/w"] = lambda h: h.answer(410, {"message": "too old", "reason": "Expired"})
    with pytest.raises(KubeApiError) as err:
        client(server).watch("/w", "1", 60)
    assert (err.value.status, err.value.reason) == (410, "Expired")


def test_a_malformed_watch_event_is_status_0(server: Server) -> None:
    def route(h: Handler) -> None:
        h.start_stream()
        h.chunk(events("a") + b"{not json\n")
        h.chunk(b"")

    server.routes["/w"] = route
    stream = client(server).watch("/w", "1", 60)
    with pytest.raises(KubeApiError) as err:
        list(stream)
    assert err.value.status == 0 and "malformed watch event" in err.value.message


def test_a_broken_watch_is_status_0(server: Server) -> None:
    def route(h: Handler) -> None:
        h.start_stream()
        h.wfile.write(b"ff\r\nshort")  # a chunk cut off by the server going away
        h.close_connection = True

    server.routes["/w"] = route
    with pytest.raises(KubeApiError) as err:
        list(client(server).watch("/w", "1", 60))
    assert err.value.status == 0 and "broken" in err.value.message


def test_close_from_another_thread_ends_a_blocked_watch(server: Server) -> None:
    sent = threading.Event()

    def route(h: Handler) -> None:
        h.start_stream()
        h.chunk(events("a"))
        sent.set()
        server.release.wait(30)  # then nothing, as a quiet watch

    server.routes["/w"] = route
    stream = client(server).watch("/w", "1", 60)
    got: list[Any] = []
    errors: list[BaseException] = []

    def read() -> None:
        try:
            got.extend(stream)
        except BaseException as err:
            errors.append(err)

    reader = threading.Thread(target=read)
    reader.start()
    assert sent.wait(10)
    while not got and reader.is_alive():
        reader.join(0.05)
    stream.close()
    reader.join(10)
    assert not reader.is_alive(), "close() did not end the read"
    assert [e["object"]["n"] for e in got] == ["a"]
    assert errors == []


def test_a_watch_closed_before_it_is_read_yields_nothing(server: Server) -> None:
    def route(h: Handler) -> None:
        h.start_stream()
        h.chunk(events("a"))
        server.release.wait(30)

    server.routes["/w"] = route
    stream = client(server).watch("/w", "1", 60)
    stream.close()
    assert list(stream) == []
