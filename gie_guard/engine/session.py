"""Install a plan's processors on a pipeline for exactly one call, and take them off again."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from ..errors import GuardedCallError
from .plan import Plan
from .processors import CallState, GrowthInhibitorProcessor


def _pipeline_step_facts(pipe: Any) -> tuple[int, bool]:
    """(steps in this call, whether classifier-free guidance is on), read as the UNet runs.

    The SD and SDXL pipelines set both before their denoising loop; img2img counts only
    the steps it actually runs."""
    total = getattr(pipe, "_num_timesteps", None)
    cfg = getattr(pipe, "_guidance_scale", None)
    if not isinstance(total, int) or total <= 0 or cfg is None:
        raise GuardedCallError(
            f"{type(pipe).__name__} did not announce its number of denoising steps before running "
            "its UNet; the step window cannot be applied, so the call was stopped"
        )
    return total, bool(pipe.do_classifier_free_guidance)


@contextlib.contextmanager
def installed(pipe: Any, plan: Plan) -> Iterator[CallState | None]:
    """Within the block, ``pipe``'s cross-attention layers run the plan's growth inhibitors.

    The UNet's own processors are put back on exit, also when the call raises. An empty
    plan installs nothing (the call is then bit-identical to an unguarded one)."""
    if plan.is_empty:
        yield None
        return
    unet = pipe.unet
    originals = dict(unet.attn_processors)
    state = CallState(
        embeddings=plan.embeddings.to(device=unet.device, dtype=unet.dtype),
        token_scales=plan.token_scales.to(device=unet.device),
        window_start=plan.window.start,
        window_end=plan.window.end,
    )
    guarded = dict(originals)
    # each processor refuses an attention processor it cannot reproduce, before anything is installed
    for name in plan.layer_names:
        guarded[name] = GrowthInhibitorProcessor(originals[name], name, state)

    def on_unet_forward(_module: Any, _args: Any) -> None:
        if state.probing:  # the adapters' probe pass re-enters the UNet within step 0
            return
        total, cfg = _pipeline_step_facts(pipe)
        state.begin_step(total, cfg)

    unet.set_attn_processor(guarded)
    hook = unet.register_forward_pre_hook(on_unet_forward)
    try:
        yield state
    finally:
        hook.remove()
        unet.set_attn_processor(dict(originals))  # it pops from the dict it is given
