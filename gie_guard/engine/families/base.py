"""What the engine needs to know about one family of pipelines, and nothing else.

A family module (unet.py, pixart.py, sd3.py, flux.py) subclasses :class:`Family` and is
registered in ``families/__init__.py``. The Guard, the plan, the call's coordinator, the
report and the metrics only ever talk to this interface; the family also supplies the
handler of each kind of attention site it has (``site_handlers``), so adding a family,
even one with a new kind of attention, is a module and its tests (docs/families.md, "How
to add a family").
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ...errors import ConceptError, UnsupportedPipelineError
from ..cross import CrossHandler
from ..joint import JointHandler
from ..sites import Site, SiteHandler, SiteKind

__all__ = ["ConceptEncoding", "Family", "JointFamily", "Site", "SiteKind", "concept_slots", "describe", "ride_along_slots"]

@dataclass(frozen=True, eq=False)
class ConceptEncoding:
    """Concepts encoded as the denoiser sees prompt embeddings.

    ``embeddings`` is ``(C, T, D)``; ``positions[c]`` are the slots of concept ``c``'s own
    tokens (never start, end or padding); ``ride_along[c]`` are the slots a joint-attention
    family carries through its blocks for that concept (its own tokens and the special
    tokens around them). Cross-attention families use every slot."""

    embeddings: torch.Tensor
    positions: tuple[tuple[int, ...], ...]
    ride_along: tuple[tuple[int, ...], ...] | None = None


def describe(pipe: Any) -> str:
    return f"{type(pipe).__module__}.{type(pipe).__qualname__}"


def concept_slots(
    tokenizer: Any, text: str, concept_id: str, *, max_length: int | None = None, convert: Any = None,
    padding_side: str | None = None,
) -> tuple[list[int], list[int]]:
    """``(ids, own)``: the padded ids of ``text`` as the pipeline tokenizes a prompt, and the
    slots of its own tokens (ids that are not special). Refuses texts the encoder would
    truncate: a truncated concept is a different concept."""
    if not text or not text.strip():
        raise ConceptError("the concept text is empty", concept_id=concept_id)
    prompt = convert(text, tokenizer) if convert is not None else text
    limit = max_length or tokenizer.model_max_length
    extra = {"padding_side": padding_side} if padding_side else {}
    ids = tokenizer(prompt, padding="max_length", max_length=limit, truncation=False, **extra).input_ids
    if len(ids) > limit:
        raise ConceptError(
            f"the text {text!r} is {len(ids)} tokens long with its special tokens; the pipeline's text "
            f"encoder takes at most {limit}",
            concept_id=concept_id,
        )
    special = set(tokenizer.all_special_ids)
    own = [i for i, token in enumerate(ids) if token not in special]
    if not own:
        raise ConceptError(f"the text {text!r} has no tokens besides special tokens", concept_id=concept_id)
    return list(ids), own


def ride_along_slots(ids: Sequence[int], own: Sequence[int], end_id: int | None, offset: int = 0) -> list[int]:
    """The concept's own slots and the end token right after them, shifted by ``offset``:
    what a joint family carries along for a concept."""
    slots = list(own)
    after = max(own) + 1
    if end_id is not None and after < len(ids) and ids[after] == end_id:
        slots.append(after)
    return [offset + s for s in slots]


def call_default(pipe: Any, name: str, fallback: Any) -> Any:
    """The default of ``pipe.__call__``'s keyword ``name`` (what a prompt is encoded with)."""
    import inspect

    parameter = inspect.signature(type(pipe).__call__).parameters.get(name)
    return fallback if parameter is None or parameter.default is inspect.Parameter.empty else parameter.default


