"""Sampling a saved model from end to end, as ``scorekit sample`` does: load a run or a diffusers pipeline,
build guidance plug-ins by name, draw samples in batches with a named sampler, write them.

The samplers and plug-ins live in the ``samplers`` and ``guidance`` packages; this module imports them
only inside its functions (``scorekit`` never imports them at module level).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .config import SampleConfig, load_score_model
from .validate import positive_int

__all__ = ["SAMPLERS", "GUIDANCE", "GuidanceOptions", "build_guidance", "load_model", "sampler_steps",
           "draw_samples", "save_samples"]

SAMPLERS = ("pc", "ode", "dpm_solver_2m")


@dataclass
class GuidanceOptions:
    """Settings of the plug-ins :data:`GUIDANCE` builds (``scorekit sample``'s guidance flags)."""

    classifier: str | None = None  # a trained (minority) classifier checkpoint
    target: int | None = None  # class for ``classifier``
    target_level: int | None = None  # minority level for ``minority`` (L-1: most unique, 0: most common)
    scale: float = 1.0  # guidance scale w
    reward: str | None = None  # reward for ``svdd``: a built-in, module:function or file.py:function
    candidates: int = 8  # SVDD candidates per step (M)
    alpha: float = 0.0  # SVDD temperature (0: argmax)
    seed: int | None = None


def _same_sde(guidance, model):
    if guidance.sde is not None and guidance.sde != model.sde:
        raise ValueError(f"the classifier was trained on {guidance.sde!r} but the model uses {model.sde!r}; "
                         "train the classifier on the model's SDE")
    return guidance


def _classifier(opts: GuidanceOptions, model, device):
    from guidance import ClassifierGuidance

    if opts.classifier is None or opts.target is None:
        raise ValueError("--guidance classifier needs --classifier PATH and --target CLASS")
    return _same_sde(ClassifierGuidance.load(opts.classifier, target=opts.target, scale=opts.scale, device=device),
                     model)


def _minority(opts: GuidanceOptions, model, device):
    from guidance import MinorityGuidance

    if opts.classifier is None or opts.target_level is None:
        raise ValueError("--guidance minority needs --classifier PATH (a minority classifier) and --target-level L")
    return _same_sde(MinorityGuidance.load(opts.classifier, target_level=opts.target_level, scale=opts.scale,
                                           device=device), model)


def _self_minority(opts: GuidanceOptions, model, device):
    from guidance import SelfMinorityGuidance

    generator = None if opts.seed is None else torch.Generator(device).manual_seed(opts.seed + 1)
    return SelfMinorityGuidance(model, model.sde, scale=opts.scale, generator=generator)


def _svdd(opts: GuidanceOptions, model, device):
    from guidance import SVDD, load_reward

    if opts.reward is None:
        raise ValueError("--guidance svdd needs --reward SPEC: a built-in (compressibility, ink), module:function "
                         "or file.py:function, a reward of the clean sample returning shape (batch,)")
    return SVDD(load_reward(opts.reward), num_candidates=opts.candidates, alpha=opts.alpha, seed=opts.seed)


# Plug-ins a user picks by name: name -> builder(options, model, device).
GUIDANCE: dict[str, Callable] = {"classifier": _classifier, "minority": _minority, "self_minority": _self_minority,
                                 "svdd": _svdd}


def build_guidance(names: Sequence[str], model, options: GuidanceOptions, device: str | torch.device = "cpu") -> list:
    """The plug-ins named in ``names``, in order, for ``model``."""
    unknown = [n for n in names if n not in GUIDANCE]
    if unknown:
        raise ValueError(f"unknown guidance {unknown}; valid names are {sorted(GUIDANCE)}")
    return [GUIDANCE[name](options, model, device) for name in names]


def load_model(path: str | os.PathLike, ema: bool = True, device: str | torch.device = "cpu"):
    """``(score_model, sampling_config)`` from a scorekit run directory or a diffusers pipeline directory
    (whose sampling settings are the defaults, ending at the SDE's ``sampling_eps``)."""
    if (Path(path) / "model_index.json").is_file():
        from .pretrained import from_diffusers

        model = from_diffusers(path).to(device).eval().requires_grad_(False)
        return model, SampleConfig(eps=model.sde.sampling_eps)
    model, run = load_score_model(path, ema=ema, device=device)
    return model, run.sampling


def sampler_steps(cfg: SampleConfig, steps: int | None = None) -> int | None:
    """``steps``, or the default of ``cfg.sampler``: the config's ``steps`` are PC steps; DPM-Solver takes 20 NFE
    and the ``ode`` solver its adaptive grid (``None``)."""
    if steps is not None:
        return steps
    return {"pc": cfg.steps, "dpm_solver_2m": 20}.get(cfg.sampler)


def draw_samples(score_fn, sde, shape: Sequence[int], cfg: SampleConfig, *, steps: int | None = None,
                 guidance: Sequence = (), generator: torch.Generator | None = None,
                 device: str | torch.device = "cpu", progress: bool = False) -> Tensor:
    """``cfg.n`` samples of per-sample ``shape``, drawn in batches of ``cfg.batch_size`` with ``cfg.sampler``
    (``pc``, ``ode`` or ``dpm_solver_2m``), returned on the CPU.

    ``steps`` defaults to :func:`sampler_steps`.
    """
    from samplers import ode_sample, pc_sample

    n = positive_int(cfg.n, "--n", "number of samples")
    batch = positive_int(cfg.batch_size, "--batch_size")
    if cfg.sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {cfg.sampler!r}; valid names are {list(SAMPLERS)}")
    steps = sampler_steps(cfg, steps)
    out = []
    for start in range(0, n, batch):
        b = min(batch, n - start)
        if cfg.sampler == "pc":
            x = pc_sample(score_fn, sde, (b, *shape), predictor=cfg.predictor, corrector=cfg.corrector, snr=cfg.snr,
                          n_corrector_steps=cfg.n_corrector_steps, steps=steps, eps=cfg.eps, guidance=guidance,
                          generator=generator, progress=progress, device=device)
        else:
            method = "dpm_solver_2m" if cfg.sampler == "dpm_solver_2m" else cfg.method
            x = ode_sample(score_fn, sde, (b, *shape), method=method, steps=steps, eps=cfg.eps, rtol=cfg.rtol,
                           atol=cfg.atol, guidance=guidance, generator=generator, device=device)
        out.append(x.cpu())
    return torch.cat(out)


def save_samples(samples: Tensor, path: str | os.PathLike, meta: dict) -> list[Path]:
    """Write ``samples`` as a picture (image grid, or a scatter plot for 2-D points) and a safetensors file."""
    from .checkpoint import save_tensors
    from .viz import plot_scatter, save_image_grid

    path = Path(path)
    written = []
    if samples.ndim == 4:
        written.append(save_image_grid(samples, path))
    elif samples.ndim == 2 and samples.shape[1] == 2:
        written.append(plot_scatter({meta.get("sampler", "samples"): samples}, path))
    tensor_path = path.with_suffix(".safetensors")
    save_tensors({"samples": samples}, tensor_path, meta)
    return [*written, tensor_path]
