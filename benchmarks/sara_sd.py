"""Peak training memory at Stable Diffusion scale: SaRA (with and without the unstructured backprop), LoRA at
the same trainable budget and full fine-tuning of a randomly initialised ``UNet2DConditionModel`` with Stable
Diffusion 1.5's layout (its block types, two layers per block, cross-attention to 77 x 768 text states, 8
heads), at full width (320-640-1280-1280, ~860M parameters) or a fraction of it (``--width 0.5``).

One training step is batch 1 of 4 x 32 x 32 latents: the epsilon-prediction MSE at a random timestep (SaRA
adds its nuclear-norm penalty), backward, AdamW (fp32, the for-loop implementation torch uses on the CPU).
Memory is counted on the CPU, deterministically, by :class:`benchmarks.sara.LiveTensorPeak` (every tensor
storage alive at once: weights, buffers, gradients, AdamW's moments, activations, temporaries) over two steps
(the second is the steady state: the moments exist while the next backward runs). No EMA copy is counted.
Each method runs in its own process, so that one's memory never stands in another's way.

    python -m benchmarks.sara_sd                 # half width (~215M parameters), ~2 min, ~5 GB peak
    python -m benchmarks.sara_sd --width 1       # full width (~860M parameters), ~16 GB for full fine-tuning

Writes ``benchmarks/results/sara_sd.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

from ._harness import RESULTS, markdown_table, seed_all, write_results

VARIANTS = {  # name: (method, unstructured_backprop)
    "SaRA": ("sara", True),
    "SaRA without unstructured backprop": ("sara", False),
    "LoRA (peft, same budget)": ("lora", True),
    "full fine-tuning": ("full", True),
}
SD15_CHANNELS = (320, 640, 1280, 1280)


def sd15_unet(width: float) -> nn.Module:
    """A randomly initialised UNet2DConditionModel with Stable Diffusion 1.5's layout at ``width`` x its channels."""
    from diffusers import UNet2DConditionModel

    channels = tuple(int(round(c * width / 32)) * 32 for c in SD15_CHANNELS)  # GroupNorm(32) needs multiples of 32
    seed_all(0)
    return UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=channels,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
    )


def sara_budget(model: nn.Module, config) -> tuple[list[str], int]:
    """The modules SaRA adapts and its trainable count, without building the adapter."""
    from scorekit.sara import find_targets

    names = find_targets(model, config.target_modules)
    return names, sum(config.select(model.get_submodule(n).weight).numel() for n in names)


def prepare(model: nn.Module, method: str, ub: bool, args) -> tuple[nn.Module, dict]:
    from scorekit.finetune import inject_lora, lora_rank_for_budget
    from scorekit.sara import SaRAConfig, apply_sara

    config = SaRAConfig(fraction=None if args.threshold else args.fraction, threshold=args.threshold,
                        unstructured_backprop=ub)
    if method == "full":
        return model.requires_grad_(True), {}
    if method == "sara":
        return apply_sara(model, config), {}
    modules, budget = sara_budget(model, config)
    r = lora_rank_for_budget(model, modules, budget)
    return inject_lora(model.requires_grad_(False), modules, r, r, 0.0), {"rank": r, "budget": budget}


def measure(variant: str, args) -> dict:
    """Peak live-tensor bytes of two training steps of ``variant`` (run in a process of its own)."""
    from benchmarks.sara import LiveTensorPeak, state_bytes
    from scorekit.sara import rank_penalty

    method, ub = VARIANTS[variant]
    cuda = args.device.startswith("cuda")
    model, extra = prepare(sd15_unet(args.width).to(args.device), method, ub, args)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, foreach=False)
    g = torch.Generator(args.device).manual_seed(0)
    latents = torch.randn(1, 4, args.latent, args.latent, generator=g, device=args.device)
    text = torch.randn(1, 77, 768, generator=g, device=args.device)
    noise = torch.randn(latents.shape, generator=g, device=args.device)
    times = []

    def steps():
        for _ in range(args.steps):
            t0 = time.perf_counter()
            t = torch.randint(0, 1000, (1,), generator=g, device=args.device)
            loss = (model(latents, t, encoder_hidden_states=text).sample - noise).pow(2).mean()
            if method == "sara":
                loss = loss + rank_penalty(model, g)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)

    if cuda:  # the allocator's own count; the peak starts from what is allocated now (the weights)
        torch.cuda.reset_peak_memory_stats()
        steps()
        peak = torch.cuda.max_memory_allocated()
    else:
        with LiveTensorPeak([*model.parameters(), *model.buffers(), latents, text, noise]) as tracker:
            steps()
        peak = tracker.peak
    base_params = sum(p.numel() for n, p in model.named_parameters() if not n.endswith("sara_values")
                      and "lora_" not in n)
    return {"peak_gib": peak / 2**30, "state_gib": state_bytes(model) / 2**30,
            "trainable": sum(p.numel() for p in params), "params": base_params, "step_s": min(times), **extra}


