"""A small production-style image service guarded by gie_guard, on the standard library only.

    python examples/service.py --port 8000                      # tiny random-weight pipeline
    python examples/service.py --pipeline shapes --port 8000    # the shapes-world model

Endpoints:

    POST /generate   {"prompt": str, "seed": int, "steps": int}  ->  200 {"image_png_base64", "report"}
                     451 when a verifier blocked the output (policy action `block`)
    GET  /metrics    Prometheus exposition (all workers' values when PROMETHEUS_MULTIPROC_DIR is set)
    GET  /healthz    {"status": "ok", "policy", "content_hash"}

Limits: bodies over --max-body bytes get 413, more than --max-inflight concurrent
generations get 503, bad JSON or fields get 400 with a message. Prompts are never logged
at INFO or above. SIGTERM and SIGINT stop the server after the requests in progress.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import logging
import signal
import sys
import threading
import time
from dataclasses import asdict
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

log = logging.getLogger("gie_guard.examples.service")

MAX_PROMPT_CHARS = 1000


class BadRequest(Exception):
    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


def load_pipeline(kind: str, weights: str | None = None) -> Any:
    if kind == "tiny":
        from gie_guard.testing import tiny_sd_pipeline

        return tiny_sd_pipeline()
    if kind == "shapes":
        from gie_guard.shapes import load_pipeline as load_shapes

        return load_shapes(weights_dir=weights)
    raise ValueError(f"unknown pipeline {kind!r}")


class ImageService:
    """The application: validates requests, runs the guarded pipeline, encodes the answer."""

    def __init__(self, pipe: Any, guard: Any, *, max_steps: int = 50, max_inflight: int = 4) -> None:
        self.pipe = pipe
        self.guard = guard
        self.max_steps = max_steps
        self._slots = threading.BoundedSemaphore(max_inflight)

    def parse(self, body: bytes) -> dict[str, Any]:
        try:
            data = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BadRequest(HTTPStatus.BAD_REQUEST, f"body is not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise BadRequest(HTTPStatus.BAD_REQUEST, "body must be a JSON object")
        unknown = set(data) - {"prompt", "seed", "steps"}
        if unknown:
            raise BadRequest(HTTPStatus.BAD_REQUEST, f"unknown fields: {', '.join(sorted(unknown))}")
        prompt, seed, steps = data.get("prompt"), data.get("seed", 0), data.get("steps", 20)
        if not isinstance(prompt, str) or not prompt.strip():
            raise BadRequest(HTTPStatus.BAD_REQUEST, "prompt must be a non-empty string")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise BadRequest(HTTPStatus.BAD_REQUEST, f"prompt is longer than {MAX_PROMPT_CHARS} characters")
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
            raise BadRequest(HTTPStatus.BAD_REQUEST, "seed must be an integer in [0, 2**63)")
        if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= self.max_steps:
            raise BadRequest(HTTPStatus.BAD_REQUEST, f"steps must be an integer in [1, {self.max_steps}]")
        return {"prompt": prompt, "seed": seed, "steps": steps}

    def generate(self, request: dict[str, Any]) -> tuple[HTTPStatus, dict[str, Any]]:
        import torch

        from gie_guard.verifiers import ContentBlockedError

        if not self._slots.acquire(blocking=False):
            raise BadRequest(HTTPStatus.SERVICE_UNAVAILABLE, "too many generations in progress; retry later")
        try:
            generator = torch.Generator().manual_seed(request["seed"])
            try:
                out = self.guard(self.pipe, prompt=request["prompt"], num_inference_steps=request["steps"],
                                 generator=generator)
            except ContentBlockedError as exc:
                return HTTPStatus.UNAVAILABLE_FOR_LEGAL_REASONS, {
                    "error": "blocked", "message": "the output was withheld by the content policy",
                    "concepts": list(exc.concept_ids), "report": _report_json(exc.report), "outcome": "blocked",
                }
        finally:
            self._slots.release()
        buffer = io.BytesIO()
        out.images[0].save(buffer, format="PNG")
        report = self.guard.last_report
        return HTTPStatus.OK, {
            "image_png_base64": base64.b64encode(buffer.getvalue()).decode("ascii"),
            "report": _report_json(report),
        }


def _report_json(report: Any) -> dict[str, Any]:
    return asdict(report) if report is not None else {}


def make_handler(service: ImageService, *, max_body: int) -> type[BaseHTTPRequestHandler]:
    from gie_guard.errors import GuardError
    from gie_guard.serving import exposition

    class Handler(BaseHTTPRequestHandler):
        server_version = "gie-guard-example/1"
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            if self.path == "/metrics":
                body, content_type = exposition(accept=self.headers.get("Accept"))
                self._send(HTTPStatus.OK, body, content_type)
            elif self.path == "/healthz":
                snapshot = service.guard.policy
                self._json(HTTPStatus.OK, {"status": "ok", "policy": snapshot.name, "content_hash": snapshot.content_hash})
            elif self.path == "/generate":
                self._json(HTTPStatus.METHOD_NOT_ALLOWED, {"error": "use POST /generate"}, allow="POST")
            else:
                self._json(HTTPStatus.NOT_FOUND, {"error": f"no such path {self.path[:100]!r}"})

        def do_POST(self) -> None:  # noqa: N802
            started = time.perf_counter()
            if self.path != "/generate":
                self._json(HTTPStatus.NOT_FOUND if self.path not in ("/metrics", "/healthz") else HTTPStatus.METHOD_NOT_ALLOWED,
                           {"error": f"POST is only for /generate, not {self.path[:100]!r}"})
                return
            try:
                request = service.parse(self._body())
                status, payload = service.generate(request)
            except BadRequest as exc:
                status, payload = exc.status, {"error": str(exc)}
            except GuardError as exc:
                log.error("guarded generation failed: %s: %s", type(exc).__name__, exc)
                status, payload = HTTPStatus.INTERNAL_SERVER_ERROR, {"error": type(exc).__name__, "message": str(exc)}
            except Exception:
                log.exception("generation failed")
                status, payload = HTTPStatus.INTERNAL_SERVER_ERROR, {"error": "internal error"}
            self._json(status, payload)
            log.info("POST /generate %d %.3fs", status, time.perf_counter() - started)  # never the prompt

        def _body(self) -> bytes:
            if "json" not in (self.headers.get("Content-Type") or ""):
                raise BadRequest(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "send Content-Type: application/json")
            try:
                length = int(self.headers.get("Content-Length") or "")
            except ValueError:
                raise BadRequest(HTTPStatus.LENGTH_REQUIRED, "Content-Length is required") from None
            if length > max_body:
                self.close_connection = True  # the unread body must not be parsed as a request
                raise BadRequest(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body is over {max_body} bytes")
            return self.rfile.read(length)

        def _json(self, status: HTTPStatus, payload: dict[str, Any], **headers: str) -> None:
            self._send(status, json.dumps(payload).encode(), "application/json", **headers)

        def _send(self, status: HTTPStatus, body: bytes, content_type: str, **headers: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for name, value in headers.items():
                self.send_header(name.title(), value)
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            log.debug("%s " + format, self.address_string(), *args)  # paths only, never bodies

    return Handler


def build_server(service: ImageService, host: str = "127.0.0.1", port: int = 0, *, max_body: int = 16 * 1024) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer((host, port), make_handler(service, max_body=max_body))
    server.daemon_threads = True
    return server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed on start)")
    parser.add_argument("--pipeline", choices=("tiny", "shapes"), default="tiny")
    parser.add_argument("--weights", help="folder of shapes-world weights (default: the packaged ones)")
    parser.add_argument("--policy", default="shapes-demo", help="shipped policy name or YAML file")
    parser.add_argument("--watch", action="store_true", help="reload the policy file when it changes")
    parser.add_argument("--max-steps", type=int, default=50)
    parser.add_argument("--max-body", type=int, default=16 * 1024, help="largest request body in bytes")
    parser.add_argument("--max-inflight", type=int, default=4, help="concurrent generations before 503")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from gie_guard import Guard

    guard = Guard(policy=args.policy, watch=args.watch)  # metrics on the default registry
    service = ImageService(load_pipeline(args.pipeline, args.weights), guard, max_steps=args.max_steps, max_inflight=args.max_inflight)
    server = build_server(service, args.host, args.port, max_body=args.max_body)
    host, port = server.server_address[:2]

    def stop(signum: int, _frame: Any) -> None:
        log.info("signal %d: stopping", signum)
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"listening on http://{host}:{port}", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
        guard.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
