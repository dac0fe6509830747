"""Time-conditioned classifiers of noisy inputs, ``net(x_t, t) -> logits``, for guidance.

Both take the continuous time ``t`` of the SDE (shape ``(batch,)`` or a scalar), like every scorekit
score function, and embed ``t * time_scale`` with sinusoidal features (``time_scale = 999`` matches
the step index ``t (N - 1)`` that VP score models see). ``out_dim`` is the number of logits: the
number of classes or minority levels, or 1 for a value network. Every network records its
constructor arguments in ``.config`` so that :func:`classifier_from_config` can rebuild it from a
checkpoint's metadata.
"""

from __future__ import annotations

from diffusers.models.resnet import ResnetBlock2D
from torch import Tensor, nn

from ..sde import batch_time
from ..validate import positive_int
from .mlp import MLP, sinusoidal_embedding

__all__ = ["MLPClassifier", "ConvClassifier", "make_classifier", "classifier_from_config", "CLASSIFIERS"]


class MLPClassifier(MLP):
    """Residual MLP on flattened inputs, the time embedding added in every block (as :class:`MLP`),
    with a linear head of ``out_dim`` logits."""

    def __init__(
        self,
        data_shape: int | tuple[int, ...] = 2,
        out_dim: int = 2,
        hidden: int = 128,
        depth: int = 3,
        emb_dim: int = 64,
        time_scale: float = 999.0,
    ):
        super().__init__(data_shape, hidden=hidden, depth=depth, emb_dim=emb_dim, embedding="sinusoidal")
        _check_out_dim(out_dim)
        self.out_dim, self.time_scale = int(out_dim), float(time_scale)
        self.config = {"class": "MLPClassifier", "data_shape": list(self.data_shape), "out_dim": self.out_dim,
                       "hidden": hidden, "depth": depth, "emb_dim": emb_dim, "time_scale": self.time_scale}
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(hidden, self.out_dim))

    def forward(self, x: Tensor, t: Tensor | float) -> Tensor:
        _check_input(x, self.data_shape)
        e = self.temb(self._features(batch_time(t, x) * self.time_scale).to(x.dtype))
        h = self.inp(x.reshape(x.shape[0], -1))
        for block in self.blocks:
            h = block(h, e)
        return self.out(h)


class ConvClassifier(nn.Module):
    """A half-UNet encoder for images ``(C, H, W)``: the downsampling path of a diffusion UNet
    (ResNet blocks whose time embedding scales and shifts the normalised features, as ADM's
    ``use_scale_shift_norm``), global average pooling and a linear head of ``out_dim`` logits.

    ADM's noisy classifier (which the minority-guidance code builds on) pools with attention; average
    pooling is its ``pool="adaptive"`` option and suffices for small images. The ResNet blocks are
    diffusers'; strided convolutions downsample.
    """

    def __init__(
        self,
        data_shape: tuple[int, int, int] = (1, 8, 8),
        out_dim: int = 10,
        channels: tuple[int, ...] = (32, 64),
        layers_per_block: int = 1,
        emb_dim: int = 128,
        norm_groups: int = 8,
        dropout: float = 0.0,
        time_scale: float = 999.0,
    ):
        super().__init__()
        data_shape = tuple(data_shape)
        if len(data_shape) != 3:
            raise ValueError(f"ConvClassifier needs image data_shape (C, H, W), got {data_shape}")
        _check_out_dim(out_dim)
        channels = tuple(channels)
        if not channels or any(c % norm_groups for c in channels):
            raise ValueError(f"every entry of channels={channels} must be a positive multiple of norm_groups={norm_groups}")
        if min(data_shape[1:]) % 2 ** (len(channels) - 1):
            raise ValueError(f"images of size {data_shape[1:]} cannot be halved {len(channels) - 1} times "
                             f"for channels={channels}")
        self.data_shape, self.out_dim, self.time_scale = data_shape, int(out_dim), float(time_scale)
        self.emb_dim = emb_dim
        self.config = {"class": "ConvClassifier", "data_shape": list(data_shape), "out_dim": self.out_dim,
                       "channels": list(channels), "layers_per_block": layers_per_block, "emb_dim": emb_dim,
                       "norm_groups": norm_groups, "dropout": dropout, "time_scale": self.time_scale}
        temb = 4 * channels[0]
        self.temb = nn.Sequential(nn.Linear(emb_dim, temb), nn.SiLU(), nn.Linear(temb, temb))
        self.inp = nn.Conv2d(data_shape[0], channels[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        c_in = channels[0]
        for level, c in enumerate(channels):
            for _ in range(layers_per_block):
                self.blocks.append(ResnetBlock2D(in_channels=c_in, out_channels=c, temb_channels=temb,
                                                 groups=norm_groups, dropout=dropout,
                                                 time_embedding_norm="scale_shift"))
                c_in = c
            if level < len(channels) - 1:
                self.blocks.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
        self.head = nn.Sequential(nn.GroupNorm(norm_groups, c_in), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(c_in, self.out_dim))

    def forward(self, x: Tensor, t: Tensor | float) -> Tensor:
        _check_input(x, self.data_shape)
        e = self.temb(sinusoidal_embedding(batch_time(t, x) * self.time_scale, self.emb_dim).to(x.dtype))
        h = self.inp(x)
        for block in self.blocks:
            h = block(h, e) if isinstance(block, ResnetBlock2D) else block(h)
        return self.head(h)


CLASSIFIERS = {"mlp": MLPClassifier, "conv": ConvClassifier}


def make_classifier(data_shape: int | tuple[int, ...], out_dim: int, net: str = "auto", **options) -> nn.Module:
    """A noisy-input classifier for samples of shape ``data_shape`` with ``out_dim`` logits.

    ``net`` is ``"mlp"``, ``"conv"`` or ``"auto"`` (``"conv"`` for images ``(C, H, W)``, else ``"mlp"``);
    ``options`` go to the constructor (:class:`MLPClassifier`, :class:`ConvClassifier`).
    """
    shape = (data_shape,) if isinstance(data_shape, int) else tuple(data_shape)
    if net == "auto":
        net = "conv" if len(shape) == 3 else "mlp"
    if net not in CLASSIFIERS:
        raise ValueError(f"unknown classifier net {net!r}; valid choices are {sorted(CLASSIFIERS)} or 'auto'")
    return CLASSIFIERS[net](shape, out_dim, **options)


def classifier_from_config(config: dict) -> nn.Module:
    """Rebuild a network from its ``.config`` (as stored in a checkpoint), with fresh weights."""
    config = dict(config)
    name = config.pop("class", None)
    classes = {cls.__name__: cls for cls in CLASSIFIERS.values()}
    if name not in classes:
        raise ValueError(f"unknown classifier class {name!r} in the config; known classes are {sorted(classes)}")
    shape = config.pop("data_shape")
    return classes[name](tuple(shape), **config)


def _check_out_dim(out_dim: int) -> None:
    positive_int(out_dim, "out_dim (number of logits)")


def _check_input(x: Tensor, data_shape: tuple[int, ...]) -> None:
    if tuple(x.shape[1:]) != tuple(data_shape):
        raise ValueError(f"x has shape {tuple(x.shape)} but the classifier expects (B, {', '.join(map(str, data_shape))})")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")

