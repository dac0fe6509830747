"""Inverse problems with an unconditional score (Song et al. 2021, App. I; ``controllable_generation.py``).

Both samplers run :func:`pc_sample` and, after every corrector and predictor update, replace the
known part of the state by the known data diffused to the current time, ``alpha(t) y + sigma(t) z``,
so the unknown part is sampled from the model conditioned on it. After a predictor step the state is
at ``t_next``, so the data is diffused to ``t_next`` (the reference code uses the step's start ``t``).

Replacement conditions on the noised known part ``y_t``, not on ``y`` itself, so it is approximate: a
mode of the unknown part that only the clean ``y`` rules out keeps about its unconditional weight
(``tests/test_inverse.py`` keeps a case on the 2-D mixture).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from scorekit.sde import SDE, batch_time, bcast

from ._common import ScoreFn, check_data, check_sde, prior_sample, randn_like
from .generators import StackedGenerator
from .pc import pc_sample

__all__ = ["inpaint", "colorize", "COLOR_DECOUPLE"]

# Orthonormal map from RGB to a space whose first channel is (r + g + b) / sqrt(3) = sqrt(3) gray,
# the reference's matrix `M` (columns: gray axis, then two chroma axes).
COLOR_DECOUPLE = torch.tensor(
    [
        [1 / math.sqrt(3), -2 / math.sqrt(6), 0.0],
        [1 / math.sqrt(3), 1 / math.sqrt(6), 1 / math.sqrt(2)],
        [1 / math.sqrt(3), 1 / math.sqrt(6), -1 / math.sqrt(2)],
    ],
    dtype=torch.float64,
)


def _projection(
    sde: SDE,
    data: Tensor,
    mask: Tensor,
    generator: torch.Generator | StackedGenerator | None,
    to_latent: Callable[[Tensor], Tensor],
    from_latent: Callable[[Tensor], Tensor],
) -> Callable[[Tensor, Tensor], Tensor]:
    """``project(x, t)``: in the latent space, overwrite the ``mask`` entries with ``data`` diffused to
    ``t``. At ``t = 0`` (the end of the sampler) the data is put back exactly, for VE too."""

    def project(x: Tensor, t) -> Tensor:
        t = batch_time(t, x, sde.T)
        alpha, sigma = sde.marginal_coeffs(t)
        sigma = torch.where(t > 0, sigma, torch.zeros_like(sigma))
        known = bcast(alpha, x) * data + bcast(sigma, x) * randn_like(x, generator)
        latent = to_latent(x)
        return from_latent(latent * (1 - mask) + known * mask)

    return project


def _masked_sample(score_fn, sde, data, mask, generator, to_latent, from_latent, kwargs) -> Tensor:
    if "x_T" in kwargs or "project" in kwargs:
        raise TypeError("inpaint/colorize build x_T and the projection themselves; don't pass x_T or project")
    check_sde(sde, score_fn)
    project = _projection(sde, data, mask, generator, to_latent, from_latent)
    # The reference starts from the raw known data; starting from it diffused to T keeps every
    # state on the schedule.
    x_T = project(prior_sample(sde, data.shape, generator, data.device, data.dtype), sde.T)
    return pc_sample(score_fn, sde, None, x_T=x_T, generator=generator, project=project, **kwargs)


def inpaint(
    score_fn: ScoreFn,
    sde: SDE,
    x: Tensor,
    mask: Tensor,
    *,
    generator: torch.Generator | StackedGenerator | None = None,
    **kwargs,
) -> Tensor:
    """Fill in the entries of ``x`` where ``mask == 0`` given those where ``mask == 1``.

    ``mask`` broadcasts against ``x`` (e.g. ``(1, 1, H, W)``); the entries of ``x`` under ``mask == 0``
    are ignored. Returns samples of ``x``'s shape whose known entries equal ``x`` exactly. Other
    keyword arguments (``predictor``, ``corrector``, ``snr``, ``steps``, ``eps``, ``guidance`` ...) go
    to :func:`pc_sample`.
    """
    check_data(x, "x", finite=False)  # the unknown entries may hold anything
    mask = torch.as_tensor(mask, dtype=x.dtype, device=x.device)
    try:
        torch.broadcast_shapes(mask.shape, x.shape)
    except RuntimeError:
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} does not broadcast against x of shape {tuple(x.shape)}"
        ) from None
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("mask must contain only 0 (unknown) and 1 (known)")
    data = torch.where(mask.bool(), x, torch.zeros_like(x))
    if not bool(torch.isfinite(data).all()):
        raise ValueError("x contains NaN or infinite values where mask == 1 (the known entries)")
    identity = lambda v: v  # noqa: E731
    return _masked_sample(score_fn, sde, data, mask, generator, identity, identity, kwargs)


def colorize(
    score_fn: ScoreFn, sde: SDE, gray: Tensor, *, generator: torch.Generator | StackedGenerator | None = None, **kwargs
) -> Tensor:
    """Sample RGB images ``(B, 3, H, W)`` whose channel mean is the gray image ``gray`` ``(B, 1, H, W)``.

    Inpainting in the orthonormal space of :data:`COLOR_DECOUPLE`, where the gray image fixes the
    first channel (``sqrt(3) gray``) and the two chroma channels are sampled. ``gray`` is in the
    model's data range. Other keyword arguments go to :func:`pc_sample`.
    """
    check_data(gray, "gray")
    if gray.ndim != 4 or gray.shape[1] != 1:
        raise ValueError(f"gray has shape {tuple(gray.shape)}; expected (B, 1, H, W)")
    M = COLOR_DECOUPLE.to(gray.device, gray.dtype)
    to_latent = lambda v: torch.einsum("bihw,ij->bjhw", v, M)  # noqa: E731
    from_latent = lambda v: torch.einsum("bihw,ji->bjhw", v, M)  # noqa: E731  (M^-1 = M^T)
    mask = torch.zeros(1, 3, 1, 1, dtype=gray.dtype, device=gray.device)
    mask[:, 0] = 1
    data = torch.cat([math.sqrt(3) * gray, torch.zeros_like(gray), torch.zeros_like(gray)], dim=1)
    return _masked_sample(score_fn, sde, data, mask, generator, to_latent, from_latent, kwargs)
