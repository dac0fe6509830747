"""DPS-style gradient guidance by a differentiable reward (Chung et al. 2023, "Diffusion Posterior Sampling").

The gradient-based baseline of the SVDD paper: the score is moved along ``grad_x r(x0_hat(x_t))``, with
``x0_hat`` Tweedie's posterior mean under the model's own score.
"""

from __future__ import annotations

import torch
from torch import Tensor

from samplers.hooks import Guidance, ScoreFn
from scorekit.score import tweedie_denoise
from scorekit.sde import SDE
from scorekit.validate import guidance_scale

from .rewards import RewardFn, checked_values

__all__ = ["RewardGradientGuidance"]


class RewardGradientGuidance(Guidance):
    """DPS-style guidance by a differentiable reward: ``s(x, t) + scale * grad_x r(x0_hat(x, t))``.

    ``x0_hat`` is Tweedie's posterior mean under the guided score's own network, and the gradient flows
    through it (DPS, Chung et al. 2023, with ``log p(y | x0) = r(x0)``; the SVDD paper's DPS baseline).
    ``sde`` defaults to ``score_fn.sde`` (:class:`ScoreModel`, ``GaussianMixture.score_fn``). A score-level
    plug-in, so it applies in PC and ODE samplers alike. One network evaluation per score evaluation,
    plus a backward pass.
    """

    def __init__(self, reward_fn: RewardFn, scale: float = 1.0, sde: SDE | None = None):
        if not callable(reward_fn):
            raise TypeError(f"reward_fn must be callable as reward_fn(x0) -> (batch,), got {type(reward_fn).__name__}")
        self.reward_fn, self.scale, self.sde = reward_fn, guidance_scale(scale), sde

    def __repr__(self) -> str:
        return f"RewardGradientGuidance(scale={self.scale})"

    def guide_score(self, score_fn: ScoreFn) -> ScoreFn:
        sde = self.sde if self.sde is not None else getattr(score_fn, "sde", None)
        if sde is None:
            raise ValueError("RewardGradientGuidance needs the SDE for Tweedie's x0_hat: pass sde=, or a score "
                             "function with an .sde attribute (ScoreModel, GaussianMixture.score_fn)")

        def guided_score(x: Tensor, t: Tensor) -> Tensor:
            scores: list[Tensor] = []

            def recorded(x_in: Tensor, t_in: Tensor) -> Tensor:
                scores.append(score_fn(x_in, t_in))
                return scores[-1]

            with torch.enable_grad():
                x_in = x.detach().requires_grad_(True)
                r = checked_values(self.reward_fn(tweedie_denoise(recorded, sde, x_in, t)), x.shape[0], "reward_fn")
                if not r.requires_grad:
                    raise TypeError("reward_fn's output carries no gradient: RewardGradientGuidance needs a "
                                    "differentiable reward (use SVDD for non-differentiable ones)")
                (grad,) = torch.autograd.grad(r.sum(), x_in)
            return scores[0].detach() + self.scale * grad.to(x.dtype)

        return guided_score
