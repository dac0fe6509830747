"""Counting score evaluations (NFE), so that samplers are compared at equal cost."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

__all__ = ["NFECounter", "count_nfe"]


class NFECounter:
    """A score function that counts its own evaluations.

    ``nfe`` is the number of calls (one batched network evaluation each) and ``samples`` the number
    of per-sample evaluations (the sum of the batch sizes), so ``samples / batch`` is the NFE each
    sample cost even when a plug-in evaluates a larger batch (SVDD's candidates). Other attributes
    (``data_shape``, ``sde`` ...) are those of the wrapped function.
    """

    def __init__(self, score_fn: Callable[[Tensor, Tensor], Tensor]):
        self.score_fn = score_fn
        self.nfe = 0
        self.samples = 0

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        self.nfe += 1
        self.samples += x.shape[0]
        return self.score_fn(x, t)

    @property
    def denoise(self) -> Callable[[Tensor, Tensor], Tensor]:
        """The wrapped function's own ``denoise(x, t)`` (one network evaluation), counted alike."""
        inner = getattr(self.score_fn, "denoise", None)
        if inner is None:
            raise AttributeError("denoise")

        def counted(x: Tensor, t: Tensor) -> Tensor:
            self.nfe += 1
            self.samples += x.shape[0]
            return inner(x, t)

        return counted

    def reset(self) -> None:
        """Set both counts back to zero."""
        self.nfe = self.samples = 0

    def __getattr__(self, name: str) -> Any:
        if name == "score_fn":  # not set yet (copy/unpickling): don't recurse
            raise AttributeError(name)
        return getattr(self.score_fn, name)

    def __repr__(self) -> str:
        return f"NFECounter(nfe={self.nfe}, samples={self.samples})"


def count_nfe(score_fn: Callable[[Tensor, Tensor], Tensor]) -> NFECounter:
    """Wrap ``score_fn`` so that it counts its evaluations (see :class:`NFECounter`)."""
    return NFECounter(score_fn)
