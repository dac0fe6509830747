"""``scorekit train --config configs/digits_vp.yaml``: denoising score matching on accelerate."""

from __future__ import annotations

import argparse

from . import add_config_args, load_run_config


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("train", help="train a score model (denoising score matching)",
                              description=__doc__)
    add_config_args(p)
    return p


def run(args: argparse.Namespace) -> int:
    cfg = load_run_config(args)
    trainer = make_trainer(cfg)
    trainer.train()
    if trainer.is_main:
        from pathlib import Path

        from ..viz import plot_loss

        path = plot_loss(trainer.history, Path(cfg.out_dir) / "loss.png", title=f"DSM loss ({cfg.sde.name}, {cfg.data.name})")
        print(f"trained {trainer.step} steps; checkpoints in {Path(cfg.out_dir) / 'checkpoints'}; loss curve {path}")
    return 0


def make_trainer(cfg):
    """The Trainer of a run config: data, SDE, score model and DSM loss, with the config stored in checkpoints."""
    import torch

    from ..config import build_data, build_score_model, to_dict
    from ..losses import make_dsm_loss
    from ..training import Trainer

    x, _ = build_data(cfg.data)
    sde = cfg.sde.build()
    torch.manual_seed(cfg.training.seed)
    model = build_score_model(cfg.model, sde, tuple(x.shape[1:]))
    loss = make_dsm_loss(sde, reduce=cfg.loss.reduce, likelihood_weighting=cfg.loss.likelihood_weighting, eps=cfg.loss.eps)
    meta = {"run_config": to_dict(cfg), "data_shape": list(x.shape[1:])}
    return Trainer(model, loss, x, cfg.training, out_dir=cfg.out_dir, meta=meta)
