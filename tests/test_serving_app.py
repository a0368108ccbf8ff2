"""gie_guard.serving's FastAPI app under a real uvicorn on 127.0.0.1: generation, metrics
against what happened, verifier outcomes per request in a batch, and bad requests (sent as
raw bytes where a client library would refuse to send them) answered 4xx, never 500 and
never a reset, with the server still serving afterwards. Run under both of uvicorn's HTTP
parsers (h11, and httptools where installed)."""

from __future__ import annotations

import base64
import http.client
import io
import json
import logging
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from gie_guard import Guard  # noqa: E402
from gie_guard.serving import ImageService, ServeSettings, create_app  # noqa: E402
from gie_guard.serving import http as serving_http  # noqa: E402
from gie_guard.serving.http import GuardedH11Protocol  # noqa: E402

import _servers  # noqa: E402
from gie_guard.serving.schemas import concept_label  # noqa: E402

SECRET = "quokka"  # in every prompt; must never reach a log line at INFO or above

POLICY = """\
name: svc
version: "1"
dedup_threshold: 0.0
inhibit_steps: [0.0, 1.0]
concepts:
  - {id: circle, text: circle, scale: 1.5, verify: {verifier: switch, labels: [circle], action: block}}
  - {id: star, text: star, scale: 1.0, verify: {verifier: switch, labels: [star], action: blur}}
  - {id: square, text: square, scale: 2.0, verify: {verifier: switch, labels: [square], action: record}}
"""

SETTINGS = ServeSettings(max_steps=4, default_steps=2, max_images=3, max_side=64, max_queue=4, max_batch_images=4,
                         max_body_bytes=4096, body_timeout_s=1.0, batch_wait_s=0.05)


class Switch:
    """A verifier whose next answers the test queues (functions of the images); no labels otherwise."""

    def __init__(self) -> None:
        self.answers: list = []
        self.lock = threading.Lock()

    def __call__(self, images):
        with self.lock:
            answer = self.answers.pop(0) if self.answers else None
        return answer(images) if answer is not None else [set() for _ in images]


class Running(_servers.Running):
    def __init__(self, app, *, http: str = "h11") -> None:
        protocol = {"h11": GuardedH11Protocol, "httptools": getattr(serving_http, "GuardedHttpToolsProtocol", None)}[http]
        super().__init__(app, http=protocol, max_requests=64)


class Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.name} {record.getMessage()} {record.exc_text or ''}")


def request(port, method, path, body=None, headers=None, timeout=60):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
        conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})} if data is not None else (headers or {}))
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def raw(port, data: bytes, *, timeout=20.0):
    """Send ``data`` as is; return (status, headers+body bytes, seconds, closed by the server)."""
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        received = b""
        closed = False
        while True:
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                break
            if not chunk:
                closed = True
                break
            received += chunk
            head, sep, rest = received.partition(b"\r\n\r\n")
            if sep:
                length = [int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")]
                if length and len(rest) >= length[0]:
                    if b"connection: close" in head.lower():
                        closed = s.recv(1) == b""
                    break
    status = int(received.split(b" ", 2)[1]) if received.startswith(b"HTTP/1.1 ") else None
    return status, received, time.perf_counter() - started, closed


def post_raw(body: bytes, *, content_length: str | None = None, extra: bytes = b"") -> bytes:
    length = str(len(body)) if content_length is None else content_length
    return (b"POST /v1/images HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {length}\r\n".encode() + extra + b"\r\n" + body)


def scrape(port) -> dict:
    status, _, body = request(port, "GET", "/metrics")
    assert status == 200
    assert SECRET not in body.decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(body.decode()) for s in f.samples}


def served(samples, outcome):
    return samples.get(("gie_guard_serve_requests_total", (("outcome", outcome),)), 0.0)


def generations(samples, outcome):
    return samples.get(("gie_guard_generations_total", (("outcome", outcome), ("policy", "svc"))), 0.0)


def wait_ready(port, timeout=180.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, _, body = request(port, "GET", "/readyz")
        if status == 200:
            return json.loads(body)
        time.sleep(0.1)
    raise AssertionError(f"not ready: {body!r}")


HTTP_IMPLS = ["h11"]
try:
    import httptools  # noqa: F401

    HTTP_IMPLS.append("httptools")
except ImportError:
    pass


@pytest.fixture(scope="module")
def capture():
    handler = Capture()
    root = logging.getLogger()
    old = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)  # DEBUG records pass through too; the handler keeps INFO and above
    yield handler
    root.removeHandler(handler)
    root.setLevel(old)


