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

import os
import tempfile
import uuid
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from ray import serve

from .app import _configure_process, create_app
from .exposition import MULTIPROC_ENV, multiprocess_dir
from .schemas import ServeSettings
from .service import ImageService, ServiceSpec

__all__ = ["GuardedImages", "RayAppArgs", "app_builder", "build_app", "new_metrics_dir"]

DEFAULT_NAME = "gie-guard"


@serve.deployment(
    name=DEFAULT_NAME,
    ray_actor_options={"num_cpus": 1},
    health_check_period_s=10,
    health_check_timeout_s=60,
    graceful_shutdown_timeout_s=120,
)
@serve.ingress()
class GuardedImages:
    """One replica: an :class:`ImageService` loaded in the constructor and the FastAPI app of
    :func:`gie_guard.serving.create_app` as its ingress. ``spec`` is a :class:`ServiceSpec`
    (or its dict); ``service_factory(spec)`` replaces ``spec.build()`` (tests, benchmarks)."""

    def __init__(self, spec: dict[str, Any] | ServiceSpec,
                 service_factory: Callable[[ServiceSpec], ImageService] | None = None) -> None:
        spec = spec if isinstance(spec, ServiceSpec) else ServiceSpec.model_validate(spec)
        _configure_process(spec)
        folder = multiprocess_dir()
        if folder:
            os.makedirs(folder, exist_ok=True)  # before the first metric is created
        self._service = service_factory(spec) if service_factory is not None else spec.build()
        self._service.load()  # raises: Serve retries the replica, and never routes to an unguarded one

    def __serve_build_asgi_app__(self) -> Any:
        return create_app(self._service, load=False, access_log_enabled=False)  # Serve logs access itself

    def check_health(self) -> None:
        self._service.check_health()


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
    return deployment.bind(spec.model_dump(mode="json"), service_factory)


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
