"""The image service without HTTP: load a pipeline and a Guard, admit requests, batch them
into guarded pipeline calls, and shape each request's answer.

One :class:`ImageService` owns one pipeline and one :class:`~gie_guard.Guard`. Calls on one
pipeline run one at a time (the guard serialises them per denoiser anyway), so the service
runs them on one thread of its own and gets its throughput from batching: requests that
agree on steps, size and guidance share one guarded call (a list of prompts, one generator
per image), up to ``max_batch_images`` images. The guard reads its policy snapshot once per
call, so every image of a batch is made under one complete policy, and the report each
request gets is that call's.

Fails closed: an image reaches a client only from a guarded call that returned normally with
a report; any error of the call is an error for every request in it (a batch that fails is
retried one request at a time, so one request cannot fail the others). When a verifier
blocks a batch, the requests whose images it flagged are answered ``blocked`` and the others
are generated again without them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import inspect
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..engine import family_for
from ..errors import ContentBlockedError, GuardedCallError, GuardError
from ..metrics import GuardMetrics
from .exposition import multiprocess_dir
from .schemas import MAX_SEED, ConceptOut, FieldProblem, ImageRequest, ReportOut, ServeSettings, concept_label
from .telemetry import ServeTelemetry

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from ..guard import Guard
    from ..report import GuardedOutput, GuardReport
    from ..verifiers import Verification

__all__ = [
    "Generated",
    "ImageService",
    "NotReadyError",
    "OverloadedError",
    "RequestRejected",
    "ServiceSpec",
]

log = logging.getLogger("gie_guard.serving")

_ACTION_OUTCOME = {"record": "recorded", "blur": "blurred", "block": "blocked"}
_OUTCOME_RANK = {"ok": 0, "recorded": 1, "blurred": 2, "blocked": 3}


class NotReadyError(Exception):
    """The service cannot take requests: its pipeline is loading, failed to load, or it is stopping."""

    def __init__(self, state: str) -> None:
        super().__init__(f"the service is {state}")
        self.state = state


class OverloadedError(Exception):
    """More requests than ``max_queue`` are admitted; retry later."""


class RequestRejected(Exception):
    """A request this service cannot serve (the operator's limits, or what the model takes)."""

    def __init__(self, problems: Sequence[FieldProblem]) -> None:
        super().__init__("; ".join(f"{p.loc}: {p.problem}" for p in problems))
        self.problems = list(problems)


@dataclass
class Generated:
    """One request's answer: its images (PIL) and seeds, or why it has none.

    ``status``: ``ok`` (images), ``blocked`` (withheld by a verifier; ``report`` says which
    concepts) or ``failed`` (the guarded call failed; ``error`` is its type name)."""

    status: Literal["ok", "blocked", "failed"]
    seeds: list[int]
    images: list[Any] = field(default_factory=list)
    report: ReportOut | None = None
    error: str | None = None


# requests batch together when they agree on these: steps, (width, height), guidance scale
_BatchKey = tuple[int, tuple[int | None, int | None], float | None]


class _Item:
    __slots__ = ("request", "seeds", "key", "future", "admitted_at", "started_at")

    def __init__(
        self, request: ImageRequest, seeds: list[int], key: _BatchKey, future: asyncio.Future[Generated]
    ) -> None:
        self.request = request
        self.seeds = seeds
        self.key = key
        self.future = future
        self.admitted_at = time.perf_counter()
        self.started_at: float | None = None

    @property
    def n(self) -> int:
        return self.request.n


PipelineFactory = Callable[[], Any]
GuardFactory = Callable[[GuardMetrics], "Guard"]


class ImageService:
    """A guarded image generator for one process (a uvicorn worker or a Ray Serve replica).

    ``pipeline_factory()`` returns the pipeline; ``guard_factory(metrics)`` returns the Guard,
    built with ``metrics=metrics`` (the service reads each call's verifier outcome from
    them). Both run in :meth:`load` (the app runs it in the background; a Ray replica in its
    constructor). ``registry``: where the metrics go (default: a new one; in multi-process
    mode the values go to ``PROMETHEUS_MULTIPROC_DIR`` either way).
    """

    def __init__(
        self,
        pipeline_factory: PipelineFactory,
        guard_factory: GuardFactory,
        settings: ServeSettings | None = None,
        *,
        registry: CollectorRegistry | None = None,
        description: str = "",
    ) -> None:
        from prometheus_client import CollectorRegistry

        self.settings = settings or ServeSettings()
        self.description = description
        self.registry = registry if registry is not None else CollectorRegistry()
        self.multiprocess = multiprocess_dir() is not None
        self.guard_metrics = GuardMetrics(self.registry)
        self.telemetry = ServeTelemetry(self.registry)
        self.replica = f"{socket.gethostname()}-{os.getpid()}"
        self._pipeline_factory = pipeline_factory
        self._guard_factory = guard_factory
        self.pipe: Any = None
        self.guard: Guard | None = None
        self._state = "new"
        self._error: str | None = None
        self._load_lock = threading.Lock()
        self._call_params: frozenset[str] = frozenset()
        self._default_size: tuple[int, int] | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="gie-guard-pipeline")
        self._pending: list[_Item] = []
        self._admitted = 0
        self._free_since = 0.0  # when the pipeline finished its last call
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- lifecycle -----------------------------------------------------------------------------
    @property
    def state(self) -> str:
        """``new``, ``loading``, ``ready``, ``failed`` or ``stopping``."""
        return self._state

    @property
    def error(self) -> str | None:
        """Why loading failed (the error's type and message), or None."""
        return self._error

    @property
    def ready(self) -> bool:
        return self._state == "ready"

    def load(self) -> None:
        """Load the pipeline, build the guard and compile the policy for the pipeline. Raises
        what failed (and the service stays ``failed``: it never serves unguarded)."""
        with self._load_lock:
            if self._state != "new":
                return
            self._state = "loading"
        started = time.perf_counter()
        try:
            if self.settings.torch_threads:
                import torch

                torch.set_num_threads(self.settings.torch_threads)
            pipe = self._pipeline_factory()
            if hasattr(pipe, "set_progress_bar_config"):
                pipe.set_progress_bar_config(disable=True)
            guard = self._guard_factory(self.guard_metrics)
            try:
                if getattr(guard, "metrics", None) is not self.guard_metrics:
                    raise TypeError("guard_factory must build the Guard with metrics=<the metrics it is given>")
                guard.plan_for(pipe)  # compile the live policy for this pipeline now, not on the first request
            except BaseException:
                guard.close()
                raise
            self.pipe, self.guard = pipe, guard
            self._call_params = frozenset(inspect.signature(pipe.__call__).parameters)
            self._default_size = _default_size(pipe)
        except BaseException as exc:
            self._error = f"{type(exc).__name__}: {exc}"
            self._state = "failed"
            log.error("the image service failed to load (%s); it will not serve", type(exc).__name__)
            raise
        if self._state == "stopping":  # closed while loading
            self.guard.close()
            return
        self._state = "ready"
        self.telemetry.ready.set(1)
        snapshot = self.guard.snapshot
        log.info("image service ready in %.1fs: %s; policy %r (%s), %d concepts",
                 time.perf_counter() - started, self.description or type(self.pipe).__name__, snapshot.name,
                 snapshot.content_hash[:12], len(snapshot.concepts))

    def check_health(self) -> None:
        """Raise when this service can no longer serve (load failed, worker crashed)."""
        if self._state == "failed":
            raise RuntimeError(f"the image service failed to load: {self._error}")
        worker = self._worker
        if worker is not None and worker.done() and not worker.cancelled() and worker.exception() is not None:
            raise RuntimeError(f"the batch worker stopped: {worker.exception()!r}")

    def close(self) -> None:
        """Stop: refuse new requests, fail queued ones as ``not_ready``, close the guard."""
        self._state = "stopping"
        self.telemetry.ready.set(0)
        pending, self._pending = self._pending, []
        for item in pending:
            with contextlib.suppress(RuntimeError):  # its loop is closed
                item.future.get_loop().call_soon_threadsafe(_set_exception, item.future, NotReadyError("stopping"))
        if self._worker is not None and self._loop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._worker.cancel)
        self._executor.shutdown(wait=False)
        if self.guard is not None:
            self.guard.close()

    def describe(self) -> dict[str, Any]:
        """Readiness details for ``/readyz`` (policy name and hash, never concept texts)."""
        info: dict[str, Any] = {"status": self._state}
        if self.guard is not None:
            snapshot = self.guard.snapshot
            info.update(policy=snapshot.name, policy_hash=snapshot.content_hash)
            reloads = self.guard.store.state
            # a change that failed for a reason other than its content waits for a retry: the
            # last good policy serves meanwhile, so readiness stays, and the operator sees it here
            info["policy_reload"] = {"last_result": reloads.last_result, "pending": reloads.pending,
                                     "pending_since": reloads.pending_since, "retries": reloads.retries}
        if self._state == "failed":
            info["error"] = self._error
        return info

    # -- requests ------------------------------------------------------------------------------
    def check(self, request: ImageRequest) -> None:
        """Raise :class:`RequestRejected` when ``request`` breaks the operator's limits or asks
        what this model does not take."""
        problems = self.settings.check(request)
        if self.pipe is not None:
            asked = {"negative_prompt": request.negative_prompt is not None, "guidance_scale": request.guidance_scale is not None,
                     "width": request.width is not None, "height": request.height is not None}
            for name, used in asked.items():
                if used and name not in self._call_params:
                    problems.append(FieldProblem(loc=name, problem="this model does not take it"))
        if problems:
            raise RequestRejected(problems)

    async def submit(self, request: ImageRequest) -> Generated:
        """Generate ``request`` guarded (batched with others). Raises :class:`NotReadyError`,
        :class:`OverloadedError` or :class:`RequestRejected`; a blocked or failed generation
        is a :class:`Generated` with that status."""
        if self._state != "ready":
            raise NotReadyError(self._state)
        self.check(request)
        if self._admitted >= self.settings.max_queue:
            raise OverloadedError(f"{self._admitted} requests in progress (max_queue {self.settings.max_queue})")
        loop = asyncio.get_running_loop()
        self._start_worker(loop)
        seed = request.seed if request.seed is not None else secrets.randbelow(MAX_SEED + 1)
        seeds = [(seed + i) % (MAX_SEED + 1) for i in range(request.n)]
        steps = request.steps or self.settings.default_steps
        size = (request.width, request.height)
        if self._default_size is not None:
            size = (request.width or self._default_size[0], request.height or self._default_size[1])
        item = _Item(request, seeds, (steps, size, request.guidance_scale), loop.create_future())
        self._admitted += 1
        self.telemetry.in_flight.inc()
        try:
            self._pending.append(item)
            assert self._wakeup is not None
            self._wakeup.set()
            result = await item.future
            self.telemetry.request_seconds.observe(time.perf_counter() - item.admitted_at)
            return result
        finally:
            self._admitted -= 1
            self.telemetry.in_flight.dec()

    # -- batching ------------------------------------------------------------------------------
    def _start_worker(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._worker is not None and not self._worker.done():
            if self._loop is not loop:
                raise RuntimeError("an ImageService serves from one event loop")
            return
        self._loop = loop
        self._wakeup = asyncio.Event()
        self._worker = loop.create_task(self._work(), name="gie-guard-batcher")

    async def _work(self) -> None:
        try:
            await self._batches()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # a bug here must not leave clients waiting forever
            log.error("the batch worker failed (%s); queued requests are refused", type(exc).__name__)
            for item in self._pending:
                _set_exception(item.future, NotReadyError("failed"))
            raise

    async def _batches(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._wakeup is not None
        while self._state != "stopping":
            self._pending = [i for i in self._pending if not i.future.done()]  # cancelled by their clients
            if not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            await self._fill(loop)
            batch = self._take()
            if not batch:
                continue
            started = time.perf_counter()
            for item in batch:
                item.started_at = started
                self.telemetry.queue_seconds.observe(started - item.admitted_at)
            try:
                results = await loop.run_in_executor(self._executor, self._run_batch, batch)
            except BaseException as exc:  # stopped: cancelled, or the executor was shut down
                for item in batch:
                    _set_exception(item.future, NotReadyError("stopping"))
                if isinstance(exc, (asyncio.CancelledError, KeyboardInterrupt, SystemExit)):
                    raise
                log.error("the batch worker could not run a batch (%s)", type(exc).__name__)
                continue
            for item, result in zip(batch, results):
                if not item.future.done():
                    item.future.set_result(result)
            self._free_since = time.perf_counter()

    async def _fill(self, loop: asyncio.AbstractEventLoop) -> None:
        """While the batch is not full, wait for more requests until ``batch_wait_s`` after
        the oldest one arrived or the pipeline became free, whichever is later: clients whose
        answers just went out can join the next call, and the pipeline idles at most
        ``batch_wait_s`` per call."""
        assert self._wakeup is not None
        wait = self.settings.batch_wait_s
        if wait <= 0:
            return
        head = self._pending[0]
        deadline = max(head.admitted_at, self._free_since) + wait
        while self._compatible_images(head) < self.settings.max_batch_images:
            left = deadline - time.perf_counter()
            if left <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), left)
            except asyncio.TimeoutError:
                return

    def _compatible_images(self, head: _Item) -> int:
        return sum(i.n for i in self._pending if i.key == head.key and not i.future.done())

    def _take(self) -> list[_Item]:
        """The oldest request and the compatible ones after it, up to ``max_batch_images``
        images (a request is never split; one larger than that runs alone)."""
        live = [i for i in self._pending if not i.future.done()]
        if not live:
            self._pending = []
            return []
        head, batch, images = live[0], [live[0]], live[0].n
        for item in live[1:]:
            if item.key == head.key and images + item.n <= self.settings.max_batch_images:
                batch.append(item)
                images += item.n
        taken = set(map(id, batch))
        self._pending = [i for i in live if id(i) not in taken]
        return batch

    # -- generation (the pipeline thread) -------------------------------------------------------
    def _run_batch(self, batch: list[_Item]) -> list[Generated]:
        """Every request of ``batch``, answered: one guarded call; on a block, the flagged
        requests are answered ``blocked`` and the rest generated again; on any other error, a
        batch of several is retried one request at a time."""
        results: dict[int, Generated] = {}
        todo = list(batch)
        while todo:
            try:
                results.update(self._generate(todo))
                break
            except ContentBlockedError as exc:
                blocked = self._blocked(todo, exc)
                for item in todo:
                    if id(item) in blocked:
                        report = self._view(exc.report, outcome="blocked", requests=len(todo),
                                            images=sum(i.n for i in todo), blocked=blocked[id(item)])
                        results[id(item)] = Generated("blocked", item.seeds, report=report)
                todo = [i for i in todo if id(i) not in blocked]
            except Exception as exc:
                if len(todo) > 1:
                    log.warning("a guarded batch of %d requests failed (%s); retrying them one by one",
                                len(todo), type(exc).__name__)
                    for item in todo:
                        results[id(item)] = self._run_batch([item])[0]
                    break
                log.error("guarded generation failed: %s (nothing was returned)", type(exc).__name__)
                log.debug("guarded generation failed", exc_info=True)
                results[id(todo[0])] = Generated("failed", todo[0].seeds, error=type(exc).__name__)
                break
        return [results[id(item)] for item in batch]

    def _generate(self, items: list[_Item]) -> dict[int, Generated]:
        steps, (width, height), guidance = items[0].key
        prompts, negatives, seeds = [], [], []
        for item in items:
            for seed in item.seeds:
                prompts.append(item.request.prompt)
                negatives.append(item.request.negative_prompt or "")
                seeds.append(seed)
        kwargs: dict[str, Any] = {"prompt": prompts, "num_inference_steps": steps, "output_type": "pil",
                                  "generator": _generators(seeds)}
        if "num_images_per_prompt" in self._call_params:
            kwargs["num_images_per_prompt"] = 1
        if any(negatives):
            kwargs["negative_prompt"] = negatives
        if width is not None and "width" in self._call_params:
            kwargs["width"] = width
        if height is not None and "height" in self._call_params:
            kwargs["height"] = height
        if guidance is not None:
            kwargs["guidance_scale"] = guidance
        self.telemetry.batch_requests.observe(len(items))
        self.telemetry.batch_images.observe(len(prompts))
        result = self._call_pipeline(kwargs)
        images = list(result.images)
        report = result.report
        # fail closed: an answer that does not add up is withheld
        if len(images) != len(prompts):
            raise GuardedCallError(f"the pipeline returned {len(images)} images for {len(prompts)} prompts")
        if report is None or report.interrupted:
            raise GuardedCallError("the guarded call returned no complete report")
        verification = result.verification
        answers: dict[int, Generated] = {}
        start = 0
        for item in items:
            mine = range(start, start + item.n)
            start += item.n
            outcome = _item_outcome(verification, mine)
            view = self._view(report, outcome=outcome, requests=len(items), images=len(prompts))
            answers[id(item)] = Generated("ok", item.seeds, images=[images[i] for i in mine], report=view)
        return answers

    def _call_pipeline(self, kwargs: dict[str, Any]) -> GuardedOutput:
        """One guarded call (the only place the pipeline is called)."""
        assert self.guard is not None
        return self.guard.generate(self.pipe, **kwargs)

    @staticmethod
    def _blocked(items: list[_Item], exc: ContentBlockedError) -> dict[int, list[str]]:
        """id(item) -> blocking concept ids, for the requests whose images a `block` hit flagged
        (every request when the hits name no image: fail closed)."""
        flagged: dict[int, list[str]] = {}
        start = 0
        for item in items:
            mine = set(range(start, start + item.n))
            start += item.n
            ids = [h.concept_id for h in exc.verification.hits if h.action == "block" and mine & set(h.images)]
            if ids:
                flagged[id(item)] = list(dict.fromkeys(ids))
        if not flagged:
            return {id(item): list(exc.concept_ids) for item in items}
        return flagged

    def _view(self, report: GuardReport, *, outcome: str, requests: int, images: int,
              blocked: Sequence[str] = ()) -> ReportOut:
        settings = self.settings
        expose = settings.expose_concept_text
        policy = report.policy_name

        def name(concept_id: str) -> str:
            if expose or settings.concept_ids == "ids":
                return concept_id
            return concept_label(policy, concept_id, settings.concept_label_key)

        inhibited = bool(report.steps_inhibited)
        concepts = []
        for c in report.concepts:
            scale = max(c.token_scales, default=0.0)
            extra = {"text": c.text, "max_scale": scale} if expose else {}
            concepts.append(ConceptOut(id=name(c.id), inhibited=inhibited and scale > 0, **extra))
        return ReportOut(
            policy=policy, policy_hash=report.policy_hash, outcome=outcome, concepts=concepts,
            concepts_applied=sum(c.inhibited for c in concepts), steps_inhibited=len(report.steps_inhibited),
            total_steps=report.total_steps, batch_requests=requests, batch_images=images,
            blocked_concepts=[name(b) for b in blocked],
        )


