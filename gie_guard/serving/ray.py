"""The image service as a Ray Serve deployment: the same FastAPI app on every replica.

    from ray import serve
    from gie_guard.serving import ServiceSpec
    from gie_guard.serving.ray import build_app

    spec = ServiceSpec(model="shapes", policy="/etc/gie-guard/policy.yaml")
    serve.run(build_app(spec, replicas=4, num_gpus=1), name="gie-guard", route_prefix="/")

or from a Serve config file (``serve run`` / ``serve deploy``)::

    applications:
      - name: gie-guard
        route_prefix: /
        import_path: gie_guard.serving.ray:app_builder
        args: {model: shapes, policy: /etc/gie-guard/policy.yaml, replicas: 4, num_gpus: 1}

``gie-guard serve --ray --replicas N`` does the first on a local (or ``--ray-address``) cluster.

Each replica loads its own pipeline and Guard in its constructor, so Serve routes to it only
once it is ready, and batches the requests routed to it (one guarded call per batch, one
policy snapshot per call: :class:`~gie_guard.serving.ImageService`).

HTTP reaches the replicas through a small ingress deployment (:class:`GuardedIngress`, no
CPU of its own) that calls them through a deployment handle. When the replica holding a
request dies (its process killed, its node lost), the ingress sends the request once more to
a live replica; a request without a seed got one from the ingress before its first try, so
the second try makes the same images. When that fails too, or no replica is left, the client
gets the service's JSON 503 (``error.code`` ``replica_lost``, ``Retry-After: 5``), never
Serve's plain-text 500. Both are counted: ``gie_guard_serve_retries_total`` and
``gie_guard_serve_requests_total{outcome="replica_lost"}`` (the request's answer from the
live replica is counted there as usual).

Ray on loopback: :func:`start_local_ray` starts a local cluster whose node address is
127.0.0.1 (tests, benchmarks, ``gie-guard serve --ray`` on a loopback ``--host``).

Policy reload: every replica's Guard watches the policy file itself (the file is the one
source of truth; a replica that starts or restarts later reads the current file; each
replica validates a new policy against its own pipeline before it swaps, and keeps its last
good policy when the new one is broken). So the file must be at the same path on every node
(a ConfigMap volume, a shared folder with ``watch: poll``, or baked into the image).

Metrics: replicas write to a Prometheus multi-process directory (``metrics_dir``, default a
fresh folder per deployment under the temp dir), so ``GET /metrics`` on any replica sums
every replica on its node, under the same metric names as a single process. On a cluster of
several nodes, scrape each node (docs/deployment.md).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import tempfile
import uuid
from collections.abc import Callable, MutableMapping
from typing import Any, Literal

from prometheus_client import CollectorRegistry
from pydantic import BaseModel, ConfigDict, Field, field_validator
from ray import serve

from .app import _configure_process, create_app
from .exposition import MULTIPROC_ENV, multiprocess_dir
from .schemas import MAX_SEED, ServeSettings
from .service import ImageService, ServiceSpec
from .telemetry import ServeTelemetry

__all__ = ["GuardedImages", "GuardedIngress", "RayAppArgs", "app_builder", "build_app", "new_metrics_dir",
           "start_local_ray"]

log = logging.getLogger("gie_guard.serving")

DEFAULT_NAME = "gie-guard"
IMAGES_PATH = "/v1/images"
RETRY_AFTER_S = 5
# environment of a local cluster started by start_local_ray (unless already set): a proxy or a
# replica that answers its health check late on a busy machine is not killed for it
RAY_ENV_DEFAULTS = {
    "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "60",
    "RAY_SERVE_PROXY_HEALTH_CHECK_PERIOD_S": "20",
    "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60",
}

Headers = list[tuple[bytes, bytes]]


def start_local_ray(num_cpus: int = 2, *, loopback: bool = True, **kwargs: Any) -> str:
    """``ray.init`` a local cluster without the dashboard; with ``loopback`` (default) its
    node address is 127.0.0.1, so that Ray's own traffic stays on loopback. Returns the node
    address.

    Ray turns ``_node_ip_address="127.0.0.1"`` into the machine's network address unless its
    multi-node support is off (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, despite its name the
    switch on every platform); a loopback cluster is a single-node cluster, so both are set
    here, for this process and the cluster's workers. Raises RuntimeError when the node still
    has another address."""
    import ray

    for name, value in RAY_ENV_DEFAULTS.items():
        os.environ.setdefault(name, value)
    if loopback:
        from ray._private import ray_constants  # the switch is read from here at call time

        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # for the cluster's own processes
        ray_constants.ENABLE_RAY_CLUSTER = False
        kwargs["_node_ip_address"] = "127.0.0.1"
    kwargs.setdefault("include_dashboard", False)
    ray.init(num_cpus=num_cpus, **kwargs)
    address: str = ray.util.get_node_ip_address()  # type: ignore[no-untyped-call]  # unannotated in ray
    if loopback and not address.startswith("127."):
        ray.shutdown()
        raise RuntimeError(f"the local Ray node got address {address}, not loopback (ray {ray.__version__})")
    return address


@serve.deployment(
    name=DEFAULT_NAME,
    ray_actor_options={"num_cpus": 1},
    health_check_period_s=10,
    health_check_timeout_s=60,
    graceful_shutdown_timeout_s=120,
)
class GuardedImages:
    """One replica: an :class:`ImageService` loaded in the constructor and the FastAPI app of
    :func:`gie_guard.serving.create_app`, which :class:`GuardedIngress` calls with whole
    HTTP requests (:meth:`http`). ``spec`` is a :class:`ServiceSpec` (or its dict);
    ``service_factory(spec)`` replaces ``spec.build()`` (tests, benchmarks)."""

    def __init__(self, spec: dict[str, Any] | ServiceSpec,
                 service_factory: Callable[[ServiceSpec], ImageService] | None = None) -> None:
        spec = spec if isinstance(spec, ServiceSpec) else ServiceSpec.model_validate(spec)
        _configure_process(spec)
        folder = multiprocess_dir()
        if folder:
            os.makedirs(folder, exist_ok=True)  # before the first metric is created
        self._service = service_factory(spec) if service_factory is not None else spec.build()
        self._service.load()  # raises: Serve retries the replica, and never routes to an unguarded one

        self._app = create_app(self._service, load=False, access_log_enabled=False)  # Serve logs access itself

    async def http(self, scope: dict[str, Any], body: bytes) -> tuple[int, Headers, bytes]:
        """One whole HTTP request (the ASGI scope's plain fields and the body) through the app:
        its status, headers and body."""
        return await call_asgi(self._app, scope, body)

    def pid(self) -> int:
        return os.getpid()

    def check_health(self) -> None:
        self._service.check_health()


async def call_asgi(app: Any, scope: dict[str, Any], body: bytes) -> tuple[int, Headers, bytes]:
    """Run ``app`` on one request whose body is all there: (status, headers, body)."""
    done = asyncio.Event()
    sent = False
    status = 500
    headers: Headers = []
    chunks: list[bytes] = []

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: MutableMapping[str, Any]) -> None:
        nonlocal status, headers
        if message["type"] == "http.response.start":
            status = int(message["status"])
            headers = [(bytes(k), bytes(v)) for k, v in message.get("headers", [])]
        elif message["type"] == "http.response.body":
            chunks.append(bytes(message.get("body", b"")))
            if not message.get("more_body", False):
                done.set()

    full = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
            "scheme": "http", "server": ("127.0.0.1", 0), "client": ("127.0.0.1", 0), "state": {}, **scope}
    full["headers"] = [(bytes(k), bytes(v)) for k, v in scope.get("headers", [])]
    try:
        await app(full, receive, send)
    finally:
        done.set()
    return status, headers, b"".join(chunks)


def _json_error(status: int, code: str, message: str, retry_after: int | None = None) -> tuple[int, Headers, bytes]:
    body = json.dumps({"error": {"code": code, "message": message, "fields": []}}, separators=(",", ":")).encode()
    headers: Headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if retry_after is not None:
        headers.append((b"retry-after", str(retry_after).encode()))
    return status, headers, body


def _with_seed(body: bytes, limit: int) -> bytes:
    """``body`` with a random ``seed`` when it is a JSON object without one (so that a retry
    makes the same images); anything else, or a body that the seed would take past ``limit``
    bytes, as it is (the replica answers it)."""
    try:
        request = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return body
    if not isinstance(request, dict) or request.get("seed") is not None:
        return body
    request["seed"] = secrets.randbelow(MAX_SEED + 1)
    try:
        seeded = json.dumps(request, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate, which the replica refuses with its own message
        return body
    return seeded if len(seeded) <= limit else body


def _replica_lost(exc: BaseException) -> bool:
    """Whether ``exc`` says the replica holding the request died or cannot be reached (so the
    request may run again elsewhere), rather than an error of the request itself."""
    import ray.exceptions
    import ray.serve.exceptions

    lost: tuple[type[BaseException], ...] = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)
    for name in ("ReplicaUnavailableError", "DeploymentUnavailableError"):
        kind = getattr(ray.serve.exceptions, name, None)
        if isinstance(kind, type) and issubclass(kind, BaseException):
            lost += (kind,)
    return isinstance(exc, lost)


@serve.deployment(name=f"{DEFAULT_NAME}-ingress", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
class GuardedIngress:
    """The HTTP ingress in front of :class:`GuardedImages`: reads each request (bounded by the
    settings' ``max_body_bytes`` and ``body_timeout_s``), gives ``POST /v1/images`` a seed
    when it has none, and sends it to a replica; retries once when that replica dies, else
    answers the JSON 503 (module docstring). Counts what it answers itself in the service's
    metrics (the same multi-process folder)."""

    def __init__(self, images: Any, settings: dict[str, Any] | ServeSettings) -> None:
        self._images = images
        self._settings = settings if isinstance(settings, ServeSettings) else ServeSettings.model_validate(settings)
        folder = multiprocess_dir()
        if folder:
            os.makedirs(folder, exist_ok=True)
        self._telemetry = ServeTelemetry(CollectorRegistry())
        self._telemetry.ready.set(0)

    async def __call__(self, request: Any) -> Any:
        from starlette.responses import Response

        status, headers, body = await self.answer(request.scope, request.stream())
        response = Response(content=body, status_code=status)
        response.raw_headers = headers
        return response

    async def answer(self, scope: MutableMapping[str, Any], stream: Any) -> tuple[int, Headers, bytes]:
        plain = {k: scope[k] for k in ("method", "path", "raw_path", "root_path", "query_string", "headers")
                 if k in scope}
        path = str(scope.get("path", ""))
        root = str(scope.get("root_path", ""))
        route = path[len(root):] if root and path.startswith(root) else path
        images = route == IMAGES_PATH
        body = await self._read(stream, images)
        if isinstance(body, tuple):
            return body
        if images and plain.get("method") == "POST":
            body = _with_seed(body, self._settings.max_body_bytes)
            plain["headers"] = [(k, v) for k, v in plain.get("headers", []) if bytes(k).lower() != b"content-length"]
            plain["headers"].append((b"content-length", str(len(body)).encode()))
        for attempt in (1, 2):
            try:
                result: tuple[int, Headers, bytes] = await self._images.http.remote(plain, body)
                return result
            except Exception as exc:
                if not _replica_lost(exc):
                    if type(exc).__name__ == "BackPressureError":
                        self._count(images, "overloaded")
                        return _json_error(503, "overloaded", "too many requests in progress; retry later", 1)
                    raise
                if attempt == 1:
                    log.warning("a replica died holding a request (%s); retrying it once", type(exc).__name__)
                    self._telemetry.retries.inc()
                    continue
                log.error("a replica died holding a request and its retry failed too (%s)", type(exc).__name__)
        self._count(images, "replica_lost")
        return _json_error(503, "replica_lost", "the replica serving this request stopped; retry later", RETRY_AFTER_S)

    def _count(self, images: bool, outcome: str) -> None:
        if images:
            self._telemetry.count(outcome)

    async def _read(self, stream: Any, images: bool) -> bytes | tuple[int, Headers, bytes]:
        settings = self._settings
        body = bytearray()

        async def read() -> None:
            async for chunk in stream:
                body.extend(chunk)
                if len(body) > settings.max_body_bytes:
                    return

        try:
            await asyncio.wait_for(read(), settings.body_timeout_s)
        except asyncio.TimeoutError:
            self._count(images, "timeout")
            return _json_error(408, "body_timeout", f"the request body did not arrive within {settings.body_timeout_s:g}s")
        if len(body) > settings.max_body_bytes:
            self._count(images, "invalid")
            return _json_error(413, "body_too_large", f"the body is over {settings.max_body_bytes} bytes")
        return bytes(body)


def new_metrics_dir() -> str:
    """A fresh multi-process metrics folder name for one deployment (made by each replica on
    its node): counters start from zero with every deployment, as with a process restart."""
    return os.path.join(tempfile.gettempdir(), f"gie-guard-metrics-{uuid.uuid4().hex[:12]}")


def build_app(
    spec: ServiceSpec | dict[str, Any],
    *,
    replicas: int = 1,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    autoscaling_config: dict[str, Any] | None = None,
    max_ongoing_requests: int | None = None,
    max_queued_requests: int | None = None,
    metrics_dir: str | None = "auto",
    name: str = DEFAULT_NAME,
    service_factory: Callable[[ServiceSpec], ImageService] | None = None,
) -> Any:
    """A Serve application (``serve.run(build_app(...))``).

    ``replicas`` (ignored with ``autoscaling_config``, e.g. ``{"min_replicas": 1,
    "max_replicas": 8, "target_ongoing_requests": 8}``); ``num_gpus=1`` gives each replica
    a GPU (its pipeline goes to ``cuda`` with ``device="auto"``); ``max_ongoing_requests``
    per replica (default: the settings' ``max_queue``, so a replica can batch what it is
    sent); ``max_queued_requests``: requests Serve queues before it answers 503 (default:
    Serve's); ``metrics_dir``: ``"auto"`` (a fresh folder), a path, or None (each replica
    keeps its own registry, and ``/metrics`` shows only the replica that answers)."""
    spec = spec if isinstance(spec, ServiceSpec) else ServiceSpec.model_validate(spec)
    actor: dict[str, Any] = {"num_cpus": num_cpus}
    if num_gpus:
        actor["num_gpus"] = num_gpus
    if metrics_dir == "auto":
        metrics_dir = new_metrics_dir()
    if metrics_dir:
        actor["runtime_env"] = {"env_vars": {MULTIPROC_ENV: metrics_dir}}
    options: dict[str, Any] = {
        "name": name,
        "ray_actor_options": actor,
        "max_ongoing_requests": max_ongoing_requests or spec.settings.max_queue,
    }
    if max_queued_requests is not None:
        options["max_queued_requests"] = max_queued_requests
    if autoscaling_config:
        options["autoscaling_config"] = autoscaling_config
    else:
        options["num_replicas"] = replicas
    # serve.deployment turns the class into a Deployment, which its decorator's typing does not say
    deployment = GuardedImages.options(**options)  # type: ignore[attr-defined]
    images = deployment.bind(spec.model_dump(mode="json"), service_factory)
    ingress_actor: dict[str, Any] = {"num_cpus": 0}
    if metrics_dir:
        ingress_actor["runtime_env"] = {"env_vars": {MULTIPROC_ENV: metrics_dir}}
    ingress = GuardedIngress.options(name=f"{name}-ingress", ray_actor_options=ingress_actor)  # type: ignore[attr-defined]
    return ingress.bind(images, spec.settings.model_dump(mode="json"))


class RayAppArgs(BaseModel):
    """The ``args`` of :func:`app_builder` (a Serve config file's, or ``serve run``'s ``key=value``)."""

    model_config = ConfigDict(extra="forbid")

    model: str = "shapes"
    weights: str | None = None
    policy: str = "nsfw"
    watch: bool | str = True
    policy_roots: list[str] = Field(default_factory=list)
    verifiers: list[str] = Field(default_factory=list)
    device: str = "auto"
    settings: ServeSettings = Field(default_factory=ServeSettings)
    replicas: int = Field(1, ge=1)
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    autoscaling_config: dict[str, Any] | None = None
    max_ongoing_requests: int | None = Field(None, ge=1)
    max_queued_requests: int | None = None
    metrics_dir: str | None = "auto"

    @field_validator("policy_roots", "verifiers", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        return [part for part in value.split(",") if part] if isinstance(value, str) else value


def app_builder(args: dict[str, Any]) -> Any:
    """Serve application builder: ``import_path: gie_guard.serving.ray:app_builder``."""
    parsed = RayAppArgs.model_validate(args)
    watch: bool | Literal["poll"]
    if isinstance(parsed.watch, bool):
        watch = parsed.watch
    elif parsed.watch == "poll":
        watch = "poll"
    else:  # serve run's key=value arguments arrive as strings
        watch = parsed.watch.strip().lower() in ("1", "true", "yes", "on")
    spec = ServiceSpec(model=parsed.model, weights=parsed.weights, policy=parsed.policy, watch=watch,
                       policy_roots=parsed.policy_roots, verifiers=parsed.verifiers, device=parsed.device,
                       settings=parsed.settings)
    return build_app(spec, replicas=parsed.replicas, num_cpus=parsed.num_cpus, num_gpus=parsed.num_gpus,
                     autoscaling_config=parsed.autoscaling_config, max_ongoing_requests=parsed.max_ongoing_requests,
                     max_queued_requests=parsed.max_queued_requests, metrics_dir=parsed.metrics_dir)
