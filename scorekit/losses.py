"""Denoising score matching in continuous time (Song et al. 2021, eq. 7; Song et al. 2021b for the weighting)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .score import ScoreFn
from .sde import SDE, bcast

__all__ = ["dsm_loss", "make_dsm_loss", "REDUCTIONS"]

REDUCTIONS = ("mean", "sum")


def dsm_loss(
    score_fn: ScoreFn,
    sde: SDE,
    x0: Tensor,
    *,
    generator: torch.Generator | None = None,
    eps: float = 1e-5,
    reduce: str = "mean",
    likelihood_weighting: bool = False,
) -> Tensor:
    """Continuous-time denoising score matching, eq. (7) of Song et al. (2021).

    ``t ~ U(eps, T)``, ``x_t = alpha(t) x0 + sigma(t) z`` and the per-sample loss is
    ``lambda(t) || s(x_t, t) + z / sigma(t) ||^2``, reduced over data dimensions by ``reduce``
    (``"mean"`` or ``"sum"``), then averaged over the batch. The default weighting
    ``lambda = sigma^2`` is the reference code's ``|| s sigma + z ||^2``; ``likelihood_weighting``
    uses ``lambda = g(t)^2``, which makes the loss an upper bound on the negative log-likelihood
    (Song et al. 2021b, Theorem 1).
    """
    if reduce not in REDUCTIONS:
        raise ValueError(f"unknown reduce {reduce!r}; valid choices are {list(REDUCTIONS)}")
    if not 0 <= eps < sde.T:
        raise ValueError(f"eps must lie in [0, {sde.T}), got {eps}")
    b = x0.shape[0]
    device = x0.device
    t = torch.rand(b, generator=generator, device=device, dtype=x0.dtype) * (sde.T - eps) + eps
    z = torch.randn(x0.shape, generator=generator, device=device, dtype=x0.dtype)
    mean, std = sde.marginal_prob(x0, t)
    x_t = mean + bcast(std, x0) * z
    score = score_fn(x_t, t)
    if likelihood_weighting:
        g2 = sde.sde(torch.zeros_like(x0), t)[1] ** 2
        per_elem = torch.square(score + z / bcast(std, x0)) * bcast(g2, x0)
    else:
        per_elem = torch.square(score * bcast(std, x0) + z)
    per_elem = per_elem.reshape(b, -1)
    per_sample = per_elem.mean(-1) if reduce == "mean" else per_elem.sum(-1)
    return per_sample.mean()


def make_dsm_loss(sde: SDE, **kwargs) -> Callable[[ScoreFn, Tensor, torch.Generator | None], Tensor]:
    """A ``loss_fn(model, batch, generator)`` for :class:`scorekit.training.Trainer` using :func:`dsm_loss`.

    ``batch`` may be a tensor or a tuple whose first entry is the data (labels are ignored).
    """

    def loss_fn(model: ScoreFn, batch, generator: torch.Generator | None = None) -> Tensor:
        x0 = batch[0] if isinstance(batch, (tuple, list)) else batch
        return dsm_loss(model, sde, x0, generator=generator, **kwargs)

    return loss_fn
