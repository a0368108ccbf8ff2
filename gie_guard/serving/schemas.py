"""What the image service accepts and answers, and the operator's settings (pydantic).

Requests are validated twice: :class:`ImageRequest` checks types and absolute bounds (strict:
``"5"`` is not an integer, ``true`` is not a number, unknown fields are refused), then
:meth:`ServeSettings.check` checks the operator's limits (steps, sizes, images per request).
Both answer with :class:`FieldProblem` lists that never echo the value sent: a prompt is
neither logged nor sent back.

The report a client sees (:class:`ReportOut`) names the policy, its content hash, one
opaque label per concept (:func:`concept_label`: stable, but neither the concept's id nor its
text), the counts and the verifier outcome. Concept ids are in it only when the operator sets
``concept_ids: ids`` (trusted clients); concept texts and scales, which would hand clients the
blocklist, only with ``expose_concept_text``.
"""

from __future__ import annotations

import hashlib
import hmac
import unicodedata
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "ConceptOut",
    "ErrorBody",
    "ErrorResponse",
    "FieldProblem",
    "ImageOut",
    "ImageRequest",
    "ImagesResponse",
    "ReportOut",
    "ServeSettings",
    "concept_label",
]

MAX_SEED = 2**63 - 1
_ALLOWED_CONTROLS = frozenset("\t\n\r")


class FieldProblem(BaseModel):
    """One problem with a request field: where (``loc``, e.g. ``"steps"``) and what."""

    loc: str
    problem: str


class ServeSettings(BaseModel):
    """The operator's limits and switches for one service (one process, worker or replica).

    Defaults suit a Stable Diffusion 1.x model on one GPU; every limit is enforced before
    anything reaches the pipeline.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    # requests
    max_prompt_chars: int = Field(1000, ge=1, le=100_000, description="longest prompt or negative prompt")
    max_steps: int = Field(50, ge=1, le=1000, description="most denoising steps a request may ask")
    default_steps: int = Field(20, ge=1, le=1000, description="steps when a request names none")
    max_images: int = Field(4, ge=1, le=64, description="most images per request (n)")
    max_side: int = Field(1024, ge=8, le=8192, description="largest width or height in pixels")
    size_multiple: int = Field(8, ge=1, le=128, description="width and height must be multiples of this")
    max_guidance: float = Field(20.0, ge=0.0, le=100.0, description="largest guidance_scale a request may ask")
    # batching and admission
    max_batch_images: int = Field(8, ge=1, le=256, description="most images in one guarded pipeline call")
    batch_wait_s: float = Field(0.01, ge=0.0, le=1.0, description="how long an idle pipeline waits to fill a batch")
    max_queue: int = Field(32, ge=1, le=100_000, description="requests admitted at once (queued or running); more get 503")
    # HTTP
    max_body_bytes: int = Field(64 * 1024, ge=1024, le=64 * 1024 * 1024, description="largest request body; more gets 413")
    drain_limit_bytes: int = Field(
        16 * 1024 * 1024, ge=0, le=1024 * 1024 * 1024,
        description="an oversized body up to this size is read and discarded before the 413, so the client reads "
                    "the answer instead of a connection reset; larger ones are cut off",
    )
    body_timeout_s: float = Field(10.0, gt=0.0, le=3600.0, description="a request body must arrive within this time; else 408")
    header_timeout_s: float = Field(
        10.0, gt=0.0, le=3600.0,
        description="a connection must send a request's complete headers within this time of opening (or of its "
                    "previous answer); else it is closed (gie-guard serve's uvicorn; see docs/deployment.md)",
    )
    # disclosure
    concept_ids: Literal["opaque", "ids"] = Field(
        "opaque", description="what names a concept in responses: 'opaque' (a stable label that is neither its id nor "
                              "its text; the default) or 'ids' (the policy's concept ids: trusted clients only)")
    concept_label_key: str = Field(
        "", max_length=256, repr=False,
        description="secret mixed into the opaque labels (the same on every replica); without it a label can be "
                    "matched against guessed ids by hashing them")
    expose_concept_text: bool = Field(False, description="put concept ids, texts and scales in responses (hands clients the blocklist)")
    replica_header: bool = Field(False, description="name the answering process in an X-Gie-Guard-Replica header")
    # runtime
    torch_threads: int | None = Field(None, ge=1, le=1024, description="torch.set_num_threads in the serving process")

    @model_validator(mode="after")
    def _consistent(self) -> ServeSettings:
        if self.default_steps > self.max_steps:
            raise ValueError(f"default_steps ({self.default_steps}) is above max_steps ({self.max_steps})")
        if self.max_side % self.size_multiple:
            raise ValueError(f"max_side ({self.max_side}) is not a multiple of size_multiple ({self.size_multiple})")
        return self

    def check(self, request: ImageRequest) -> list[FieldProblem]:
        """The operator's limits ``request`` breaks (empty when it keeps them all)."""
        problems = []
        for name in ("prompt", "negative_prompt"):
            text = getattr(request, name)
            if text is not None and len(text) > self.max_prompt_chars:
                problems.append(FieldProblem(loc=name, problem=f"longer than {self.max_prompt_chars} characters"))
        if request.steps is not None and not 1 <= request.steps <= self.max_steps:
            problems.append(FieldProblem(loc="steps", problem=f"must be within [1, {self.max_steps}]"))
        if request.n > self.max_images:
            problems.append(FieldProblem(loc="n", problem=f"must be within [1, {self.max_images}]"))
        for name in ("width", "height"):
            side = getattr(request, name)
            if side is not None and (not self.size_multiple <= side <= self.max_side or side % self.size_multiple):
                problems.append(FieldProblem(
                    loc=name, problem=f"must be a multiple of {self.size_multiple} within [{self.size_multiple}, {self.max_side}]"))
        if request.guidance_scale is not None and request.guidance_scale > self.max_guidance:
            problems.append(FieldProblem(loc="guidance_scale", problem=f"must be within [0, {self.max_guidance}]"))
        if request.response_format == "png" and request.n != 1:
            problems.append(FieldProblem(loc="response_format", problem="'png' returns one image: use n=1, or b64_json"))
        return problems