def table(rows: dict[str, dict], device: str = "cpu") -> str:
    full = rows.get("full fine-tuning", {}).get("peak_gib")
    lora = rows.get("LoRA (peft, same budget)", {}).get("peak_gib")
    out = []
    for name, r in rows.items():
        out.append([
            name + (f" (rank {r['rank']})" if "rank" in r else ""), f"{r['trainable']:,}",
            f"{r['peak_gib']:.3f}", f"{r['peak_gib'] / full:.3f}x" if full else "—",
            f"{r['peak_gib'] / lora:.3f}x" if lora else "—", f"{r['state_gib']:.3f}", f"{r['step_s']:.1f}",
        ])
    return markdown_table(["method", "trainable params", "peak train memory (GiB)", "vs full", "vs LoRA",
                           "weights+buffers+grads+AdamW (GiB)", f"step time (s, {device})"], out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=float, default=0.5, help="share of SD 1.5's channels (1 = full, ~860M parameters)")
    p.add_argument("--fraction", type=float, default=0.1, help="SaRA: smallest-|w| share trained per weight")
    p.add_argument("--threshold", type=float, default=None, help="SaRA: |w| < threshold instead of --fraction")
    p.add_argument("--latent", type=int, default=32, help="latent side (32 = 256 px images)")
    p.add_argument("--steps", type=int, default=2, help="training steps measured (2: the steady state)")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu (live tensor bytes counted) or cuda (max_memory_allocated)")
    p.add_argument("--one", choices=list(VARIANTS), help=argparse.SUPPRESS)  # internal: measure one, print JSON
    p.add_argument("--out", type=Path, default=RESULTS / "sara_sd.md")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.one:
        print("RESULT " + json.dumps(measure(args.one, args)))
        return 0

    rows, start = {}, time.perf_counter()
    passed = [f"--width={args.width}", f"--fraction={args.fraction}", f"--latent={args.latent}",
              f"--steps={args.steps}", f"--threads={args.threads}", f"--device={args.device}"] + ([f"--threshold={args.threshold}"]
                                                                        if args.threshold else [])
    for variant in args.variants:
        done = subprocess.run([sys.executable, "-m", "benchmarks.sara_sd", "--one", variant, *passed],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{variant} failed:\n{done.stderr[-3000:]}")
        rows[variant] = json.loads(done.stdout.rsplit("RESULT ", 1)[1])
        print(f"  {variant}: peak {rows[variant]['peak_gib']:.2f} GiB", flush=True)
    n = next(iter(rows.values()))["params"]
    channels = [int(round(c * args.width / 32)) * 32 for c in SD15_CHANNELS]
    rule = f"entries with |w| < {args.threshold:g}" if args.threshold else f"the smallest {args.fraction:.0%}"
    width = "full width" if math.isclose(args.width, 1) else f"{args.width:g} x SD 1.5's width"
    text = (
        "# Peak training memory at Stable Diffusion scale\n\n"
        f"Randomly initialised UNet2DConditionModel with Stable Diffusion 1.5's layout at **{width}** "
        f"(block_out_channels {channels}, 2 layers per block, CrossAttn down/up blocks, cross-attention to 77 x 768 "
        f"text states, 8 heads; {n:,} parameters), fp32, batch 1 of 4 x {args.latent} x {args.latent} latents, "
        f"epsilon MSE, AdamW (for-loop). SaRA trains {rule} of every Linear/Conv weight (plus its nuclear-norm "
        "penalty); LoRA (peft) is on the same modules with the rank whose trainable count is the closest to SaRA's. "
        + (f"Peak: torch.cuda.max_memory_allocated on {torch.cuda.get_device_name()} over {args.steps} steps"
           if args.device.startswith("cuda") else
           f"Peak: bytes of live tensor storages counted on the CPU (benchmarks.sara.LiveTensorPeak) over {args.steps} "
           f"steps")
        + f", each method in its own process; no EMA copy. Step time: fastest step ({args.device}"
        f"{'' if args.device.startswith('cuda') else f', {args.threads} thread(s)'}). "
        f"Took {time.perf_counter() - start:.0f} s "
        f"(`python -m benchmarks.sara_sd --width {args.width:g} --device {args.device}`).\n\n"
        + table(rows, args.device)
    )
    write_results(args.out, text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
