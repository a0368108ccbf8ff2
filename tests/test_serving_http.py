"""gie_guard.serving.http under a real uvicorn on 127.0.0.1: connections that send nothing or
half a request head are closed after the header timeout, and while 1,000 of them are open
the probes answer and images are generated (idle connections do not count against the
request limit)."""

from __future__ import annotations

import contextlib
import http.client
import json
import resource
import select
import socket
import threading
import time

import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from gie_guard import Guard  # noqa: E402
from gie_guard.serving import ImageService, ServeSettings, create_app  # noqa: E402
from gie_guard.serving import http as serving_http  # noqa: E402
from gie_guard.serving.http import GuardedH11Protocol, server_config  # noqa: E402

import _servers  # noqa: E402

IDLE = 1000
PROTOCOLS = [GuardedH11Protocol] + ([serving_http.GuardedHttpToolsProtocol]
                                     if hasattr(serving_http, "GuardedHttpToolsProtocol") else [])


class Running(_servers.Running):
    def __init__(self, app, **config) -> None:
        super().__init__(app, backlog=2048, **config)  # room for the 1,000 idle connections


def request(port, method, path, body=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        data = json.dumps(body).encode() if body is not None else None
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"} if data else {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def wait_ready(port):
    deadline = time.monotonic() + 180
    while request(port, "GET", "/readyz")[0] != 200:
        if time.monotonic() > deadline:
            raise AssertionError("the service did not get ready")
        time.sleep(0.1)


def closed_by_server(sock, wait: float) -> bool:
    """True once the server closed ``sock`` (EOF or reset), reading and dropping what it sends
    meanwhile, waiting up to ``wait`` seconds (0: only what has already happened)."""
    deadline = time.monotonic() + wait
    while True:
        poll = select.poll()  # not select.select: descriptors here go past 1024
        poll.register(sock, select.POLLIN)
        if not poll.poll(max(deadline - time.monotonic(), 0) * 1000):
            return False
        try:
            if sock.recv(65536) == b"":
                return True
        except ConnectionResetError:
            return True


async def hello(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


@pytest.fixture
def many_files():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 2 * IDLE + 512  # both ends of every idle connection live in this process
    if hard != resource.RLIM_INFINITY and hard < wanted:
        pytest.skip(f"the file-descriptor hard limit ({hard}) is below {wanted}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.parametrize("protocol", PROTOCOLS, ids=lambda p: p.__name__)
def test_idle_and_stalled_connections_are_closed_after_the_header_timeout(protocol):
    running = Running(hello, http=protocol, header_timeout_s=0.5, timeout_keep_alive=60)
    try:
        idle = socket.create_connection(("127.0.0.1", running.port))
        stalled = socket.create_connection(("127.0.0.1", running.port))
        stalled.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")  # and never the rest
        kept = socket.create_connection(("127.0.0.1", running.port))  # answered, then silent (keep-alive 60 s)
        kept.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert kept.recv(4096).startswith(b"HTTP/1.1 200")  # (its body may follow: closed_by_server reads it)
        with idle, stalled, kept:
            # each is closed by the header timeout, long before keep-alive or any client gives up
            assert closed_by_server(idle, 60), "an idle connection stayed open"
            assert closed_by_server(stalled, 60), "a connection with half a request head stayed open"
            assert closed_by_server(kept, 60), "a kept-alive connection waited past the header timeout"
        status, body = request(running.port, "GET", "/")
        assert (status, body) == (200, b"ok")  # the server lives on
    finally:
        running.stop()


def test_a_slow_request_is_not_cut_by_the_header_timeout():
    """Headers complete in time: the header timeout leaves the request alone (its answer
    takes longer than the timeout)."""
    release = threading.Event()

    async def slow(scope, receive, send):
        if scope["type"] != "http":
            return
        import asyncio

        while not release.is_set():
            await asyncio.sleep(0.05)
        await hello(scope, receive, send)

    running = Running(slow, header_timeout_s=0.2)
    try:
        with socket.create_connection(("127.0.0.1", running.port)) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert not closed_by_server(sock, 1.0)  # 5 header timeouts later, still waiting for its answer
            release.set()
            assert sock.recv(4096).startswith(b"HTTP/1.1 200")
    finally:
        running.stop()


def test_probes_and_requests_are_served_beside_1000_idle_connections(sd_pipe, many_files):
    service = ImageService(lambda: sd_pipe, lambda metrics: Guard(policy="shapes-demo", metrics=metrics),
                           ServeSettings(max_steps=2, default_steps=1))
    # the header timeout is long here so that every idle socket is still open while the
    # requests are served; max_requests is far below the number of idle sockets
    running = Running(create_app(service), header_timeout_s=600, max_requests=16)
    sockets: list[socket.socket] = []
    try:
        wait_ready(running.port)
        for i in range(IDLE):
            sock = socket.create_connection(("127.0.0.1", running.port))
            if i % 2:
                sock.sendall(b"POST /v1/images HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-")  # a stalled head
            sockets.append(sock)
        for path in ("/healthz", "/readyz"):
            status, body = request(running.port, "GET", path)
            assert status == 200, (path, body)
        status, body = request(running.port, "POST", "/v1/images", {"prompt": "a red circle", "seed": 3})
        assert status == 200, body
        assert json.loads(body)["images"][0]["seed"] == 3
        status, body = request(running.port, "GET", "/metrics")
        assert status == 200 and b'gie_guard_serve_requests_total{outcome="ok"} 1.0' in body
        still_open = sum(not closed_by_server(s, 0) for s in sockets)
        assert still_open == IDLE  # they were all there while the requests were served
    finally:
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.close()
        running.stop()


def test_more_requests_than_max_requests_get_the_json_503_and_probes_still_answer():
    release = threading.Event()
    started = threading.Semaphore(0)

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        if scope["path"] in ("/healthz", "/readyz"):
            await hello(scope, receive, send)
            return
        import asyncio

        started.release()
        while not release.is_set():
            await asyncio.sleep(0.02)
        await hello(scope, receive, send)

    running = Running(app, max_requests=2)
    busy = []
    try:
        for _ in range(2):
            sock = socket.create_connection(("127.0.0.1", running.port))
            sock.sendall(b"GET /work HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            busy.append(sock)
        for _ in range(2):
            assert started.acquire(timeout=60)
        status, body = request(running.port, "GET", "/work")
        assert status == 503 and json.loads(body)["error"]["code"] == "overloaded"
        assert request(running.port, "GET", "/healthz") == (200, b"ok")
        assert request(running.port, "GET", "/readyz") == (200, b"ok")
        release.set()
        for sock in busy:
            assert sock.recv(4096).startswith(b"HTTP/1.1 200")
    finally:
        release.set()
        for sock in busy:
            sock.close()
        running.stop()


def test_config_refuses_uvicorns_connection_counting_limit():
    with pytest.raises(ValueError, match="max_requests"):
        server_config(hello, limit_concurrency=10)
    with pytest.raises(ValueError, match="header_timeout_s"):
        server_config(hello, header_timeout_s=0)
