"""Sampling a saved model from end to end, as ``scorekit sample`` does: load a run or a diffusers pipeline,
build guidance plug-ins by name, draw samples in batches with a named sampler, write them.

The samplers and plug-ins live in the ``samplers`` and ``guidance`` packages; this module imports them
only inside its functions (``scorekit`` never imports them at module level).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from .config import SampleConfig, load_score_model
from .launch import warn_if_launch_was_not_split
from .validate import non_negative_int, positive_int

__all__ = ["SAMPLERS", "GUIDANCE", "GuidanceOptions", "build_guidance", "load_model", "condition_score",
           "decode_samples", "sampler_steps",
           "draw_samples", "save_samples", "parse_seeds", "Processes", "init_processes", "rank_batches",
           "gather_samples", "to_uint8", "save_outdir"]

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
    # the reward judges decoded images (the identity for pixel models)
    return SVDD(load_reward(opts.reward), num_candidates=opts.candidates, alpha=opts.alpha, seed=opts.seed,
                decode=getattr(model, "decode", None))


# Plug-ins a user picks by name: name -> builder(options, model, device).
GUIDANCE: dict[str, Callable] = {"classifier": _classifier, "minority": _minority, "self_minority": _self_minority,
                                 "svdd": _svdd}


def build_guidance(names: Sequence[str], model, options: GuidanceOptions, device: str | torch.device = "cpu") -> list:
    """The plug-ins named in ``names``, in order, for ``model`` (a score model, or one bound to a conditioning)."""
    unknown = [n for n in names if n not in GUIDANCE]
    if unknown:
        raise ValueError(f"unknown guidance {unknown}; valid names are {sorted(GUIDANCE)}")
    return [GUIDANCE[name](options, model, device) for name in names]


def load_model(path: str | os.PathLike, ema: bool = True, device: str | torch.device = "cpu", *,
               height: int | None = None, width: int | None = None, dtype: torch.dtype | None = None,
               adapter: str | os.PathLike | None = None):
    """``(score_model, sampling_config)`` from a scorekit run directory or a diffusers pipeline directory
    (whose sampling settings are the defaults, ending at the table's first step ``sampling_eps`` with the
    noise-free last step; ``height``/``width``/``dtype`` go to :func:`scorekit.from_diffusers`). ``adapter``
    (a SaRA or peft LoRA directory of ``scorekit finetune``) is applied unmerged: to a pipeline's UNet, or to
    a run's score model (:func:`scorekit.finetune.load_adapter`)."""
    if (Path(path) / "model_index.json").is_file():
        from .pretrained import from_diffusers

        model = from_diffusers(path, height=height, width=width, dtype=dtype, device=device)
        if adapter is not None:
            _apply_adapter(model.net, adapter, device)
        return model.eval().requires_grad_(False), SampleConfig(eps=model.sde.sampling_eps, denoise=True)
    if height is not None or width is not None or dtype is not None:
        raise ValueError(f"--height, --width and --dtype apply to diffusers pipeline directories; {path} is a "
                         "scorekit run, whose sample shape is its training data's")
    model, run = load_score_model(path, ema=ema, device=device)
    if adapter is not None:
        _apply_adapter(model, adapter, device)
    return model, run.sampling


def _apply_adapter(module: torch.nn.Module, adapter: str | os.PathLike, device) -> None:
    from .finetune import load_adapter

    load_adapter(module, adapter).to(device).requires_grad_(False)


def condition_score(model, *, prompt: str | None = None, negative_prompt: str | None = None,
                    guidance_scale: float | None = None, class_label: int | None = None,
                    prompt_2: str | None = None, negative_prompt_2: str | None = None):
    """The score function ``scorekit sample`` draws from: ``model`` itself, or ``model.condition(...)`` with a
    prompt (one for every sample; SDXL also ``prompt_2`` / ``negative_prompt_2`` for its second text encoder) or
    a class label, classifier-free guided when ``guidance_scale > 1``."""
    kwargs: dict = {}
    if negative_prompt is not None and prompt is None:
        raise ValueError("--negative-prompt needs --prompt")
    second = {k: v for k, v in (("prompt_2", prompt_2), ("negative_prompt_2", negative_prompt_2)) if v is not None}
    if second and (prompt is None or not getattr(model, "sdxl", False)):
        raise ValueError("--prompt-2 / --negative-prompt-2 are the second text encoder's prompts of a Stable "
                         "Diffusion XL pipeline and go with --prompt" + ("" if getattr(model, "sdxl", False) else
                                                                         "; this model is not an SDXL pipeline"))
    if prompt is not None:
        if not getattr(model, "text", False):
            raise ValueError("--prompt needs a text-to-image pipeline (one with a tokenizer and a text encoder); "
                             "this model has none")
        kwargs.update(prompt=prompt, negative_prompt=negative_prompt, **second)
    if class_label is not None:
        if getattr(model, "num_classes", None) is None:
            raise ValueError("--class-label needs a class-conditional model (DiT, or a UNet with num_class_embeds); "
                             "this model has no classes")
        kwargs["class_labels"] = [class_label]
    if not kwargs:
        if getattr(model, "requires_condition", False):
            raise ValueError(f"this {type(model.net).__name__} pipeline is conditional: pass "
                             f"{'--prompt TEXT' if getattr(model, 'text', False) else '--class-label K'}")
        if guidance_scale is not None:
            raise ValueError("--guidance-scale is classifier-free guidance: it needs --prompt or --class-label")
        return model
    return model.condition(guidance_scale=guidance_scale, **kwargs)


