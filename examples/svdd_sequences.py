"""Decode a masked discrete diffusion model for a motif count with SVDD (no gradients, no fine-tuning).

A small x0-predictor is trained on synthetic DNA-like sequences (length 12 over A, C, G, T; a mixture
whose rarest component, 5% of the data, is rich in G), then sequences are drawn by the pretrained
ancestral sampler, by Best-of-N and by SVDD-PM at about the same number of denoiser calls. The reward
is the number of ``GG`` pairs: a count, with no gradient. ``--exact`` uses the mixture's exact
x0-predictor instead of training one.

    OMP_NUM_THREADS=1 python examples/svdd_sequences.py --candidates 8
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from guidance.svdd import SVDD, best_of_n
from samplers import count_nfe
from samplers.masked import masked_sample
from scorekit.discrete import MaskedDenoiser, MaskedDiffusion, imbalanced_sequences, make_masked_loss
from scorekit.training import TrainConfig, Trainer

ALPHABET = "ACGT"


def gg_pairs(x: torch.Tensor) -> torch.Tensor:
    """The number of adjacent ``GG`` pairs in each sequence (G is token 2)."""
    g = x == 2
    return (g[:, 1:] & g[:, :-1]).sum(1).to(torch.get_default_dtype())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--candidates", type=int, default=8)
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--train_steps", type=int, default=1500)
    p.add_argument("--exact", action="store_true", help="use the exact x0-predictor of the data mixture")
    p.add_argument("--cache", type=Path, default=Path("outputs/svdd_sequences"))
    args = p.parse_args()

    data = imbalanced_sequences(length=12)
    diffusion = MaskedDiffusion(vocab_size=4, length=12)
    if args.exact:
        denoiser = data.denoiser(diffusion)
    else:
        torch.manual_seed(0)
        config = TrainConfig(steps=args.train_steps, batch_size=256, lr=3e-3, warmup=50, ema_decay=0.99,
                             checkpoint_every=0)
        trainer = Trainer(MaskedDenoiser(4, 12, hidden=128), make_masked_loss(diffusion),
                          data.sample(20000, torch.Generator().manual_seed(0)), config, out_dir=args.cache)
        trainer.train()
        denoiser = trainer.ema.eval().requires_grad_(False)

    m, n = args.candidates, args.samples
    results = {}
    counted = count_nfe(denoiser)
    results["pretrained"] = masked_sample(counted, diffusion, n, steps=args.steps, generator=torch.Generator().manual_seed(1))
    nfe = {"pretrained": counted.samples / n}
    counted.reset()
    results[f"best-of-{m}"] = best_of_n(
        lambda k: masked_sample(counted, diffusion, k, steps=args.steps, generator=torch.Generator().manual_seed(2)),
        gg_pairs, m, n)[0]
    nfe[f"best-of-{m}"] = counted.samples / n
    counted.reset()
    results[f"SVDD-PM (M={m})"] = masked_sample(counted, diffusion, n, steps=args.steps, guidance=[SVDD(gg_pairs, m, seed=0)],
                                                generator=torch.Generator().manual_seed(1))
    nfe[f"SVDD-PM (M={m})"] = counted.samples / n

    for name, x in results.items():
        r = gg_pairs(x)
        print(f"{name:>14}: GG pairs mean {float(r.mean()):.2f}, median {float(r.median()):.0f}, "
              f"denoiser calls per sample {nfe[name]:.0f}; e.g. {' '.join(''.join(ALPHABET[i] for i in s) for s in x[:3])}")


if __name__ == "__main__":
    main()
