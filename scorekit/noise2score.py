"""Noise2Score (Kim & Ye, NeurIPS 2021): self-supervised denoising from noisy images alone.

Two steps:

1. Learn the score ``l'(y) = grad_y log p(y)`` of the *noisy* images with the amortized residual
   denoising autoencoder (AR-DAE, Lim et al. 2020): minimise ``E ||u + sigma_a R(y + sigma_a u)||^2``
   over ``u ~ N(0, I)`` while ``sigma_a`` is annealed towards 0 (:func:`ardae_loss`, :class:`ARDAE`).
   ``R`` sees only noisy data and is not conditioned on ``sigma_a``.
2. Plug the score into Tweedie's formula for the exponential-family noise model (paper Sec. 3.2,
   Table 1). Each noise model is one :class:`NoiseModel` object in :data:`NOISE_MODELS`:
   :class:`GaussianNoise` ``y = x + sigma n`` (level ``sigma``), :class:`PoissonNoise`
   ``y = zeta Poisson(x / zeta)`` (level ``zeta``) and :class:`GammaNoise` ``y = x Gamma(k, 1/k)``
   (level ``k``). Each carries its level check, Tweedie estimate, blind-level grid and criterion,
   AR-DAE ``sigma_a`` range and CLI flag.

When the noise level is unknown it is picked from a grid by the total-variation criteria of the
authors' code (:meth:`NoiseModel.estimate_level`). :class:`Noise2Score` ties the pieces together;
images are float tensors in ``[0, 1]`` intensity units throughout, so ``sigma = 25/255`` for "sigma 25".
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from .checkpoint import load_tensors, meta_field, save_tensors
from .nets.noise2score import ScoreUNet
from .validate import fraction, positive, positive_int

if TYPE_CHECKING:
    from .training import TrainConfig, Trainer

__all__ = [
    "NOISE_MODELS",
    "NoiseModel",
    "GaussianNoise",
    "PoissonNoise",
    "GammaNoise",
    "tweedie",
    "estimate_level",
    "level_grid",
    "charbonnier_tv",
    "ardae_loss",
    "ARDAE",
    "ScoreUNet",
    "Noise2Score",
]

# Images brighter than this are taken for 8- or 16-bit data that was not rescaled to [0, 1].
_MAX_INTENSITY = 4.0

ScoreFunction = Callable[[Tensor], Tensor]


def charbonnier_tv(x: Tensor, eps: float = 1e-6) -> Tensor:
    """Anisotropic total variation with a Charbonnier penalty: ``mean sqrt(dx^2 + eps^2) + mean sqrt(dy^2 + eps^2)``."""
    dh = x[..., 1:, :] - x[..., :-1, :]
    dw = x[..., :, 1:] - x[..., :, :-1]
    return (dh.square() + eps**2).sqrt().mean() + (dw.square() + eps**2).sqrt().mean()


# -- the noise models ------------------------------------------------------------------------------
class NoiseModel:
    """One exponential-family noise model of Noise2Score (paper Sec. 3.2, Table 1).

    A subclass sets the class attributes and writes :meth:`_tweedie` (the closed form), :meth:`level_grid`
    and :meth:`level_criterion` (the blind mode of the authors' code); the rest is shared.
    """

    name: str  #: key in :data:`NOISE_MODELS`
    level_name: str  #: what the level is called; also the CLI flag ``--<level_name>``
    description: str  #: how the noisy ``y`` is generated from the clean ``x``
    flag_help: str  #: help text of the CLI flag
    flag_unit: float = 1.0  #: the CLI flag's value is ``level * flag_unit`` (8-bit units for sigma)
    #: AR-DAE ``sigma_a`` annealing (start, end) of the authors' code, in the units the network sees
    ardae_sigma: tuple[float, float]
    non_negative: bool = False  #: noisy values are never negative
    counts: bool = False  #: the network sees ``y / level`` (Poisson counts) rather than ``y``
    clamps: bool = False  #: the estimate is clamped where a learned score makes it ill-posed

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def check_level(self, level: float | Tensor) -> float:
        """``level`` as a float; it must be a single positive finite number."""
        if torch.is_tensor(level):
            if level.numel() != 1:
                raise ValueError(f"{self.level_name} must be a single number, got a tensor of shape {tuple(level.shape)}")
            level = level.item()
        level = float(level)
        if not math.isfinite(level) or level <= 0:
            raise ValueError(f"the {self.name} noise level {self.level_name} must be a positive number, got {level}")
        return level

    def check_image_level(self, level: float) -> None:
        """Refuse a level that cannot be meant for images in [0, 1] units (nothing to refuse by default)."""

    def level_from_flag(self, value: float) -> float:
        """The level given on the command line (in ``flag_unit`` units), checked, in library units."""
        return self.check_level(value) / self.flag_unit

    def describe(self, level: float) -> str:
        """The level for humans, as ``--<level_name>`` spells it."""
        return f"{self.level_name} {level:g}"

    def network_input(self, y: Tensor, level: float | None) -> Tensor:
        """What the score network sees for noisy ``y``: ``y`` itself, or the counts ``y / level``."""
        return y / level if self.counts else y

    def tweedie(
        self, y: Tensor, score_fn: ScoreFunction, level: float, *, return_clamped: bool = False
    ) -> Tensor | tuple[Tensor, float]:
        """Noise2Score's closed-form estimate of the clean image from ``y`` and the score of the noisy data.

        ``score_fn(v)`` is ``grad_v log p(v)`` for the noisy distribution, evaluated on
        :meth:`network_input`. Returns the estimate with the shape of ``y``; ``return_clamped=True``
        also returns the fraction of values clamped (0 unless :attr:`clamps`).
        """
        estimate, clamped = self._tweedie(y, score_fn, self.check_level(level))
        return (estimate, clamped) if return_clamped else estimate

    def _tweedie(self, y: Tensor, score_fn: ScoreFunction, level: float) -> tuple[Tensor, float]:
        raise NotImplementedError

    def level_grid(self) -> Tensor:
        """The candidate levels the authors' blind test scripts search (float64)."""
        raise NotImplementedError

    def level_criterion(self, estimate: Tensor, y: Tensor) -> Tensor:
        """The score the blind mode minimises over the level grid (authors' ``forward_tv``)."""
        raise NotImplementedError

    def estimate_level(
        self, y: Tensor, score_fn: ScoreFunction, grid: Tensor | Sequence[float] | None = None
    ) -> tuple[float, Tensor]:
        """Blind Noise2Score: the grid level whose Tweedie estimate minimises :meth:`level_criterion`.

        ``y`` is one image (or a batch assumed to share one level); ``grid`` defaults to :meth:`level_grid`.
        The network runs once when its input does not depend on the level, else once per candidate
        (Poisson counts ``y / zeta``). Returns ``(best level, criterion per grid value)``.
        """
        grid = self.level_grid() if grid is None else torch.as_tensor(grid, dtype=torch.float64).flatten()
        if grid.numel() == 0:
            raise ValueError("the level grid is empty")
        if not self.counts:
            s = score_fn(y)
            score_fn = lambda v: s  # noqa: E731 - the score of y, reused for every candidate level
        values = torch.stack([
            self.level_criterion(self.tweedie(y, score_fn, float(level)), y).double() for level in grid
        ])
        return float(grid[int(torch.argmin(values))]), values


class GaussianNoise(NoiseModel):
    """``y = x + sigma n``, ``n ~ N(0, I)``: Tweedie's ``x_hat = y + sigma^2 s(y) = E[x | y]``, the posterior mean."""

    name, level_name = "gaussian", "sigma"
    description = "y = x + sigma n, n ~ N(0, I); sigma in [0, 1] intensity units (25/255 for 'sigma 25')"
    flag_help = "Gaussian noise std in 8-bit units: 25 means 25/255 of the range"
    flag_unit = 255.0
    ardae_sigma = (0.05, 0.001)

    def _tweedie(self, y, score_fn, level):
        return y + level**2 * score_fn(y), 0.0

    def check_image_level(self, level: float) -> None:
        if level >= 1:
            raise ValueError(
                f"sigma={level:g} is in [0, 1] intensity units, so it exceeds the whole range; "
                f"for 8-bit sigma {level:g} pass {level:g}/255 = {level / 255:.4f}"
            )

    def describe(self, level: float) -> str:
        return f"sigma {level * 255:.1f}/255"

    def level_grid(self) -> Tensor:
        """``sigma = 6/255 ... 55/255`` (50 values)."""
        return torch.arange(6, 56, dtype=torch.float64) / 255

    def level_criterion(self, estimate: Tensor, y: Tensor) -> Tensor:
        """``TV(x_hat)`` (:func:`charbonnier_tv`)."""
        return charbonnier_tv(estimate)


class PoissonNoise(NoiseModel):
    """``y = zeta z`` with counts ``z ~ Poisson(x / zeta)``: ``x_hat = (y + zeta / 2) exp(s(z))``.

    The score is taken **with respect to the counts** ``z = y / zeta``, as the authors' code does:
    ``score_fn`` receives ``z`` and returns ``d log p(z) / dz`` (for a count distribution, the derivative
    of the log of its analytic continuation in ``z``). The estimate is ``zeta exp(E[log lambda | z])`` up
    to ``psi(z + 1) ~ log(z + 1/2)`` (exact to < 1% for ``z >= 10``).
    """

    name, level_name = "poisson", "zeta"
    description = "y = zeta Poisson(x / zeta); the network sees the counts y / zeta"
    flag_help = "Poisson scale in [0, 1] intensity units: y = zeta Poisson(x / zeta)"
    ardae_sigma = (1.0, 0.5)  # in counts
    non_negative = counts = True

    def _tweedie(self, y, score_fn, level):
        return (y + level / 2) * torch.exp(score_fn(y / level)), 0.0

    def level_grid(self) -> Tensor:
        """``zeta = 0.005 ... 0.09905`` (100 values, step 0.00095)."""
        return 0.005 + 0.00095 * torch.arange(100, dtype=torch.float64)

    def level_criterion(self, estimate: Tensor, y: Tensor) -> Tensor:
        """``0.1 TV(max(x_hat, 0)) + mean(x_hat - y log x_hat)`` over pixels with ``x_hat > 0`` (the Poisson
        negative log-likelihood of ``y`` up to constants)."""
        pos = estimate > 0
        e, v = estimate[pos], y[pos]
        return 0.1 * charbonnier_tv(estimate.clamp(min=0)) + (e - v * torch.log(e)).mean()


class GammaNoise(NoiseModel):
    """``y = x Gamma(k, 1/k)``: ``x_hat = k y / (k - 1 - y s(y)) = 1 / E[1/x | y]`` (exact).

    The denominator is floored at :attr:`min_denominator` (so ``x_hat <= k y``) where a learned score
    makes it too small or negative: a clean value ``k`` times the noisy one needs a ``Gamma(k, 1/k)``
    draw below ``1/k``, which does not happen for ``k >= 10``.
    """

    name, level_name = "gamma", "k"
    description = "y = x Gamma(k, 1/k): multiplicative noise of mean 1 and variance 1/k"
    flag_help = "Gamma noise shape: y = x Gamma(k, 1/k)"
    ardae_sigma = (0.05, 0.001)
    non_negative = clamps = True
    min_denominator = 1.0

    def check_level(self, level: float | Tensor) -> float:
        """``k`` must also exceed 1: Tweedie's estimate divides by ``k - 1 - y s(y)``."""
        level = super().check_level(level)
        if level <= 1:
            raise ValueError(f"the Gamma shape k must exceed 1 (Tweedie's estimate divides by k - 1 - y s(y)), got {level}")
        return level

    def _tweedie(self, y, score_fn, level):
        denominator = level - 1 - y * score_fn(y)
        clamped = (denominator < self.min_denominator).float().mean().item()
        return level * y / denominator.clamp(min=self.min_denominator), clamped

    def level_grid(self) -> Tensor:
        """``k = 41 ... 120`` (80 values)."""
        return torch.arange(41, 121, dtype=torch.float64)

    def level_criterion(self, estimate: Tensor, y: Tensor) -> Tensor:
        """``TV(x_hat) + mean(log x_hat + y / x_hat + (y / x_hat)^2)`` over pixels with ``x_hat > 0``."""
        pos = estimate > 0
        e, ratio = estimate[pos], y[pos] / estimate[pos]
        return charbonnier_tv(estimate) + torch.log(e).mean() + ratio.mean() + ratio.square().mean()


NOISE_MODELS: dict[str, NoiseModel] = {"gaussian": GaussianNoise(), "poisson": PoissonNoise(), "gamma": GammaNoise()}


def _noise_model(noise: str) -> NoiseModel:
    """The :class:`NoiseModel` named ``noise``, else a ``ValueError`` listing the supported ones."""
    if noise not in NOISE_MODELS:
        raise ValueError(f"unknown noise model {noise!r}; supported noise models are {list(NOISE_MODELS)}")
    return NOISE_MODELS[noise]


def tweedie(
    y: Tensor, score_fn: ScoreFunction, noise: str, level: float, *, return_clamped: bool = False
) -> Tensor | tuple[Tensor, float]:
    """Tweedie's estimate for the noise model named ``noise``: :meth:`NoiseModel.tweedie`."""
    return _noise_model(noise).tweedie(y, score_fn, level, return_clamped=return_clamped)


def level_grid(noise: str) -> Tensor:
    """The blind-mode level grid of the noise model named ``noise``: :meth:`NoiseModel.level_grid`."""
    return _noise_model(noise).level_grid()


def estimate_level(
    y: Tensor, score_fn: ScoreFunction, noise: str, grid: Tensor | Sequence[float] | None = None
) -> tuple[float, Tensor]:
    """Blind level estimation for the noise model named ``noise``: :meth:`NoiseModel.estimate_level`."""
    return _noise_model(noise).estimate_level(y, score_fn, grid)


def _check_images(y: Tensor, model: NoiseModel, what: str = "noisy images") -> None:
    """Images must be floating point, in [0, 1] units (not 0-255), non-negative for Poisson and Gamma noise."""
    if not torch.is_tensor(y):
        raise TypeError(f"{what} must be a torch tensor, got {type(y).__name__}")
    if not y.is_floating_point():
        raise TypeError(
            f"{what} have dtype {y.dtype}; expected floating-point intensities in [0, 1]: "
            "convert 8-bit images with x.float() / 255 (16-bit: / 65535)"
        )
    if y.numel() == 0:
        raise ValueError(f"{what} are empty (shape {tuple(y.shape)}); expected at least one image with pixels")
    if not torch.isfinite(y).all():
        raise ValueError(f"{what} contain NaN or infinite values")
    top = y.max().item()
    if top > _MAX_INTENSITY:
        raise ValueError(
            f"{what} reach {top:.4g}, but Noise2Score expects intensities in [0, 1] units; "
            "divide 8-bit images by 255 (16-bit by 65535)"
        )
    if model.non_negative and y.min().item() < 0:
        raise ValueError(
            f"{model.name} noise is non-negative but the {what} have a minimum of {y.min().item():.4g}; "
            "pass the raw noisy intensities (not mean-subtracted or Gaussian-noised data)"
        )


def _check_fits_net(shape: tuple[int, ...], net: nn.Module, what: str) -> None:
    """Images ``(..., C, H, W)`` must have a :class:`ScoreUNet`'s channels and sides its reflect padding reaches."""
    if not isinstance(net, ScoreUNet):
        return
    channels, (h, w) = net.config["channels"], shape[-2:]
    if shape[-3] != channels:
        raise ValueError(f"{what} have {shape[-3]} channel(s) but the network takes {channels}: denoise with a "
                         f"model trained on {shape[-3]}-channel images")
    least = net.unshuffle * 2**net.depth // 2 + 1
    if min(h, w) < least:
        raise ValueError(f"{what} of {h}x{w} pixels are too small for the network (depth {net.depth}, unshuffle "
                         f"{net.unshuffle}): each side needs at least {least} pixels; use a smaller depth")


# -- AR-DAE score learning -------------------------------------------------------------------------
def ardae_loss(
    net: Callable[[Tensor], Tensor], y: Tensor, sigma_a: float, generator: torch.Generator | None = None,
    *, antithetic: bool = True,
) -> Tensor:
    """AR-DAE objective (paper eq. 13; Lim et al. 2020): ``mean (u + sigma_a R(y + sigma_a u))^2``, ``u ~ N(0, I)``.

    Its minimiser tends to ``R = grad log p(y)`` as ``sigma_a -> 0``. With ``antithetic`` each ``u`` is
    paired with ``-u`` (the batch is doubled): the objective is unchanged, but the ``2 sigma_a u . R(y)``
    term that dominates the gradient noise for small ``sigma_a`` cancels inside every pair. This is a
    variance reduction of ours (the paper and its code draw ``u`` independently); pass ``False`` for theirs.
    """
    u = torch.randn(y.shape, generator=generator, device=y.device, dtype=y.dtype)
    if antithetic:
        y, u = torch.cat([y, y]), torch.cat([u, -u])
    return (u + sigma_a * net(y + sigma_a * u)).square().mean()


def _random_dihedral(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """Per-sample random flips and transposes of square patches (the code's flip/transpose augmentation)."""
    flips = torch.rand(3, x.shape[0], generator=generator, device=x.device) < 0.5
    mask = [f.view(-1, 1, 1, 1) for f in flips]
    x = torch.where(mask[0], x.flip(-1), x)
    x = torch.where(mask[1], x.flip(-2), x)
    return torch.where(mask[2], x.transpose(-1, -2), x)


class ARDAE:
    """The AR-DAE loss as a :class:`~scorekit.training.Trainer` ``loss_fn(model, batch, generator)``, with
    ``sigma_a`` annealed linearly from ``start`` to ``end`` over ``steps`` optimizer steps and then held.

    Schedule: the paper draws ``sigma_a ~ N(0, delta^2)``; the authors' code anneals ``sigma_a`` linearly
    (0.05 -> 0.001 in [0, 1] units, 1 -> 0.5 in counts for Poisson) over 22k samples and restarts every
    epoch. We follow the code's linear ramp and end points, once over the run. Pass :meth:`anneal` to the
    Trainer's ``callbacks``. Square image patches get random flips/transposes when ``augment`` is set.
    """

    def __init__(self, start: float, end: float, steps: int, *, antithetic: bool = True, augment: bool = True):
        self.start, self.end = positive(start, "sigma_a start"), positive(end, "sigma_a end")
        self.steps = positive_int(steps, "steps", "optimizer steps of the sigma_a annealing")
        self.antithetic, self.augment = antithetic, augment
        self.sigma_a = self.start

    def at(self, step: int) -> float:
        """``sigma_a`` after ``step`` optimizer steps."""
        frac = min(step / self.steps, 1.0)
        return self.start + (self.end - self.start) * frac

    def anneal(self, trainer: Trainer) -> None:
        """Trainer callback: set ``sigma_a`` for the next step."""
        self.sigma_a = self.at(trainer.step)

    def __call__(self, model: nn.Module, batch: Tensor, generator: torch.Generator) -> Tensor:
        if self.augment and batch.ndim == 4 and batch.shape[-1] == batch.shape[-2]:
            batch = _random_dihedral(batch, generator)
        return ardae_loss(model, batch, self.sigma_a, generator, antithetic=self.antithetic)


# -- the entry point ---------------------------------------------------------------------------------
class Noise2Score:
    """Noise2Score denoiser: a score network ``net`` for the noisy data and a noise model.

    ``net(v)`` returns ``grad_v log p(v)`` with the shape of ``v``: noisy images ``(B, C, H, W)`` in
    [0, 1] units for Gaussian and Gamma noise, counts ``y / zeta`` for Poisson noise, or vectors ``(B, D)``.
    ``level`` is the noise level (see :data:`NOISE_MODELS`) when it is known. For Poisson noise build the
    network as ``ScoreUNet(input_scale=zeta)`` so that it sees the counts back in [0, 1] units.

    >>> n2s = Noise2Score(ScoreUNet(), noise="gaussian")
    >>> n2s.fit(noisy_images)                 # AR-DAE on patches of the noisy images only
    >>> clean = n2s.denoise(noisy, 25 / 255)  # or noise_level=None: estimated as in the paper's code
    """

    FORMAT = "scorekit.noise2score/1"

    def __init__(self, net: nn.Module, noise: str = "gaussian", level: float | None = None):
        self.noise_model = _noise_model(noise)
        self.noise = noise
        self.level = None if level is None else self.noise_model.check_level(level)
        self.net = net
        self.history: list[float] = []

    def __repr__(self) -> str:
        return f"Noise2Score(noise={self.noise!r}, level={self.level}, net={type(self.net).__name__})"

    # -- the learned score -------------------------------------------------------------------------
    @torch.no_grad()
    def score(self, v: Tensor) -> Tensor:
        """``R(v)``, the learned score of the noisy data (``v`` in network units: counts for Poisson)."""
        self.net.eval()
        param = next(self.net.parameters(), None)
        out = self.net(v.to(param.device, param.dtype) if param is not None else v)
        return out.to(v.device, v.dtype)

    # -- training --------------------------------------------------------------------------------
    def fit(
        self,
        noisy: Tensor | Sequence[Tensor],
        level: float | Sequence[float] | None = None,
        *,
        config: TrainConfig | None = None,
        patch_size: int | None = 48,
        n_patches: int = 4096,
        sigma_a: tuple[float, float] | None = None,
        anneal_steps: int | None = None,
        antithetic: bool = True,
        lr_drop: float | None = 0.5,
        out_dir: str | os.PathLike | None = None,
    ) -> list[float]:
        """Learn the score of the noisy data with AR-DAE (paper Sec. 3.3) and return the loss history.

        ``noisy``: images ``(N, C, H, W)``, a list of ``(C, H, W)`` images of any sizes, or vectors
        ``(N, D)``. From images, ``n_patches`` random ``patch_size`` crops are drawn once (``None``: the
        whole images, which must then share one size); every step takes a batch of them with random
        flips/transposes. ``level``: the noise level, needed for Poisson noise (one per image is allowed:
        the counts ``y / zeta`` are what the network learns); for the others it is only recorded.
        ``config`` sets the optimiser; the default, 2000 steps of Adam (lr 1e-3, batch 8, no gradient
        clipping, EMA 0.999 whose weights are kept), is sized for CPUs: the code's lr 2e-4 with
        betas (0.5, 0.999) and batch 8 of 128^2 patches for 100 epochs is a GPU budget. ``sigma_a`` is the
        AR-DAE annealing ``(start, end)`` in network units (default per noise model, see :class:`ARDAE`),
        over ``anneal_steps`` steps (default: the first half), then held at ``end``. The learning rate is
        divided by 10 after the ``lr_drop`` share of the steps (the code's step policy: x0.1 at epoch 50
        of 100; ``None`` keeps it constant). ``out_dir`` makes the run checkpoint and resume.
        """
        from .training import TrainConfig, Trainer  # accelerate loads only when training

        if patch_size is not None:
            positive_int(patch_size, "patch_size", "pixels")
        positive_int(n_patches, "n_patches")
        if lr_drop is not None:
            fraction(lr_drop, "lr_drop", "share of the steps before the learning rate drops", closed=True)
        cfg = config if config is not None else TrainConfig(
            steps=2000, batch_size=8, lr=1e-3, grad_clip=None, ema_decay=0.999,
            progress=False, checkpoint_every=0,
        )
        if torch.is_tensor(noisy) and noisy.ndim == 2:  # vectors (N, D): every row is a training sample
            if noisy.numel() == 0 or not noisy.is_floating_point():
                raise ValueError(f"noisy vectors must be a non-empty floating-point (N, D) tensor, got "
                                 f"{noisy.dtype} of shape {tuple(noisy.shape)}")
            levels = self._fit_levels(level, 1)
            data = self.noise_model.network_input(noisy.float(), levels[0])
        else:
            images = [noisy] if torch.is_tensor(noisy) and noisy.ndim == 3 else list(noisy)
            if not images:
                raise ValueError("fit needs at least one noisy image")
            for img in images:
                if not torch.is_tensor(img) or img.ndim != 3:
                    raise ValueError(
                        f"noisy must be images (N, C, H, W), a list of (C, H, W) images or vectors (N, D); "
                        f"got an element of shape {tuple(getattr(img, 'shape', ()))}"
                    )
                _check_images(img, self.noise_model)
                if patch_size is None:
                    _check_fits_net(tuple(img.shape), self.net, "the noisy images")
                else:
                    _check_fits_net((img.shape[0], patch_size, patch_size), self.net, "the training patches")
            levels = self._fit_levels(level, len(images))
            inputs = [self.noise_model.network_input(img.float(), lv) for img, lv in zip(images, levels)]
            data = _extract_patches(inputs, patch_size, n_patches, torch.Generator().manual_seed(cfg.seed))
        start, end = sigma_a if sigma_a is not None else self.noise_model.ardae_sigma
        loss = ARDAE(start, end, anneal_steps or max(1, cfg.steps // 2), antithetic=antithetic)
        meta = self._meta() | {"ardae": {"sigma_a": [start, end], "antithetic": antithetic}}
        cfg = dataclasses.replace(cfg)  # the step decay below edits the trainer's copy, not the caller's
        callbacks = [loss.anneal]
        if lr_drop is not None:
            callbacks.append(_step_decay(cfg.lr, int(lr_drop * cfg.steps)))
        trainer = Trainer(self.net, loss, data, cfg, out_dir=out_dir, callbacks=callbacks, meta=meta)
        if out_dir is not None and cfg.resume:
            trainer.resume()
            for callback in callbacks:  # a resumed run continues the schedules where it stopped
                callback(trainer)
        self.history = trainer.train()
        self.net.load_state_dict(trainer.ema.state_dict())
        self.net.eval()
        if levels[0] is not None and len(set(levels)) == 1 and self.level is None:
            self.level = levels[0]
        return self.history

    def _fit_levels(self, level, n: int) -> list[float | None]:
        if level is None:
            if self.noise_model.counts and self.level is None:
                m = self.noise_model
                raise ValueError(
                    f"{m.name.capitalize()} training needs the scale {m.level_name} (level=...) to turn "
                    f"intensities y into counts y / {m.level_name}"
                )
            return [self.level] * n
        if isinstance(level, (int, float)) or (torch.is_tensor(level) and level.numel() == 1):
            return [self.noise_model.check_level(level)] * n
        levels = [self.noise_model.check_level(lv) for lv in level]
        if len(levels) != n:
            raise ValueError(f"got {len(levels)} noise levels for {n} images; pass one level or one per image")
        return levels

    # -- denoising -------------------------------------------------------------------------------
    def estimate_level(self, noisy: Tensor, grid: Tensor | Sequence[float] | None = None) -> float:
        """The noise level of one noisy image ``(C, H, W)`` or ``(1, C, H, W)``, by :meth:`NoiseModel.estimate_level`."""
        y = noisy if noisy.ndim == 4 else noisy.unsqueeze(0)
        _check_images(y, self.noise_model)
        return self.noise_model.estimate_level(y, self.score, grid)[0]

    @torch.no_grad()
    def denoise(
        self, noisy: Tensor, noise_level: float | None = None, *, return_info: bool = False
    ) -> Tensor | tuple[Tensor, dict]:
        """Tweedie's estimate of the clean data (:meth:`NoiseModel.tweedie`) from ``noisy`` and the learned score.

        ``noisy`` is one image ``(C, H, W)``, a batch ``(B, C, H, W)`` or vectors ``(B, D)``. The level
        used is ``noise_level`` if given, else the one the model was built or trained with, else it is
        estimated per image (:meth:`estimate_level`, the blind mode of the paper). Outputs are not clipped.
        ``return_info`` adds ``{"levels": [...], "clamped_fraction": [...]}`` (per image).
        """
        if not torch.is_tensor(noisy):
            raise TypeError(f"noisy must be a torch tensor, got {type(noisy).__name__}")
        single = noisy.ndim == 3
        batch = noisy.unsqueeze(0) if single else noisy
        if batch.ndim not in (2, 4):
            raise ValueError(f"noisy must be (C, H, W), (B, C, H, W) or (B, D), got shape {tuple(noisy.shape)}")
        if batch.ndim == 4:
            _check_images(batch, self.noise_model)
            _check_fits_net(tuple(batch.shape), self.net, "the noisy images")
        elif not batch.is_floating_point():
            raise TypeError(f"noisy has dtype {batch.dtype}; expected a floating-point tensor")
        elif batch.numel() == 0:
            raise ValueError(f"noisy vectors are empty (shape {tuple(batch.shape)})")
        level = noise_level if noise_level is not None else self.level
        if level is not None:
            level = self.noise_model.check_level(level)
            if batch.ndim == 4:
                self.noise_model.check_image_level(level)
        if level is None and batch.ndim == 2:
            raise ValueError("the noise level must be given for vector data: blind estimation works on images")
        chunks = [batch] if batch.ndim == 2 else list(batch.split(1))
        outs, levels, clamped = [], [], []
        for y in chunks:
            lv = level if level is not None else self.noise_model.estimate_level(y, self.score)[0]
            out, frac = self.noise_model.tweedie(y, self.score, lv, return_clamped=True)
            outs.append(out)
            levels.append(lv)
            clamped.append(frac)
        result = torch.cat(outs)
        result = result[0] if single else result
        return (result, {"levels": levels, "clamped_fraction": clamped}) if return_info else result

    # -- persistence -----------------------------------------------------------------------------
    def _meta(self) -> dict:
        net = {"class": type(self.net).__name__}
        if isinstance(self.net, ScoreUNet):
            net["config"] = self.net.config
        return {"format": self.FORMAT, "noise": self.noise, "level": self.level, "net": net}

    def save(self, path: str | os.PathLike) -> None:
        """Write the network weights (safetensors) with the noise model, level and network config, atomically."""
        save_tensors(self.net.state_dict(), path, self._meta())

    @classmethod
    def load(
        cls, path: str | os.PathLike, *, noise: str | None = None, net: nn.Module | None = None,
        device: str | torch.device = "cpu",
    ) -> Noise2Score:
        """Rebuild a model saved by :meth:`save`. ``noise``, when given, must be the checkpoint's noise model;
        ``net`` is required when the checkpoint holds a network other than :class:`ScoreUNet`."""
        from .training import load_state_checked

        tensors, meta = load_tensors(path, device)
        if meta.get("format") != cls.FORMAT:
            raise ValueError(f"{path} is not a Noise2Score checkpoint (format {meta.get('format')!r}, expected {cls.FORMAT!r})")
        trained_for, level = meta_field(meta, "noise", path), meta_field(meta, "level", path)
        if noise is not None and _noise_model(noise).name != trained_for:
            raise ValueError(
                f"{path} was trained for {trained_for} noise and cannot denoise {noise} noise: the score of "
                f"the noisy data depends on the noise model; train a {noise} model (Noise2Score(..., noise={noise!r}).fit)"
            )
        if net is None:
            info = meta_field(meta, "net", path)
            if meta_field(info, "class", path, "'net' metadata") != "ScoreUNet":
                raise ValueError(f"{path} holds a {info['class']} network; pass an instance of it as net=")
            net = ScoreUNet(**meta_field(info, "config", path, "'net' metadata"))
        load_state_checked(net, tensors, Path(path))
        net.to(device).eval()
        return cls(net, trained_for, level)


def _step_decay(lr: float, at: int) -> Callable[[Trainer], None]:
    """Trainer callback: learning rate ``lr`` before step ``at``, ``lr / 10`` from then on."""

    def callback(trainer: Trainer) -> None:
        trainer.config.lr = lr if trainer.step < at else lr / 10

    return callback


def _extract_patches(images: list[Tensor], size: int | None, n: int, generator: torch.Generator) -> Tensor:
    """``n`` random ``size x size`` crops drawn uniformly over images and positions (or the images themselves)."""
    if size is None:
        shapes = {tuple(img.shape) for img in images}
        if len(shapes) != 1:
            raise ValueError(f"patch_size=None needs images of one size, got shapes {sorted(shapes)}")
        return torch.stack(images)
    small = [tuple(img.shape) for img in images if min(img.shape[-2:]) < size]
    if small:
        raise ValueError(f"patch_size={size} does not fit images of shape {small}; lower patch_size")
    which = torch.randint(len(images), (n,), generator=generator)
    patches = []
    for i in which.tolist():
        img = images[i]
        top = int(torch.randint(img.shape[-2] - size + 1, (1,), generator=generator))
        left = int(torch.randint(img.shape[-1] - size + 1, (1,), generator=generator))
        patches.append(img[..., top : top + size, left : left + size])
    return torch.stack(patches)
