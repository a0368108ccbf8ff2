"""The FastAPI app: ``POST /v1/images``, ``GET /metrics``, ``GET /healthz``, ``GET /readyz``.

    from gie_guard.serving import ImageService, ServeSettings, create_app
    service = ImageService(load_my_pipeline, lambda metrics: Guard(policy="nsfw", watch=True, metrics=metrics))
    app = create_app(service)          # uvicorn module:app; the pipeline loads in the background

or, from names only, ``create_app(ServiceSpec(model="shapes", policy="nsfw").build())``; the
``gie-guard serve`` command runs it under uvicorn (and, with ``--ray``, under Ray Serve).

Status codes: 200 images; 400 a body that is not JSON (also 1,500-deep nesting, a lone
surrogate, invalid UTF-8); 408 a body that did not arrive within ``body_timeout_s``; 413 a
body over ``max_body_bytes``; 415 a content type other than JSON; 422 a field of the wrong
type, unknown, or out of bounds; 451 the policy's verifier withheld the images (the report
says which concept ids); 503 not ready or more requests than ``max_queue`` (with
``Retry-After``); 500 only when the guarded call failed (nothing is returned: fail closed).
Error bodies never echo what was sent, and nothing logs a prompt at INFO or above.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .exposition import exposition, reap_dead_processes
from .schemas import ErrorBody, ErrorResponse, FieldProblem, ImageOut, ImageRequest, ImagesResponse, ReportOut, ServeSettings
from .service import Generated, ImageService, NotReadyError, OverloadedError, RequestRejected, ServiceSpec

__all__ = ["SPEC_ENV", "app_from_env", "create_app"]

log = logging.getLogger("gie_guard.serving")
access_log = logging.getLogger("gie_guard.serving.access")

SPEC_ENV = "GIE_GUARD_SERVE_SPEC"  # a ServiceSpec as JSON, for app_from_env (uvicorn workers)
IMAGES_PATH = "/v1/images"
_MAX_PROBLEMS = 20

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class _JSON(JSONResponse):
    """JSON with ASCII escapes: any text encodes, whatever a client sent."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def _error_payload(code: str, message: str, fields: Sequence[FieldProblem] = (), report: ReportOut | None = None) -> dict[str, Any]:
    body = ErrorResponse(error=ErrorBody(code=code, message=message, fields=list(fields)[:_MAX_PROBLEMS]), report=report)
    return body.model_dump(exclude_none=True)


def _error(status: int, code: str, message: str, fields: Sequence[FieldProblem] = (), *,
           report: ReportOut | None = None, headers: dict[str, str] | None = None) -> _JSON:
    return _JSON(_error_payload(code, message, fields, report), status_code=status, headers=headers)