def decode_samples(model, samples: Tensor, batch_size: int) -> Tensor:
    """Images in [-1, 1] of a latent model's samples (``model.decode``, in batches), on the CPU; pixel models'
    samples are returned as they are."""
    if getattr(model, "autoencoder", None) is None:
        return samples
    device = next(model.parameters()).device
    with torch.no_grad():
        return torch.cat([model.decode(samples[i : i + batch_size].to(device)).float().cpu()
                          for i in range(0, len(samples), batch_size)])


def sampler_steps(cfg: SampleConfig, steps: int | None = None) -> int | None:
    """``steps``, or the default of ``cfg.sampler``: the config's ``steps`` are PC steps; DPM-Solver takes 20 NFE
    and the ``ode`` solver its adaptive grid (``None``)."""
    if steps is not None:
        return steps
    return {"pc": cfg.steps, "dpm_solver_2m": 20}.get(cfg.sampler)


def draw_samples(score_fn, sde, shape: Sequence[int], cfg: SampleConfig, *, steps: int | None = None,
                 guidance: Sequence = (), generator: torch.Generator | None = None,
                 device: str | torch.device = "cpu", progress: bool = False,
                 seeds: Sequence[int] | None = None) -> Tensor:
    """``cfg.n`` samples of per-sample ``shape``, drawn in batches of ``cfg.batch_size`` with ``cfg.sampler``
    (``pc``, ``ode`` or ``dpm_solver_2m``), returned on the CPU.

    ``steps`` defaults to :func:`sampler_steps`. With ``seeds``, sample ``i`` is drawn from its own
    stream seeded ``seeds[i]`` (a :class:`samplers.StackedGenerator` per batch, handed to the plug-ins too through
    ``with_generator``; ``cfg.n`` and ``generator`` are then unused), so it does not depend on the batch size
    (SVDD-R's batch-wide resampling excepted, by its definition).
    """
    from samplers import StackedGenerator, ode_sample, pc_sample

    n = positive_int(cfg.n if seeds is None else len(seeds), "--n", "number of samples")
    batch = positive_int(cfg.batch_size, "--batch_size")
    if cfg.sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {cfg.sampler!r}; valid names are {list(SAMPLERS)}")
    steps = sampler_steps(cfg, steps)
    out = []
    for start in range(0, n, batch):
        b = min(batch, n - start)
        plugins = guidance
        if seeds is not None:
            generator = StackedGenerator(seeds[start : start + b], device)
            # plug-ins that draw random numbers (SVDD's selection, self-guidance's re-noising) take them from the
            # samples' own streams too, or a sample would depend on its batch
            plugins = [g.with_generator(generator) for g in guidance]
        if cfg.sampler == "pc":
            x = pc_sample(score_fn, sde, (b, *shape), predictor=cfg.predictor, corrector=cfg.corrector, snr=cfg.snr,
                          n_corrector_steps=cfg.n_corrector_steps, steps=steps, eps=cfg.eps, guidance=plugins,
                          generator=generator, progress=progress, device=device,
                          denoise=cfg.denoise is None or cfg.denoise)
        else:
            method = "dpm_solver_2m" if cfg.sampler == "dpm_solver_2m" else cfg.method
            x = ode_sample(score_fn, sde, (b, *shape), method=method, steps=steps, eps=cfg.eps, rtol=cfg.rtol,
                           atol=cfg.atol, guidance=plugins, generator=generator, device=device, progress=progress,
                           denoise=bool(cfg.denoise))
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


# -- per-sample seeds, several processes, the FID tools' layout -------------------------------------
def parse_seeds(spec: str) -> list[int]:
    """The seeds of ``--seeds``: comma-separated seeds and inclusive ranges, ``"0-49999"`` or ``"0-9,20"``."""
    seeds: list[int] = []
    for part in str(spec).split(","):
        lo, sep, hi = part.strip().partition("-")
        try:
            first, last = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise ValueError(f"--seeds takes seeds >= 0 and ranges A-B separated by commas (0-49999, 0-9,20); "
                             f"got {spec!r}") from None
        non_negative_int(first, "--seeds", "a seed")
        if last < first:
            raise ValueError(f"--seeds range {part.strip()!r} runs backwards; write it low-high")
        seeds.extend(range(first, last + 1))
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds {spec!r} names a seed twice; each seed is one sample")
    return seeds


