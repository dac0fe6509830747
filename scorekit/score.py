"""Score functions: the protocol every sampler consumes, networks wrapped as scores, and Tweedie's formula.

A *score function* is any callable ``score_fn(x, t) -> Tensor`` returning ``grad_x log p_t(x)`` with
the shape of ``x``. :class:`ScoreModel` turns a network that predicts noise, the score, the clean
sample or the velocity into one, given the SDE that defines ``x_t = alpha(t) x_0 + sigma(t) z``.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from .sde import SDE, batch_time, bcast

__all__ = ["ScoreFn", "ScoreModel", "tweedie_denoise", "PREDICTIONS", "TIME_INPUTS", "data_shape_of"]

PREDICTIONS = ("eps", "score", "x0", "v")
TIME_INPUTS = ("index", "t", "sigma", "log_sigma")


@runtime_checkable
class ScoreFn(Protocol):
    """``score_fn(x, t)``: ``grad_x log p_t(x)``; ``x`` of shape ``(batch, ...)``, ``t`` of shape ``(batch,)``."""

    def __call__(self, x: Tensor, t: Tensor) -> Tensor: ...


def data_shape_of(net: nn.Module) -> tuple[int, ...] | None:
    """The per-sample input shape a network expects, when it says so (``net.data_shape`` or a diffusers UNet config)."""
    shape = getattr(net, "data_shape", None)
    if shape is not None:
        return tuple(shape)
    cfg = getattr(net, "config", None)
    if cfg is not None and getattr(cfg, "sample_size", None) is not None and hasattr(cfg, "in_channels"):
        size = cfg.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return (cfg.in_channels, h, w)
    return None


class ScoreModel(nn.Module):
    """A network ``net(x, c(t))`` read as a score function of the SDE ``sde``.

    ``prediction`` says what the network outputs, with ``x_t = alpha x_0 + sigma z``:

    - ``"eps"``: the noise ``z``; ``score = -eps / sigma``
    - ``"score"``: the score itself
    - ``"x0"``: the clean sample; ``score = (alpha x0 - x_t) / sigma^2``
    - ``"v"``: the velocity ``v = alpha z - sigma x0`` (Salimans & Ho 2022); ``z = (sigma x_t + alpha v) / (alpha^2 + sigma^2)``

    ``time_input`` is the conditioning ``c(t)`` fed to the network, as in the reference code:
    ``"index"`` (``t (N - 1)``, default for VP and sub-VP), ``"log_sigma"`` (default for VE), ``"sigma"``
    or ``"t"``. Networks returning an object with ``.sample`` (diffusers' ``UNet2DModel``) are unwrapped.
    """

    def __init__(
        self,
        net: nn.Module,
        sde: SDE,
        prediction: str = "eps",
        time_input: str | None = None,
        data_shape: tuple[int, ...] | None = None,
    ):
        super().__init__()
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; valid parameterizations are {list(PREDICTIONS)}")
        if time_input is None:
            time_input = sde.network_time
        if time_input not in TIME_INPUTS:
            raise ValueError(f"unknown time_input {time_input!r}; valid choices are {list(TIME_INPUTS)}")
        if time_input in ("sigma", "log_sigma") and not sde.variance_exploding:
            raise ValueError(f"time_input={time_input!r} needs a VESDE, got {sde!r}; use 'index' or 't'")
        self.net, self.sde, self.prediction, self.time_input = net, sde, prediction, time_input
        self.data_shape = tuple(data_shape) if data_shape is not None else data_shape_of(net)

    # -- hooks a subclass may override (pretrained discrete-time models do) -----------------------
    def coeffs(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(alpha(t), sigma(t))`` used to convert the network output to a score."""
        return self.sde.marginal_coeffs(t)

    def network_time(self, t: Tensor) -> Tensor:
        """The conditioning value ``c(t)`` passed to the network."""
        if self.time_input == "index":
            return t * (self.sde.N - 1)
        if self.time_input == "t":
            return t
        sigma = self.sde.marginal_coeffs(t)[1]
        return sigma if self.time_input == "sigma" else torch.log(sigma)

    # -- evaluation ------------------------------------------------------------------------------
    def check_input(self, x: Tensor) -> None:
        """Raise a ``ValueError`` naming both shapes when ``x`` is not a batch of what the network expects."""
        if not torch.is_tensor(x) or not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got {type(x).__name__} {getattr(x, 'dtype', '')}")
        if self.data_shape is not None and tuple(x.shape[1:]) != self.data_shape:
            expected = ", ".join(map(str, self.data_shape))
            raise ValueError(f"x has shape {tuple(x.shape)} but the model expects (B, {expected})")

    def raw(self, x: Tensor, t: Tensor) -> Tensor:
        """The network's own output at ``(x, t)`` (noise, score, x0 or v, per ``prediction``)."""
        self.check_input(x)
        return self._net(x, batch_time(t, x, self.sde.T))

    def _net(self, x: Tensor, t: Tensor) -> Tensor:
        out = self.net(x, self.network_time(t))
        out = getattr(out, "sample", out)
        if out.shape != x.shape:
            raise ValueError(f"the network returned shape {tuple(out.shape)} for input of shape {tuple(x.shape)}")
        return out

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        """``grad_x log p_t(x)``."""
        self.check_input(x)
        t = batch_time(t, x, self.sde.T)
        out = self._net(x, t)
        alpha, sigma = (bcast(c.to(out.dtype), x) for c in self.coeffs(t))
        if self.prediction == "score":
            return out
        if self.prediction == "eps":
            return -out / sigma
        if self.prediction == "x0":
            return (alpha * out - x) / sigma**2
        eps = (sigma * x + alpha * out) / (alpha**2 + sigma**2)
        return -eps / sigma

    def extra_repr(self) -> str:
        return f"sde={self.sde!r}, prediction={self.prediction!r}, time_input={self.time_input!r}"


def tweedie_denoise(score_fn: ScoreFn, sde: SDE, x: Tensor, t: Tensor | float) -> Tensor:
    """Tweedie's formula: ``E[x_0 | x_t = x] = (x + sigma(t)^2 score(x, t)) / alpha(t)``.

    Exact for the true score of the diffused data (Efron 2011); with a learned score it is the
    denoiser the score implies. Minority score, SVDD's posterior-mean value and Noise2Score reuse it.
    """
    t = batch_time(t, x, sde.T)
    alpha, sigma = (bcast(c, x) for c in sde.marginal_coeffs(t))
    return (x + sigma**2 * score_fn(x, t)) / alpha
