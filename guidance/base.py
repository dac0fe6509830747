"""The guidance plug-in protocol.

A plug-in has two optional hooks, each the identity by default:

- ``guide_score(score_fn) -> score_fn``: gradient guidance (classifier, minority) wraps the score,
  so it applies in every sampler, stochastic or deterministic.
- ``guide_step(step_fn, score_fn, sde) -> step_fn``: selection guidance (SVDD) wraps one stochastic
  reverse step ``step_fn(x, t, t_next) -> x_next``; the score function and SDE are passed so that
  values can use Tweedie's posterior mean.

Samplers take ``guidance=[...]`` and apply the hooks in list order, so plug-ins compose.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from torch import Tensor

from scorekit.sde import SDE

__all__ = ["Guidance", "StepFn", "apply_score_guidance", "apply_step_guidance"]

ScoreFn = Callable[[Tensor, Tensor], Tensor]
StepFn = Callable[[Tensor, Tensor, Tensor], Tensor]


class Guidance:
    """Base class of guidance plug-ins; override one or both hooks."""

    #: True for plug-ins whose ``guide_step`` needs a stochastic reverse step (it draws candidates).
    needs_stochastic_step: bool = False

    def guide_score(self, score_fn: ScoreFn) -> ScoreFn:
        """Return the guided score function (identity by default)."""
        return score_fn

    def guide_step(self, step_fn: StepFn, score_fn: ScoreFn, sde: SDE) -> StepFn:
        """Return the guided reverse step (identity by default)."""
        return step_fn


def _check(guidance: Iterable[Guidance]) -> list[Guidance]:
    plugins = list(guidance)
    for g in plugins:
        if not isinstance(g, Guidance):
            raise TypeError(f"guidance entries must be Guidance plug-ins, got {type(g).__name__}")
    return plugins


def apply_score_guidance(score_fn: ScoreFn, guidance: Iterable[Guidance]) -> ScoreFn:
    """Wrap ``score_fn`` with every plug-in's ``guide_score``, in list order."""
    for g in _check(guidance):
        score_fn = g.guide_score(score_fn)
    return score_fn


def apply_step_guidance(step_fn: StepFn, score_fn: ScoreFn, sde: SDE, guidance: Iterable[Guidance]) -> StepFn:
    """Wrap ``step_fn`` with every plug-in's ``guide_step``, in list order."""
    for g in _check(guidance):
        step_fn = g.guide_step(step_fn, score_fn, sde)
    return step_fn
