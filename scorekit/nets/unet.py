"""Image networks: a factory over diffusers' ``UNet2DModel`` sized for small images."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..validate import fraction, positive_int

if TYPE_CHECKING:  # diffusers takes seconds to import; only make_unet needs it
    from diffusers import UNet2DModel

__all__ = ["make_unet"]


def make_unet(
    sample_size: int = 8,
    channels: int = 1,
    block_out_channels: tuple[int, ...] = (32, 64, 64),
    layers_per_block: int = 1,
    attention: bool = False,
    time_embedding: str = "positional",
    norm_num_groups: int = 8,
    dropout: float = 0.0,
) -> UNet2DModel:
    """A ``UNet2DModel`` for ``channels x sample_size x sample_size`` images.

    ``time_embedding="positional"`` takes a step index (``ScoreModel(time_input="index")``, VP and
    sub-VP); ``"fourier"`` is diffusers' NCSN++ convention for VE: it takes ``sigma``, embeds
    ``log sigma`` and divides its output by ``sigma`` (``ScoreModel(prediction="score",
    time_input="sigma")``). ``attention`` adds self-attention in the lowest-resolution blocks.
    """
    from diffusers import UNet2DModel

    if time_embedding not in ("positional", "fourier"):
        raise ValueError(f"time_embedding must be 'positional' (VP, sub-VP) or 'fourier' (VE), got {time_embedding!r}")
    sample_size = positive_int(sample_size, "sample_size", "image side in pixels")
    channels = positive_int(channels, "channels", "image channels")
    if isinstance(block_out_channels, (str, bytes, dict)) or not isinstance(block_out_channels, (list, tuple)) \
            or not block_out_channels:
        raise ValueError(f"block_out_channels must be a non-empty list of channel counts, e.g. [32, 64, 64], "
                         f"got {block_out_channels!r}")
    block_out_channels = tuple(positive_int(c, "every entry of block_out_channels") for c in block_out_channels)
    layers_per_block = positive_int(layers_per_block, "layers_per_block")
    norm_num_groups = positive_int(norm_num_groups, "norm_num_groups", "groups of the GroupNorm layers")
    fraction(dropout, "dropout")
    n = len(block_out_channels)
    if sample_size % 2 ** (n - 1):
        raise ValueError(
            f"sample_size={sample_size} cannot be halved {n - 1} times for block_out_channels={block_out_channels}"
        )
    if any(c % norm_num_groups for c in block_out_channels):
        raise ValueError(f"every entry of block_out_channels={block_out_channels} must be divisible by {norm_num_groups}")
    down = ["DownBlock2D"] * n
    up = ["UpBlock2D"] * n
    if attention:
        down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
    return UNet2DModel(
        sample_size=sample_size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        time_embedding_type=time_embedding,
        norm_num_groups=norm_num_groups,
        attention_head_dim=8,
        add_attention=attention,
        dropout=dropout,
    )
