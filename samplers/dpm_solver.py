"""DPM-Solver++(2M): a second-order multistep exponential integrator for the probability-flow ODE.

Lu et al. (2022b), "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models",
Alg. 2. Written on the SDE's own ``alpha(t)``, ``sigma(t)`` and log-SNR, so it serves VP, sub-VP and
VE alike. With ``lambda = log(alpha / sigma)`` (half of :meth:`SDE.log_snr`) and the data prediction
``x0(x, t)`` (Tweedie's formula), the exact solution of the ODE from ``s`` to ``t`` is

    x_t = sigma_t / sigma_s x_s + sigma_t int_{lambda_s}^{lambda_t} e^lambda x0 dlambda,

and the solver integrates a linear (2M) or constant (1st order, = DDIM) interpolation of ``x0``
in ``lambda`` exactly.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from tqdm.auto import tqdm

from scorekit.score import tweedie_denoise
from scorekit.sde import SDE

from ._common import ScoreFn

__all__ = ["dpm_solver_2m", "solver_time_grid", "default_time_grid", "TIME_GRIDS"]

TIME_GRIDS = ("time_uniform", "logsnr", "quadratic", "karras")


def default_time_grid(sde: SDE) -> str:
    """The SDE's ``solver_grid``: the grid measured best for DPM-Solver++(2M) (``benchmarks/samplers.py`` on the
    2-D mixture: ``"logsnr"`` for VE, there uniform in ``t`` too, ``"quadratic"`` for VP and sub-VP;
    ``benchmarks/pretrained.py`` on a pretrained pipeline's table: ``"karras"``)."""
    return sde.solver_grid


def solver_time_grid(sde: SDE, steps: int, eps: float, kind: str | None = None, rho: float = 7.0) -> Tensor:
    """``steps + 1`` times from ``T`` down to ``eps`` (float64), spaced by ``kind``
    (``None``: :func:`default_time_grid`):

    - ``"time_uniform"``: uniform in ``t``;
    - ``"logsnr"``: uniform in ``lambda = log(alpha / sigma)`` (DPM-Solver's ``logSNR``);
    - ``"quadratic"``: uniform in ``sqrt(t)`` (DPM-Solver's ``time_quadratic``);
    - ``"karras"``: Karras et al. (2022) eq. 5 on the noise level ``sigma / alpha`` with ``rho``.

    With zero terminal SNR there is no log-SNR or noise level at ``T`` to space from: the first step then leaves
    ``T`` (pure noise, where the data prediction is the network's own) for the table's last finite level,
    ``T (1 - 1/N)``, and the ``"logsnr"`` / ``"karras"`` spacing runs from there.
    """
    kind = default_time_grid(sde) if kind is None else kind
    if kind not in TIME_GRIDS:
        raise ValueError(f"unknown time grid {kind!r}; valid names are {list(TIME_GRIDS)}")
    if kind in ("logsnr", "karras") and getattr(sde, "zero_terminal_snr", False):
        if steps == 1:
            return torch.tensor([sde.T, eps], dtype=torch.float64)
        rest = _spaced(sde, sde.T * (1 - 1 / sde.N), eps, steps - 1, kind, rho)
        return torch.cat([torch.tensor([sde.T], dtype=torch.float64), rest])
    return _spaced(sde, sde.T, eps, steps, kind, rho)


def _spaced(sde: SDE, start: float, end: float, steps: int, kind: str, rho: float) -> Tensor:
    """``steps + 1`` times from ``start`` to ``end`` spaced by ``kind`` (see :func:`solver_time_grid`)."""
    ends = torch.tensor([start, end], dtype=torch.float64)
    u = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
    if kind == "time_uniform":
        return ends[0] + u * (ends[1] - ends[0])
    if kind == "quadratic":
        r = ends.sqrt()
        return (r[0] + u * (r[1] - r[0])) ** 2
    lam = sde.log_snr(ends)
    if kind == "logsnr":
        return sde.t_from_log_snr(lam[0] + u * (lam[1] - lam[0]))
    s = torch.exp(-0.5 * lam) ** (1 / rho)  # sigma / alpha = exp(-lambda), lambda = log_snr / 2
    sigma = (s[0] + u * (s[1] - s[0])) ** rho
    return sde.t_from_log_snr(-2 * torch.log(sigma))


def dpm_solver_2m(
    score_fn: ScoreFn, sde: SDE, x: Tensor, timesteps: Tensor, *, lower_order_final: bool = True,
    progress: bool = False, desc: str = "dpm_solver_2m",
) -> Tensor:
    """Integrate the probability-flow ODE over ``timesteps`` (either direction) with DPM-Solver++(2M).

    One score evaluation per step. The first step is first order (DDIM); each later step uses the
    last two data predictions, ``D = (1 + 1/(2r)) x0_{i-1} - 1/(2r) x0_{i-2}`` with ``r = h_{i-1} / h_i``,
    and ``x_i = sigma_i / sigma_{i-1} x_{i-1} + alpha_i (1 - e^{-h_i}) D``. With ``lower_order_final``
    the last step is first order too, as diffusers does for few steps. The coefficients are host numbers
    computed once from the float64 grid, so the loop never reads the device, and the score is evaluated at
    the grid's host times (:func:`~scorekit.score.score_time`); each update is two or three fused passes.
    """
    ts = timesteps.detach().to("cpu", torch.float64)
    alpha, sigma = (c.tolist() for c in sde.marginal_coeffs(ts))
    lam = (0.5 * sde.log_snr(ts)).tolist()
    ts = ts.tolist()
    n = len(ts) - 1
    x0_prev = None
    for i in tqdm(range(1, n + 1), desc=desc, disable=not progress):
        x0 = tweedie_denoise(score_fn, sde, x, ts[i - 1])
        h = lam[i] - lam[i - 1]
        c_x, c_d = sigma[i] / sigma[i - 1], alpha[i] * -math.expm1(-h)  # x_i = c_x x_{i-1} + c_d D
        if x0_prev is None or (lower_order_final and i == n):  # first order (DDIM): D = x0
            x = torch.add(c_x * x, x0, alpha=c_d)
        else:  # second order (Alg. 2), D's two terms folded into the update's coefficients
            r = (lam[i - 1] - lam[i - 2]) / h
            x = torch.add(c_x * x, x0, alpha=c_d * (1 + 0.5 / r)).sub_(x0_prev, alpha=c_d * 0.5 / r)
        x0_prev = x0
    return x