def concept_label(policy: str, concept_id: str, key: str = "") -> str:
    """The opaque label clients see for ``concept_id`` of policy ``policy``: ``c-`` and 10 hex
    digits of HMAC-SHA256(``key``, policy and id). Stable across processes, replicas, restarts
    and edits of the policy that keep the id; the same id in two policies gets two labels.
    Operators map labels back with ``gie-guard policy labels`` (docs/deployment.md)."""
    digest = hmac.new(key.encode("utf-8"), f"{policy}\x00{concept_id}".encode("utf-8"), hashlib.sha256).hexdigest()
    return "c-" + digest[:10]


class ImageRequest(BaseModel):
    """``POST /v1/images``. Only ``prompt`` is required.

    ``seed``: image ``i`` of the request uses ``seed + i`` (a random seed when absent; every
    image's seed is in the answer). ``width``/``height``/``steps``/``guidance_scale``: the
    pipeline's defaults when absent. ``response_format``: ``b64_json`` (JSON with base64
    PNGs and the report) or ``png`` (the PNG itself, ``n`` must be 1, the report in headers).
    """

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    prompt: str = Field(min_length=1, max_length=100_000)
    negative_prompt: str | None = Field(None, max_length=100_000)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    steps: int | None = Field(None, ge=1, le=100_000)
    width: int | None = Field(None, ge=1, le=65_536)
    height: int | None = Field(None, ge=1, le=65_536)
    n: int = Field(1, ge=1, le=1024)
    guidance_scale: float | None = Field(None, ge=0.0, le=1000.0, allow_inf_nan=False)
    response_format: Literal["b64_json", "png"] = "b64_json"

    @field_validator("prompt", "negative_prompt")
    @classmethod
    def _text(cls, value: str | None, info: object) -> str | None:
        if value is None:
            return None
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("is not valid Unicode text (a lone surrogate)") from None
        if any(unicodedata.category(ch) == "Cc" and ch not in _ALLOWED_CONTROLS for ch in value):
            raise ValueError("contains control characters")
        if getattr(info, "field_name", None) == "prompt" and not value.strip():
            raise ValueError("is blank")
        return value


class ConceptOut(BaseModel):
    """One policy concept in a generation: its label (``id``: opaque by default, see
    :func:`concept_label`; the policy's concept id with ``concept_ids: ids``), and whether it
    was inhibited (at least one step, scale above 0). ``text`` and ``max_scale`` only with
    ``expose_concept_text``."""

    id: str
    inhibited: bool
    text: str | None = None
    max_scale: float | None = None


class ReportOut(BaseModel):
    """The client's view of the guard's report on the call that made (or withheld) its images.

    ``outcome``: ``ok`` (nothing to act on), ``recorded`` (a verifier found a concept, the
    policy says record), ``blurred`` (affected images blurred), ``blocked`` (withheld), or
    ``unknown`` (the verifier outcome could not be read; the images were still guarded).
    ``batch_requests``/``batch_images``: how many requests and images shared the guarded call.
    """

    policy: str
    policy_hash: str
    outcome: str
    concepts: list[ConceptOut]
    concepts_applied: int
    steps_inhibited: int
    total_steps: int
    batch_requests: int
    batch_images: int
    blocked_concepts: list[str] = Field(default_factory=list)


class ImageOut(BaseModel):
    b64_png: str
    seed: int


class ImagesResponse(BaseModel):
    images: list[ImageOut]
    report: ReportOut


class ErrorBody(BaseModel):
    """``code`` is stable and machine-readable: ``invalid_json``, ``invalid_request``,
    ``unsupported_media_type``, ``body_too_large``, ``body_timeout``, ``not_found``,
    ``method_not_allowed``, ``content_blocked`` (451), ``overloaded`` and ``not_ready``
    (503), ``generation_failed`` and ``internal`` (500)."""

    code: str
    message: str
    fields: list[FieldProblem] = Field(default_factory=list)


class ErrorResponse(BaseModel):
    error: ErrorBody
    report: ReportOut | None = None
