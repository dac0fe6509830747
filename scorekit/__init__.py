"""scorekit: score-based generative modeling through SDEs.

Foundations (SDEs, score models, Tweedie's formula, pretrained diffusers models) live here; samplers
are in the ``samplers`` package and guidance plug-ins in ``guidance``.
"""

from .score import ScoreFn, ScoreModel, tweedie_denoise
from .sde import SDE, SDES, VESDE, VPSDE, DiscreteVPSDE, ReverseSDE, SubVPSDE, make_sde

__version__ = "0.1.0"

__all__ = [
    "SDE",
    "SDES",
    "VPSDE",
    "SubVPSDE",
    "VESDE",
    "DiscreteVPSDE",
    "ReverseSDE",
    "make_sde",
    "ScoreFn",
    "ScoreModel",
    "tweedie_denoise",
    "from_diffusers",
    "save_diffusers",
]


def __getattr__(name: str):
    # diffusers is heavy to import; load the pretrained adapters only when asked for.
    if name in ("from_diffusers", "save_diffusers"):
        from . import pretrained

        return getattr(pretrained, name)
    raise AttributeError(f"module 'scorekit' has no attribute {name!r}")
