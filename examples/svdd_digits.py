"""Steer a digits diffusion model toward a non-differentiable reward with SVDD, without fine-tuning.

Trains (or loads from ``--cache``) a small VP score model on scikit-learn's 8x8 digits, then samples
the same initial noise with the pretrained sampler and with SVDD-PM, and writes both grids side by side.
The reward is any ``reward(x0) -> (batch,)``: a built-in name (``digits_compressibility``: minus the PNG
size at the digits' 17 grey levels; ``ink``: pixels brighter than mid-grey) or ``module:function`` /
``file.py:function``.

    OMP_NUM_THREADS=1 python examples/svdd_digits.py --reward ink --candidates 8
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from guidance.rewards import load_reward
from guidance.svdd import SVDD
from samplers import pc_sample
from scorekit import VPSDE, ScoreModel
from scorekit.data import load_digits
from scorekit.losses import make_dsm_loss
from scorekit.nets import MLP
from scorekit.training import TrainConfig, Trainer
from scorekit.viz import save_image_grid


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reward", default="digits_compressibility", help="built-in name, module:function or file.py:function")
    p.add_argument("--candidates", type=int, default=8, help="M, candidates per step")
    p.add_argument("--alpha", type=float, default=0.0, help="selection temperature (0 = argmax)")
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--train_steps", type=int, default=2000)
    p.add_argument("--cache", type=Path, default=Path("outputs/svdd_digits"))
    args = p.parse_args()

    sde = VPSDE()
    torch.manual_seed(0)
    model = ScoreModel(MLP((1, 8, 8), hidden=256, depth=3), sde, prediction="eps")
    config = TrainConfig(steps=args.train_steps, batch_size=128, lr=1e-3, warmup=100, checkpoint_every=0)
    trainer = Trainer(model, make_dsm_loss(sde), load_digits("train")[0], config, out_dir=args.cache / "score")
    trainer.train()  # resumes from the cache when it is complete
    model = trainer.ema.eval().requires_grad_(False)

    reward = load_reward(args.reward)
    rows = {}
    for name, guidance in (("pretrained", []), ("svdd", [SVDD(reward, args.candidates, args.alpha, seed=0)])):
        x = pc_sample(model, sde, (args.samples, 1, 8, 8), predictor="reverse_diffusion", corrector=None,
                      steps=args.steps, guidance=guidance, generator=torch.Generator().manual_seed(1))
        rows[name] = x
        r = reward(x)
        print(f"{name:>10}: reward median {float(r.median()):.2f}, mean {float(r.mean()):.2f}")
    path = save_image_grid(torch.cat([rows["pretrained"], rows["svdd"]]), args.cache / "pretrained_vs_svdd.png",
                           nrow=args.samples // 4 if args.samples >= 16 else args.samples)
    print(f"grid (top half pretrained, bottom half SVDD, same initial noise): {path}")


if __name__ == "__main__":
    main()
