"""``scorekit sample --checkpoint RUN --sampler pc|ode|dpm_solver_2m``: draw samples, write a picture and a tensor file.

``--checkpoint`` is a ``scorekit train`` output directory (EMA weights) or a saved diffusers pipeline
(``DDPMPipeline`` / ``ScoreSdeVePipeline``) directory. Sampler settings default to the run config's
``sampling:`` section; flags override them. ``--guidance`` adds a plug-in (several may be given).
"""

from __future__ import annotations

import argparse
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
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--raw_weights", "--raw-weights", dest="raw_weights", action="store_true",
                   help="use the raw weights instead of the EMA")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--out", default=None, help="output PNG (default: <checkpoint>/samples/<sampler>.png)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    g = p.add_argument_group("guidance")
    g.add_argument("--guidance", action="append", default=[], choices=sorted(GUIDANCE),
                   help="plug-in to apply (repeatable; applied in the given order)")
    g.add_argument("--classifier", default=None, help="trained (minority) classifier checkpoint")
    g.add_argument("--target", type=int, default=None, help="class for --guidance classifier")
    g.add_argument("--target-level", "--target_level", dest="target_level", type=int, default=None,
                   help="minority level for --guidance minority (L-1: most unique, 0: most common)")
    g.add_argument("--scale", type=float, default=1.0, help="guidance scale w")
    g.add_argument("--reward", default=None,
                   help="reward for --guidance svdd: compressibility, ink, module:function or file.py:function")
    g.add_argument("--candidates", type=int, default=8, help="SVDD candidates per step (M)")
    g.add_argument("--alpha", type=float, default=0.0, help="SVDD temperature (0: argmax)")
    return p


def _none(value):
    return None if value is None or str(value).lower() == "none" else value


def run(args: argparse.Namespace) -> int:
    import dataclasses

    import torch

    from samplers import count_nfe

    from ..sampling import (
        GuidanceOptions,
        build_guidance,
        draw_samples,
        load_model,
        sampler_steps,
        save_samples,
    )

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, cfg = load_model(args.checkpoint, ema=not args.raw_weights, device=device)
    flags = {"sampler": args.sampler, "n": args.n, "batch_size": args.batch_size or None, "seed": args.seed,
             "snr": args.snr, "eps": args.eps, "method": args.method}
    cfg = dataclasses.replace(cfg, **{k: v for k, v in flags.items() if v is not None})
    if args.predictor is not None:
        cfg.predictor = _none(args.predictor)
    if args.corrector is not None:
        cfg.corrector = _none(args.corrector)
    options = GuidanceOptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(GuidanceOptions)})
    guidance = build_guidance(args.guidance, model, options, device)

    steps = sampler_steps(cfg, args.steps)
    score = count_nfe(model)
    t0 = time.perf_counter()
    samples = draw_samples(score, model.sde, tuple(model.data_shape), cfg, steps=steps, guidance=guidance,
                           generator=torch.Generator(device).manual_seed(cfg.seed), device=device,
                           progress=args.progress)
    seconds = time.perf_counter() - t0
    path = Path(args.out) if args.out else Path(args.checkpoint) / "samples" / f"{cfg.sampler}.png"
    written = save_samples(samples, path, meta={"sampler": cfg.sampler, "steps": steps, "seed": cfg.seed,
                                                "nfe": score.nfe, "guidance": args.guidance,
                                                "checkpoint": str(args.checkpoint)})
    print(f"{cfg.n} samples with {cfg.sampler} in {seconds:.1f}s ({score.samples / cfg.n:.0f} score evaluations "
          f"per sample); wrote {', '.join(map(str, written))}")
    return 0
