"""Correctors of the predictor-corrector sampler: Langevin MCMC at a fixed ``t`` (Song et al. 2021, Alg. 4-5).

``corrector(score_fn, sde, x, t, *, snr, n_steps, generator) -> (x, x_mean)`` runs ``n_steps`` updates
``x <- x + e s + sqrt(2 e) z`` targeting ``p_t``; ``x_mean`` is the last update without its noise.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from scorekit.score import score_time
from scorekit.sde import SDE, as_time, bcast, lib_for

from ._common import ScoreFn, add_scaled, randn_like
from .generators import StackedGenerator, stream_mean

__all__ = ["langevin", "annealed_langevin", "CORRECTORS", "Corrector"]

Corrector = Callable[..., tuple[Tensor, Tensor]]


def _alpha(sde: SDE, t: Tensor | float) -> Tensor | float:
    # Alg. 5 scales the step by alpha_i = 1 - beta_i of the N-step DDPM schedule; the reference code
    # does so for sub-VP too, and uses 1 for VE (Alg. 4). A host number for a host t.
    if sde.variance_exploding:
        return torch.ones_like(t) if torch.is_tensor(t) else 1.0
    return 1 - sde.discrete_beta(t)


def _mean_norm(v: Tensor, generator) -> Tensor:
    return stream_mean(v.reshape(v.shape[0], -1).norm(dim=-1), generator)


def _langevin(score_fn, sde, x, t, n_steps, generator, step_size) -> tuple[Tensor, Tensor]:
    # the step size's coefficients at t (a host number stays one), the score at the time it takes
    t, t_score = as_time(t, x, sde.T), score_time(score_fn, x, t, sde.T)
    x_mean = x
    for _ in range(n_steps):
        score = score_fn(x, t_score)
        z = randn_like(x, generator)
        e = bcast(step_size(score, z, t), x)
        # one pass over the batch per update instead of a product and a sum
        x_mean = add_scaled(x, e, score)
        x = add_scaled(x_mean, lib_for(e).sqrt(2 * e), z)
    return x, x_mean


def langevin(score_fn: ScoreFn, sde: SDE, x: Tensor, t, *, snr: float, n_steps: int = 1,
             generator: torch.Generator | StackedGenerator | None = None) -> tuple[Tensor, Tensor]:
    """Langevin corrector with the step ``e = 2 alpha (snr ||z|| / ||s||)^2`` (Alg. 4 VE, Alg. 5 VP).

    The algorithms are written for one ``x``; for a batch, the norms are averaged over it as in the
    reference code. One step size for the whole batch keeps each update a plain Langevin step: a
    per-sample step that depends on ``z`` or ``x`` changes the chain's stationary law (in two
    dimensions, ``||z|| z`` doubles the noise variance relative to the drift). With a per-sample
    :class:`StackedGenerator` the means are over each sample's own rows (its copies under the tiling
    rule): the rule a batch of one follows, so that a sample does not depend on its batch.
    """

    def step_size(score: Tensor, z: Tensor, t: Tensor | float) -> Tensor:
        score_norm = _mean_norm(score, generator)
        e = 2 * _alpha(sde, t) * (snr * _mean_norm(z, generator) / score_norm) ** 2
        # a vanishing score (e.g. a zero-initialised output layer) leaves the rule without a scale: the
        # step would be infinite, so the chain stays put instead of turning x into NaN; torch.where
        # keeps this off the host (no device sync per corrector step)
        return torch.where(score_norm > 0, e, 0.0)

    return _langevin(score_fn, sde, x, t, n_steps, generator, step_size)


def annealed_langevin(score_fn: ScoreFn, sde: SDE, x: Tensor, t, *, snr: float, n_steps: int = 1,
                      generator: torch.Generator | StackedGenerator | None = None) -> tuple[Tensor, Tensor]:
    """Annealed Langevin dynamics (Song & Ermon 2019) with ``e = 2 alpha (snr sigma(t))^2``, ``sigma(t)``
    the marginal std, as the reference code's ``AnnealedLangevinDynamics``."""

    def step_size(score: Tensor, z: Tensor, t: Tensor | float) -> Tensor | float:
        return 2 * _alpha(sde, t) * (snr * sde.marginal_coeffs(t)[1]) ** 2

    return _langevin(score_fn, sde, x, t, n_steps, generator, step_size)


CORRECTORS: dict[str, Corrector] = {"langevin": langevin, "annealed_langevin": annealed_langevin}
