"""Log-likelihoods through the probability-flow ODE (Song et al. 2021, App. D.2; reference ``likelihood.py``).

By the instantaneous change of variables (Chen et al. 2018), along the ODE ``dx/dt = v(x, t)``

    log p_eps(x_eps) = log p_T(x_T) + int_eps^T div v(x_t, t) dt,

solved jointly with the ODE from ``eps`` to ``T``. The divergence is exact (``D`` backward passes,
for low dimensions) or the Hutchinson-Skilling estimate ``e^T (dv/dx) e`` with one Rademacher or
Gaussian probe ``e`` per sample, fixed along the trajectory as in the reference code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from scorekit.sde import SDE

from ._common import CheckedScore, ScoreFn, check_data, check_eps, check_sde, check_shape, randn_like
from .generators import StackedGenerator, rand
from .nfe import count_nfe
from .ode import ADAPTIVE_METHODS, check_tolerances, probability_flow, solve_ode

__all__ = ["likelihood", "bits_per_dim", "Likelihood", "ESTIMATORS"]

ESTIMATORS = ("rademacher", "gaussian", "exact")


@dataclass
class Likelihood:
    """Result of :func:`likelihood`. ``logp``: log-density in nats, shape ``(batch,)``; ``bpd``:
    ``-logp / (D ln 2) + offset`` (``offset`` is 0 for a density, the dequantization term for
    :func:`bits_per_dim`); ``z``: the latent ``x_T``; ``nfe``: score evaluations (batched calls)."""

    logp: Tensor
    bpd: Tensor
    z: Tensor
    nfe: int
    offset: float = 0.0


def _divergence(v: Tensor, x: Tensor, probe: Tensor | None) -> Tensor:
    """``div v`` per sample: exact (``probe is None``) or Hutchinson ``e^T grad(e^T v)``."""
    if probe is not None:
        grad = torch.autograd.grad((v * probe).sum(), x)[0]
        return (grad * probe).reshape(x.shape[0], -1).sum(-1)
    flat_v = v.reshape(x.shape[0], -1)
    div = torch.zeros(x.shape[0], dtype=v.dtype, device=v.device)
    for d in range(flat_v.shape[1]):
        grad = torch.autograd.grad(flat_v[:, d].sum(), x, retain_graph=d + 1 < flat_v.shape[1])[0]
        div = div + grad.reshape(x.shape[0], -1)[:, d]
    return div


def likelihood(
    score_fn: ScoreFn,
    sde: SDE,
    x: Tensor,
    *,
    estimator: str = "rademacher",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    eps: float = 1e-5,
    method: str = "dopri5",
    generator: torch.Generator | StackedGenerator | None = None,
) -> Likelihood:
    """``log p(x)`` of data ``x`` (shape ``(batch, ...)``) under the model's probability-flow ODE.

    ``estimator`` is ``"rademacher"`` or ``"gaussian"`` (Hutchinson-Skilling, unbiased, one probe
    per sample drawn from ``generator``, which may be a per-sample :class:`~samplers.StackedGenerator`)
    or ``"exact"`` (the full Jacobian trace). The ODE is solved
    with an adaptive torchdiffeq ``method`` at ``rtol``/``atol`` from ``eps`` (the reference's
    ``1e-5``) to ``T``. The score is differentiated with respect to ``x``, so it must be differentiable.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; valid names are {list(ESTIMATORS)}")
    if method not in ADAPTIVE_METHODS:
        raise ValueError(
            f"likelihood needs an adaptive ODE method, one of {list(ADAPTIVE_METHODS)}; got {method!r}"
        )
    check_tolerances(rtol, atol)
    check_eps(eps, sde)
    check_sde(sde, score_fn)
    check_data(x, "x")
    check_shape(tuple(x.shape), score_fn)
    checked = CheckedScore(score_fn)
    counter = count_nfe(checked)
    drift = probability_flow(counter, sde)
    probe = None
    if estimator != "exact":
        probe = randn_like(x, generator)
        if estimator == "rademacher":
            probe = torch.sign(probe)  # P(+1) = P(-1) = 1/2

    def augmented(t: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        with torch.enable_grad():
            y = state[0].detach().requires_grad_(True)
            v = drift(y, t.to(y.dtype))
            div = _divergence(v, y, probe)
        return v.detach(), div.detach()

    delta = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    try:
        z, delta = solve_ode(augmented, (x.detach(), delta), eps, sde.T, method=method, rtol=rtol, atol=atol)
    except (AssertionError, RuntimeError):
        checked.check()  # a non-finite score says more than the step-size controller
        raise
    checked.check()
    logp = sde.prior_logp(z) + delta
    D = x[0].numel()
    return Likelihood(logp=logp, bpd=-logp / (D * math.log(2)), z=z, nfe=counter.nfe)


def bits_per_dim(
    score_fn: ScoreFn,
    sde: SDE,
    images: Tensor,
    num_bits: int = 8,
    *,
    data_range: tuple[float, float] = (-1.0, 1.0),
    generator: torch.Generator | StackedGenerator | None = None,
    **kwargs,
) -> Likelihood:
    """Bits per dimension of quantized images, with uniform dequantization (reference ``run_lib``).

    ``images`` are quantized to ``2**num_bits`` levels and scaled to ``data_range``, the range the
    model was trained on (scorekit's convention: ``[-1, 1]``; pass ``(0, 1)`` for a model on
    ``[0, 1]``): level ``k`` sits at ``lo + (hi - lo) k / (2**num_bits - 1)`` (values are rounded to the
    nearest level). Each image is
    dequantized as ``y = (k + u) / 2**num_bits``, ``u ~ U[0, 1)^D``, mapped to ``lo + (hi - lo) y``,
    and ``-log2 p(y) / D`` is offset by the log-volume of one quantization bin,
    ``offset = num_bits - log2(hi - lo)``: 8 for 8-bit ``[0, 1]`` data, 7 for ``[-1, 1]`` data, the
    reference's ``7. - inverse_scaler(-1.)``. ``kwargs`` go to :func:`likelihood`.
    """
    lo, hi = map(float, data_range)
    if not hi > lo:
        raise ValueError(f"data_range must be (low, high) with low < high, got {data_range}")
    levels = 2**num_bits
    k = (images - lo) / (hi - lo) * (levels - 1)
    if bool((k < -1e-3).any() or (k > levels - 1 + 1e-3).any()):
        raise ValueError(
            f"images must lie in data_range {data_range}; got values in "
            f"[{images.min().item():.4g}, {images.max().item():.4g}]"
        )
    u = rand(images.shape, generator, images.device, images.dtype)
    y = lo + (hi - lo) * (k.round() + u) / levels
    result = likelihood(score_fn, sde, y, generator=generator, **kwargs)
    offset = num_bits - math.log2(hi - lo)
    result.bpd = result.bpd + offset
    result.offset = offset
    return result
