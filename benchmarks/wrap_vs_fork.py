"""Wrap or fork? The cost of one SD 1.5 cross-attention layer four ways.

- `processor`: the layer's own processor (AttnProcessor2_0), nothing else;
- `+ idle hooks`: the engine's hooks installed (forward hook on to_q, pre-hook on to_out[0])
  while no step is inhibited: the price of wrapping outside the window;
- `wrap`: the engine as it runs: the layer's own processor plus the inhibitor subtracted
  before to_out[0] (1 and 8 concepts);
- `fork`: the layer computed by a copied processor that adds the inhibitor itself (what
  gie-guard 0.1 did), same maths, same fused attention kernel.

Timings are CPU seconds per call in one process, interleaved, median of --repeats; the layer
is the first down block's (32x32 latents at 256 px, 320 channels, 8 heads, CFG batch 2).

    python benchmarks/wrap_vs_fork.py [--size 256] [--repeats 50] [--smoke]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from _common import markdown_table, median
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from gie_guard.engine import attention


class ForkedProcessor:
    """The layer computed whole, with the inhibitor, in one copied processor (the 0.1 design)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, w: torch.Tensor) -> None:
        self.concepts = [(k, v, w) for k, v in zip(keys, values)]

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        b, n, _ = hidden_states.shape
        h = attn.heads
        q, k, v = attn.to_q(hidden_states), attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        d = k.shape[-1] // h
        q, k, v = (t.view(b, -1, h, d).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        half = slice(b // 2, b)
        out[half] -= attention.inhibitor(q[half], self.concepts, scale=attn.scale)
        out = out.transpose(1, 2).reshape(b, n, h * d)
        return attn.to_out[1](attn.to_out[0](out))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    if args.smoke:
        args.size, args.repeats = 64, 2
    torch.set_num_threads(1)
    torch.manual_seed(0)
    side = args.size // 8
    attn = Attention(query_dim=320, cross_attention_dim=768, heads=8, dim_head=40).eval()
    attn.set_processor(AttnProcessor2_0())
    hidden = torch.randn(2, side * side, 320)
    text = torch.randn(2, 77, 768)
    rows = {}
    for count in (1, 8):
        enc = torch.randn(count, 77, 768)
        keys = attn.to_k(enc).view(count, 77, 8, 40).transpose(1, 2).detach()
        values = attn.to_v(enc).view(count, 77, 8, 40).transpose(1, 2).detach()
        w = torch.zeros(77)
        w[1:3] = 3.0
        rows[count] = (keys, values, w)

    captured: dict[str, torch.Tensor] = {}

    def on_q(_m, _a, out):
        captured["q"] = out

    def on_out(_m, args, inhibit: int):
        q = captured.pop("q")
        if not inhibit:
            return None
        keys, values, w = rows[inhibit]
        x = args[0]
        qh = q[1:].view(1, -1, 8, 40).transpose(1, 2)
        delta = attention.inhibitor(qh, [(k, v, w) for k, v in zip(keys, values)], scale=attn.scale)
        x[1:] -= delta.transpose(1, 2).reshape(1, -1, 320)
        return (x,)

    def hooked(inhibit: int):
        def run():
            h1 = attn.to_q.register_forward_hook(on_q)
            h2 = attn.to_out[0].register_forward_pre_hook(lambda m, a: on_out(m, a, inhibit))
            try:
                attn(hidden, encoder_hidden_states=text)
            finally:
                h1.remove()
                h2.remove()
        return run

    def forked(count: int):
        keys, values, w = rows[count]
        proc = ForkedProcessor(keys, values, w)

        def run():
            attn.set_processor(proc)
            try:
                attn(hidden, encoder_hidden_states=text)
            finally:
                attn.set_processor(AttnProcessor2_0())
        return run

    variants = {
        "processor": lambda: attn(hidden, encoder_hidden_states=text),
        "+ idle hooks": hooked(0),
        "wrap, 1 concept": hooked(1),
        "fork, 1 concept": forked(1),
        "wrap, 8 concepts": hooked(8),
        "fork, 8 concepts": forked(8),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    with torch.no_grad():
        for rep in range(args.repeats + 2):
            for name, run in variants.items():
                t0 = time.process_time()
                run()
                if rep >= 2:
                    times[name].append(time.process_time() - t0)
    base = median(times["processor"])
    print(f"SD 1.5 first cross-attention layer, {args.size} px ({side * side} positions), CFG batch 2, CPU seconds, "
          f"median of {args.repeats}, 1 thread\n")
    print(markdown_table(("variant", "ms / call", "ratio to the processor"),
                         [(k, f"{median(v) * 1e3:.3f}", f"{median(v) / base:.3f}") for k, v in times.items()]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
