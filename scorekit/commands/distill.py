"""``scorekit distill --config configs/distill_digits.yaml --teacher RUN``: f-distill a one-step generator.

The teacher is a run of ``scorekit train`` (its EMA weights by default). The generator and the fake
score start as copies of the teacher; the discriminator is a head on the teacher's features, trained
against the ``data:`` section's samples. The ``distill:`` section is :class:`scorekit.distill.DistillConfig`;
its ``training:`` subsection (steps, batch size, learning rate, EMA, checkpoints) keeps f-distill's defaults
for the keys it does not give. Outputs in ``out_dir``: ``checkpoints/`` (resumable),
``generator.safetensors`` (the EMA generator; :func:`scorekit.distill.load_generator` rebuilds it
without further arguments) and ``samples.png``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from . import add_config_args, load_run_config

__all__ = ["add_parser", "run", "load_distill_config"]  # and DistillRunConfig, on first use


def __getattr__(name: str):
    # The run config lives with the method (scorekit.distill); importing it here at start-up would load
    # torch-heavy modules for every `scorekit` command.
    if name == "DistillRunConfig":
        from ..distill import DistillRunConfig

        return DistillRunConfig
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("distill", help="distil a score model into a one-step generator (f-distill)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p, default_config="configs/distill_digits.yaml")
    p.add_argument("--teacher", default=None, help="run directory of `scorekit train` (overrides teacher)")
    p.add_argument("--divergence", default=None,
                   help="overrides distill.divergence: a name of scorekit.distill.DIVERGENCES (reverse_kl, js, "
                        "forward_kl, ...) or alpha")
    return p


def load_distill_config(args: argparse.Namespace):
    """The :class:`~scorekit.distill.DistillRunConfig` of ``args`` (config file, flags, overrides)."""
    from ..distill import DistillRunConfig

    return load_run_config(args, DistillRunConfig, mixed_precision="distill.training.mixed_precision",
                           seed="distill.training.seed", teacher="teacher", divergence="distill.divergence")


def run(args: argparse.Namespace) -> int:
    import torch

    from ..config import build_data, load_score_model, to_dict
    from ..distill import FDistill
    from ..viz import save_image_grid

    cfg = load_distill_config(args)
    if cfg.teacher is None:
        raise ValueError("no teacher: pass --teacher RUN_DIR (a `scorekit train` output) or set teacher: in the config")
    torch.manual_seed(cfg.distill.training.seed)  # before anything is built, as train and finetune do
    teacher, teacher_cfg = load_score_model(cfg.teacher, ema=cfg.teacher_ema)
    x, _ = build_data(cfg.data)
    meta = {"teacher": str(cfg.teacher), "teacher_run_config": to_dict(teacher_cfg), "distill_config": to_dict(cfg)}
    fd = FDistill(teacher, teacher.sde, config=cfg.distill, data=x, out_dir=cfg.out_dir, meta=meta)
    fd.train()
    if fd.is_main:
        out = Path(cfg.out_dir)
        path = fd.save(out / "generator.safetensors")
        samples = fd.sample(cfg.n_samples, torch.Generator(fd.accelerator.device).manual_seed(cfg.distill.training.seed))
        shown = [f"generator {path}"]
        if samples.ndim == 4:
            shown.append(f"samples {save_image_grid(samples, out / 'samples.png')}")
        print(f"distilled {fd.step} generator steps ({fd.divergence_name}); " + ", ".join(shown))
    fd.accelerator.end_training()  # leaves the process group (torchrun) before exit, as accelerate asks
    return 0
