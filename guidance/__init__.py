"""Guidance plug-ins: they change what a sampler produces without retraining the model.

Gradient guidance wraps the score (``guide_score``) and works in every sampler; selection guidance
wraps one stochastic reverse step (``guide_step``). Pass plug-ins as ``guidance=[...]``; they compose
in list order.
"""

from .base import Guidance, apply_score_guidance, apply_step_guidance
from .classifier import ClassifierGuidance, load_classifier, save_classifier, train_noisy_classifier
from .dps import RewardGradientGuidance
from .minority import (
    MinorityClassifier,
    MinorityGuidance,
    SelfMinorityGuidance,
    minority_score,
    quantize_levels,
    train_minority_classifier,
)
from .rewards import REWARDS, load_reward
from .svdd import SVDD, best_of_n, fit_value_function

__all__ = [
    "Guidance",
    "apply_score_guidance",
    "apply_step_guidance",
    "ClassifierGuidance",
    "train_noisy_classifier",
    "save_classifier",
    "load_classifier",
    "minority_score",
    "quantize_levels",
    "MinorityClassifier",
    "train_minority_classifier",
    "MinorityGuidance",
    "SelfMinorityGuidance",
    "SVDD",
    "RewardGradientGuidance",
    "best_of_n",
    "fit_value_function",
    "load_reward",
    "REWARDS",
]
