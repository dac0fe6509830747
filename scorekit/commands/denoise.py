"""``scorekit denoise``: Noise2Score on image files (a file or a folder in, the same out).

Reads PNG (8- or 16-bit), TIFF and ``.npy``; integer images are scaled to [0, 1] by their bit depth,
float images are taken as [0, 1] intensities. Writes by the output's extension: ``.png`` 8-bit (or
16-bit with ``--bits 16``), ``.tif``/``.tiff`` and ``.npy`` float32 (unclipped).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from ..noise2score import NOISE_MODELS, Noise2Score, ScoreUNet, check_level
from ..training import TrainConfig

__all__ = ["add_parser", "run", "read_image", "write_image", "IMAGE_SUFFIXES"]

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".npy")
LEVEL_FLAGS = {"gaussian": "sigma", "poisson": "zeta", "gamma": "k"}


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``denoise`` on an ``argparse`` sub-parser collection and return its parser."""
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
    p.add_argument("--sigma", type=float, help="Gaussian noise std in 8-bit units: 25 means 25/255 of the range")
    p.add_argument("--zeta", type=float, help="Poisson scale in [0, 1] intensity units: y = zeta Poisson(x / zeta)")
    p.add_argument("--k", type=float, help="Gamma noise shape: y = x Gamma(k, 1/k)")
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


def read_image(path: Path) -> torch.Tensor:
    """An image file as float32 ``(C, H, W)``: integer data divided by its maximum (255, 65535), floats as is."""
    suffix = path.suffix.lower()
    if suffix == ".npy":
        arr = np.load(path, allow_pickle=False)
    elif suffix in (".tif", ".tiff"):
        import tifffile

        arr = tifffile.imread(path)
    elif suffix == ".png":
        from PIL import Image

        with Image.open(path) as im:
            arr = np.array(im)
            if im.mode.startswith("I"):  # 16-bit PNG; older Pillow reads it as int32 ("I")
                arr = arr.astype(np.uint16)
    else:
        raise ValueError(f"{path}: unsupported image format {suffix!r}; use one of {list(IMAGE_SUFFIXES)}")
    if arr.ndim == 3 and arr.shape[-1] in (2, 4):  # drop alpha
        arr = arr[..., :-1]
    if arr.ndim == 3 and arr.shape[-1] in (1, 3):
        arr = arr.transpose(2, 0, 1)
    elif arr.ndim == 2:
        arr = arr[None]
    else:
        raise ValueError(f"{path}: expected a grayscale or RGB image, got an array of shape {arr.shape}")
    if np.issubdtype(arr.dtype, np.integer):
        arr = arr.astype(np.float32) / np.iinfo(arr.dtype).max
    elif np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float32)
    else:
        raise ValueError(f"{path}: unsupported pixel type {arr.dtype}")
    return torch.from_numpy(np.ascontiguousarray(arr))


def write_image(path: Path, image: torch.Tensor, bits: int = 8) -> None:
    """Write ``(C, H, W)`` by extension: PNG clipped to [0, 1] and quantised to ``bits``, TIFF/npy as float32."""
    from ..checkpoint import atomic_path

    suffix = path.suffix.lower()
    arr = image.detach().cpu().float().numpy()
    arr = arr[0] if arr.shape[0] == 1 else arr.transpose(1, 2, 0)
    with atomic_path(path) as tmp:
        if suffix == ".png":
            from PIL import Image

            top = 2**bits - 1
            q = np.round(np.clip(arr, 0, 1) * top).astype(np.uint8 if bits == 8 else np.uint16)
            Image.fromarray(q).save(tmp, format="PNG")
        elif suffix in (".tif", ".tiff"):
            import tifffile

            tifffile.imwrite(tmp, arr.astype(np.float32))
        elif suffix == ".npy":
            with open(tmp, "wb") as f:
                np.save(f, arr.astype(np.float32))
        else:
            raise ValueError(f"{path}: unsupported output format {suffix!r}; use one of {list(IMAGE_SUFFIXES)}")


def _pairs(src: Path, dst: Path) -> list[tuple[Path, Path]]:
    """(input, output) files: one pair for a file, one per image for a folder (same names in ``dst``)."""
    if src.is_dir():
        files = sorted(p for p in src.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in folder {src}")
        if dst.suffix.lower() in IMAGE_SUFFIXES:
            raise ValueError(f"input {src} is a folder, so the output must be a folder too, got {dst}")
        return [(f, dst / f.name) for f in files]
    if not src.is_file():
        raise FileNotFoundError(f"no such input image or folder: {src}")
    return [(src, dst)]


def _level(args: argparse.Namespace) -> float | None:
    """The noise level from the flag that belongs to ``--noise`` (8-bit sigma converted to [0, 1] units)."""
    own = LEVEL_FLAGS[args.noise]
    for noise, flag in LEVEL_FLAGS.items():
        if flag != own and getattr(args, flag) is not None:
            raise ValueError(f"--{flag} is the {noise} noise level; for --noise {args.noise} use --{own}")
    value = getattr(args, own)
    if value is None:
        return None
    check_level(args.noise, value)
    return value / 255 if args.noise == "gaussian" else value


def run(args: argparse.Namespace) -> int:
    """Denoise ``args.input`` into ``args.output``; returns 0 on success (errors raise with a message)."""
    level = _level(args)
    if args.checkpoint is None and not args.fit:
        raise ValueError("no model: pass --checkpoint PATH (a trained Noise2Score model) or --fit to learn one from the inputs")
    if args.save_checkpoint is not None and not args.fit:
        raise ValueError("--save-checkpoint saves what --fit learns; add --fit")
    pairs = _pairs(args.input, args.output)
    images = [read_image(src) for src, _ in pairs]
    channels = {img.shape[0] for img in images}
    if len(channels) != 1:
        raise ValueError(f"the inputs mix channel counts {sorted(channels)}; denoise grayscale and RGB images separately")

    if args.checkpoint is not None:
        model = Noise2Score.load(args.checkpoint, noise=args.noise)
    else:
        torch.manual_seed(args.seed)
        # Poisson networks see counts y / zeta; scaling them back by zeta keeps the convolutions' inputs in [0, 1]
        scale = level if args.noise == "poisson" and level is not None else 1.0
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
        used = info["levels"][0]
        shown = f"sigma {used * 255:.1f}/255" if args.noise == "gaussian" else f"{LEVEL_FLAGS[args.noise]} {used:g}"
        note = f", Gamma denominator clamped at {info['clamped_fraction'][0]:.2%} of pixels" if args.noise == "gamma" else ""
        print(f"{src} -> {dst} ({shown}{' estimated' if level is None and model.level is None else ''}{note})")
    return 0
