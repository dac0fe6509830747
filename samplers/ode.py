"""Sampling and encoding with the probability-flow ODE ``dx/dt = f - 1/2 g^2 score`` (Song et al., eq. 13).

Adaptive (``dopri5``, the paper's RK45 counterpart) and fixed-step (``euler``, ``midpoint``, ``rk4``)
solvers come from torchdiffeq; ``dpm_solver_2m`` is the exponential integrator of
:mod:`samplers.dpm_solver`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from scorekit.sde import SDE

from ._common import (
    ScoreFn,
    check_eps,
    check_shape,
    check_steps,
    guided_score,
    initial_state,
)
from .dpm_solver import dpm_solver_2m, solver_time_grid
from .hooks import Guidance, check_guidance
from .predictors import reverse_diffusion

__all__ = ["ode_sample", "ode_encode", "probability_flow", "solve_ode", "ODE_METHODS"]

ADAPTIVE_METHODS = ("dopri5", "dopri8", "bosh3")
FIXED_METHODS = ("euler", "midpoint", "rk4")
ODE_METHODS = ADAPTIVE_METHODS + FIXED_METHODS + ("dpm_solver_2m",)


def probability_flow(score_fn: ScoreFn, sde: SDE) -> Callable[[Tensor, Tensor], Tensor]:
    """The probability-flow drift ``v(x, t) = f(x, t) - 1/2 g(t)^2 score(x, t)`` (eq. 13)."""
    reverse = sde.reverse(score_fn, probability_flow=True)
    return lambda x, t: reverse.sde(x, t)[0]


def solve_ode(
    func: Callable,
    y0: Tensor | tuple[Tensor, ...],
    t0: float,
    t1: float,
    *,
    method: str = "dopri5",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    steps: int | None = None,
):
    """Solve ``dy/dt = func(t, y)`` from ``t0`` to ``t1`` with torchdiffeq and return ``y(t1)``.

    ``func`` is only ever evaluated inside ``[min(t0, t1), max(t0, t1)]``: torchdiffeq's adaptive
    solvers would otherwise probe past the interval (their initial-step heuristic, and steps that
    overshoot the end and interpolate back), where a VP score is NaN. The last step is pinned to
    ``t1`` (``step_t``) and the first one given (1% of the interval; the controller adapts it). A
    violation raises rather than being clamped.
    """
    from torchdiffeq import odeint  # it loads scipy; only the ODE solves need it

    lo, hi = min(t0, t1), max(t0, t1)
    tol = 1e-6 * max(abs(lo), abs(hi), 1.0)

    def guarded(t: Tensor, y):
        if not lo - tol <= float(t) <= hi + tol:
            raise RuntimeError(f"the ODE solver evaluated t = {float(t):.8g} outside [{lo}, {hi}]")
        return func(t, y)

    if method in FIXED_METHODS:
        if steps is None:
            raise ValueError(f"the fixed-step method {method!r} needs steps=")
        grid = torch.linspace(t0, t1, check_steps(steps, steps) + 1, dtype=torch.float64)
        options = {"grid_constructor": lambda f, y, t: grid.to(t)}
    else:
        options = {"step_t": torch.tensor([t1], dtype=torch.float64), "first_step": 0.01 * (hi - lo)}
    t = torch.tensor([t0, t1], dtype=torch.float64)
    sol = odeint(guarded, y0, t, rtol=rtol, atol=atol, method=method, options=options)
    return tuple(s[-1] for s in sol) if isinstance(sol, tuple) else sol[-1]


def _check_method(method: str, steps: int | None) -> int | None:
    """Validate the method name and return ``steps``: ``None`` for adaptive methods, else a positive int."""
    if method not in ODE_METHODS:
        raise ValueError(f"unknown ODE method {method!r}; valid names are {list(ODE_METHODS)}")
    if method in ADAPTIVE_METHODS:
        if steps is not None:
            raise ValueError(
                f"{method} is adaptive and chooses its own steps (set rtol/atol); steps is for "
                f"{list(FIXED_METHODS) + ['dpm_solver_2m']}"
            )
        return None
    if steps is None:
        raise ValueError(f"method {method!r} takes a fixed number of steps: pass steps=")
    return check_steps(steps, steps)


def _integrate(score: ScoreFn, sde: SDE, x: Tensor, *, t0: float, t1: float, eps: float, method: str, rtol: float,
               atol: float, steps: int | None, time_grid: str | None, lower_order_final: bool) -> Tensor:
    """Carry ``x`` along the probability-flow ODE from ``t0`` to ``t1`` (either direction) with ``method``."""
    if method == "dpm_solver_2m":
        ts = solver_time_grid(sde, steps, eps, time_grid)
        if t0 < t1:
            ts = ts.flip(0)
        return dpm_solver_2m(score, sde, x, ts, lower_order_final=lower_order_final)
    drift = probability_flow(score, sde)
    return solve_ode(
        lambda t, y: drift(y, t.to(y.dtype)), x, t0, t1, method=method, rtol=rtol, atol=atol, steps=steps
    )


@torch.no_grad()
def ode_sample(
    score_fn: ScoreFn,
    sde: SDE,
    shape: tuple[int, ...] | torch.Size | None,
    *,
    method: str = "dopri5",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    steps: int | None = None,
    eps: float = 1e-3,
    denoise: bool = False,
    guidance: Iterable[Guidance] = (),
    x_T: Tensor | None = None,
    generator: torch.Generator | None = None,
    time_grid: str | None = None,
    lower_order_final: bool = True,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Sample by solving the probability-flow ODE (eq. 13) from ``T`` down to ``eps``.

    ``method`` is one of ``ODE_METHODS``: adaptive torchdiffeq solvers (``"dopri5"`` with
    ``rtol``/``atol``, the reference's RK45 setting), fixed-step ones (``"euler"``, ``"midpoint"``,
    ``"rk4"`` with ``steps``) or ``"dpm_solver_2m"`` (``steps`` score evaluations on ``time_grid``,
    one of ``TIME_GRIDS``, default :func:`default_time_grid`; ``lower_order_final`` makes the last
    step first order). ``denoise`` ends with the noise-free reverse-diffusion step from ``eps`` to 0,
    as the reference code. Score-level plug-ins
    apply; step-level ones (SVDD) raise, as the ODE has no stochastic step.
    """
    steps = _check_method(method, steps)
    guidance = check_guidance(guidance, "probability-flow ODE", allowed=("score",))
    check_eps(eps, sde)
    x = initial_state(sde, shape, x_T, score_fn, generator, device, dtype)
    score = guided_score(score_fn, guidance)
    x = _integrate(score, sde, x, t0=sde.T, t1=eps, eps=eps, method=method, rtol=rtol, atol=atol, steps=steps,
                   time_grid=time_grid, lower_order_final=lower_order_final)
    if denoise:
        x = reverse_diffusion(score, sde, x, eps, 0.0)[1]
    return x


@torch.no_grad()
def ode_encode(
    score_fn: ScoreFn,
    sde: SDE,
    x: Tensor,
    *,
    method: str = "dopri5",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    steps: int | None = None,
    eps: float = 1e-3,
    guidance: Iterable[Guidance] = (),
    time_grid: str | None = None,
    lower_order_final: bool = True,
) -> Tensor:
    """Encode data into the latent ``z = x_T`` by solving the probability-flow ODE from ``eps`` up to ``T``.

    The map is the inverse of :func:`ode_sample` with the same settings (up to solver error), so
    ``ode_sample(..., x_T=ode_encode(score_fn, sde, x))`` reconstructs ``x`` (Sec. 4.3).
    """
    steps = _check_method(method, steps)
    guidance = check_guidance(guidance, "probability-flow ODE", allowed=("score",))
    check_eps(eps, sde)
    check_shape(tuple(x.shape), score_fn)
    score = guided_score(score_fn, guidance)
    return _integrate(score, sde, x, t0=eps, t1=sde.T, eps=eps, method=method, rtol=rtol, atol=atol, steps=steps,
                      time_grid=time_grid, lower_order_final=lower_order_final)
