"""The stacked, chunked inhibitor (inhibition.act over concept_stack.ConceptKeys) against a
literal per-concept loop: every map rule, with and without a sink, keys shared by the rows
and per row, concepts of different lengths (padding), competing anchors, and chunk sizes
that split both the concepts and the queries."""

from __future__ import annotations

import pytest
import torch

from gie_guard.engine import StepWindow
from gie_guard.engine.attention import concept_maps
from gie_guard.engine.concept_stack import own_columns, stack_concepts
from gie_guard.engine.context import StepContext
from gie_guard.engine.families import StableDiffusion
from gie_guard.engine.inhibition import ReferenceKeys, act
from gie_guard.engine.plan import ConceptSpec, Plan

B, H, N, D, SLOTS = 2, 3, 23, 8, 12
SCALE = D**-0.5


def _plan(positions: list[tuple[int, ...]], rule: str) -> Plan:
    scales = torch.zeros(len(positions), SLOTS)
    for c, own in enumerate(positions):
        scales[c, list(own)] = 1.0 + 0.5 * c
    return Plan(family=StableDiffusion("StableDiffusionPipeline"), concepts=tuple(ConceptSpec(f"c{c}", f"t{c}", 1.0) for c in range(len(positions))),
                window=StepWindow(0.0, 1.0), site_names=(), token_positions=tuple(positions), embeddings=None,
                token_scales=scales, concept_map=rule)  # type: ignore[arg-type]


def _world(seed: int, *, per_row: bool, padded: bool, anchors: bool):
    """Concepts over plan slots; keys ``(h, T_c, d)`` or per row ``(B, h, T_c, d)``."""
    g = torch.Generator().manual_seed(seed)
    lead = (B, H) if per_row else (H,)
    positions = [(1, 2), (3,), (1, 4, 5), (2,), (6, 7), (1,), (8,)]
    slots = [list(p) for p in positions] if padded else [list(range(SLOTS))] * len(positions)
    keys = [torch.randn(*lead, len(s), D, generator=g) for s in slots]
    values = [torch.randn(*lead, len(s), D, generator=g) for s in slots]
    competing = [torch.randn(*lead, 2 + c % 2, D, generator=g) if anchors and c % 3 == 0 else None
                 for c in range(len(positions))]
    return positions, slots, keys, values, competing


def _literal(q, plan, slots, keys, values, competing, scales, *, sink, level, gates):
    """sum_c sum_j w_j A_c[..., j] V_c[j], one concept at a time, maps over every column."""
    total = torch.zeros(q.shape, dtype=torch.float32)
    for c, (k, v, s) in enumerate(zip(keys, values, slots)):
        m = concept_maps(q, k, scale=SCALE, sink_lse=sink, anchor_keys=competing[c])  # (B, h, N, T_c)
        own = [i for i, slot in enumerate(s) if slot in plan.token_positions[c]]
        if plan.concept_map in ("calibrated", "contrast"):
            m = torch.relu(m - level[..., None])
        elif plan.concept_map == "gated":
            m = m * (m[..., own].mean(-1).mean(1) > level.mean(1)).float()[:, None, :, None]
        elif plan.concept_map == "output":
            m = m * gates[c].float()[:, None, :, None]
        w = scales[c, s]
        vv = v if v.ndim == 4 else v[None].expand(q.shape[0], *v.shape)
        total += (m * w) @ vv
    return total


