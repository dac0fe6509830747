"""``scorekit sample --checkpoint RUN --sampler pc|ode|dpm_solver_2m``: draw samples, write a picture and a tensor file.

``--checkpoint`` is a ``scorekit train`` output directory (EMA weights) or a saved diffusers pipeline
directory (Stable Diffusion, DiT, LDM, DDPM, ...; see ``scorekit.from_diffusers``). Text-to-image pipelines
take ``--prompt`` (and ``--negative-prompt``), class-conditional ones ``--class-label``; ``--guidance-scale W``
turns on classifier-free guidance (W > 1). Latent pipelines' samples are decoded by the pipeline's VAE
before they are written (``--save-latents`` keeps the latents too). Sampler settings default to the run
config's ``sampling:`` section; flags override them. ``--guidance`` adds a plug-in (several may be given).

``--seeds 0-49999`` draws sample i from its own seed (ranges and lists: ``0-9,20``), so the samples do
not depend on ``--batch_size`` or on the number of processes; under ``torchrun --nproc_per_node N`` or
``accelerate launch --num_processes N`` the seeds are split across the processes and rank 0 gathers
them. ``--outdir DIR`` writes one PNG per seed (``000123.png``) and ``samples.npz`` (uint8 ``arr_0``,
``(N, H, W, C)``), the layout FID tools read; ``--out`` writes a grid and a tensor file.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

# the names scorekit.sampling's SAMPLERS and GUIDANCE registries take (checked there too)
SAMPLERS = ("pc", "ode", "dpm_solver_2m")
GUIDANCE = ("classifier", "minority", "self_minority", "svdd")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("sample", help="sample from a trained or pretrained score model", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="training run directory or diffusers pipeline directory")
    p.add_argument("--sampler", choices=SAMPLERS, default=None, help="default: the run config's sampling.sampler")
    p.add_argument("--steps", type=int, default=None, help="PC steps, fixed ODE steps or DPM-Solver NFE")
    p.add_argument("--n", type=int, default=None, help="number of samples")
    p.add_argument("--batch_size", "--batch-size", dest="batch_size", type=int, default=None)
    p.add_argument("--predictor", default=None, help="PC predictor (reverse_diffusion, euler_maruyama, ancestral, none)")
    p.add_argument("--corrector", default=None, help="PC corrector (langevin, annealed_langevin, none)")
    p.add_argument("--snr", type=float, default=None)
    p.add_argument("--method", default=None, help="ODE method for --sampler ode (dopri5, rk4, euler, midpoint)")
    p.add_argument("--eps", type=float, default=None, help="last time of the sampler (1e-3 VP, 1e-5 VE)")
    p.add_argument("--seed", type=int, default=None, help="one stream for the whole run (see --seeds)")
    p.add_argument("--seeds", default=None, help="per-sample seeds, e.g. 0-49999 or 0-9,20 (sets --n)")
    p.add_argument("--raw_weights", "--raw-weights", dest="raw_weights", action="store_true",
                   help="use the raw weights instead of the EMA")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--out", default=None, help="output PNG (default: <checkpoint>/samples/<sampler>.png)")
    p.add_argument("--outdir", default=None, help="folder for one PNG per seed and samples.npz (FID tools' layout)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    c = p.add_argument_group("pretrained pipelines")
    c.add_argument("--prompt", default=None, help="text prompt (text-to-image pipelines)")
    c.add_argument("--negative-prompt", "--negative_prompt", dest="negative_prompt", default=None,
                   help="negative prompt for classifier-free guidance (default: the empty prompt, as diffusers)")
    c.add_argument("--prompt-2", "--prompt_2", dest="prompt_2", default=None,
                   help="SDXL: prompt of the second text encoder (default: --prompt, as diffusers)")
    c.add_argument("--negative-prompt-2", "--negative_prompt_2", dest="negative_prompt_2", default=None,
                   help="SDXL: negative prompt of the second text encoder (default: --negative-prompt)")
    c.add_argument("--guidance-scale", "--guidance_scale", dest="guidance_scale", type=float, default=None,
                   help="classifier-free guidance weight W (on when W > 1, as in diffusers)")
    c.add_argument("--class-label", "--class_label", dest="class_label", type=int, default=None,
                   help="class of a class-conditional pipeline (DiT: ImageNet class)")
    c.add_argument("--height", type=int, default=None, help="image height in pixels (pipelines)")
    c.add_argument("--width", type=int, default=None, help="image width in pixels (pipelines)")
    c.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="precision of the networks (the sampler state stays float32)")
    c.add_argument("--adapter", default=None,
                   help="SaRA or LoRA adapter directory of `scorekit finetune`, applied without merging")
    c.add_argument("--save-latents", "--save_latents", dest="save_latents", action="store_true",
                   help="latent pipelines: also write the latents (<out>.latents.safetensors)")
    g = p.add_argument_group("guidance")
    g.add_argument("--guidance", action="append", default=[], choices=sorted(GUIDANCE),
                   help="plug-in to apply (repeatable; applied in the given order)")
    g.add_argument("--classifier", default=None, help="trained (minority) classifier checkpoint")
    g.add_argument("--target", type=int, default=None, help="class for --guidance classifier")
    g.add_argument("--target-level", "--target_level", dest="target_level", type=int, default=None,
                   help="minority level for --guidance minority (L-1: most unique, 0: most common)")
    g.add_argument("--scale", type=float, default=1.0, help="guidance scale w")
    g.add_argument("--reward", default=None,
                   help="reward for --guidance svdd: compressibility, ink, module:function or file.py:function; the "
                        "last two import the module / execute the file with your rights: use code you trust")
    g.add_argument("--candidates", type=int, default=8, help="SVDD candidates per step (M)")
    g.add_argument("--alpha", type=float, default=0.0, help="SVDD temperature (0: argmax)")
    return p


def _none(value):
    return None if value is None or str(value).lower() == "none" else value


def run(args: argparse.Namespace) -> int:
    import dataclasses

    import torch

    from samplers import count_nfe

    from ..checkpoint import save_tensors
    from ..sampling import (
        GuidanceOptions,
        build_guidance,
        condition_score,
        decode_samples,
        draw_samples,
        gather_samples,
        init_processes,
        load_model,
        parse_seeds,
        rank_batches,
        sampler_steps,
        save_outdir,
        save_pngs,
        save_samples,
    )
    from . import check_device

    args.device = check_device(args.device)
    seeds = parse_seeds(args.seeds) if args.seeds is not None else None
    if seeds is not None and args.n is not None and args.n != len(seeds):
        raise ValueError(f"--n {args.n} disagrees with --seeds {args.seeds} ({len(seeds)} seeds); give one of them")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and seeds is None:
        raise ValueError(f"sampling in {world} processes needs per-sample seeds: pass --seeds, e.g. 0-999")
    procs = init_processes(args.device)
    try:
        device = procs.device(args.device)
        dtype = None if args.dtype is None else getattr(torch, args.dtype)
        model, cfg = load_model(args.checkpoint, ema=not args.raw_weights, device=device, height=args.height,
                                width=args.width, dtype=dtype, adapter=args.adapter)
        score_fn = condition_score(model, prompt=args.prompt, negative_prompt=args.negative_prompt,
                                   guidance_scale=args.guidance_scale, class_label=args.class_label,
                                   prompt_2=args.prompt_2, negative_prompt_2=args.negative_prompt_2)
        flags = {"sampler": args.sampler, "n": len(seeds) if seeds else args.n, "batch_size": args.batch_size,
                 "seed": args.seed, "snr": args.snr, "eps": args.eps, "method": args.method}
        cfg = dataclasses.replace(cfg, **{k: v for k, v in flags.items() if v is not None})
        if args.predictor is not None:
            cfg.predictor = _none(args.predictor)
        if args.corrector is not None:
            cfg.corrector = _none(args.corrector)
        options = GuidanceOptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(GuidanceOptions)})
        guidance = build_guidance(args.guidance, score_fn, options, device)

        steps = sampler_steps(cfg, args.steps)
        score = count_nfe(score_fn)
        mine = None if seeds is None else [s for b in rank_batches(seeds, cfg.batch_size, procs) for s in b]
        t0 = time.perf_counter()
        samples = draw_samples(score, model.sde, tuple(model.data_shape), cfg, steps=steps, guidance=guidance,
                               generator=torch.Generator(device).manual_seed(cfg.seed), device=device,
                               progress=args.progress and procs.main, seeds=mine)
        latents, samples = samples, decode_samples(model, samples, cfg.batch_size)
        if args.outdir and samples.ndim == 4:
            save_pngs(samples, mine if seeds else range(cfg.n), args.outdir)  # each rank writes its own
        out = Path(args.out) if args.out else None
        if out is None and not args.outdir:
            out = Path(args.checkpoint) / "samples" / f"{cfg.sampler}.png"
        shards = Path(args.outdir) / ".shards" if args.outdir else out.parent / f".{out.name}.shards"
        gathered = gather_samples(samples, mine or [], procs, seeds or [], shards, nfe=score.samples)
        keep_latents = args.save_latents and latents is not samples
        if keep_latents:  # every rank takes part in each gather
            latents = gather_samples(latents, mine or [], procs, seeds or [], shards.with_name(shards.name + "-z"))
        if gathered is None:  # not rank 0: its shard is with rank 0
            return 0
        samples, evaluations = gathered
        seconds = time.perf_counter() - t0
        meta = {"sampler": cfg.sampler, "steps": steps, "seed": cfg.seed, "seeds": args.seeds, "nfe": score.nfe,
                "guidance": args.guidance, "checkpoint": str(args.checkpoint), "prompt": args.prompt,
                "prompt_2": args.prompt_2, "negative_prompt_2": args.negative_prompt_2,
                "negative_prompt": args.negative_prompt, "guidance_scale": args.guidance_scale, "adapter": args.adapter,
                "class_label": args.class_label}
        written = [save_outdir(samples, args.outdir)] if args.outdir else []
        if out is not None:
            written += save_samples(samples, out, meta=meta)
        if keep_latents:
            path = (out or Path(args.outdir) / "samples.png").with_suffix(".latents.safetensors")
            save_tensors({"latents": latents[0]}, path, meta)
            written.append(path)
        print(f"{cfg.n} samples with {cfg.sampler} in {seconds:.1f}s on {procs.world} process(es) "
              f"({evaluations / cfg.n:.0f} score evaluations per sample); wrote {', '.join(map(str, written))}")
        return 0
    finally:
        procs.close()