@dataclass(frozen=True)
class Processes:
    """This process's place among the launcher's processes (one process: rank 0 of 1)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def device(self, requested: str | None) -> str:
        """The device of this process: ``requested``, else CUDA (``cuda:LOCAL_RANK`` under a launcher) or CPU."""
        if requested is not None:
            return requested
        if not torch.cuda.is_available():
            return "cpu"
        return f"cuda:{self.local_rank}" if self.world > 1 else "cuda"

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def gather(self, obj) -> list | None:
        """Every rank's ``obj`` on rank 0 (in rank order), ``None`` elsewhere; one collective, at the end."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world if self.main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def init_processes(device: str | None = None) -> Processes:
    """Join the process group that ``torchrun`` or ``accelerate launch`` describe in the environment
    (``WORLD_SIZE > 1``): gloo on the CPU, NCCL on CUDA. A single process starts nothing. The work is
    split by :func:`rank_batches` and gathered once at the end, so ranks never wait on each other
    mid-run (an adaptive solver may take different numbers of steps on each)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        warn_if_launch_was_not_split("every seed")
        return Processes()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
    procs = Processes(rank, world, local)
    cuda = procs.device(device).startswith("cuda")
    if not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(torch.device(procs.device(device)))
        # a long sampling run reaches the final gather at different times on different ranks
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(hours=12))
    return procs


def rank_batches(items: Sequence, batch_size: int, procs: Processes) -> list:
    """This rank's share of ``items``: the batches of ``batch_size`` dealt round-robin (EDM's split), so a
    rank's batches are those of a one-process run and only the last batch may be short."""
    batches = [list(items[i : i + batch_size]) for i in range(0, len(items), batch_size)]
    return batches[procs.rank :: procs.world]


def gather_samples(samples: Tensor, seeds: Sequence[int], procs: Processes, all_seeds: Sequence[int],
                   shard_dir: str | os.PathLike, nfe: int = 0) -> tuple[Tensor, int] | None:
    """On rank 0, the samples of every rank in the order of ``all_seeds`` and the summed ``nfe`` (other
    ranks: ``None``). Each rank writes its shard to ``shard_dir``; rank 0 reads them after one barrier
    and removes the folder."""
    if procs.world == 1:
        return samples, nfe
    from .checkpoint import load_tensors, save_tensors

    shard_dir = Path(shard_dir)
    save_tensors({"samples": samples, "seeds": torch.tensor(list(seeds), dtype=torch.int64)},
                 shard_dir / f"rank{procs.rank}.safetensors", {"nfe": nfe})
    procs.barrier()
    if not procs.main:
        return None
    parts, seen, total = [], [], 0
    for r in range(procs.world):
        tensors, meta = load_tensors(shard_dir / f"rank{r}.safetensors")
        parts.append(tensors["samples"])
        seen += tensors["seeds"].tolist()
        total += int(meta.get("nfe", 0))
    shutil.rmtree(shard_dir, ignore_errors=True)
    where = {seed: i for i, seed in enumerate(seen)}
    if sorted(where) != sorted(all_seeds):
        raise RuntimeError(f"the ranks' shards in {shard_dir} hold other seeds than asked for; rerun")
    order = torch.tensor([where[s] for s in all_seeds])
    return torch.cat(parts)[order], total


def to_uint8(images: Tensor, value_range: tuple[float, float] = (-1.0, 1.0)) -> Tensor:
    """Images ``(N, C, H, W)`` in ``value_range`` as uint8 ``(N, H, W, C)``, the layout FID tools read."""
    lo, hi = value_range
    x = ((images.detach().float().cpu() - lo) / (hi - lo)).clamp(0, 1)
    return (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def save_pngs(samples: Tensor, seeds: Sequence[int], outdir: str | os.PathLike) -> list[Path]:
    """One PNG per sample, named by its seed (``000123.png``); images ``(N, C, H, W)`` only."""
    from PIL import Image

    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed, img in zip(seeds, to_uint8(samples).numpy()):
        path = outdir / f"{seed:06d}.png"
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(path)
        paths.append(path)
    return paths


def save_outdir(samples: Tensor, outdir: str | os.PathLike) -> Path:
    """``outdir/samples.npz`` with ``arr_0``: uint8 ``(N, H, W, C)`` for images (pytorch-fid, clean-fid and
    torch-fidelity read it), the raw float array for other data."""
    import numpy as np

    from .checkpoint import atomic_path

    arr = to_uint8(samples).numpy() if samples.ndim == 4 else samples.detach().cpu().numpy()
    path = Path(outdir) / "samples.npz"
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, arr_0=arr)
    return path
