"""Teach a digits score model new digits with SaRA sparse adapters, then save, reload and merge them.

A small VP score model learns digits 0-4; SaRA then makes the smallest 10% of every weight trainable
and fine-tunes only those entries on digits 5-9, with the nuclear-norm penalty in the loss and one
progressive re-selection halfway. The adapter file holds just the sparse values and their indices;
loaded into a fresh copy of the base model it reproduces the fine-tuned model exactly, and
``with disable_sara(model):`` brings the base model back for a block without unloading anything.

    python examples/finetune_sara.py                    # ~8 min on one CPU thread
    python examples/finetune_sara.py --steps 3000 --out sara_digits.png
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch

from samplers import pc_sample
from scorekit import VPSDE, ScoreModel
from scorekit.data import load_digits
from scorekit.fd_digits import fd_digits
from scorekit.losses import make_dsm_loss
from scorekit.nets import MLP
from scorekit.sara import (
    SaRAConfig,
    apply_sara,
    disable_sara,
    load_sara,
    merge_sara,
    print_trainable_parameters,
    rank_penalty,
    reselect,
    save_sara,
)
from scorekit.training import TrainConfig, Trainer
from scorekit.viz import save_image_grid


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pretrain_steps", type=int, default=3000)
    ap.add_argument("--steps", type=int, default=1500, help="fine-tuning steps")
    ap.add_argument("--fraction", type=float, default=0.1)
    ap.add_argument("--out", default="finetune_sara.png")
    args = ap.parse_args()
    torch.manual_seed(0)
    sde = VPSDE()
    x_old, _ = load_digits("train", classes=[0, 1, 2, 3, 4])
    x_new, _ = load_digits("train", classes=[5, 6, 7, 8, 9])
    dsm = make_dsm_loss(sde)

    # 1. the base model: digits 0-4 only
    base = ScoreModel(MLP((1, 8, 8), hidden=256, depth=3), sde)
    trainer = Trainer(base, dsm, x_old, TrainConfig(steps=args.pretrain_steps, lr=1e-3, warmup=100))
    trainer.train()
    base = trainer.ema

    # 2. SaRA: the smallest-|w| entries of every Linear weight become the only trainable parameters
    config = SaRAConfig(fraction=args.fraction, rank_lambda=5e-4, progressive_step=args.steps // 2)
    model = apply_sara(copy.deepcopy(base), config)
    print_trainable_parameters(model)  # peft's line: trainable params: N || all params: M || trainable%: P

    def loss_fn(model, batch, generator):
        return dsm(model, batch, generator) + rank_penalty(model, generator)  # low-rank constraint

    def progressive(trainer):
        if trainer.step == config.progressive_step:
            reselect(trainer.unwrapped)  # re-select the ineffective entries once, outputs unchanged
            trainer.rebuild_optimizer()

    trainer = Trainer(model, loss_fn, x_new, TrainConfig(steps=args.steps, lr=1e-3), callbacks=[progressive])
    trainer.train()
    model = trainer.ema

    # 3. the adapter alone (a peft-style directory): save, then load into a fresh base model
    path = Path(args.out).with_suffix("")
    save_sara(model, path)
    print(f"adapter: {path}/ ({(path / 'adapter_model.safetensors').stat().st_size / 1024:.0f} KiB of sparse values)")
    reloaded = load_sara(copy.deepcopy(base), path)
    x, t = x_new[:8], torch.full((8,), 0.3)
    assert torch.equal(reloaded(x, t), model(x, t))

    # 4. sample with the adapter on and off, and merge it for deployment
    g = torch.Generator().manual_seed(0)
    # Pixels beyond [-1, 1] are the sampler's overshoot; the digits (and FD-digits) live in [-1, 1].
    new = pc_sample(reloaded, sde, (256, 1, 8, 8), steps=500, generator=g).clamp(-1, 1)
    with disable_sara(reloaded):  # the base model again; re-enabled on leaving the block
        old = pc_sample(reloaded, sde, (256, 1, 8, 8), steps=500, generator=g).clamp(-1, 1)
    plain = merge_sara(reloaded)  # an ordinary ScoreModel with nn.Linear layers again
    ref_new, _ = load_digits("test", classes=[5, 6, 7, 8, 9])
    ref_old, _ = load_digits("test", classes=[0, 1, 2, 3, 4])
    print(f"FD-digits to digits 5-9: adapter on {fd_digits(new, ref_new):.2f}, off {fd_digits(old, ref_new):.2f}")
    print(f"FD-digits to digits 0-4: adapter off {fd_digits(old, ref_old):.2f}")
    print(f"merged model: {type(plain.net.inp).__name__} layers, same outputs: "
          f"{torch.allclose(plain(x, t), model(x, t), atol=0, rtol=0)}")
    save_image_grid(torch.cat([old[:32], new[:32]]), args.out, nrow=16)
    print(f"wrote {args.out} (top: adapter off, bottom: adapter on)")


if __name__ == "__main__":
    main()