def create_app(service: ImageService, *, load: bool = True, access_log_enabled: bool = True) -> FastAPI:
    """The HTTP app around ``service``. With ``load`` (default) the app loads the service in
    the background when it starts, if it is not loaded yet (``/readyz`` says 503 until it is
    ready); the service is closed when the app stops. ``access_log_enabled``: one INFO line
    per request (method, path without query, status, seconds)."""

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        loading = None
        if load and service.state == "new":
            loading = asyncio.get_running_loop().run_in_executor(None, _load_logged, service)
        try:
            yield
        finally:
            service.close()
            if loading is not None and not loading.done():
                loading.cancel()

    app = FastAPI(title="gie-guard image service", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.service = service

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        message = {404: "no such path", 405: "method not allowed"}.get(exc.status_code, str(exc.detail)[:200])
        return _error(exc.status_code, code, message, headers=dict(exc.headers or {}))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError) -> Response:
        return _error(422, "invalid_request", "the request is invalid", _problems(exc.errors()))

    @app.exception_handler(Exception)
    async def internal_error(_request: Request, exc: Exception) -> Response:
        log.error("unhandled error in the image service: %s", type(exc).__name__)
        log.debug("unhandled error", exc_info=exc)
        return _error(500, "internal", "internal error")

    @app.post(
        IMAGES_PATH,
        response_model=ImagesResponse,
        response_model_exclude_none=True,
        openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": ImageRequest.model_json_schema()}}}},
        responses={451: {"model": ErrorResponse}, 422: {"model": ErrorResponse}, 503: {"model": ErrorResponse}},
    )
    async def images(request: Request) -> Response:
        """Generate images, guarded by the live policy."""
        count = service.telemetry.count
        content_type = request.headers.get("content-type")
        if content_type is not None and not _is_json(content_type):
            count("invalid")
            return _error(415, "unsupported_media_type", "send Content-Type: application/json")
        body = await request.body()
        try:
            parsed = ImageRequest.model_validate_json(body)
        except ValidationError as exc:
            count("invalid")
            errors = exc.errors(include_input=False, include_url=False, include_context=False)
            if any(e["type"] == "json_invalid" for e in errors):
                return _error(400, "invalid_json", "the body is not valid JSON: " + errors[0]["msg"][:200])
            return _error(422, "invalid_request", "the request is invalid", _problems(errors, service.settings))
        try:
            generated = await service.submit(parsed)
        except RequestRejected as exc:
            count("invalid")
            return _error(422, "invalid_request", "the request is outside this service's limits", exc.problems)
        except NotReadyError as exc:
            count("not_ready")
            return _error(503, "not_ready", f"the service is {exc.state}; retry later", headers={"Retry-After": "5"})
        except OverloadedError:
            count("overloaded")
            return _error(503, "overloaded", "too many requests in progress; retry later", headers={"Retry-After": "1"})
        return await _answer(service, parsed, generated)

    @app.get("/metrics")
    def metrics(request: Request) -> Response:
        """Prometheus exposition: this process's registry, or every process's values in
        multi-process mode (PROMETHEUS_MULTIPROC_DIR)."""
        if service.multiprocess:
            reap_dead_processes()
            body, media_type = exposition(None, accept=request.headers.get("accept"))
        else:
            body, media_type = exposition(service.registry, accept=request.headers.get("accept"))
        return Response(body, media_type=media_type)

    @app.get("/healthz")
    def healthz() -> Response:
        """Liveness: 200 unless the service failed to load or its batch worker stopped."""
        try:
            service.check_health()
        except RuntimeError:
            return _JSON({"status": "failed"}, status_code=503)
        return _JSON({"status": "ok"})

    @app.get("/readyz")
    def readyz() -> Response:
        """Readiness: 200 once the pipeline is loaded and the policy compiled for it."""
        return _JSON(service.describe(), status_code=200 if service.ready else 503)

    app.add_middleware(_BodyGuard, service=service, access_log_enabled=access_log_enabled)
    return app


async def _answer(service: ImageService, request: ImageRequest, generated: Generated) -> Response:
    count = service.telemetry.count
    if generated.status == "blocked":
        count("blocked")
        return _error(451, "content_blocked", "the images were withheld by the content policy", report=generated.report)
    if generated.status == "failed" or generated.report is None:
        count("failed")
        return _error(500, "generation_failed",
                      f"the request could not be generated under the content policy ({generated.error}); nothing was returned")
    pngs = await asyncio.to_thread(_encode_pngs, generated.images)
    report = generated.report
    count(report.outcome, images=len(pngs))
    if request.response_format == "png":
        headers = {
            "X-Gie-Guard-Policy-Hash": report.policy_hash,
            "X-Gie-Guard-Outcome": report.outcome,
            "X-Gie-Guard-Seed": str(generated.seeds[0]),
            "X-Gie-Guard-Report": json.dumps(report.model_dump(exclude_none=True), ensure_ascii=True, separators=(",", ":")),
        }
        return Response(pngs[0], media_type="image/png", headers=headers)
    payload = ImagesResponse(
        images=[ImageOut(b64_png=base64.b64encode(png).decode("ascii"), seed=seed) for png, seed in zip(pngs, generated.seeds)],
        report=report,
    )
    return _JSON(payload.model_dump(exclude_none=True))


