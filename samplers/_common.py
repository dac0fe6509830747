"""Input checks and small pieces shared by the samplers."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import Tensor

from scorekit.sde import SDE
from scorekit.validate import positive_int

from .generators import StackedGenerator, randn
from .hooks import Guidance, ScoreFn, apply_score_guidance

#: score evaluations between two read-backs of :class:`CheckedScore`'s finiteness flags
CHECK_EVERY = 32


def add_scaled(x: Tensor, a: Tensor | float, y: Tensor) -> Tensor:
    """``x + a y`` in one pass over the batch, ``a`` a host number (``torch.add``'s ``alpha``) or a tensor that
    broadcasts against ``y`` (``addcmul``): the samplers' updates, one kernel instead of a product and a sum."""
    return torch.addcmul(x, a, y) if torch.is_tensor(a) else torch.add(x, y, alpha=a)


def randn_like(x: Tensor, generator: torch.Generator | StackedGenerator | None) -> Tensor:
    """Standard normal noise of ``x``'s shape, dtype and device, drawn from ``generator`` (a per-sample
    :class:`StackedGenerator` too: the samplers' noise draws all come through here)."""
    return randn(x.shape, generator, x.device, x.dtype)


def prior_sample(sde: SDE, shape, generator: torch.Generator | StackedGenerator | None = None, device=None,
                 dtype: torch.dtype | None = None) -> Tensor:
    """``sde.prior_sampling(shape)`` from ``generator``; per stream (each sample's own draw) for a
    :class:`StackedGenerator`."""
    if not isinstance(generator, StackedGenerator):
        return sde.prior_sampling(shape, generator=generator, device=device, dtype=dtype)
    x = generator.draw(lambda s, g: sde.prior_sampling(s, generator=g, dtype=dtype), shape)
    return x if device is None else x.to(device)


def is_zero(t) -> bool:
    """Whether the time ``t`` (a number or a tensor) is 0 everywhere. Samplers pass host numbers, so that
    the check never waits for the device; a device tensor is read back."""
    if torch.is_tensor(t):
        return bool((t == 0).all())
    return float(t) == 0


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
    if not isinstance(shape, (tuple, list, torch.Size)) or not shape:
        raise ValueError(f"the sample shape must be a tuple (batch, ...), got {shape!r}")
    for d in shape:
        positive_int(d, "every dimension of shape", f"shape={tuple(shape)}")
    expected = getattr(score_fn, "data_shape", None)
    if expected is not None and tuple(shape[1:]) != tuple(expected):
        raise ValueError(
            f"samples of shape {tuple(shape)} do not fit the score model, which expects "
            f"(B, {', '.join(map(str, expected))})"
        )


def check_sde(sde: SDE, score_fn: ScoreFn) -> None:
    """Where the score function carries the SDE it was trained on (``ScoreModel.sde``, forwarded by
    :class:`~scorekit.score.ConditionedScore` and :func:`~samplers.count_nfe`), the sampler's ``sde`` must be
    that process; only its number of steps ``N`` may differ."""
    own = getattr(score_fn, "sde", None)
    if not isinstance(sde, SDE):
        raise ValueError(f"sde must be a scorekit SDE (VPSDE(), VESDE(), ...), got {type(sde).__name__}")
    if not isinstance(own, SDE) or own is sde:
        return
    process = lambda s: {k: v for k, v in s._params().items() if k != "N"}  # noqa: E731
    if type(own) is not type(sde) or process(own) != process(sde):
        raise ValueError(f"the score model was trained on {own!r} but the sampler was given {sde!r}; "
                         "pass the model's own SDE (model.sde)")


def check_data(x, name: str, finite: bool = True) -> None:
    """``x`` must be a non-empty floating-point batch ``(batch, ...)`` (integer data cannot carry noise), with
    finite values unless ``finite`` is false."""
    if not torch.is_tensor(x):
        raise ValueError(f"{name} must be a torch tensor (batch, ...), got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name} has dtype {x.dtype}; the samplers need floating-point data: pass {name}.float() "
                         "(scaled to the model's data range, e.g. [-1, 1])")
    if x.ndim == 0 or x.numel() == 0:
        raise ValueError(f"{name} has shape {tuple(x.shape)}; expected a non-empty batch (batch, ...)")
    if finite and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or infinite values")


def initial_state(
    sde: SDE,
    shape,
    x_T: Tensor | None,
    score_fn: ScoreFn,
    generator: torch.Generator | None,
    device=None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """``x_T`` if given (checked against ``shape``), else a draw from the prior; see :func:`check_shape` and
    :func:`check_sde`."""
    check_sde(sde, score_fn)
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating-point torch dtype (torch.float32, ...), got {dtype!r}")
    if x_T is not None:
        check_data(x_T, "x_T")
        if shape is not None and tuple(x_T.shape) != tuple(shape):
            raise ValueError(
                f"x_T has shape {tuple(x_T.shape)} but shape={tuple(shape)}; pass one or make them agree"
            )
        shape = x_T.shape
    elif shape is None:
        raise ValueError("pass the sample shape (batch, ...) or an initial state x_T")
    check_shape(tuple(shape) if isinstance(shape, (list, torch.Size)) else shape, score_fn)
    if x_T is not None:
        return x_T
    if device is None and generator is not None:
        device = generator.device
    return prior_sample(sde, shape, generator, device, dtype)


class CheckedScore:
    """A score function that stops the sampler on a wrong shape or a non-finite value.

    ``step`` is set by the sampler so that the error names where it happened. The finiteness test stays
    on the device: each evaluation queues the sum of its score (non-finite if any entry is), and the sums
    are read back (one host read) every ``check_every`` evaluations and at :meth:`check`, which samplers
    call at the end; the error names the first bad evaluation's step and ``t``.
    """

    def __init__(self, score_fn: ScoreFn, steps: int | None = None, check_every: int = CHECK_EVERY):
        self.score_fn, self.steps = score_fn, steps
        self.check_every = positive_int(check_every, "check_every", "score evaluations between checks")
        self.step: int | None = None
        self.calls = 0
        self._pending: list[tuple[Tensor, int, int | None, Tensor]] = []

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        return self._checked(self.score_fn(x, t), x, t)

    @property
    def host_time(self) -> bool:
        """Whether the wrapped function takes a host time (:class:`~scorekit.score.ScoreFn`)."""
        return getattr(self.score_fn, "host_time", False)

    @property
    def denoise(self) -> ScoreFn:
        """The wrapped function's own ``denoise(x, t)`` (a model's x0 estimate, which Tweedie's formula uses
        where it has one), guarded alike; absent when the wrapped function has none."""
        inner = getattr(self.score_fn, "denoise", None)
        if inner is None:
            raise AttributeError("denoise")
        return lambda x, t: self._checked(inner(x, t), x, t)

    def _checked(self, s: Tensor, x: Tensor, t: Tensor) -> Tensor:
        self.calls += 1
        if s.shape != x.shape:
            raise ValueError(
                f"the score function returned shape {tuple(s.shape)} for x of shape {tuple(x.shape)}; "
                "it must return a tensor of the same shape as x"
            )
        # One reduction per evaluation: a NaN or inf anywhere makes the sum non-finite, and the sum costs one pass
        # over the score where isfinite().all() costs four. Low precisions are summed in float32, which only
        # overflows for scores far beyond anything a sampler survives.
        low = s.dtype in (torch.float16, torch.bfloat16)
        total = s.detach().sum(dtype=torch.float32 if low else None)
        self._pending.append((total, self.calls, self.step, t))
        if len(self._pending) >= self.check_every:
            self.check()
        return s

    def check(self) -> None:
        """Read the queued sums back and raise a ``FloatingPointError`` at the first non-finite score."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        flags = torch.isfinite(torch.stack([total.to(pending[0][0]) for total, *_ in pending]))
        if bool(flags.all()):
            return
        _, call, step, t = pending[int(flags.to(torch.uint8).argmin())]
        if step is None:
            where = f"score evaluation {call}"
        else:
            where = f"step {step}" + (f" of {self.steps}" if self.steps else "")
        t_val = t.flatten()[0].item() if torch.is_tensor(t) else float(t)
        raise FloatingPointError(
            f"the score is not finite (NaN or inf) at {where}, t = {t_val:.6g}; check the model and its inputs"
        )


def guided_score(score_fn: ScoreFn, guidance: Iterable[Guidance], steps: int | None = None) -> CheckedScore:
    """Apply the plug-ins' ``guide_score`` hooks, then guard the result (:class:`CheckedScore`)."""
    return CheckedScore(apply_score_guidance(score_fn, guidance), steps)
