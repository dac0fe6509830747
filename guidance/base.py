"""The guidance plug-in protocol, defined by its consumer (:mod:`samplers.hooks`) and re-exported here
so that plug-ins and users write ``from guidance import Guidance``."""

from samplers.hooks import (
    Guidance,
    ScoreFn,
    StepFn,
    apply_score_guidance,
    apply_step_guidance,
    check_guidance,
)

__all__ = ["Guidance", "ScoreFn", "StepFn", "apply_score_guidance", "apply_step_guidance", "check_guidance"]
