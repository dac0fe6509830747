"""Pictures a person would rather look at than read: image grids, loss curves, 2-D scatter plots, and the
markdown tables of metrics that go with them."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .checkpoint import atomic_path

__all__ = ["image_grid", "save_image_grid", "save_image_panels", "plot_loss", "plot_scatter", "metrics_table"]


def image_grid(x: Tensor, nrow: int | None = None, value_range: tuple[float, float] = (-1.0, 1.0),
               pad: int = 1, scale: int = 1) -> np.ndarray:
    """Tile a batch ``(B, C, H, W)`` into one uint8 image ``(rows*(H+pad)+pad, cols*(W+pad)+pad[, C])``."""
    if x.ndim != 4:
        raise ValueError(f"expected images of shape (B, C, H, W), got {tuple(x.shape)}")
    lo, hi = value_range
    x = ((x.detach().float().cpu() - lo) / (hi - lo)).clamp(0, 1)
    if scale > 1:
        x = x.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    b, c, h, w = x.shape
    cols = nrow or math.ceil(math.sqrt(b))
    rows = math.ceil(b / cols)
    grid = torch.ones(c, rows * (h + pad) + pad, cols * (w + pad) + pad)
    for i in range(b):
        r, q = divmod(i, cols)
        grid[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = x[i]
    arr = (grid * 255).round().byte().permute(1, 2, 0).numpy()
    return arr[..., 0] if c == 1 else arr


def save_image_grid(x: Tensor, path: str | os.PathLike, nrow: int | None = None,
                    value_range: tuple[float, float] = (-1.0, 1.0), scale: int = 4) -> Path:
    """Write a PNG grid of the batch ``x`` (atomically); small images are upscaled by ``scale``."""
    from PIL import Image

    path = Path(path)
    with atomic_path(path) as tmp:
        Image.fromarray(image_grid(x, nrow, value_range, scale=scale)).save(tmp, format="PNG")
    return path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_fig(fig, path: Path, dpi: int = 120) -> Path:
    plt = _pyplot()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return path


def save_image_panels(grids: dict[str, Tensor], path: str | os.PathLike, nrow: int = 10) -> Path:
    """Image grids side by side as a PNG, one panel per entry of ``grids`` (title -> batch ``(B, C, H, W)``)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(grids), figsize=(3.2 * len(grids), 3.4), squeeze=False)
    for ax, (name, x) in zip(axes[0], grids.items()):
        ax.imshow(image_grid(x, nrow=nrow), cmap="gray", vmin=0, vmax=255)
        ax.set_title(name, fontsize=10)
        ax.axis("off")
    fig.tight_layout()
    return _save_fig(fig, Path(path), dpi=110)


def plot_loss(history: Sequence[float], path: str | os.PathLike, title: str = "training loss",
              window: int = 50) -> Path:
    """Loss per step (faint) and its running mean over ``window`` steps, log-scaled, as a PNG."""
    plt = _pyplot()
    h = np.asarray(history, dtype=float)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(np.arange(1, len(h) + 1), h, alpha=0.3, lw=0.8, label="per step")
    if len(h) >= window:
        smooth = np.convolve(h, np.ones(window) / window, mode="valid")
        ax.plot(np.arange(window, len(h) + 1), smooth, lw=1.5, label=f"mean of {window}")
    ax.set(xlabel="step", ylabel="loss", title=title)
    if (h > 0).all():
        ax.set_yscale("log")
    ax.legend()
    return _save_fig(fig, Path(path))


def plot_scatter(points: dict[str, Tensor], path: str | os.PathLike, title: str = "",
                 lim: float | None = None) -> Path:
    """Side-by-side 2-D scatter plots, one panel per entry of ``points``."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(points), figsize=(3.2 * len(points), 3.2), squeeze=False)
    for ax, (name, x) in zip(axes[0], points.items()):
        x = x.detach().cpu().numpy()
        ax.scatter(x[:, 0], x[:, 1], s=2, alpha=0.5)
        ax.set_title(name, fontsize=9)
        if lim is not None:
            ax.set(xlim=(-lim, lim), ylim=(-lim, lim))
        ax.set_aspect("equal")
    if title:
        fig.suptitle(title)
    return _save_fig(fig, Path(path))


def metrics_table(rows: dict[str, dict[str, float]], caption: str = "", hidden: Sequence[str] = ("vendi_reference",)
                  ) -> str:
    """A markdown table, one line per entry of ``rows`` (name -> metrics with ``nfe`` per sample and ``seconds``),
    the metrics (all but ``hidden``) in the order of the first row, under ``caption``."""
    keys = next(iter(rows.values())).keys()
    metric_keys = [k for k in keys if k not in ("nfe", "seconds", *hidden)]
    head = "| samples | " + " | ".join(metric_keys) + " | NFE per sample | seconds |"
    lines = [caption, ""] if caption else []
    lines += [head, "|" + "---|" * (len(metric_keys) + 3)]
    for name, r in rows.items():
        vals = " | ".join(f"{r[k]:.3f}" for k in metric_keys)
        lines.append(f"| {name} | {vals} | {r['nfe']:.0f} | {r['seconds']:.1f} |")
    return "\n".join(lines)
