"""Per-step cost of the guard on a UNet with the real Stable Diffusion 1.5 architecture.

Random weights (no download), classifier-free guidance on (UNet batch 2), one UNet forward
= one denoising step. All variants are timed interleaved in one process and reported as
ratios to the unguarded step, with peak memory beside them:

- gie_guard with 1, 4 and 8 concepts (additive form, conditional rows only, concept keys
  and values computed once per call);
- an implementation in the style of the authors' code: the unmodified image generated
  alongside the erased one (UNet batch doubled), and the concept attention computed by
  inserting maps and value rows into the prompt's attention (eq. 8 literally), with the
  concept keys/values re-projected at every step.

    python benchmarks/overhead.py                  # 256 px (32x32 latents), about 10 minutes here
    python benchmarks/overhead.py --size 512 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0

from gie_guard.engine import CallState, GrowthInhibitorProcessor
from gie_guard.engine.families import cross_attention_layers

TEXT_LEN = 77
TEXT_DIM = 768


def _proc_status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_memory_reset(device: torch.device) -> float:
    """Reset the peak counter; returns the memory in use now (MiB), the step's baseline."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2**20
    try:  # Linux: writing 5 resets the process's peak resident set size (VmHWM)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return _proc_status_mib("VmRSS")


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return _proc_status_mib("VmHWM")


class AuthorsStyleProcessor:
    """eq. 8 as the authors' code does it: the concept's maps and value rows are inserted
    before the prompt's end token, explicit (unfused) softmax, keys/values projected anew
    at every call; applied to the second half of the erased rows' batch."""

    def __init__(self, concept_embeds: torch.Tensor, scales: torch.Tensor, end_slot: int) -> None:
        self.concept_embeds = concept_embeds  # (C, T, D)
        self.scales = scales  # (C, T)
        self.end_slot = end_slot

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        b, n, _ = hidden_states.shape
        heads = attn.heads
        q = attn.to_q(hidden_states)
        k = attn.to_k(encoder_hidden_states)
        v = attn.to_v(encoder_hidden_states)
        d = k.shape[-1] // heads
        q, k, v = (t.view(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
        maps = torch.softmax(q @ k.transpose(-1, -2) * attn.scale, dim=-1)  # (B, heads, N, T)
        values = v
        c = self.concept_embeds.shape[0]
        kc = attn.to_k(self.concept_embeds).view(c, -1, heads, d).transpose(1, 2)  # (C, heads, T, d)
        vc = attn.to_v(self.concept_embeds).view(c, -1, heads, d).transpose(1, 2)
        e = self.end_slot
        for i in range(c):
            mc = torch.softmax(q @ kc[i].transpose(-1, -2) * attn.scale, dim=-1)
            keep = self.scales[i] > 0
            # erased rows: the last quarter of the batch [uncond_orig, uncond_erased, cond_orig, cond_erased]
            inhibit = torch.zeros_like(mc[..., keep])
            inhibit[3 * b // 4 :] = -self.scales[i][keep] * mc[3 * b // 4 :][..., keep]
            maps = torch.cat([maps[..., :e], inhibit, maps[..., e:]], dim=-1)
            rows = vc[i][:, keep].unsqueeze(0).expand(b, -1, -1, -1)
            values = torch.cat([values[:, :, :e], rows, values[:, :, e:]], dim=2)
        out = (maps @ values).transpose(1, 2).reshape(b, n, heads * d)
        return attn.to_out[1](attn.to_out[0](out))


def make_state(num_concepts: int, device, dtype) -> CallState:
    torch.manual_seed(1)
    embeds = torch.randn(num_concepts, TEXT_LEN, TEXT_DIM, device=device, dtype=dtype)
    scales = torch.zeros(num_concepts, TEXT_LEN, device=device)
    scales[:, 1:3] = 3.0  # two real tokens per concept, as for "Van Gogh"
    state = CallState(embeds, scales, 0.0, 1.0)
    state.active = True
    state.classifier_free_guidance = True
    return state


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256, help="image size in pixels (latents are size/8)")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per variant (median reported)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--concepts", default="1,4,8")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=args.size // 8, cross_attention_dim=TEXT_DIM).to(device, dtype).eval()
    unet.set_attn_processor(AttnProcessor2_0())
    originals = dict(unet.attn_processors)
    layers = cross_attention_layers(unet)
    side = args.size // 8
    latents = torch.randn(2, 4, side, side, device=device, dtype=dtype)
    text = torch.randn(2, TEXT_LEN, TEXT_DIM, device=device, dtype=dtype)
    t = torch.tensor(500, device=device)

    def install(make):
        procs = dict(originals)
        for name in layers:
            procs[name] = make(name)
        unet.set_attn_processor(procs)

    variants = {"unguarded": (lambda: unet.set_attn_processor(dict(originals)), latents, text)}
    for c in [int(x) for x in args.concepts.split(",")]:
        def setup(c=c):
            state = make_state(c, device, dtype)
            install(lambda name: GrowthInhibitorProcessor(originals[name], name, state))
        variants[f"gie_guard, {c} concept{'s' if c > 1 else ''}"] = (setup, latents, text)
    for c in (1, 8):
        def setup_authors(c=c):
            state = make_state(c, device, dtype)
            proc = AuthorsStyleProcessor(state.embeddings, state.token_scales, end_slot=10)
            install(lambda name: proc)
        # unmodified + erased images together: UNet batch doubled
        variants[f"authors' style, {c} concept{'s' if c > 1 else ''}"] = (
            setup_authors, latents.repeat(2, 1, 1, 1), text.repeat(2, 1, 1))

    times: dict[str, list[float]] = {k: [] for k in variants}
    # CPU seconds of this process: on a shared CPU machine they move far less with the
    # neighbours' load than wall seconds do
    cpu_times: dict[str, list[float]] = {k: [] for k in variants}
    peaks: dict[str, float] = {}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.no_grad():
        for rep in range(args.repeats + 1):  # round 0 warms up every variant
            for name, (setup, x, ehs) in variants.items():
                setup()
                baseline = peak_memory_reset(device)
                sync()
                started, cpu_started = time.perf_counter(), time.process_time()
                unet(x, t, encoder_hidden_states=ehs)
                sync()
                if rep:
                    times[name].append(time.perf_counter() - started)
                    cpu_times[name].append(time.process_time() - cpu_started)
                    # memory the step itself needed above what was resident before it (weights, inputs)
                    peaks[name] = max(peaks.get(name, 0.0), peak_memory_mib(device) - baseline)
                print(f"  round {rep} {name}: {time.perf_counter() - started:.3f}s", file=sys.stderr)
    unet.set_attn_processor(dict(originals))

    base = statistics.median(times["unguarded"])
    cpu_base = statistics.median(cpu_times["unguarded"])
    print(f"\nSD 1.5 UNet architecture (random weights), {args.size} px, CFG batch 2, "
          f"{args.device} {args.dtype}, median of {args.repeats} steps, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads\n")
    print("| variant | wall s / step | wall ratio | CPU s / step | CPU ratio | step peak memory MiB | memory ratio |")
    print("|---|---|---|---|---|---|---|")
    for name in variants:
        med, cpu = statistics.median(times[name]), statistics.median(cpu_times[name])
        print(
            f"| {name} | {med:.3f} | {med / base:.3f} | {cpu:.3f} | {cpu / cpu_base:.3f} "
            f"| {peaks[name]:.0f} | {peaks[name] / peaks['unguarded']:.3f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