@pytest.fixture(scope="module", params=HTTP_IMPLS)
def svc(request, sd_pipe, tmp_path_factory, capture):
    policy = tmp_path_factory.mktemp("policy") / "policy.yaml"
    policy.write_text(POLICY)
    switch = Switch()
    service = ImageService(lambda: sd_pipe, lambda metrics: Guard(policy=str(policy), metrics=metrics, verifiers={"switch": switch}),
                           SETTINGS)
    running = Running(create_app(service), http=request.param)
    try:
        wait_ready(running.port)
        yield running.port, service, switch
    finally:
        running.stop()
    assert service.state == "stopping"


def test_generates_and_metrics_add_up(svc):
    port, service, _ = svc
    before = scrape(port)
    status, headers, body = request(port, "POST", "/v1/images", {"prompt": f"a {SECRET} circle", "seed": 7, "n": 2})
    assert status == 200, body
    answer = json.loads(body)
    assert [image["seed"] for image in answer["images"]] == [7, 8]
    for image in answer["images"]:
        png = Image.open(io.BytesIO(base64.b64decode(image["b64_png"])))
        assert png.format == "PNG" and png.size == (8, 8)
    report = answer["report"]
    assert report["policy"] == "svc" and report["policy_hash"] == service.guard.snapshot.content_hash
    assert report["outcome"] == "ok" and report["total_steps"] == 2 and report["steps_inhibited"] == 2
    # opaque labels: neither the ids nor the texts, stable (the operator maps them back)
    assert [c["id"] for c in report["concepts"]] == [concept_label("svc", i) for i in ("circle", "star", "square")]
    assert all(set(c) == {"id", "inhibited"} for c in report["concepts"])  # no texts, no scales: not the blocklist
    assert report["concepts_applied"] == 3 and report["batch_images"] == 2
    for word in ("circle", "star", "square"):
        assert word not in json.dumps(report)

    # the same seed gives the same image; the binary form carries the report in headers
    status, headers, png = request(port, "POST", "/v1/images", {"prompt": f"a {SECRET} circle", "seed": 7, "response_format": "png"})
    assert status == 200 and headers["content-type"] == "image/png"
    assert png == base64.b64decode(answer["images"][0]["b64_png"])
    assert headers["x-gie-guard-outcome"] == "ok" and headers["x-gie-guard-policy-hash"] == report["policy_hash"]
    assert json.loads(headers["x-gie-guard-report"]) == report | {"batch_images": 1}
    assert "circle" not in headers["x-gie-guard-report"] and "star" not in headers["x-gie-guard-report"]

    after = scrape(port)
    assert served(after, "ok") - served(before, "ok") == 2
    assert after[("gie_guard_serve_images_total", ())] - before.get(("gie_guard_serve_images_total", ()), 0) == 3
    assert generations(after, "ok") - generations(before, "ok") == 2
    key = ("gie_guard_concept_applications_total", (("concept", "star"), ("policy", "svc")))
    assert after[key] - before.get(key, 0) == 2
    assert after[("gie_guard_serve_ready", ())] == 1


def test_concurrent_requests_share_guarded_calls(svc):
    port, _, _ = svc
    before = scrape(port)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda i: request(port, "POST", "/v1/images", {"prompt": f"{SECRET} {i}", "seed": i}), range(4)))
    assert [status for status, _, _ in results] == [200] * 4
    batches = [json.loads(body)["report"]["batch_requests"] for _, _, body in results]
    after = scrape(port)
    calls = generations(after, "ok") - generations(before, "ok")
    assert calls == sum(1 / b for b in batches) and calls < 4  # batched: fewer guarded calls than requests
    assert served(after, "ok") - served(before, "ok") == 4


