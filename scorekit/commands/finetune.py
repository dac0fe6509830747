"""``scorekit finetune --config configs/finetune_sara.yaml --base RUN --method sara|lora|full``, or
``scorekit finetune --config configs/finetune_sd.yaml --base PIPELINE_DIR --data IMAGEFOLDER --method ...``.

Fine-tunes a score model trained by ``scorekit train`` on new data with denoising score matching, in one
of three ways that share data, steps, seeds and the :class:`~scorekit.training.Trainer` (progress bar,
EMA, atomic checkpoints that resume):

- ``sara``: SaRA sparse adapters (:mod:`scorekit.sara`): the rank penalty is added to the loss at every
  step and the progressive re-selection runs once, after ``sara.progressive_step`` steps;
- ``lora``: LoRA through ``peft`` on the same modules, with the rank chosen so that its trainable
  parameter count is the closest to SaRA's (unless ``lora.r`` is set);
- ``full``: every parameter trains.

Outputs in ``out_dir``: the trainer's ``checkpoints/``, ``merged/`` (a plain checkpoint with the EMA
weights merged, readable by ``scorekit sample`` and :func:`scorekit.config.load_score_model`) and, for
the adapters, ``adapter.safetensors`` and the peft-style directory ``adapter/`` (``scorekit sample --checkpoint BASE
--adapter OUT/adapter`` applies it unmerged). Runs unchanged under ``accelerate launch`` / ``torchrun --nproc_per_node N -m scorekit.cli finetune``
(the progressive re-selection re-wraps the model, so the ranks stay identical). The library side is
:mod:`scorekit.finetune`.

With a diffusers pipeline directory (Stable Diffusion style) as ``--base``, its UNet is fine-tuned on
``--data``, a folder of images with a ``metadata.jsonl`` (``file_name``, ``text``; the image-folder layout of
diffusers' text-to-image scripts), resized and centre-cropped to ``--resolution``; the VAE and text encoder
stay frozen, captions are dropped to the empty prompt with ``finetune.caption_dropout``. Outputs: ``merged/``
(a pipeline directory for ``scorekit sample --checkpoint``) and ``adapter/`` (SaRA or peft LoRA, for
``scorekit sample --checkpoint PIPELINE_DIR --adapter``).
"""

from __future__ import annotations

import argparse

from . import add_config_args, load_run_config

# scorekit.finetune.METHODS (FinetuneConfig checks the method too)
METHODS = ("sara", "lora", "full")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("finetune", help="fine-tune a trained score model (SaRA, LoRA or full)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p, default_config="configs/finetune_sara.yaml")
    p.add_argument("--base", default=None, help="run directory or checkpoint of `scorekit train`, or a diffusers "
                   "pipeline directory (overrides base)")
    p.add_argument("--method", choices=METHODS, default=None, help="overrides method")
    p.add_argument("--data", default=None, help="pipelines: image folder with metadata.jsonl (overrides finetune.images)")
    p.add_argument("--resolution", type=int, default=None, help="pipelines: training image size (finetune.resolution)")
    return p


def run(args: argparse.Namespace) -> int:
    from ..finetune import FinetuneConfig, is_pipeline
    from ..sara import print_trainable_parameters

    cfg = load_run_config(args, FinetuneConfig, base="base", method="method", data="finetune.images",
                          resolution="finetune.resolution")
    if cfg.base is None:
        raise ValueError("no base model: pass --base RUN_DIR (a `scorekit train` output) or set base: in the config")
    trainer, summary, write = (_pipeline_trainer if is_pipeline(cfg.base) else _run_trainer)(cfg)
    if trainer.is_main:
        print(f"fine-tuning {cfg.base} with {summary}")
        print_trainable_parameters(trainer.unwrapped)
    trainer.train()
    if trainer.is_main:
        paths = write()
        shown = ", ".join(f"{k}: {v}" for k, v in paths.items())
        print(f"fine-tuned {trainer.step} steps ({cfg.method}, {summary['trainable']} trainable parameters); {shown}")
    trainer.accelerator.end_training()  # leaves the process group (torchrun) before exit, as accelerate asks
    return 0


def _run_trainer(cfg):
    """``(trainer, summary, write)`` for a ``scorekit train`` run as the base, on its config's ``data:``."""
    from ..config import build_data, load_score_model, to_dict
    from ..finetune import make_finetune_trainer, write_outputs

    if cfg.finetune.images is not None:
        raise ValueError(f"--data IMAGEFOLDER (finetune.images) fine-tunes diffusers pipelines; {cfg.base} is a "
                         "scorekit run, which trains on its config's data: section")
    base, run_cfg = load_score_model(cfg.base, ema=cfg.base_ema)
    x, _ = build_data(cfg.data)
    if tuple(x.shape[1:]) != tuple(base.data_shape):
        raise ValueError(f"the fine-tuning data has shape {tuple(x.shape[1:])} but the base model expects {base.data_shape}")
    base_meta = {"run_config": to_dict(run_cfg), "data_shape": list(base.data_shape)}
    trainer, summary = make_finetune_trainer(cfg, base, x, meta={"base": str(cfg.base)})
    return trainer, summary, lambda: write_outputs(trainer, cfg, base_meta)


def _pipeline_trainer(cfg):
    """``(trainer, summary, write)`` for a diffusers pipeline base, its data encoded on this process's device."""
    from accelerate import PartialState

    from ..finetune import make_pipeline_trainer, prepare_pipeline_data, write_pipeline_outputs
    from ..pretrained import from_diffusers

    f = cfg.finetune
    if f.images is None:
        raise ValueError(f"{cfg.base} is a diffusers pipeline: pass --data IMAGEFOLDER (images and a metadata.jsonl "
                         "with file_name and text) or set finetune.images")
    base = from_diffusers(cfg.base, device=PartialState().device)
    data = prepare_pipeline_data(base, f.images, resolution=f.resolution, latents=f.latents, seed=cfg.training.seed,
                                 batch_size=f.encode_batch_size)
    trainer, summary = make_pipeline_trainer(cfg, base, data, meta={"base": str(cfg.base), "images": str(f.images)})
    return trainer, summary, lambda: write_pipeline_outputs(trainer, cfg, base)