def _set_exception(future: asyncio.Future[Generated], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


def _generators(seeds: list[int]) -> list[Any]:
    import torch

    return [torch.Generator().manual_seed(seed) for seed in seeds]


def _item_outcome(verification: Verification | None, images: range) -> str:
    if verification is None:
        return "ok"
    outcome = "ok"
    for hit in verification.hits:
        if set(hit.images) & set(images):
            candidate = _ACTION_OUTCOME.get(hit.action, "unknown")
            if _OUTCOME_RANK.get(candidate, 4) > _OUTCOME_RANK.get(outcome, 4):
                outcome = candidate
    return outcome


def _default_size(pipe: Any) -> tuple[int, int] | None:
    """The pipeline's default (width, height): its denoiser's sample size times the VAE's
    scale factor (SD 1.x: 64 * 8 = 512), or None when it does not say."""
    try:
        denoiser = family_for(pipe).denoiser(pipe)
    except GuardError:  # not a pipeline gie_guard guards: the service refuses it elsewhere
        return None
    sample = getattr(getattr(denoiser, "config", None), "sample_size", None)
    factor = getattr(pipe, "vae_scale_factor", None)
    if isinstance(sample, int) and isinstance(factor, int):
        return sample * factor, sample * factor
    return None


class ServiceSpec(BaseModel):
    """A service described by names and paths only (so it travels as JSON to uvicorn workers
    and Ray replicas): the model (``--model`` of ``gie-guard serve``: ``shapes``, ``tiny``,
    ``auto``, a diffusers folder or ``module:function``), the policy (a shipped name or a
    YAML path, watched for changes when it is a file), verifiers by detector name
    (``shapes``, ``nudenet``, ``module:attr``, or ``NAME=module:attr``), the device and
    the settings."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = "shapes"
    weights: str | None = None
    policy: str = "nsfw"
    watch: bool | Literal["poll"] = True
    policy_roots: list[str] = Field(default_factory=list)
    verifiers: list[str] = Field(default_factory=list)
    device: str = "auto"
    settings: ServeSettings = Field(default_factory=ServeSettings)

    def build(self, *, registry: CollectorRegistry | None = None) -> ImageService:
        spec = self

        def pipeline_factory() -> Any:
            from ..cli.pipelines import load_pipeline

            pipe = load_pipeline(spec.model, weights=spec.weights).pipe
            device = _device(spec.device)
            return pipe if device == "cpu" else pipe.to(device)

        def guard_factory(metrics: GuardMetrics) -> Guard:
            from .. import detectors
            from ..guard import Guard

            verifiers = {}
            for entry in spec.verifiers:
                name, _, target = entry.partition("=") if "=" in entry else (entry, "", entry)
                verifiers[name] = detectors.create(target)
            watch = spec.watch if os.path.isfile(spec.policy) else False
            return Guard(policy=spec.policy, watch=watch, metrics=metrics, verifiers=verifiers,
                         policy_roots=spec.policy_roots)

        return ImageService(pipeline_factory, guard_factory, spec.settings, registry=registry,
                            description=f"model {spec.model}")


def _device(name: str) -> str:
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