class Family:
    """Base of every family. Subclasses set the class attributes and override the methods
    their pipelines need; the defaults fit diffusers' usual layouts."""

    name: ClassVar[str]  # short, stable: goes into reports and metrics ("sd", "sdxl", "sd3", ...)
    pipelines: ClassVar[tuple[str, ...]]  # diffusers pipeline class names guarded (and their subclasses)
    refused: ClassVar[dict[str, str]] = {}  # diffusers pipeline class name -> why it cannot be guarded
    fused_projections: ClassVar[bool] = True  # whether sites with fused QKV projections can be guarded
    denoiser_attr: ClassVar[str] = "transformer"
    joint: ClassVar[bool] = False  # joint attention: concepts ride along in the text sequence
    text_first: ClassVar[bool] = False  # joint sequence order [text; image] (Flux) or [image; text] (SD3)
    # what competes with a concept's tokens in its map: "own" (its own encoding's other slots,
    # the paper's rule), "prompt" (the prompt's columns), "image" (a joint block's image keys)
    default_sink: ClassVar[str] = "own"
    # where a concept's map lets it inhibit (plan.ConceptMap): "gie" (the paper's map) unless
    # a family's measurements chose a more specific rule (docs/families.md)
    default_map: ClassVar[str] = "gie"
    # denoiser keyword arguments that are not per batch row (never sliced for a probe pass)
    shared_kwargs: ClassVar[frozenset[str]] = frozenset()
    # the pipeline attributes that hold its tokenizers and text encoders (a plan depends on
    # them: plan_cache fingerprints the encoders; compiles run on private tokenizer copies)
    tokenizer_attrs: ClassVar[tuple[str, ...]] = ("tokenizer",)
    text_encoder_attrs: ClassVar[tuple[str, ...]] = ("text_encoder",)
    # the pipeline call's keyword whose "scale" sets a LoRA's strength on the text encoders
    lora_scale_kwarg: ClassVar[str | None] = "cross_attention_kwargs"

    def __init__(self, pipeline_class: str) -> None:
        self.pipeline_class = pipeline_class

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.pipeline_class})"

    # -- matching ----------------------------------------------------------------------------
    @classmethod
    def classes(cls, names: Iterable[str]) -> tuple[type, ...]:
        import diffusers

        return tuple(getattr(diffusers, n) for n in names if hasattr(diffusers, n))

    @classmethod
    def matches(cls, pipe: Any) -> bool:
        return isinstance(pipe, cls.classes(cls.pipelines))

    def check(self, pipe: Any) -> None:
        """Raise UnsupportedPipelineError when this pipeline cannot be guarded as built."""
        sites = self.sites(pipe)
        if not sites:
            raise UnsupportedPipelineError(f"cannot guard {type(pipe).__name__}: it has no attention layer over text")
        if not self.fused_projections:
            for site in sites:
                if getattr(site.module, "fused_projections", False):
                    raise UnsupportedPipelineError(
                        f"cannot guard {type(pipe).__name__}: {site.name} runs fused QKV projections, which gie_guard "
                        f"does not reproduce for {self.name} pipelines; call {self.denoiser_attr}.unfuse_qkv_projections() "
                        "first"
                    )

    # -- structure ---------------------------------------------------------------------------
    def denoiser(self, pipe: Any) -> torch.nn.Module:
        model = getattr(pipe, self.denoiser_attr, None)
        if not isinstance(model, torch.nn.Module):
            raise UnsupportedPipelineError(
                f"cannot guard {type(pipe).__name__}: its {self.denoiser_attr!r} is {type(model).__name__}, not a module"
            )
        refuse_compiled(model, f"{type(pipe).__name__}'s {self.denoiser_attr}")
        return model

    def sites(self, pipe: Any) -> tuple[Site, ...]:
        raise NotImplementedError

    def site_handlers(self) -> dict[SiteKind, SiteHandler]:
        """The handler of each kind of site this family's ``sites`` (and ``aux_sites``) have."""
        return {"cross": CrossHandler()}

    def aux_models(self, pipe: Any) -> list[tuple[str, torch.nn.Module]]:
        """Other models a step runs on the prompt's text before the denoiser (ControlNets), by
        name: the engine can inhibit their cross-attention too."""
        return []

    def aux_sites(self, pipe: Any) -> list[tuple[torch.nn.Module, tuple[Site, ...]]]:
        """The attention sites of each auxiliary model, named ``{model name}.{layer}``."""
        return []

    def owned_models(self, pipe: Any) -> list[torch.nn.Module]:
        """The models a guard that owns this pipeline refuses to run outside guarded calls:
        the denoiser and every auxiliary model that reads the prompt (ControlNets)."""
        models = [self.denoiser(pipe)]
        for name, model in self.aux_models(pipe):
            refuse_compiled(model, f"{type(pipe).__name__}'s {name}")
            models.append(model)
        return models

    def expected_sites(self, sites: Sequence[Site], kwargs: dict[str, Any]) -> Sequence[Site]:
        """The sites a denoiser call with these keyword arguments runs (all by default)."""
        return sites

    def text_for_sites(self, denoiser: torch.nn.Module, embeddings: torch.Tensor) -> torch.Tensor:
        """Concept embeddings as the attention layers receive text (after any caption
        projection the denoiser applies). Cross-attention families only."""
        return embeddings

    # -- concepts ----------------------------------------------------------------------------
    def encoding_options(self, pipe: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The settings of a call that change how a prompt is encoded (``clip_skip``, a T5
        sequence length, ...): concepts are encoded with the same ones, and plans are cached
        per value."""
        return {"clip_skip": kwargs.get("clip_skip")}

    def positions(self, pipe: Any, text: str, concept_id: str, options: dict[str, Any]) -> tuple[int, ...]:
        """Slots of the concept's own tokens in its encoding (ConceptError if it cannot be encoded)."""
        raise NotImplementedError

    def encode(self, pipe: Any, texts: Sequence[str], ids: Sequence[str], options: dict[str, Any]) -> ConceptEncoding:
        raise NotImplementedError

    # -- one call ----------------------------------------------------------------------------
    def prompt_embeddings(self, result: Any, call_index: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """From the return value of the pipeline's ``encode_prompt`` (its ``call_index``-th call
        in this generation): ``(prompt rows, negative rows)`` as the denoiser will see them."""
        raise NotImplementedError

    def denoiser_text(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
        """The text states a denoiser call receives (``encoder_hidden_states``)."""
        value = kwargs.get("encoder_hidden_states")
        if value is None and len(args) >= 3:
            value = args[2]
        return value if isinstance(value, torch.Tensor) else None

    def batch_size(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
        sample = args[0] if args else kwargs.get("hidden_states", kwargs.get("sample"))
        if sample is None:
            raise TypeError("the denoiser was called without its latents (hidden_states or sample)")
        return int(sample.shape[0])

    def ride_along(self, args: tuple[Any, ...], kwargs: dict[str, Any], tokens: torch.Tensor) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Joint families: the call's arguments with ``tokens`` ``(T_c, D)`` appended to every
        row's text sequence."""
        raise NotImplementedError


class JointFamily(Family):
    """A family of joint-attention transformers (SD3, Flux): a concept is encoded as a prompt
    and its own tokens, with the end token after them, ride along in the text sequence."""

    joint = True
    lora_scale_kwarg = "joint_attention_kwargs"

    @classmethod
    def processors(cls) -> set[type]:
        """The diffusers processor classes of this family's joint blocks (reproduced exactly)."""
        raise NotImplementedError

    def site_handlers(self) -> dict[SiteKind, SiteHandler]:
        handler = JointHandler(self.processors, text_first=self.text_first)
        return {"joint": handler, "single": handler}

    def hold_concept_states(
        self, denoiser: torch.nn.Module, sites: Sequence[Site], span: Callable[[], slice | None]
    ) -> list[Any]:
        """The "static" measurement baseline: every block sees the concept tokens as they
        entered the first. ``span()``: the carried tokens' slots in the text sequence while
        they ride in this thread's call, else None. Returns the hook handles."""
        blocks = list(dict.fromkeys(denoiser.get_submodule(s.name.rsplit(".", 1)[0]) for s in sites))
        held: dict[int, torch.Tensor] = {}

        def first(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            where = span()
            if where is not None:
                held[threading.get_ident()] = kwargs["encoder_hidden_states"][:, where].clone()

        def after(_module: Any, _args: tuple[Any, ...], _kwargs: dict[str, Any], output: Any) -> None:
            where = span()
            if where is not None and output[0] is not None:
                output[0][:, where] = held[threading.get_ident()]

        handles = [blocks[0].register_forward_pre_hook(first, with_kwargs=True)]
        handles += [block.register_forward_hook(after, with_kwargs=True) for block in blocks]
        return handles

    def _slots(self, pipe: Any, text: str, concept_id: str, options: dict[str, Any]) -> tuple[list[int], list[int]]:
        """The concept's own slots and the slots that ride along, in the text sequence."""
        raise NotImplementedError

    def _encode_prompt(self, pipe: Any, texts: list[str], options: dict[str, Any]) -> torch.Tensor:
        """The pipeline's prompt embeddings of ``texts``, as its denoiser receives text."""
        raise NotImplementedError

    def positions(self, pipe: Any, text: str, concept_id: str, options: dict[str, Any]) -> tuple[int, ...]:
        return tuple(self._slots(pipe, text, concept_id, options)[0])

    def encode(self, pipe: Any, texts: Sequence[str], ids: Sequence[str], options: dict[str, Any]) -> ConceptEncoding:
        slots = [self._slots(pipe, t, i, options) for t, i in zip(texts, ids)]
        return ConceptEncoding(
            embeddings=self._encode_prompt(pipe, list(texts), options).detach(),
            positions=tuple(tuple(own) for own, _ in slots),
            ride_along=tuple(tuple(carried) for _, carried in slots),
        )

    def ride_along(self, args: tuple[Any, ...], kwargs: dict[str, Any], tokens: torch.Tensor) -> tuple[tuple[Any, ...], dict[str, Any]]:
        text = kwargs["encoder_hidden_states"]
        extra = tokens.to(device=text.device, dtype=text.dtype)[None].expand(text.shape[0], -1, -1)
        return args, {**kwargs, "encoder_hidden_states": torch.cat([text, extra], dim=1)}


def refuse_compiled(model: torch.nn.Module, what: str) -> None:
    """UnsupportedPipelineError for a model compiled with torch.compile, as a wrapper
    (``torch.compile(model)``) or in place (``model.compile()``): compiled graphs can skip
    the guard's hooks and processors."""
    if hasattr(model, "_orig_mod") or getattr(model, "_compiled_call_impl", None) is not None:
        raise UnsupportedPipelineError(
            f"cannot guard {what}: it is compiled with torch.compile (compiled graphs can skip the guard's "
            "hooks); guard the uncompiled model"
        )
