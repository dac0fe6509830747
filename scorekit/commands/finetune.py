"""``scorekit finetune --config configs/finetune_sara.yaml --base RUN --method sara|lora|full``.

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
the adapters, ``adapter.safetensors`` (SaRA: also the peft-style directory ``adapter/``; :func:`scorekit.sara.load_sara`
reads either). Runs unchanged under ``accelerate launch`` / ``torchrun --nproc_per_node N -m scorekit.cli finetune``
(the progressive re-selection re-wraps the model, so the ranks stay identical). The library side is
:mod:`scorekit.finetune`.
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
    p.add_argument("--base", default=None, help="run directory or checkpoint of `scorekit train` (overrides base)")
    p.add_argument("--method", choices=METHODS, default=None, help="overrides method")
    return p


def run(args: argparse.Namespace) -> int:
    from ..config import build_data, load_score_model, to_dict
    from ..finetune import FinetuneConfig, make_finetune_trainer, write_outputs
    from ..sara import print_trainable_parameters

    cfg = load_run_config(args, FinetuneConfig, base="base", method="method")
    if cfg.base is None:
        raise ValueError("no base model: pass --base RUN_DIR (a `scorekit train` output) or set base: in the config")
    base, run_cfg = load_score_model(cfg.base, ema=cfg.base_ema)
    x, _ = build_data(cfg.data)
    if tuple(x.shape[1:]) != tuple(base.data_shape):
        raise ValueError(f"the fine-tuning data has shape {tuple(x.shape[1:])} but the base model expects {base.data_shape}")
    base_meta = {"run_config": to_dict(run_cfg), "data_shape": list(base.data_shape)}
    trainer, summary = make_finetune_trainer(cfg, base, x, meta={"base": str(cfg.base)})
    if trainer.is_main:
        print(f"fine-tuning {cfg.base} with {summary}")
        print_trainable_parameters(trainer.unwrapped)
    trainer.train()
    if trainer.is_main:
        paths = write_outputs(trainer, cfg, base_meta)
        shown = ", ".join(f"{k}: {v}" for k, v in paths.items())
        print(f"fine-tuned {trainer.step} steps ({cfg.method}, {summary['trainable']} trainable parameters); {shown}")
    return 0
