"""Sampling and encoding with the probability-flow ODE ``dx/dt = f - 1/2 g^2 score`` (Song et al., eq. 13).

Adaptive solvers (``dopri5``, the paper's RK45 counterpart) come from torchdiffeq, fixed-step ones
(``euler``, ``midpoint``, ``rk4``) step on a host grid here; ``dpm_solver_2m`` is the exponential integrator of
:mod:`samplers.dpm_solver`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from scorekit.sde import SDE
from scorekit.validate import positive

from ._common import (
    CheckedScore,
    ScoreFn,
    check_data,
    check_eps,
    check_sde,
    check_shape,
    check_steps,
    guided_score,
    initial_state,
)
from .dpm_solver import dpm_solver_2m, solver_time_grid
from .generators import StackedGenerator
from .hooks import Guidance, check_guidance
from .predictors import reverse_diffusion

__all__ = ["ode_sample", "ode_encode", "probability_flow", "solve_ode", "ODE_METHODS"]

ADAPTIVE_METHODS = ("dopri5", "dopri8", "bosh3")


# One step of a fixed-step Runge-Kutta method: step(f, t, dt, y) -> y(t + dt), with t and dt host numbers.
def _euler(f: Callable, t: float, dt: float, y: Tensor) -> Tensor:
    return y + dt * f(t, y)


def _midpoint(f: Callable, t: float, dt: float, y: Tensor) -> Tensor:
    k1 = f(t, y)
    return y + dt * f(t + 0.5 * dt, y + (0.5 * dt) * k1)


def _rk4(f: Callable, t: float, dt: float, y: Tensor) -> Tensor:
    # the 3/8 rule, torchdiffeq's "rk4"
    k1 = f(t, y)
    k2 = f(t + dt / 3, y + (dt / 3) * k1)
    k3 = f(t + 2 * dt / 3, y + dt * (k2 - k1 / 3))
    k4 = f(t + dt, y + dt * (k1 - k2 + k3))
    return y + (k1 + 3 * (k2 + k3) + k4) * (dt / 8)


FIXED_STEPS: dict[str, Callable] = {"euler": _euler, "midpoint": _midpoint, "rk4": _rk4}
FIXED_METHODS = tuple(FIXED_STEPS)
ODE_METHODS = ADAPTIVE_METHODS + FIXED_METHODS + ("dpm_solver_2m",)


def probability_flow(score_fn: ScoreFn, sde: SDE) -> Callable[[Tensor, Tensor], Tensor]:
    """The probability-flow drift ``v(x, t) = f(x, t) - 1/2 g(t)^2 score(x, t)`` (eq. 13)."""
    reverse = sde.reverse(score_fn, probability_flow=True)
    return lambda x, t: reverse.sde(x, t)[0]


def _with_progress(func: Callable, bar) -> Callable:
    """``func`` that advances ``bar`` by one evaluation and shows the current ``t`` (a read-back for a
    device ``t``, made only while a bar is shown)."""

    def counted(t, y):
        out = func(t, y)
        bar.update(1)
        bar.set_postfix(t=f"{float(t):.4g}", refresh=False)
        return out

    return counted


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
    progress: bool = False,
    desc: str = "ode",
):
    """Solve ``dy/dt = func(t, y)`` from ``t0`` to ``t1`` and return ``y(t1)``.

    Fixed-step methods (``FIXED_STEPS``; ``y`` a tensor) step on a host grid of ``steps`` steps and call
    ``func`` with host numbers, so their loop never reads the device. Adaptive ones run in torchdiffeq
    (``t`` a tensor), and ``func`` is only ever evaluated inside ``[min(t0, t1), max(t0, t1)]``: the
    solvers would otherwise probe past the interval (their initial-step heuristic, and steps that
    overshoot the end and interpolate back), where a VP score is NaN. The last step is pinned to
    ``t1`` (``step_t``) and the first one given (1% of the interval; the controller adapts it). A
    violation raises rather than being clamped. ``progress`` shows a bar of evaluations and the current ``t``.
    """
    with tqdm(desc=desc, unit="nfe", disable=not progress) as bar:
        if progress:
            func = _with_progress(func, bar)
        if method in FIXED_STEPS:
            if steps is None:
                raise ValueError(f"the fixed-step method {method!r} needs steps=")
            grid = torch.linspace(t0, t1, check_steps(steps, steps) + 1, dtype=torch.float64).tolist()
            step, y = FIXED_STEPS[method], y0
            for ta, tb in zip(grid[:-1], grid[1:]):
                y = step(func, ta, tb - ta, y)
            return y
        return _adaptive(func, y0, t0, t1, method=method, rtol=rtol, atol=atol)


def _adaptive(func: Callable, y0, t0: float, t1: float, *, method: str, rtol: float, atol: float):
    from torchdiffeq import odeint  # it loads scipy; only the adaptive solves need it

    check_tolerances(rtol, atol)
    lo, hi = min(t0, t1), max(t0, t1)
    tol = 1e-6 * max(abs(lo), abs(hi), 1.0)
    message = f"the ODE solver evaluated t outside [{lo}, {hi}]"

    def guarded(t: Tensor, y):
        if t.device.type != "cpu":  # checked on the device, without a read-back
            torch._assert_async((t >= lo - tol) & (t <= hi + tol), message)
        elif not lo - tol <= float(t) <= hi + tol:
            raise RuntimeError(f"the ODE solver evaluated t = {float(t):.8g} outside [{lo}, {hi}]")
        return func(t, y)

    options = {"step_t": torch.tensor([t1], dtype=torch.float64), "first_step": 0.01 * (hi - lo)}
    t = torch.tensor([t0, t1], dtype=torch.float64)
    sol = odeint(guarded, y0, t, rtol=rtol, atol=atol, method=method, options=options)
    return tuple(s[-1] for s in sol) if isinstance(sol, tuple) else sol[-1]


def check_tolerances(rtol: float, atol: float) -> None:
    """The adaptive solvers' error tolerances must be finite and > 0 (<= 0 gives wrong results or a failed solve)."""
    positive(rtol, "rtol", "relative error tolerance of the adaptive ODE solver, e.g. 1e-5")
    positive(atol, "atol", "absolute error tolerance of the adaptive ODE solver, e.g. 1e-5")


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


