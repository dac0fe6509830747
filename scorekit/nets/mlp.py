"""A time-conditioned MLP for low-dimensional data (toy 2-D sets, flattened 8x8 digits)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..validate import int_at_least, non_negative_int, positive, positive_int

__all__ = ["MLP", "sinusoidal_embedding"]


def sinusoidal_embedding(c: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Transformer/DDPM sinusoidal features of the conditioning value ``c`` (shape ``(batch,)``)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=c.device, dtype=torch.float32) / half)
    args = c.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class _Block(nn.Module):
    def __init__(self, hidden: int, emb_dim: int):
        super().__init__()
        self.lin1, self.lin2 = nn.Linear(hidden, hidden), nn.Linear(hidden, hidden)
        self.emb = nn.Linear(emb_dim, hidden)
        self.act = nn.SiLU()

    def forward(self, h: Tensor, e: Tensor) -> Tensor:
        return h + self.lin2(self.act(self.lin1(self.act(h)) + self.emb(e)))


class MLP(nn.Module):
    """Residual MLP ``net(x, c) -> same shape as x`` with a time embedding added in every block.

    ``embedding="sinusoidal"`` suits a step index ``t (N - 1)`` (VP default); ``"fourier"`` uses
    fixed Gaussian random features of scale ``fourier_scale`` and suits ``t`` or ``log sigma`` (VE).
    Inputs of any per-sample shape ``data_shape`` are flattened and reshaped back.
    """

    def __init__(
        self,
        data_shape: int | tuple[int, ...] = 2,
        hidden: int = 256,
        depth: int = 3,
        emb_dim: int = 128,
        embedding: str = "sinusoidal",
        fourier_scale: float = 16.0,
    ):
        super().__init__()
        self.data_shape = (data_shape,) if isinstance(data_shape, int) else tuple(data_shape)
        for d in self.data_shape:
            positive_int(d, "every dimension of data_shape", f"data_shape={self.data_shape}")
        dim = math.prod(self.data_shape)
        if embedding not in ("sinusoidal", "fourier"):
            raise ValueError(f"unknown embedding {embedding!r}; valid choices are ['sinusoidal', 'fourier']")
        hidden = positive_int(hidden, "hidden", "width of the MLP")
        depth = non_negative_int(depth, "depth", "number of residual blocks")
        emb_dim = int_at_least(emb_dim, 2, "emb_dim", "width of the time embedding")
        if emb_dim % 2:
            raise ValueError(f"emb_dim must be even (cosine and sine features), got {emb_dim}")
        fourier_scale = positive(fourier_scale, "fourier_scale", "scale of the Fourier features")
        self.embedding, self.emb_dim = embedding, emb_dim
        if embedding == "fourier":
            self.register_buffer("freqs", torch.randn(emb_dim // 2) * fourier_scale)
        self.temb = nn.Sequential(nn.Linear(emb_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(_Block(hidden, hidden) for _ in range(depth))
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(hidden, dim))
        nn.init.zeros_(self.out[1].weight)
        nn.init.zeros_(self.out[1].bias)

    def _features(self, c: Tensor) -> Tensor:
        if self.embedding == "sinusoidal":
            return sinusoidal_embedding(c, self.emb_dim)
        args = 2 * math.pi * c.float()[:, None] * self.freqs[None]
        return torch.cat([torch.sin(args), torch.cos(args)], dim=-1)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        e = self.temb(self._features(c).to(x.dtype))
        h = self.inp(x.reshape(x.shape[0], -1))
        for block in self.blocks:
            h = block(h, e)
        return self.out(h).reshape(x.shape)
