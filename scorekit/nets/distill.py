"""The f-distill discriminators: ``logit(x_t, t)`` estimating ``log p_t(x_t) / q_t(x_t)``.

:class:`TeacherFeatureDiscriminator` is the method's own (a head on frozen teacher features, as in Xu,
Nie & Vahdat 2025); :class:`MLPDiscriminator` serves low-dimensional data without teacher features.
:mod:`scorekit.distill` trains them with the GAN loss and re-exports both.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..score import ScoreModel
from .mlp import sinusoidal_embedding

__all__ = ["MLPDiscriminator", "TeacherFeatureDiscriminator"]


def _time_features(t: Tensor, dim: int) -> Tensor:
    # The step-index scale of the VP reference networks: sinusoidal features of 1000 t.
    return sinusoidal_embedding(1000 * t, dim)


class MLPDiscriminator(nn.Module):
    """``logit(x_t, t)``: an MLP on the flattened noisy sample and sinusoidal features of ``t``.

    For low-dimensional data (the 2-D test mixture), where there are no teacher features to reuse.
    """

    def __init__(self, data_shape: int | tuple[int, ...], hidden: int = 128, depth: int = 3, emb_dim: int = 64):
        super().__init__()
        self.data_shape = (data_shape,) if isinstance(data_shape, int) else tuple(data_shape)
        self.emb_dim = emb_dim
        layers: list[nn.Module] = [nn.Linear(math.prod(self.data_shape) + emb_dim, hidden), nn.SiLU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(hidden, hidden), nn.SiLU()]
        layers.append(nn.Linear(hidden, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        e = _time_features(t, self.emb_dim).to(x.dtype)
        return self.net(torch.cat([x.reshape(x.shape[0], -1), e], dim=1)).squeeze(1)


class TeacherFeatureDiscriminator(nn.Module):
    """``logit(x_t, t) = head(features of the frozen teacher at (x_t, t))`` (f-distill's discriminator).

    The features are the output of the teacher network's submodule ``layer`` (default: the UNet's
    ``mid_block``, or the last residual block of an :class:`~scorekit.nets.MLP`), captured by a forward
    hook. The head is a small conv net averaged over space (image features) or an MLP (vector
    features). The teacher is held by reference, not as a submodule: only the head is trained and saved.
    Gradients flow through the teacher to ``x_t``, which the generator's GAN term needs.
    """

    def __init__(self, teacher: ScoreModel, layer: str | None = None, hidden: int | None = None):
        super().__init__()
        if not isinstance(teacher, ScoreModel):
            raise TypeError(f"TeacherFeatureDiscriminator needs a ScoreModel teacher, got {type(teacher).__name__}; "
                            "for a score function use MLPDiscriminator")
        data_shape = teacher.data_shape
        if data_shape is None:
            raise ValueError("the teacher does not record its data shape; build it with ScoreModel(..., data_shape=...)")
        if layer is None:
            layer = "mid_block" if hasattr(teacher.net, "mid_block") else _last_block(teacher.net)
        object.__setattr__(self, "_teacher", teacher)
        self.layer = layer
        object.__setattr__(self, "_module", teacher.net.get_submodule(layer))
        param = next(teacher.parameters())
        with torch.no_grad():
            probe = self.features(torch.zeros((1, *data_shape), device=param.device, dtype=param.dtype),
                                  torch.full((1,), 0.5, device=param.device, dtype=param.dtype))
        channels = probe.shape[1]
        hidden = hidden or channels
        if probe.ndim == 4:
            groups = math.gcd(hidden, 32)
            self.head = nn.Sequential(nn.Conv2d(channels, hidden, 3, padding=1), nn.GroupNorm(groups, hidden), nn.SiLU(),
                                      nn.Conv2d(hidden, 1, 1))
        elif probe.ndim == 2:
            self.head = nn.Sequential(nn.Linear(channels, hidden), nn.SiLU(), nn.Linear(hidden, 1))
        else:
            raise ValueError(f"teacher layer {layer!r} gives features of shape {tuple(probe.shape)}; "
                             "expected (B, C, H, W) or (B, C)")
        self.head.to(device=param.device, dtype=param.dtype)

    def features(self, x: Tensor, t: Tensor) -> Tensor:
        """The teacher's ``layer`` output at ``(x, t)``."""
        captured: list[Tensor] = []
        handle = self._module.register_forward_hook(lambda _m, _i, out: captured.append(out[0] if isinstance(out, tuple) else out))
        try:
            self._teacher.raw(x, t)
        finally:
            handle.remove()
        return captured[0]

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        out = self.head(self.features(x, t))
        return out.mean(dim=tuple(range(1, out.ndim)))

    def extra_repr(self) -> str:
        return f"layer={self.layer!r}"


def _last_block(net: nn.Module) -> str:
    blocks = getattr(net, "blocks", None)
    if isinstance(blocks, nn.ModuleList) and len(blocks):
        return f"blocks.{len(blocks) - 1}"
    raise ValueError(f"cannot guess which layer of {type(net).__name__} to take features from; pass layer='...'")
