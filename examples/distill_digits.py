"""Distil a digits score model into a one-step generator with f-distill, then sample from it in one call.

    OMP_NUM_THREADS=1 python examples/distill_digits.py                # trains a small MLP teacher first
    python examples/distill_digits.py --teacher outputs/digits_vp      # a `scorekit train` run (UNet)
    python examples/distill_digits.py --divergence forward_kl --steps 800

The same run from the command line: ``scorekit distill --config configs/distill_digits.yaml --teacher RUN``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from samplers import pc_sample
from scorekit import VPSDE, ScoreModel
from scorekit.data import load_digits
from scorekit.distill import (
    DIVERGENCES,
    DistillConfig,
    DistillTrainConfig,
    FDistill,
    OneStepGenerator,
    load_generator,
)
from scorekit.fd_digits import fd_digits
from scorekit.losses import make_dsm_loss
from scorekit.nets import MLP
from scorekit.training import TrainConfig, Trainer
from scorekit.viz import save_image_grid


def small_teacher(out_dir: Path) -> ScoreModel:
    """An MLP noise-prediction model on the VP SDE, trained once and cached in ``out_dir``."""
    sde = VPSDE()
    torch.manual_seed(0)
    model = ScoreModel(MLP((1, 8, 8), hidden=256, depth=3), sde, prediction="eps")
    cfg = TrainConfig(steps=3000, batch_size=128, lr=2e-3, warmup=100, ema_decay=0.999, checkpoint_every=0)
    trainer = Trainer(model, make_dsm_loss(sde), load_digits("train")[0], cfg, out_dir=out_dir)
    trainer.train()
    return trainer.ema.eval().requires_grad_(False)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", type=Path, default=None, help="a `scorekit train` run (default: a small MLP trained here)")
    p.add_argument("--divergence", default="js", choices=sorted(DIVERGENCES))
    p.add_argument("--steps", type=int, default=400, help="generator updates (each after 5 critic updates)")
    p.add_argument("--out_dir", type=Path, default=Path("outputs/examples/distill_digits"))
    args = p.parse_args()

    if args.teacher is not None:
        from scorekit.config import load_score_model

        teacher = load_score_model(args.teacher)[0]
    else:
        teacher = small_teacher(args.out_dir / "teacher")

    # The generator starts as the teacher network denoising pure noise in one step at t = 0.4, where the
    # eps-to-x0 conversion amplifies network errors by sigma/alpha = 2 rather than 150 at t = T.
    config = DistillConfig(divergence=args.divergence, generator_time=0.4,
                           training=DistillTrainConfig(steps=args.steps, lr=1e-4, batch_size=128, ema_decay=0.99))
    fd = FDistill(teacher, teacher.sde, config=config, data=load_digits("train")[0],
                  out_dir=args.out_dir / args.divergence)
    fd.train()
    path = fd.save(args.out_dir / f"generator_{args.divergence}.safetensors")

    # Reload the generator into a fresh copy of the teacher's architecture and sample in one call.
    generator, _ = load_generator(path, OneStepGenerator.from_teacher(teacher, time=0.4))
    t0 = time.perf_counter()
    x = generator.sample(1000, torch.Generator().manual_seed(0))
    one_step = time.perf_counter() - t0
    t0 = time.perf_counter()
    x_pc = pc_sample(teacher, teacher.sde, (1000, 1, 8, 8), steps=500, generator=torch.Generator().manual_seed(0))
    pc = time.perf_counter() - t0
    real = load_digits("all")[0]
    print(f"FD-digits: one-step {fd_digits(x.clamp(-1, 1), real):.2f} in {one_step:.3f}s, "
          f"teacher PC 1000 NFE {fd_digits(x_pc.clamp(-1, 1), real):.2f} in {pc:.1f}s ({pc / one_step:.0f}x slower)")
    print(f"samples: {save_image_grid(x[:64], args.out_dir / f'samples_{args.divergence}.png')}")


if __name__ == "__main__":
    main()