@pytest.mark.parametrize("rule", ["gie", "calibrated", "gated", "output", "contrast"])
@pytest.mark.parametrize("per_row", [False, True], ids=["shared-keys", "per-row-keys"])
@pytest.mark.parametrize("sinked", [False, True], ids=["own-softmax", "sink"])
@pytest.mark.parametrize("padded", [False, True], ids=["equal-lengths", "padded"])
def test_stacked_inhibitor_equals_the_literal_loop(rule, per_row, sinked, padded):
    g = torch.Generator().manual_seed(7)
    positions, slots, keys, values, competing = _world(1, per_row=per_row, padded=padded, anchors=rule == "gie")
    plan = _plan(positions, rule)
    q = torch.randn(B, H, N, D, generator=g)
    sink = torch.randn(B, H, N, generator=g) + 2.0 if sinked else None
    ref_keys = [torch.randn(H, 4, D, generator=g), torch.randn(H, 3, D, generator=g)]
    references = ReferenceKeys(keys=ref_keys, own=[[1, 2], [0]])
    levels = torch.stack([concept_maps(q, k, scale=SCALE, sink_lse=sink)[..., o].mean(-1)
                          for k, o in zip(ref_keys, references.own)])
    level = levels.amax(0) if rule == "contrast" else levels.mean(0)  # the strongest reference, or their mean
    gates = [torch.rand(B, N, generator=g) > 0.4 for _ in positions]
    own = own_columns(plan, slots)
    stacked = stack_concepts(plan, keys, [v[..., cols, :] for v, cols in zip(values, own)], slots, competing)
    ctx = StepContext(step=0, rows=slice(0, B), inhibit=True, measure=True, observe=True, scales=plan.token_scales)
    want = _literal(q, plan, slots, keys, values, competing, plan.token_scales, sink=sink, level=level, gates=gates)
    for chunk_bytes in (1, 4 * B * H * SLOTS * 5, 2**30):  # one concept and one query a chunk ... everything at once
        got = act(q, stacked, ctx, plan, scale=SCALE, sink_lse=sink, references=references, gates=gates,
                  chunk_bytes=chunk_bytes)
        assert got.delta is not None and got.measured is not None and got.maps is not None
        assert torch.allclose(got.delta, want, rtol=1e-5, atol=1e-5), (chunk_bytes, (got.delta - want).abs().max())
        for c, (k, s) in enumerate(zip(keys, slots)):
            plain = concept_maps(q, k, scale=SCALE, sink_lse=sink)  # measured: as if there were no anchors
            assert torch.allclose(got.measured[:, c, s], plain.mean(dim=(1, 2)), atol=1e-6)
            assert got.measured[:, c, [x for x in range(SLOTS) if x not in s]].eq(0).all()
            with_anchors = concept_maps(q, k, scale=SCALE, sink_lse=sink, anchor_keys=competing[c])
            cols = [i for i, slot in enumerate(s) if slot in positions[c]]
            assert torch.allclose(got.maps[c], with_anchors[..., cols].sum(-1), atol=1e-6)
    if not padded:  # keys handed over already stacked are kept as they are, with the same result
        given = torch.stack(keys)
        again = stack_concepts(plan, given, [v[..., cols, :] for v, cols in zip(values, own)], slots, competing)
        assert again.keys is given
        redo = act(q, again, ctx, plan, scale=SCALE, sink_lse=sink, references=references, gates=gates)
        assert redo.delta is not None and torch.equal(redo.delta, got.delta)


def test_a_scale_outside_a_concepts_own_tokens_fails():
    positions, slots, keys, values, competing = _world(2, per_row=False, padded=False, anchors=False)
    plan = _plan(positions, "gie")
    own = own_columns(plan, slots)
    stacked = stack_concepts(plan, keys, [v[..., cols, :] for v, cols in zip(values, own)], slots, competing)
    scales = plan.token_scales.clone()
    scales[0, 0] = 2.0  # slot 0 is nobody's own token
    ctx = StepContext(step=0, rows=slice(0, B), inhibit=True, measure=False, observe=False, scales=scales)
    with pytest.raises(ValueError, match="not one of its concept's own tokens"):
        act(torch.randn(B, H, N, D), stacked, ctx, plan, scale=SCALE, sink_lse=None)


def test_values_must_be_given_at_own_columns():
    positions, slots, keys, values, competing = _world(3, per_row=False, padded=False, anchors=False)
    with pytest.raises(ValueError, match="own columns"):
        stack_concepts(_plan(positions, "gie"), keys, values, slots, competing)


class OffTokenScales:
    """A scale source that puts a scale on slot 0 (the start token), nobody's own token."""

    probe = False

    def __init__(self, plan: Plan) -> None:
        self.plan = plan

    def scales(self, step: int, measured: object) -> torch.Tensor:
        assert self.plan.token_scales is not None
        scales = self.plan.token_scales.clone()
        scales[:, 0] = 3.0
        return scales


@pytest.mark.parametrize("family", ["sd", "sd3"])
def test_a_call_whose_scales_cannot_be_reproduced_is_withheld(family, sd_pipe):
    """Fail closed end to end: the engine cannot apply a scale off the concept's own tokens,
    so the guarded call raises instead of returning an image inhibited otherwise."""
    from gie_guard import GuardError
    from gie_guard.engine import compile_plan, guarded_call
    from gie_guard.testing import dit

    pipe = sd_pipe if family == "sd" else dit.tiny_sd3_pipeline()
    plan = compile_plan(pipe, [ConceptSpec("nude", "nude", 3.0)], StepWindow(0.0, 1.0))
    extra = {} if family == "sd" else {"height": 32, "width": 32}
    with pytest.raises(GuardError, match="not one of its concept's own tokens"):
        with guarded_call(pipe, plan, scale_source=OffTokenScales(plan)):
            pipe(prompt="a photo of a beach", num_inference_steps=2, output_type="np",
                 generator=torch.Generator().manual_seed(0), **extra)
