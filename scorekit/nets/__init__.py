"""Small score networks: :class:`MLP` for low-dimensional data, :func:`make_unet` for images."""

from .mlp import MLP, sinusoidal_embedding
from .unet import make_unet

__all__ = ["MLP", "make_unet", "sinusoidal_embedding"]
