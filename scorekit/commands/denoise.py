"""``scorekit denoise``: Noise2Score on image files (a file or a folder in, the same out).

Image formats are those of :mod:`scorekit.images`; the noise models and their level flags are the
objects of :data:`scorekit.noise2score.NOISE_MODELS`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["add_parser", "run"]


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``denoise`` on an ``argparse`` sub-parser collection and return its parser."""
    from ..noise2score import NOISE_MODELS  # the noise models name the level flags

    p = subparsers.add_parser(
        "denoise",
        help="Noise2Score: denoise images with a score learned from noisy images only",
        description=(
            "Noise2Score (Kim & Ye 2021): Tweedie's formula with the score of the noisy images, learned "
            "by AR-DAE from noisy images alone. Give a trained --checkpoint, or --fit to learn the score "
            "from the inputs themselves. Omit the noise level to estimate it (blind mode)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("input", type=Path, help="a noisy image (.png 8/16-bit, .tif, .npy) or a folder of them")
    p.add_argument("output", type=Path, help="output image (format by extension) or folder (input is a folder)")
    p.add_argument("--noise", default="gaussian", choices=list(NOISE_MODELS), help="noise model")
    for model in NOISE_MODELS.values():
        p.add_argument(f"--{model.level_name}", type=float, help=model.flag_help)
    p.add_argument("--checkpoint", type=Path, help="a Noise2Score checkpoint (.safetensors) to denoise with")
    p.add_argument("--fit", action="store_true", help="first learn the score from the noisy inputs (AR-DAE)")
    p.add_argument("--save-checkpoint", type=Path, help="where to save the model --fit learned")
    p.add_argument("--steps", type=int, default=2000, help="--fit: optimizer steps")
    p.add_argument("--batch-size", type=int, default=8, help="--fit: patches per step")
    p.add_argument("--patch-size", type=int, default=48, help="--fit: patch side in pixels")
    p.add_argument("--lr", type=float, default=1e-3, help="--fit: Adam learning rate")
    p.add_argument("--width", type=int, default=48, help="--fit without --checkpoint: U-Net channels")
    p.add_argument("--depth", type=int, default=3, help="--fit without --checkpoint: U-Net poolings")
    p.add_argument("--bits", type=int, default=8, choices=[8, 16], help="bit depth of PNG outputs")
    p.add_argument("--seed", type=int, default=0, help="--fit: random seed")
    p.add_argument("--progress", action="store_true", help="show a progress bar while fitting")
    return p


def run(args: argparse.Namespace) -> int:
    """Denoise ``args.input`` into ``args.output``; returns 0 on success (errors raise with a message)."""
    import torch

    from ..images import image_pairs, read_image, write_image
    from ..noise2score import NOISE_MODELS, Noise2Score, ScoreUNet
    from ..training import TrainConfig

    noise = NOISE_MODELS[args.noise]
    for other in NOISE_MODELS.values():  # only the flag of --noise may be given
        if other is not noise and getattr(args, other.level_name) is not None:
            raise ValueError(
                f"--{other.level_name} is the {other.name} noise level; for --noise {args.noise} use --{noise.level_name}"
            )
    flag = getattr(args, noise.level_name)
    level = None if flag is None else noise.level_from_flag(flag)
    if args.checkpoint is None and not args.fit:
        raise ValueError("no model: pass --checkpoint PATH (a trained Noise2Score model) or --fit to learn one from the inputs")
    if args.save_checkpoint is not None and not args.fit:
        raise ValueError("--save-checkpoint saves what --fit learns; add --fit")
    pairs = image_pairs(args.input, args.output)
    images = [read_image(src) for src, _ in pairs]
    channels = {img.shape[0] for img in images}
    if len(channels) != 1:
        raise ValueError(f"the inputs mix channel counts {sorted(channels)}; denoise grayscale and RGB images separately")

    if args.checkpoint is not None:
        model = Noise2Score.load(args.checkpoint, noise=args.noise)
    else:
        torch.manual_seed(args.seed)
        # networks that see counts y / zeta get them scaled back by zeta, so the convolutions see [0, 1] inputs
        scale = level if noise.counts and level is not None else 1.0
        model = Noise2Score(ScoreUNet(channels.pop(), args.width, args.depth, input_scale=scale), args.noise)
    if args.fit:
        config = TrainConfig(
            steps=args.steps, batch_size=args.batch_size, lr=args.lr, grad_clip=None,
            ema_decay=0.999, seed=args.seed, progress=args.progress, checkpoint_every=0,
        )
        patch = min([args.patch_size] + [min(img.shape[-2:]) for img in images])
        model.fit(images, level, config=config, patch_size=patch)
        if args.save_checkpoint is not None:
            model.save(args.save_checkpoint)
            print(f"saved {args.save_checkpoint}")

    for (src, dst), img in zip(pairs, images):
        out, info = model.denoise(img, level, return_info=True)
        write_image(dst, out, args.bits)
        shown = noise.describe(info["levels"][0])
        estimated = " estimated" if level is None and model.level is None else ""
        note = f", Gamma denominator clamped at {info['clamped_fraction'][0]:.2%} of pixels" if noise.clamps else ""
        print(f"{src} -> {dst} ({shown}{estimated}{note})")
    return 0
