"""Input checks and small pieces shared by the samplers."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import Tensor

from scorekit.sde import SDE
from scorekit.validate import positive_int

from .hooks import Guidance, ScoreFn, apply_score_guidance


def randn_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard normal noise of ``x``'s shape, dtype and device, drawn from ``generator``."""
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def resolve(name, registry: Mapping[str, Callable], kind: str) -> Callable | None:
    """Look ``name`` up in ``registry``; ``None`` and callables pass through."""
    if name is None or callable(name):
        return name
    if name not in registry:
        raise ValueError(f"unknown {kind} {name!r}; valid names are {sorted(registry)} or None")
    return registry[name]


def check_steps(steps: int | None, default: int) -> int:
    """``steps`` as a positive int (``None`` -> ``default``)."""
    if steps is None:
        return default
    return positive_int(steps, "steps", "number of sampler steps")


def check_eps(eps: float, sde: SDE) -> None:
    """The samplers' end time must lie strictly inside ``(0, T)``."""
    if not 0 < eps < sde.T:
        raise ValueError(
            f"eps (the smallest time the score is evaluated at) must lie in (0, {sde.T}), got {eps}"
        )


def check_shape(shape: tuple[int, ...], score_fn: ScoreFn) -> None:
    """Compare a batch shape with what the score function says it expects (``data_shape``, as
    :class:`ScoreModel` has); functions that don't say are checked at their first evaluation."""
    expected = getattr(score_fn, "data_shape", None)
    if expected is not None and tuple(shape[1:]) != tuple(expected):
        raise ValueError(
            f"samples of shape {tuple(shape)} do not fit the score model, which expects "
            f"(B, {', '.join(map(str, expected))})"
        )


def initial_state(
    sde: SDE,
    shape,
    x_T: Tensor | None,
    score_fn: ScoreFn,
    generator: torch.Generator | None,
    device=None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """``x_T`` if given (checked against ``shape``), else a draw from the prior; see :func:`check_shape`."""
    if x_T is not None:
        if shape is not None and tuple(x_T.shape) != tuple(shape):
            raise ValueError(
                f"x_T has shape {tuple(x_T.shape)} but shape={tuple(shape)}; pass one or make them agree"
            )
        shape = x_T.shape
    elif shape is None:
        raise ValueError("pass the sample shape (batch, ...) or an initial state x_T")
    check_shape(tuple(shape), score_fn)
    if x_T is not None:
        return x_T
    if device is None and generator is not None:
        device = generator.device
    return sde.prior_sampling(shape, generator=generator, device=device, dtype=dtype)


class CheckedScore:
    """A score function that stops the sampler on a wrong shape or a non-finite value.

    ``step`` is set by the sampler so that the error names where it happened.
    """

    def __init__(self, score_fn: ScoreFn, steps: int | None = None):
        self.score_fn, self.steps = score_fn, steps
        self.step: int | None = None
        self.calls = 0

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        self.calls += 1
        s = self.score_fn(x, t)
        if s.shape != x.shape:
            raise ValueError(
                f"the score function returned shape {tuple(s.shape)} for x of shape {tuple(x.shape)}; "
                "it must return a tensor of the same shape as x"
            )
        # one reduction on the usual path: a sum is finite unless an entry is not (or it overflows)
        if not bool(torch.isfinite(s.sum())) and not bool(torch.isfinite(s).all()):
            if self.step is None:
                where = f"score evaluation {self.calls}"
            else:
                where = f"step {self.step}" + (f" of {self.steps}" if self.steps else "")
            t_val = t.flatten()[0].item() if torch.is_tensor(t) else float(t)
            raise FloatingPointError(
                f"the score is not finite (NaN or inf) at {where}, t = {t_val:.6g}; "
                "check the model and its inputs"
            )
        return s


def guided_score(score_fn: ScoreFn, guidance: Iterable[Guidance], steps: int | None = None) -> CheckedScore:
    """Apply the plug-ins' ``guide_score`` hooks, then guard the result (:class:`CheckedScore`)."""
    return CheckedScore(apply_score_guidance(score_fn, guidance), steps)
