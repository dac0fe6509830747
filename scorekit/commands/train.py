"""``scorekit train --config configs/digits_vp.yaml``: denoising score matching on accelerate."""

from __future__ import annotations

import argparse
from pathlib import Path

from . import add_config_args, load_run_config


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("train", help="train a score model (denoising score matching)",
                              description=__doc__)
    add_config_args(p)
    return p


def run(args: argparse.Namespace) -> int:
    from ..config import build_trainer
    from ..viz import plot_loss

    cfg = load_run_config(args)
    trainer = build_trainer(cfg)
    trainer.train()
    if trainer.is_main:
        path = plot_loss(trainer.history, Path(cfg.out_dir) / "loss.png", title=f"DSM loss ({cfg.sde.name}, {cfg.data.name})")
        print(f"trained {trainer.step} steps; checkpoints in {Path(cfg.out_dir) / 'checkpoints'}; loss curve {path}")
    trainer.accelerator.end_training()  # leaves the process group (torchrun) before exit, as accelerate asks
    return 0