def _encode_pngs(images: Sequence[Any]) -> list[bytes]:
    out = []
    for image in images:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


_BOUND_ERRORS = frozenset({"less_than_equal", "less_than", "greater_than_equal", "greater_than", "string_too_long"})


def _problems(errors: Sequence[Any], settings: ServeSettings | None = None) -> list[FieldProblem]:
    """Field problems of a validation error. A value outside the schema's absolute bounds
    (``steps`` up to 100,000 for any service) is described by this service's own limit
    (``max_steps``, 50 by default), the one the client must keep."""
    problems = []
    for error in list(errors)[:_MAX_PROBLEMS]:
        loc = ".".join(str(part) for part in error.get("loc", ()) if part != "body") or "body"
        message = str(error.get("msg", "invalid"))
        if message.startswith("Value error, "):
            message = message[len("Value error, "):]
        if settings is not None and error.get("type") in _BOUND_ERRORS:
            message = _operator_limit(loc, settings) or message
        problems.append(FieldProblem(loc=loc[:64], problem=message[:200]))
    return problems


def _operator_limit(loc: str, settings: ServeSettings) -> str | None:
    """What ``settings.check`` says for field ``loc`` out of bounds (None for other fields)."""
    if loc == "steps":
        return f"must be within [1, {settings.max_steps}]"
    if loc == "n":
        return f"must be within [1, {settings.max_images}]"
    if loc in ("width", "height"):
        return f"must be a multiple of {settings.size_multiple} within [{settings.size_multiple}, {settings.max_side}]"
    if loc == "guidance_scale":
        return f"must be within [0, {settings.max_guidance}]"
    if loc in ("prompt", "negative_prompt"):
        return f"longer than {settings.max_prompt_chars} characters"
    return None


def _load_logged(service: ImageService) -> None:
    with contextlib.suppress(BaseException):  # the service logs it and stays `failed`
        service.load()


