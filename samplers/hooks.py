"""The guidance protocol: how plug-ins reach into a sampler.

It lives with its consumer, the samplers; the plug-ins in the ``guidance`` package implement it
(``guidance.base`` re-exports these names). A plug-in has two optional hooks, each the identity by
default:

- ``guide_score(score_fn) -> score_fn``: gradient guidance (classifier, minority) wraps the score,
  so it applies in every sampler, stochastic or deterministic.
- ``guide_step(step_fn, score_fn, sde) -> step_fn``: selection guidance (SVDD) wraps one stochastic
  reverse step ``step_fn(x, t, t_next) -> x_next``; the score function and SDE are passed so that
  values can use Tweedie's posterior mean.

Which of the two a plug-in relies on is its :attr:`Guidance.kind`, the one attribute every sampler
reads. Samplers take ``guidance=[...]`` and apply the hooks in list order, so plug-ins compose.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import ClassVar, Literal

from torch import Tensor

from scorekit.score import ScoreFn
from scorekit.sde import SDE

__all__ = [
    "Guidance", "ScoreFn", "StepFn", "apply_score_guidance", "apply_step_guidance", "check_guidance",
]

StepFn = Callable[[Tensor, Tensor, Tensor], Tensor]


class Guidance:
    """Base class of guidance plug-ins; override one or both hooks.

    ``kind`` is ``"step"`` for plug-ins that need a stochastic reverse step to act on (they draw and
    select candidates), ``"score"`` for those that only wrap the score. A subclass that overrides
    :meth:`guide_step` is a step plug-in unless it says otherwise.
    """

    kind: ClassVar[Literal["score", "step"]] = "score"

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "kind" not in cls.__dict__ and "guide_step" in cls.__dict__:
            cls.kind = "step"
        if cls.kind not in ("score", "step"):
            raise TypeError(f"{cls.__name__}.kind must be 'score' or 'step', got {cls.kind!r}")

    def guide_score(self, score_fn: ScoreFn) -> ScoreFn:
        """Return the guided score function (identity by default)."""
        return score_fn

    def guide_step(self, step_fn: StepFn, score_fn: ScoreFn, sde: SDE) -> StepFn:
        """Return the guided reverse step (identity by default)."""
        return step_fn

    def with_generator(self, generator) -> Guidance:
        """This plug-in drawing its random numbers from ``generator`` (a copy; ``self`` by default, for plug-ins
        that draw none). A caller that samples batch by batch with per-sample streams (``scorekit sample
        --seeds``) hands each batch's :class:`~samplers.StackedGenerator` to its plug-ins through it."""
        return self


def check_guidance(
    guidance: Iterable[Guidance], sampler: str | None = None, *, allowed: tuple[str, ...] = ("score", "step")
) -> list[Guidance]:
    """The plug-ins as a list, each checked to be a :class:`Guidance` whose ``kind`` the sampler supports.

    ``sampler`` names the sampler in the error; ``allowed`` lists the kinds it can apply.
    """
    plugins = list(guidance)
    for g in plugins:
        if not isinstance(g, Guidance):
            raise TypeError(f"guidance entries must be Guidance plug-ins, got {type(g).__name__}")
        if g.kind in allowed:
            continue
        if g.kind == "step":
            raise ValueError(
                f"{type(g).__name__} guides the stochastic reverse step, which the deterministic {sampler} "
                "sampler does not have; use pc_sample, or a score-level plug-in"
            )
        raise ValueError(
            f"{type(g).__name__} guides a continuous score, which {sampler} does not have; "
            "use a step-level (selection) plug-in such as SVDD"
        )
    return plugins


def apply_score_guidance(score_fn: ScoreFn, guidance: Iterable[Guidance]) -> ScoreFn:
    """Wrap ``score_fn`` with every plug-in's ``guide_score``, in list order."""
    for g in check_guidance(guidance):
        score_fn = g.guide_score(score_fn)
    return score_fn


def apply_step_guidance(step_fn: StepFn, score_fn: ScoreFn, sde: SDE, guidance: Iterable[Guidance]) -> StepFn:
    """Wrap ``step_fn`` with every plug-in's ``guide_step``, in list order."""
    for g in check_guidance(guidance):
        step_fn = g.guide_step(step_fn, score_fn, sde)
    return step_fn
