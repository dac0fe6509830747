"""Predictor-corrector sampling (Song et al. 2021, Alg. 1-5; reference ``sampling.py``)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from scorekit.sde import SDE
from scorekit.validate import non_negative, non_negative_int

from ._common import ScoreFn, check_eps, check_steps, guided_score, initial_state, is_zero, resolve
from .correctors import CORRECTORS, Corrector
from .generators import StackedGenerator
from .hooks import Guidance, StepFn, apply_step_guidance, check_guidance
from .predictors import PREDICTORS, Predictor

__all__ = ["pc_sample", "pc_step", "time_steps"]

Projection = Callable[[Tensor, Tensor], Tensor]


def time_steps(sde: SDE, steps: int, eps: float) -> tuple[Tensor, Tensor]:
    """The reference grid ``t_i = linspace(T, eps, steps)`` and each step's target ``t_{i+1}``, float64.

    The last step goes from ``eps`` to ``0`` (the data): with ``steps = N`` and ``eps = 1e-3`` every
    step then has the reference's size ``T / N``.
    """
    check_eps(eps, sde)
    ts = torch.linspace(sde.T, eps, steps, dtype=torch.float64)
    return ts, torch.cat([ts[1:], ts.new_zeros(1)])


def pc_step(
    score_fn: ScoreFn,
    sde: SDE,
    predictor: Predictor | None,
    corrector: Corrector | None,
    *,
    snr: float = 0.16,
    n_corrector_steps: int = 1,
    denoise: bool = True,
    generator: torch.Generator | StackedGenerator | None = None,
    project: Projection | None = None,
) -> StepFn:
    """One stochastic reverse step ``step_fn(x, t, t_next) -> x_next`` of the PC sampler (Alg. 1).

    ``n_corrector_steps`` corrector updates at ``t``, then one predictor step to ``t_next``. The
    function is batch-agnostic (``t``, ``t_next`` scalars or ``(batch,)``) and draws its noise from
    ``generator``, so selection plug-ins may call it on repeated batches. The step into ``t_next = 0``
    returns the predictor's mean when ``denoise`` is set (the reference's noise-free last step); pass
    the times as host numbers (as :func:`pc_sample` does) so that this test never reads the device.
    ``project(x, t)``, if given, is applied after every corrector and predictor update (App. I).
    """

    def step(x: Tensor, t, t_next) -> Tensor:
        x_mean = x
        if corrector is not None:
            x, x_mean = corrector(
                score_fn, sde, x, t, snr=snr, n_steps=n_corrector_steps, generator=generator
            )
            if project is not None:
                x = project(x, t)
        if predictor is not None:
            x, x_mean = predictor(score_fn, sde, x, t, t_next, generator)
        if denoise and is_zero(t_next):
            x = x_mean
        return x if project is None else project(x, t_next)

    return step


@torch.no_grad()
def pc_sample(
    score_fn: ScoreFn,
    sde: SDE,
    shape: tuple[int, ...] | torch.Size | None,
    *,
    predictor: str | Predictor | None = "reverse_diffusion",
    corrector: str | Corrector | None = "langevin",
    snr: float = 0.16,
    n_corrector_steps: int = 1,
    steps: int | None = None,
    eps: float = 1e-3,
    denoise: bool = True,
    guidance: Iterable[Guidance] = (),
    x_T: Tensor | None = None,
    generator: torch.Generator | StackedGenerator | None = None,
    progress: bool = False,
    project: Projection | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Sample by integrating the reverse-time SDE (eq. 6) with a predictor-corrector scheme (Alg. 1).

    Starts from ``x_T`` or a prior draw of ``shape``, runs ``steps`` (default ``sde.N``) PC steps on
    the grid ``linspace(T, eps, steps)`` and returns the samples. ``predictor`` is one of
    ``PREDICTORS`` (``"euler_maruyama"``, ``"reverse_diffusion"``, ``"ancestral"``), a callable, or
    ``None``; ``corrector`` one of ``CORRECTORS`` (``"langevin"``, ``"annealed_langevin"``), a callable,
    or ``None``. ``snr`` and ``n_corrector_steps`` set the corrector (Alg. 4-5). Guidance plug-ins
    wrap the score (``guide_score``), then the step (``guide_step``), in list order. The reference
    configs use ``eps=1e-3`` for VP and ``1e-5`` for VE. Runs under ``torch.no_grad()``: plug-ins that
    differentiate enable gradients themselves. ``generator`` may be a per-sample
    :class:`~samplers.StackedGenerator` (one stream per sample; then each sample is what a batch of one
    drawn from its stream gives). The loop never reads the device: the times are host numbers, and the
    score's finiteness is checked every few steps (:class:`~samplers._common.CheckedScore`).
    """
    predictor = resolve(predictor, PREDICTORS, "predictor")
    corrector = resolve(corrector, CORRECTORS, "corrector")
    n_corrector_steps = non_negative_int(n_corrector_steps, "n_corrector_steps")
    snr = non_negative(snr, "snr", "the corrector's signal-to-noise ratio, e.g. 0.16")
    steps = check_steps(steps, sde.N)
    ts, ts_next = time_steps(sde, steps, eps)
    guidance = check_guidance(guidance, "PC")
    x = initial_state(sde, shape, x_T, score_fn, generator, device, dtype)
    score = guided_score(score_fn, guidance, steps)
    step = pc_step(
        score,
        sde,
        predictor,
        corrector,
        snr=snr,
        n_corrector_steps=n_corrector_steps,
        denoise=denoise,
        generator=generator,
        project=project,
    )
    step = apply_step_guidance(step, score, sde, guidance)
    for i, (t, t_next) in enumerate(tqdm(list(zip(ts.tolist(), ts_next.tolist())), desc="pc_sample",
                                         disable=not progress)):
        score.step = i + 1
        x = step(x, t, t_next)  # corrector (Alg. 4/5) at t, then the predictor to t_next
    score.check()
    return x