class _BodyGuard:
    """Pure ASGI middleware in front of the app: reads every request body itself, bounded in
    size (``max_body_bytes``: 413) and time (``body_timeout_s``: 408), so a huge, endless or
    stalled body never reaches the app or holds it. An oversized body up to
    ``drain_limit_bytes`` is read and discarded before the 413 is sent (closing a socket
    with unread data makes the kernel reset the connection, and the client would see a reset
    instead of the answer). Also writes the access log and the replica header."""

    def __init__(self, app: ASGIApp, *, service: ImageService, access_log_enabled: bool = True) -> None:
        self.app = app
        self.service = service
        self.settings = service.settings
        self.access_log_enabled = access_log_enabled

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = {"code": 0}
        extra_headers = [(b"x-gie-guard-replica", self.service.replica.encode("ascii", "replace"))] \
            if self.settings.replica_header else []

        async def send_wrapped(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                if extra_headers:
                    message = dict(message)
                    message["headers"] = list(message.get("headers", [])) + extra_headers
            await send(message)

        try:
            if _has_body(scope):
                body = await self._read(scope, receive, send_wrapped)
                if body is None:  # answered (413, 408, 400) or the client went away
                    return
                receive = _replay(body, receive)
            await self.app(scope, receive, send_wrapped)
        finally:
            if self.access_log_enabled:
                access_log.info("%s %s %d %.3fs", scope.get("method", "-"), scope.get("path", "-")[:200],
                                status["code"], time.perf_counter() - started)

    async def _read(self, scope: Scope, receive: Receive, send: Send) -> bytes | None:
        settings = self.settings
        declared = _content_length(scope)
        if declared == -1:
            await self._reject(scope, send, 400, "invalid_request", "malformed Content-Length", "invalid")
            return None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + settings.body_timeout_s
        if declared is not None and declared > settings.max_body_bytes:
            # a client that waits for "100 Continue" has sent nothing yet: refuse before it does
            drain = declared <= settings.drain_limit_bytes and not _expects_continue(scope)
            await self._too_large(scope, receive, send, deadline, drain=drain)
            return None
        body = bytearray()
        while True:
            message = await _receive_by(receive, deadline, loop)
            if message is None:
                await self._reject(scope, send, 408, "body_timeout",
                                   f"the request body did not arrive within {settings.body_timeout_s:g}s", "timeout")
                return None
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            if len(body) > settings.max_body_bytes:
                await self._too_large(scope, receive, send, deadline, drain=True, seen=len(body),
                                      more=message.get("more_body", False))
                return None
            if not message.get("more_body", False):
                return bytes(body)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send, deadline: float, *, drain: bool,
                         seen: int = 0, more: bool = True) -> None:
        loop = asyncio.get_running_loop()
        while drain and more and seen <= self.settings.drain_limit_bytes:
            message = await _receive_by(receive, deadline, loop)
            if message is None or message["type"] == "http.disconnect":
                break
            seen += len(message.get("body", b""))
            more = message.get("more_body", False)
        await self._reject(scope, send, 413, "body_too_large", f"the body is over {self.settings.max_body_bytes} bytes", "invalid")

    async def _reject(self, scope: Scope, send: Send, status: int, code: str, message: str, outcome: str) -> None:
        if _route_path(scope) == IMAGES_PATH:
            self.service.telemetry.count(outcome)
        body = json.dumps(_error_payload(code, message), ensure_ascii=True, separators=(",", ":")).encode("ascii")
        await send({"type": "http.response.start", "status": status, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]})
        await send({"type": "http.response.body", "body": body})


def _route_path(scope: Scope) -> str:
    """The path below the app's mount point (Ray Serve's route prefix is the ``root_path``)."""
    path: str = scope.get("path", "")
    root: str = scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


def _has_body(scope: Scope) -> bool:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            return bool(value.strip() != b"0")
        if name == b"transfer-encoding":
            return True
    return False


def _expects_continue(scope: Scope) -> bool:
    return any(k == b"expect" and v.strip().lower() == b"100-continue" for k, v in scope.get("headers", ()))


def _content_length(scope: Scope) -> int | None:
    """The declared Content-Length; None when absent, -1 when malformed or conflicting (the
    HTTP server normally refuses those itself)."""
    values = [v for k, v in scope.get("headers", ()) if k == b"content-length"]
    if not values:
        return None
    if len(set(values)) != 1 or not values[0].strip().isdigit():
        return -1
    return int(values[0])


async def _receive_by(receive: Receive, deadline: float, loop: asyncio.AbstractEventLoop) -> Message | None:
    """The next message, or None when the deadline passes first."""
    left = deadline - loop.time()
    if left <= 0:
        return None
    try:
        return await asyncio.wait_for(receive(), left)
    except asyncio.TimeoutError:
        return None


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # http.disconnect

    return replay


def app_from_env() -> FastAPI:
    """The app described by the ``GIE_GUARD_SERVE_SPEC`` environment variable (a
    :class:`ServiceSpec` as JSON): ``uvicorn --factory gie_guard.serving.app:app_from_env``.
    ``gie-guard serve`` sets it for its workers."""
    raw = os.environ.get(SPEC_ENV)
    if not raw:
        raise RuntimeError(f"set {SPEC_ENV} to a ServiceSpec as JSON (gie-guard serve does)")
    spec = ServiceSpec.model_validate_json(raw)
    _configure_process(spec)
    return create_app(spec.build())


def _configure_process(spec: ServiceSpec) -> None:
    from ..logs import install_log_filters

    install_log_filters()
    if spec.settings.torch_threads:
        import torch

        torch.set_num_threads(spec.settings.torch_threads)
