"""Predictors of the predictor-corrector sampler (Song et al. 2021, Sec. 4.2, App. E-G).

A predictor takes one step of the reverse-time SDE (eq. 6) from ``t`` down to ``t_next < t``:
``predictor(score_fn, sde, x, t, t_next, generator) -> (x_next, x_mean)``, where ``x_mean`` is the
step without its noise (the noise-free last step returns it). ``t`` and ``t_next`` are scalars or
tensors of shape ``(batch,)``; the functions are batch-agnostic. ``t_next = 0`` is the data.

The reference code ties the discrete steps to ``N`` (``dt = -1/N``, ``beta_i``, ``sigma_i``), which is
only right when sampling with ``N`` steps. Here every coefficient is derived from ``t`` and ``t_next``
(:meth:`SDE.discretize_step`), so any number of steps discretizes the same process. For host times (the
samplers pass their grid's numbers) the coefficients are host numbers, and a step's tensor work is the few
fused passes that apply them to the state.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from scorekit.score import score_time, tweedie_denoise
from scorekit.sde import SDE, VESDE, VPSDE, DiscreteVPSDE, as_coeff, as_time, batch_time, bcast, lib_for

from ._common import ScoreFn, add_scaled, randn_like
from .generators import StackedGenerator

__all__ = ["euler_maruyama", "reverse_diffusion", "ancestral", "PREDICTORS", "Predictor"]

Predictor = Callable[..., tuple[Tensor, Tensor]]


def euler_maruyama(
    score_fn: ScoreFn, sde: SDE, x: Tensor, t, t_next, generator: torch.Generator | StackedGenerator | None = None
) -> tuple[Tensor, Tensor]:
    """Euler-Maruyama on the reverse SDE: ``x + (f - g^2 s) dt + g sqrt(-dt) z`` with ``dt = t_next - t``."""
    if _at_zero_snr(sde, t):
        raise ValueError("euler_maruyama cannot step from T on a zero-terminal-SNR table: the reverse SDE's drift "
                         "is infinite there (beta(T) = inf); use the 'ancestral' or 'reverse_diffusion' predictor")
    t, t_next = batch_time(t, x, sde.T), batch_time(t_next, x, sde.T)
    dt = t_next - t
    drift, g = sde.reverse(score_fn).sde(x, t)
    x_mean = torch.addcmul(x, drift, bcast(dt, x))
    return torch.addcmul(x_mean, bcast(g * torch.sqrt(-dt), x), randn_like(x, generator)), x_mean


def reverse_diffusion(
    score_fn: ScoreFn, sde: SDE, x: Tensor, t, t_next, generator: torch.Generator | StackedGenerator | None = None
) -> tuple[Tensor, Tensor]:
    """Reverse diffusion (App. E): ``x - f + G^2 s + G z``, where ``x_t = x_{t_next} + f + G z`` forward."""
    f, G = sde.discretize_step(x, t, t_next)
    G = bcast(G, x)
    # addcmul: one pass per update instead of a product and a sum (the sampler's own cost beside the network)
    x_mean = torch.addcmul(x - f, G**2, score_fn(x, score_time(score_fn, x, t, sde.T)))
    return torch.addcmul(x_mean, G, randn_like(x, generator)), x_mean


def ancestral(
    score_fn: ScoreFn, sde: SDE, x: Tensor, t, t_next, generator: torch.Generator | StackedGenerator | None = None
) -> tuple[Tensor, Tensor]:
    """Ancestral sampling (App. F): DDPM's step for VP, SMLD's for VE.

    VP: ``(x + beta s) / sqrt(1 - beta) + sqrt(beta) z``; VE: ``x + (sigma^2 - sigma'^2) s +
    sqrt(sigma'^2 (sigma^2 - sigma'^2) / sigma^2) z``, with ``sigma = sigma(t)``,
    ``sigma' = sigma(t_next)`` and ``beta`` from :meth:`VPSDE.step_variance`.

    The VP mean equals DDPM's posterior mean (Ho et al. 2020, eq. 7) written through the score; from
    a zero-terminal-SNR ``T`` (``alpha(T) = 0``, so ``beta = 1`` and the score form is ``0 / 0``) it is
    taken in the posterior's ``x0`` form, ``alpha(t_next) x0_hat``, with ``x0_hat`` from the model's
    :func:`~scorekit.tweedie_denoise`; the variance stays ``beta``.
    """
    if not isinstance(sde, (VPSDE, DiscreteVPSDE, VESDE)):
        raise ValueError(
            "the ancestral predictor is defined for VPSDE and DiscreteVPSDE (DDPM) and VESDE (SMLD), "
            f"not {type(sde).__name__}; "
            "use 'reverse_diffusion' or 'euler_maruyama'"
        )
    at_zero_snr = _at_zero_snr(sde, t)  # on the time as given: the samplers pass host numbers
    t, t_next = as_time(t, x, sde.T), as_time(t_next, x, sde.T)
    # beta for VP, sigma^2 - sigma'^2 for VE: a host number for host times
    step = as_coeff(sde.step_variance(t, t_next), x)
    sqrt = lib_for(step).sqrt
    if at_zero_snr:
        x_mean = bcast(sde.marginal_coeffs(t_next)[0], x) * tweedie_denoise(score_fn, sde, x, t)
        return add_scaled(x_mean, sqrt(step), randn_like(x, generator)), x_mean
    score = score_fn(x, score_time(score_fn, x, t, sde.T))
    if not sde.variance_exploding:
        x_mean = add_scaled(x, step, score).div_(sqrt(1 - step))
        std = sqrt(step)
    else:
        sigma2 = bcast(sde.sigma(t) ** 2, x)
        x_mean = add_scaled(x, step, score)
        std = sqrt((sigma2 - step) * step / sigma2)
    return add_scaled(x_mean, std, randn_like(x, generator)), x_mean


def _at_zero_snr(sde: SDE, t) -> bool:
    """Whether a step starts at the ``T`` of a zero-terminal-SNR table (reads ``t`` only for such tables)."""
    if not getattr(sde, "zero_terminal_snr", False):
        return False
    return bool((torch.as_tensor(t) >= sde.T).any())


PREDICTORS: dict[str, Predictor] = {
    "euler_maruyama": euler_maruyama,
    "reverse_diffusion": reverse_diffusion,
    "ancestral": ancestral,
}
