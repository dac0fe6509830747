"""``scorekit sample --checkpoint RUN --sampler pc|ode|dpm_solver_2m``: draw samples, write a picture and a tensor file.

``--checkpoint`` is a ``scorekit train`` output directory (EMA weights) or a saved diffusers pipeline
(``DDPMPipeline`` / ``ScoreSdeVePipeline``) directory. Sampler settings default to the run config's
``sampling:`` section; flags override them. ``--guidance`` adds a plug-in (several may be given).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

SAMPLERS = ("pc", "ode", "dpm_solver_2m")


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


def _same_sde(guidance, model):
    if guidance.sde is not None and guidance.sde != model.sde:
        raise ValueError(f"the classifier was trained on {guidance.sde!r} but the model uses {model.sde!r}; "
                         "train the classifier on the model's SDE")
    return guidance


def _classifier(args, model, device):
    from guidance import ClassifierGuidance

    if args.classifier is None or args.target is None:
        raise ValueError("--guidance classifier needs --classifier PATH and --target CLASS")
    return _same_sde(ClassifierGuidance.load(args.classifier, target=args.target, scale=args.scale, device=device),
                     model)


def _minority(args, model, device):
    from guidance import MinorityGuidance

    if args.classifier is None or args.target_level is None:
        raise ValueError("--guidance minority needs --classifier PATH (a minority classifier) and --target-level L")
    return _same_sde(MinorityGuidance.load(args.classifier, target_level=args.target_level, scale=args.scale,
                                           device=device), model)


def _self_minority(args, model, device):
    import torch

    from guidance import SelfMinorityGuidance

    generator = None if args.seed is None else torch.Generator(device).manual_seed(args.seed + 1)
    return SelfMinorityGuidance(model, model.sde, scale=args.scale, generator=generator)


def _svdd(args, model, device):
    from guidance import SVDD, load_reward

    if args.reward is None:
        raise ValueError("--guidance svdd needs --reward SPEC: a built-in (compressibility, ink), module:function "
                         "or file.py:function, a reward of the clean sample returning shape (batch,)")
    return SVDD(load_reward(args.reward), num_candidates=args.candidates, alpha=args.alpha, seed=args.seed)


# Plug-ins a user picks by name on the command line.
GUIDANCE = {"classifier": _classifier, "minority": _minority, "self_minority": _self_minority, "svdd": _svdd}


def load_model(path: str, ema: bool = True, device: str = "cpu"):
    """``(score_model, sampling_config)`` from a scorekit run directory or a diffusers pipeline directory."""
    from ..config import SampleConfig, load_score_model

    if (Path(path) / "model_index.json").is_file():
        from ..pretrained import from_diffusers

        model = from_diffusers(path).to(device).eval().requires_grad_(False)
        return model, SampleConfig(eps=1e-5 if model.sde.name == "ve" else 1e-3)
    model, run = load_score_model(path, ema=ema, device=device)
    return model, run.sampling


def run(args: argparse.Namespace) -> int:
    import torch

    from samplers import count_nfe, ode_sample, pc_sample

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, cfg = load_model(args.checkpoint, ema=not args.raw_weights, device=device)
    sampler = args.sampler or cfg.sampler
    n = args.n if args.n is not None else cfg.n
    batch = args.batch_size or cfg.batch_size
    seed = args.seed if args.seed is not None else cfg.seed
    if n < 1 or batch < 1:
        raise ValueError(f"--n and --batch_size must be >= 1, got {n} and {batch}")
    none = lambda v: None if v is None or str(v).lower() == "none" else v  # noqa: E731
    predictor = none(args.predictor) if args.predictor is not None else cfg.predictor
    corrector = none(args.corrector) if args.corrector is not None else cfg.corrector
    eps = args.eps if args.eps is not None else cfg.eps
    # the config's steps are PC steps; the ODE solvers take theirs from the flag (DPM-Solver: 20 NFE by default)
    steps = args.steps if args.steps is not None else {"pc": cfg.steps, "dpm_solver_2m": 20}.get(sampler)
    guidance = [GUIDANCE[name](args, model, device) for name in args.guidance]

    score = count_nfe(model)
    generator = torch.Generator(device).manual_seed(seed)
    shape = tuple(model.data_shape)
    out, t0 = [], time.perf_counter()
    for start in range(0, n, batch):
        b = min(batch, n - start)
        if sampler == "pc":
            x = pc_sample(score, model.sde, (b, *shape), predictor=predictor, corrector=corrector,
                          snr=args.snr if args.snr is not None else cfg.snr, n_corrector_steps=cfg.n_corrector_steps,
                          steps=steps, eps=eps, guidance=guidance, generator=generator, progress=args.progress,
                          device=device)
        else:
            method = "dpm_solver_2m" if sampler == "dpm_solver_2m" else (args.method or cfg.method)
            x = ode_sample(score, model.sde, (b, *shape), method=method, steps=steps, eps=eps, rtol=cfg.rtol,
                           atol=cfg.atol, guidance=guidance, generator=generator, device=device)
        out.append(x.cpu())
    samples = torch.cat(out)
    seconds = time.perf_counter() - t0
    path = Path(args.out) if args.out else Path(args.checkpoint) / "samples" / f"{sampler}.png"
    written = save_samples(samples, path, meta={"sampler": sampler, "steps": steps, "seed": seed, "nfe": score.nfe,
                                                "guidance": args.guidance, "checkpoint": str(args.checkpoint)})
    print(f"{n} samples with {sampler} in {seconds:.1f}s ({score.samples / n:.0f} score evaluations per sample); "
          f"wrote {', '.join(map(str, written))}")
    return 0


def save_samples(samples, path: Path, meta: dict) -> list[Path]:
    """Write ``samples`` as a picture (image grid, or a scatter plot for 2-D points) and a safetensors file."""
    from ..checkpoint import save_tensors
    from ..viz import plot_scatter, save_image_grid

    path = Path(path)
    written = []
    if samples.ndim == 4:
        written.append(save_image_grid(samples, path))
    elif samples.ndim == 2 and samples.shape[1] == 2:
        written.append(plot_scatter({meta.get("sampler", "samples"): samples}, path))
    tensor_path = path.with_suffix(".safetensors")
    save_tensors({"samples": samples}, tensor_path, meta)
    return [*written, tensor_path]
