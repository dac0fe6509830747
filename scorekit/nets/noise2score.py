"""The Noise2Score score network ``R(y)``: a compact, un-conditioned U-Net for noisy images."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..validate import positive_int

__all__ = ["ScoreUNet"]


class ScoreUNet(nn.Module):
    """``R(y)``: a compact, un-conditioned U-Net after the Noise2Noise network of the authors' code
    (3x3 convolutions, LeakyReLU(0.1), max-pooling, no normalisation, the input concatenated before the
    last layers), made CPU-sized: ``width`` channels at every scale, ``depth`` poolings (the code: 48
    and 5), and, as in FFDNet (Zhang et al. 2018), the image is first split into ``unshuffle^2``
    sub-sampled channels (``pixel_unshuffle``) so that every convolution runs at reduced resolution;
    the output is re-assembled by ``pixel_shuffle``. Inputs of any size are reflect-padded to a multiple
    of ``unshuffle * 2^depth`` and cropped back. Weights keep PyTorch's default initialisation: the
    code's N(0, 0.02) starts the output orders of magnitude below noisy-image scores (of order
    ``1 / sigma``), which short CPU runs cannot afford to grow into.

    ``input_scale`` multiplies the input before the first convolution (the output, the score, is in the
    input's own units). Poisson networks see counts ``y / zeta`` of order ``1 / zeta``; pass
    ``input_scale=zeta`` so the convolutions see intensities in [0, 1]: with raw counts AR-DAE did not
    get below the noisy input in our CPU runs.
    """

    def __init__(
        self, channels: int = 1, width: int = 48, depth: int = 3, unshuffle: int = 2, input_scale: float = 1.0
    ):
        super().__init__()
        channels, width = positive_int(channels, "channels", "image channels"), positive_int(width, "width")
        depth, unshuffle = positive_int(depth, "depth", "poolings"), positive_int(unshuffle, "unshuffle")
        if not (math.isfinite(input_scale) and input_scale > 0):
            raise ValueError(f"input_scale must be a positive number, got {input_scale}")
        self.config = {
            "channels": channels, "width": width, "depth": depth, "unshuffle": unshuffle, "input_scale": float(input_scale),
        }
        self.depth, self.unshuffle, self.input_scale = depth, unshuffle, float(input_scale)
        c = channels * unshuffle**2

        def conv(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.LeakyReLU(0.1)]

        self.inc = nn.Sequential(*conv(c, width), *conv(width, width))
        self.down = nn.ModuleList(nn.Sequential(*conv(width, width)) for _ in range(depth))
        self.up = nn.ModuleList(nn.Sequential(*conv(2 * width, width), *conv(width, width)) for _ in range(depth))
        self.out = nn.Sequential(*conv(width + c, width), nn.Conv2d(width, c, 3, padding=1))

    def forward(self, y: Tensor) -> Tensor:
        h, w = y.shape[-2:]
        m = self.unshuffle * 2**self.depth
        ph, pw = -h % m, -w % m
        x = y * self.input_scale if self.input_scale != 1.0 else y
        x = F.pad(x, (0, pw, 0, ph), mode="reflect") if ph or pw else x
        x = F.pixel_unshuffle(x, self.unshuffle)
        feat = self.inc(x)
        skips = [feat]
        for block in self.down:
            feat = block(F.max_pool2d(feat, 2))
            skips.append(feat)
        skips.pop()
        for block in self.up:
            feat = block(torch.cat([F.interpolate(feat, scale_factor=2.0, mode="nearest"), skips.pop()], 1))
        out = self.out(torch.cat([feat, x], 1))
        return F.pixel_shuffle(out, self.unshuffle)[..., :h, :w]