def _integrate(score: CheckedScore, sde: SDE, x: Tensor, *, t0: float, t1: float, eps: float, method: str,
               rtol: float, atol: float, steps: int | None, time_grid: str | None, lower_order_final: bool,
               progress: bool = False, desc: str = "ode") -> Tensor:
    """Carry ``x`` along the probability-flow ODE from ``t0`` to ``t1`` (either direction) with ``method``."""
    try:
        if method == "dpm_solver_2m":
            ts = solver_time_grid(sde, steps, eps, time_grid)
            if t0 < t1:
                ts = ts.flip(0)
            x = dpm_solver_2m(score, sde, x, ts, lower_order_final=lower_order_final, progress=progress, desc=desc)
        else:
            drift = probability_flow(score, sde)
            x = solve_ode(lambda t, y: drift(y, t.to(y.dtype) if torch.is_tensor(t) else t), x, t0, t1,
                          method=method, rtol=rtol, atol=atol, steps=steps, progress=progress, desc=desc)
    except (AssertionError, RuntimeError):
        score.check()  # a non-finite score (e.g. the step-size controller failing on NaN) says more
        raise
    score.check()
    return x


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
    generator: torch.Generator | StackedGenerator | None = None,
    time_grid: str | None = None,
    lower_order_final: bool = True,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = False,
) -> Tensor:
    """Sample by solving the probability-flow ODE (eq. 13) from ``T`` down to ``eps``.

    ``method`` is one of ``ODE_METHODS``: adaptive torchdiffeq solvers (``"dopri5"`` with
    ``rtol``/``atol``, the reference's RK45 setting), fixed-step ones (``"euler"``, ``"midpoint"``,
    ``"rk4"`` with ``steps``) or ``"dpm_solver_2m"`` (``steps`` score evaluations on ``time_grid``,
    one of ``TIME_GRIDS``, default :func:`default_time_grid`; ``lower_order_final`` makes the last
    step first order). ``denoise`` ends with the noise-free reverse-diffusion step from ``eps`` to 0,
    as the reference code. Score-level plug-ins
    apply; step-level ones (SVDD) raise, as the ODE has no stochastic step. ``progress`` shows a bar of
    score evaluations and the current ``t``. A per-sample :class:`~samplers.StackedGenerator` draws each
    prior sample from its own stream; fixed-step methods then give each sample what a batch of one gives,
    while an adaptive solver chooses one step sequence for the whole batch (samples agree across batch
    splits to the solver's tolerance, not bit for bit).
    """
    steps = _check_method(method, steps)
    guidance = check_guidance(guidance, "probability-flow ODE", allowed=("score",))
    check_eps(eps, sde)
    x = initial_state(sde, shape, x_T, score_fn, generator, device, dtype)
    score = guided_score(score_fn, guidance)
    x = _integrate(score, sde, x, t0=sde.T, t1=eps, eps=eps, method=method, rtol=rtol, atol=atol, steps=steps,
                   time_grid=time_grid, lower_order_final=lower_order_final, progress=progress, desc="ode_sample")
    if denoise:  # noise-free last step
        x = reverse_diffusion(score, sde, x, eps, 0.0)[1]
        score.check()
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
    check_sde(sde, score_fn)
    check_data(x, "x")
    check_shape(tuple(x.shape), score_fn)
    score = guided_score(score_fn, guidance)
    return _integrate(score, sde, x, t0=eps, t1=sde.T, eps=eps, method=method, rtol=rtol, atol=atol, steps=steps,
                      time_grid=time_grid, lower_order_final=lower_order_final, desc="ode_encode")