def test_verifier_outcomes_per_request_and_fail_closed(svc):
    port, _, switch = svc
    before = scrape(port)

    # block: only the request whose image was flagged is withheld; the other is generated again alone
    switch.answers = [lambda images: [{"circle"}] + [set()] * (len(images) - 1)]
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(request, port, "POST", "/v1/images", {"prompt": f"{SECRET} a", "seed": 1})
        time.sleep(0.01)
        second = pool.submit(request, port, "POST", "/v1/images", {"prompt": f"{SECRET} b", "seed": 2})
        answers = sorted([first.result(), second.result()], key=lambda r: r[0])
    (ok_status, _, ok_body), (blocked_status, _, blocked_body) = answers
    assert (ok_status, blocked_status) == (200, 451), answers
    blocked = json.loads(blocked_body)
    assert blocked["error"]["code"] == "content_blocked" and "images" not in blocked
    assert blocked["report"]["outcome"] == "blocked" and blocked["report"]["blocked_concepts"] == [concept_label("svc", "circle")]
    assert b"circle" not in blocked_body
    assert json.loads(ok_body)["report"]["batch_requests"] == 1  # retried without the blocked one

    # blur and record: images come back, the outcome says what the verifier found
    switch.answers = [lambda images: [{"star"}] * len(images)]
    status, _, body = request(port, "POST", "/v1/images", {"prompt": f"{SECRET} c", "seed": 3})
    assert status == 200 and json.loads(body)["report"]["outcome"] == "blurred"
    switch.answers = [lambda images: [{"square"}] * len(images)]
    status, _, body = request(port, "POST", "/v1/images", {"prompt": f"{SECRET} d", "seed": 4})
    assert status == 200 and json.loads(body)["report"]["outcome"] == "recorded"

    # a verifier that fails: no image, a 500 that says so (fail closed), and the server serves on
    def broken(images):
        raise RuntimeError("detector crashed")

    switch.answers = [broken]
    status, _, body = request(port, "POST", "/v1/images", {"prompt": f"{SECRET} e", "seed": 5})
    assert status == 500 and json.loads(body)["error"]["code"] == "generation_failed" and b"b64_png" not in body
    status, _, _ = request(port, "POST", "/v1/images", {"prompt": f"{SECRET} f", "seed": 6})
    assert status == 200

    after = scrape(port)
    delta = {o: served(after, o) - served(before, o) for o in ("ok", "blocked", "blurred", "recorded", "failed")}
    assert delta == {"ok": 2, "blocked": 1, "blurred": 1, "recorded": 1, "failed": 1}
    assert generations(after, "blocked") - generations(before, "blocked") == 1
    assert generations(after, "error") - generations(before, "error") == 1


DEEP = b'{"prompt": ' + b"[" * 1500 + b"]" * 1500 + b"}"
BAD_REQUESTS = [
    # (name, raw request, expected status, error code or None when uvicorn's parser answers)
    ("invalid JSON", post_raw(b'{"prompt": "x",'), 400, "invalid_json"),
    ("empty body", post_raw(b""), 400, "invalid_json"),
    ("1,500-deep JSON", post_raw(DEEP), 400, "invalid_json"),
    ("lone surrogate", post_raw(b'{"prompt": "\\ud800"}'), 400, "invalid_json"),
    ("invalid UTF-8", post_raw(b'{"prompt": "\xed\xa0\x80"}'), 400, "invalid_json"),
    ("a JSON list", post_raw(b'["x"]'), 422, "invalid_request"),
    ("prompt a number", post_raw(b'{"prompt": 5}'), 422, "invalid_request"),
    ("steps a string", post_raw(b'{"prompt": "x", "steps": "2"}'), 422, "invalid_request"),
    ("seed a bool", post_raw(b'{"prompt": "x", "seed": true}'), 422, "invalid_request"),
    ("steps out of bounds", post_raw(b'{"prompt": "x", "steps": 5}'), 422, "invalid_request"),
    ("negative seed", post_raw(b'{"prompt": "x", "seed": -1}'), 422, "invalid_request"),
    ("size out of bounds", post_raw(b'{"prompt": "x", "width": 4096, "height": 8}'), 422, "invalid_request"),
    ("size not a multiple", post_raw(b'{"prompt": "x", "width": 12}'), 422, "invalid_request"),
    ("too many images", post_raw(b'{"prompt": "x", "n": 9}'), 422, "invalid_request"),
    ("guidance NaN", post_raw(b'{"prompt": "x", "guidance_scale": NaN}'), 422, "invalid_request"),
    ("blank prompt", post_raw(b'{"prompt": "   "}'), 422, "invalid_request"),
    ("NUL in prompt", post_raw(b'{"prompt": "a\\u0000b"}'), 422, "invalid_request"),
    ("unknown field", post_raw(b'{"prompt": "x", "colour": "red"}'), 422, "invalid_request"),
    ("png with n=2", post_raw(b'{"prompt": "x", "n": 2, "response_format": "png"}'), 422, "invalid_request"),
    ("text/plain", post_raw(b"prompt=x").replace(b"application/json", b"text/plain"), 415, "unsupported_media_type"),
    ("body over the limit", post_raw(b'{"prompt": "' + b"x" * 5000 + b'"}'), 413, "body_too_large"),
    ("chunked over the limit", b"POST /v1/images HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
     b"Transfer-Encoding: chunked\r\n\r\n" + b"".join(b"400\r\n" + b"x" * 1024 + b"\r\n" for _ in range(6)) + b"0\r\n\r\n",
     413, "body_too_large"),
    ("10 MB announced, Expect: 100-continue", post_raw(b"", content_length=str(10 * 2**20), extra=b"Expect: 100-continue\r\n"),
     413, "body_too_large"),
    ("negative Content-Length", post_raw(b'{"prompt": "x"}', content_length="-5"), 400, None),
    ("malformed Content-Length", post_raw(b'{"prompt": "x"}', content_length="12abc"), 400, None),
    ("two Content-Lengths", post_raw(b'{"prompt": "x"}', extra=b"Content-Length: 3\r\n"), 400, None),
    ("unknown path", b"GET /v2/nothing HTTP/1.1\r\nHost: x\r\n\r\n", 404, "not_found"),
    ("wrong method", b"GET /v1/images HTTP/1.1\r\nHost: x\r\n\r\n", 405, "method_not_allowed"),
]


def test_bad_requests_get_4xx_and_the_server_lives_on(svc):
    port, _, _ = svc
    before = scrape(port)
    app_level = 0
    for name, data, expected, code in BAD_REQUESTS:
        status, received, _, _ = raw(port, data)
        assert status == expected, (name, received[:300])
        if code is not None:
            body = json.loads(received.partition(b"\r\n\r\n")[2])
            assert body["error"]["code"] == code, (name, body)
            assert b"\\ud800" not in received and b"xxxx" not in received  # nothing sent is echoed back
            app_level += name not in ("unknown path", "wrong method")
    status, _, _ = request(port, "GET", "/healthz")
    assert status == 200
    status, _, _ = request(port, "POST", "/v1/images", {"prompt": f"{SECRET} still here"})
    assert status == 200
    after = scrape(port)
    assert served(after, "invalid") - served(before, "invalid") == app_level
    assert generations(after, "error") == generations(before, "error")  # none reached the pipeline


def test_a_value_past_the_schema_bound_names_the_services_own_limit(svc):
    port, _, _ = svc
    for field, value, problem in (("steps", 10**9, "must be within [1, 4]"), ("steps", 5, "must be within [1, 4]"),
                                  ("n", 2000, "must be within [1, 3]")):
        status, _, body = request(port, "POST", "/v1/images", {"prompt": "x", field: value})
        assert status == 422, body
        assert json.loads(body)["error"]["fields"] == [{"loc": field, "problem": problem}], body


def test_a_10_mb_body_gets_413_not_a_reset(svc):
    port, _, _ = svc
    status, received, _, closed = raw(port, post_raw(b'{"prompt": "' + b"x" * (10 * 2**20) + b'"}'), timeout=60)
    assert status == 413 and b"body_too_large" in received and closed


def test_a_body_that_never_arrives_is_closed_by_a_read_timeout(svc):
    port, _, _ = svc
    status, received, _, closed = raw(port, post_raw(b'{"prompt": "x"', content_length="100"), timeout=20)
    assert status == 408 and b"body_timeout" in received and closed
    before = scrape(port)
    status, _, _ = request(port, "POST", "/v1/images", {"prompt": f"{SECRET} after the stall"})
    assert status == 200
    assert served(scrape(port), "ok") - served(before, "ok") == 1


def test_more_clients_than_admitted_get_503_never_a_reset(svc):
    port, _, _ = svc
    before = scrape(port)
    body = json.dumps({"prompt": f"{SECRET} crowd", "steps": 4}).encode()
    with ThreadPoolExecutor(30) as pool:
        results = list(pool.map(lambda _: raw(port, post_raw(body), timeout=120), range(30)))
    statuses = [status for status, _, _, _ in results]
    assert set(statuses) <= {200, 503} and statuses.count(200) >= 1 and statuses.count(503) >= 1, statuses
    for status, received, _, _ in results:
        if status == 503:
            assert b"retry-after: 1" in received.lower() and b"overloaded" in received
    after = scrape(port)
    assert served(after, "ok") - served(before, "ok") == statuses.count(200)
    assert served(after, "overloaded") - served(before, "overloaded") == statuses.count(503)
    assert after[("gie_guard_serve_requests_in_flight", ())] == 0


def test_no_prompt_text_in_logs_at_info(svc, capture):
    port, _, _ = svc
    request(port, "POST", "/v1/images", {"prompt": f"{SECRET} last"})
    assert capture.lines, "the access log should have written lines"
    assert any("POST /v1/images 200" in line for line in capture.lines)
    leaked = [line for line in capture.lines if SECRET in line]
    assert not leaked, leaked[:3]


def test_not_ready_until_loaded_and_concept_texts_only_when_enabled(sd_pipe):
    gate = threading.Event()

    def slow_pipeline():
        assert gate.wait(60)
        return sd_pipe

    service = ImageService(slow_pipeline, lambda metrics: Guard(policy="shapes-demo", metrics=metrics),
                           ServeSettings(max_steps=2, default_steps=1, expose_concept_text=True))
    running = Running(create_app(service))
    try:
        status, _, body = request(running.port, "GET", "/readyz")
        assert status == 503 and json.loads(body)["status"] == "loading"
        assert request(running.port, "GET", "/healthz")[0] == 200  # alive while loading
        status, headers, body = request(running.port, "POST", "/v1/images", {"prompt": "x"})
        assert status == 503 and json.loads(body)["error"]["code"] == "not_ready" and headers["retry-after"] == "5"
        gate.set()
        assert wait_ready(running.port)["policy"] == "shapes-demo"
        status, _, body = request(running.port, "POST", "/v1/images", {"prompt": "x"})
        assert status == 200
        assert json.loads(body)["report"]["concepts"] == [{"id": "circle", "inhibited": True, "text": "circle", "max_scale": 1.5}]
    finally:
        gate.set()
        running.stop()


def test_a_service_that_cannot_guard_never_serves():
    class NotAPipeline:
        def __call__(self, prompt, **kwargs):  # would generate, but cannot be guarded
            raise AssertionError("called unguarded")

    service = ImageService(NotAPipeline, lambda metrics: Guard(policy="shapes-demo", metrics=metrics), ServeSettings())
    running = Running(create_app(service))
    try:
        deadline = time.monotonic() + 60
        while service.state in ("new", "loading") and time.monotonic() < deadline:
            time.sleep(0.05)
        status, _, body = request(running.port, "GET", "/readyz")
        assert status == 503 and json.loads(body)["status"] == "failed" and "UnsupportedPipelineError" in json.loads(body)["error"]
        assert request(running.port, "GET", "/healthz")[0] == 503
        status, _, body = request(running.port, "POST", "/v1/images", {"prompt": "x"})
        assert status == 503 and json.loads(body)["error"]["code"] == "not_ready"
    finally:
        running.stop()


def test_readyz_shows_a_policy_change_waiting_for_a_retry(sd_pipe, tmp_path):
    """An embedder that fails for a while (not the policy's content): the reload is retried by
    itself, /readyz stays 200 on the last good policy and says a change is pending until it lands."""
    from gie_guard.policy.dedup import default_embedder

    class Flaky:
        def __init__(self):
            self.real = default_embedder()
            self.down = False

        def encode(self, texts):
            if self.down:
                raise RuntimeError("embedding service unavailable")
            return self.real.encode(texts)

    flaky = Flaky()
    policy = tmp_path / "policy.yaml"
    policy.write_text("name: live\nconcepts:\n  - {id: beach, text: beach, scale: 2.0}\n")
    service = ImageService(lambda: sd_pipe, lambda metrics: Guard(policy=str(policy), metrics=metrics, embedder=flaky,
                                                                  exclusive=False), SETTINGS)
    running = Running(create_app(service))
    try:
        first = wait_ready(running.port)
        assert first["policy_reload"]["pending"] is False
        flaky.down = True
        policy.write_text("name: live\nconcepts:\n  - {id: beach, text: beach, scale: 2.0}\n"
                          "  - {id: tide, text: a tide pool full of starfish, scale: 2.0}\n")
        assert service.guard.reload() is False
        status, _, body = request(running.port, "GET", "/readyz")
        info = json.loads(body)
        assert status == 200 and info["policy_hash"] == first["policy_hash"]
        assert info["policy_reload"]["pending"] is True and info["policy_reload"]["last_result"] == "failure"
        flaky.down = False
        deadline = time.monotonic() + 60
        while json.loads(request(running.port, "GET", "/readyz")[2])["policy_reload"]["pending"]:
            assert time.monotonic() < deadline, "the pending reload was never retried"
            time.sleep(0.1)
        info = json.loads(request(running.port, "GET", "/readyz")[2])
        assert info["policy_hash"] != first["policy_hash"] and info["policy_reload"]["last_result"] == "success"
    finally:
        running.stop()
