"""Noise2Score (Kim & Ye, NeurIPS 2021): self-supervised denoising from noisy images alone.

Two steps:

1. Learn the score ``l'(y) = grad_y log p(y)`` of the *noisy* images with the amortized residual
   denoising autoencoder (AR-DAE, Lim et al. 2020): minimise ``E ||u + sigma_a R(y + sigma_a u)||^2``
   over ``u ~ N(0, I)`` while ``sigma_a`` is annealed towards 0 (:func:`ardae_loss`, :class:`ARDAE`).
   ``R`` sees only noisy data and is not conditioned on ``sigma_a``.
2. Plug the score into Tweedie's formula for the exponential-family noise model (:func:`tweedie`):
   Gaussian ``y = x + sigma n`` (``level = sigma``), Poisson ``y = zeta Poisson(x / zeta)``
   (``level = zeta``) or Gamma ``y = x Gamma(k, 1/k)`` (``level = k``).

When the noise level is unknown it is picked from a grid by the total-variation criteria of the
authors' code (:func:`estimate_level`). :class:`Noise2Score` ties the pieces together; images are
float tensors in ``[0, 1]`` intensity units throughout, so ``sigma = 25/255`` for "sigma 25".
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checkpoint import load_checkpoint, save_checkpoint
from .score import tweedie_denoise
from .sde import VESDE
from .training import TrainConfig, Trainer

__all__ = [
    "NOISE_MODELS",
    "tweedie",
    "estimate_level",
    "level_grid",
    "level_criterion",
    "charbonnier_tv",
    "ardae_loss",
    "ARDAE",
    "ScoreUNet",
    "Noise2Score",
    "check_noise",
    "check_level",
]

# noise model -> (name of its level, what it means); `level` is in the units written here.
NOISE_MODELS: dict[str, tuple[str, str]] = {
    "gaussian": ("sigma", "y = x + sigma n, n ~ N(0, I); sigma in [0, 1] intensity units (25/255 for 'sigma 25')"),
    "poisson": ("zeta", "y = zeta Poisson(x / zeta); the network sees the counts y / zeta"),
    "gamma": ("k", "y = x Gamma(k, 1/k): multiplicative noise of mean 1 and variance 1/k"),
}

# sigma_a annealing (start, end) of the authors' code, in the units the network sees: [0, 1] intensities
# for Gaussian and Gamma, counts for Poisson.
ARDAE_SIGMA: dict[str, tuple[float, float]] = {"gaussian": (0.05, 0.001), "poisson": (1.0, 0.5), "gamma": (0.05, 0.001)}

# The Gamma estimate k y / (k - 1 - y s(y)) is floored at this denominator, which caps it at k y: a clean
# value k times the noisy one needs a Gamma(k, 1/k) draw below 1/k, which does not happen for k >= 10.
GAMMA_MIN_DENOMINATOR = 1.0

# Images brighter than this are taken for 8- or 16-bit data that was not rescaled to [0, 1].
_MAX_INTENSITY = 4.0

ScoreFunction = Callable[[Tensor], Tensor]


# -- validation ------------------------------------------------------------------------------------
def check_noise(noise: str) -> str:
    """Return ``noise`` if it names a supported noise model, else raise a ``ValueError`` listing them."""
    if noise not in NOISE_MODELS:
        raise ValueError(f"unknown noise model {noise!r}; supported noise models are {list(NOISE_MODELS)}")
    return noise


def check_level(noise: str, level: float) -> float:
    """Validate a noise level for ``noise`` (positive and finite; Gamma needs ``k > 1``) and return it as a float."""
    name = NOISE_MODELS[check_noise(noise)][0]
    if torch.is_tensor(level):
        if level.numel() != 1:
            raise ValueError(f"{name} must be a single number, got a tensor of shape {tuple(level.shape)}")
        level = level.item()
    level = float(level)
    if not math.isfinite(level) or level <= 0:
        raise ValueError(f"the {noise} noise level {name} must be a positive number, got {level}")
    if noise == "gamma" and level <= 1:
        raise ValueError(f"the Gamma shape k must exceed 1 (Tweedie's estimate divides by k - 1 - y s(y)), got {level}")
    return level


def _check_images(y: Tensor, noise: str, what: str = "noisy images") -> None:
    """Images must be floating point, in [0, 1] units (not 0-255), non-negative for Poisson and Gamma noise."""
    if not torch.is_tensor(y):
        raise TypeError(f"{what} must be a torch tensor, got {type(y).__name__}")
    if not y.is_floating_point():
        raise TypeError(
            f"{what} have dtype {y.dtype}; expected floating-point intensities in [0, 1]: "
            "convert 8-bit images with x.float() / 255 (16-bit: / 65535)"
        )
    if not torch.isfinite(y).all():
        raise ValueError(f"{what} contain NaN or infinite values")
    top = y.max().item()
    if top > _MAX_INTENSITY:
        raise ValueError(
            f"{what} reach {top:.4g}, but Noise2Score expects intensities in [0, 1] units; "
            "divide 8-bit images by 255 (16-bit by 65535)"
        )
    if noise in ("poisson", "gamma") and y.min().item() < 0:
        raise ValueError(
            f"{noise} noise is non-negative but the {what} have a minimum of {y.min().item():.4g}; "
            "pass the raw noisy intensities (not mean-subtracted or Gaussian-noised data)"
        )


# -- Tweedie's formula for exponential-family noise ------------------------------------------------
def tweedie(
    y: Tensor, score_fn: ScoreFunction, noise: str, level: float, *, return_clamped: bool = False
) -> Tensor | tuple[Tensor, float]:
    """Noise2Score's closed-form estimate of the clean image from ``y`` and the score of the noisy data.

    ``score_fn(v)`` is ``grad_v log p(v)`` for the noisy distribution, evaluated where the noise model
    says (paper, Sec. 3.2 and Table 1):

    - ``"gaussian"``, ``level = sigma``: ``x_hat = y + sigma^2 s(y) = E[x | y]``, the posterior mean
      (computed by :func:`scorekit.tweedie_denoise`: ``y`` is the VE SDE's marginal at ``t = 0`` with
      ``sigma_min = sigma``).
    - ``"poisson"``, ``level = zeta``: ``y = zeta z`` with counts ``z ~ Poisson(x / zeta)``. The score is
      taken **with respect to the counts** ``z = y / zeta``, as the authors' code does: ``score_fn``
      receives ``z`` and returns ``d log p(z) / dz`` (for a count distribution, the derivative of the
      log of its analytic continuation in ``z``). Then ``x_hat = (y + zeta / 2) exp(s(z))``, which is
      ``zeta exp(E[log lambda | z])`` up to ``psi(z + 1) ~ log(z + 1/2)`` (exact to < 1% for ``z >= 10``).
    - ``"gamma"``, ``level = k``: ``x_hat = k y / (k - 1 - y s(y)) = 1 / E[1/x | y]`` (exact). The
      denominator is floored at ``GAMMA_MIN_DENOMINATOR`` (so ``x_hat <= k y``) where a learned score
      makes it too small or negative; ``return_clamped=True`` also returns the clamped fraction.

    Returns the estimate with the shape of ``y`` (and the clamped fraction, 0 for Gaussian and Poisson).
    """
    check_noise(noise)
    level = check_level(noise, level)
    clamped = 0.0
    if noise == "gaussian":
        sde = VESDE(sigma_min=level, sigma_max=2 * level)  # only its t = 0 marginal, y = x + sigma n, is used
        estimate = tweedie_denoise(lambda v, t: score_fn(v), sde, y, 0.0)
    elif noise == "poisson":
        estimate = (y + level / 2) * torch.exp(score_fn(y / level))
    else:
        denominator = level - 1 - y * score_fn(y)
        low = denominator < GAMMA_MIN_DENOMINATOR
        clamped = low.float().mean().item()
        estimate = level * y / denominator.clamp(min=GAMMA_MIN_DENOMINATOR)
    return (estimate, clamped) if return_clamped else estimate


# -- blind mode: choose the noise level by a total-variation criterion ------------------------------
def charbonnier_tv(x: Tensor, eps: float = 1e-6) -> Tensor:
    """Anisotropic total variation with a Charbonnier penalty: ``mean sqrt(dx^2 + eps^2) + mean sqrt(dy^2 + eps^2)``."""
    dh = x[..., 1:, :] - x[..., :-1, :]
    dw = x[..., :, 1:] - x[..., :, :-1]
    return (dh.square() + eps**2).sqrt().mean() + (dw.square() + eps**2).sqrt().mean()


def level_grid(noise: str) -> Tensor:
    """The candidate levels the authors' blind test scripts search (float64):

    Gaussian ``sigma = 6/255 ... 55/255`` (50 values), Poisson ``zeta = 0.005 ... 0.09905`` (100 values,
    step 0.00095), Gamma ``k = 41 ... 120`` (80 values).
    """
    if check_noise(noise) == "gaussian":
        return torch.arange(6, 56, dtype=torch.float64) / 255
    if noise == "poisson":
        return 0.005 + 0.00095 * torch.arange(100, dtype=torch.float64)
    return torch.arange(41, 121, dtype=torch.float64)


def level_criterion(estimate: Tensor, y: Tensor, noise: str) -> Tensor:
    """The score the blind mode minimises over the level grid (authors' ``forward_tv``):

    - Gaussian: ``TV(x_hat)``;
    - Poisson: ``0.1 TV(max(x_hat, 0)) + mean(x_hat - y log x_hat)`` over pixels with ``x_hat > 0``
      (the Poisson negative log-likelihood of ``y`` up to constants);
    - Gamma: ``TV(x_hat) + mean(log x_hat + y / x_hat + (y / x_hat)^2)`` over pixels with ``x_hat > 0``.

    ``TV`` is :func:`charbonnier_tv`.
    """
    if check_noise(noise) == "gaussian":
        return charbonnier_tv(estimate)
    pos = estimate > 0
    e, v = estimate[pos], y[pos]
    if noise == "poisson":
        return 0.1 * charbonnier_tv(estimate.clamp(min=0)) + (e - v * torch.log(e)).mean()
    ratio = v / e
    return charbonnier_tv(estimate) + torch.log(e).mean() + ratio.mean() + ratio.square().mean()


def estimate_level(
    y: Tensor, score_fn: ScoreFunction, noise: str, grid: Tensor | Sequence[float] | None = None
) -> tuple[float, Tensor]:
    """Blind Noise2Score: the grid level whose Tweedie estimate minimises :func:`level_criterion`.

    ``y`` is one image (or a batch assumed to share one level); ``grid`` defaults to :func:`level_grid`.
    Gaussian and Gamma scores do not depend on the level, so the network runs once; Poisson counts
    ``y / zeta`` do, so it runs once per candidate. Returns ``(best level, criterion per grid value)``.
    """
    check_noise(noise)
    grid = level_grid(noise) if grid is None else torch.as_tensor(grid, dtype=torch.float64).flatten()
    if grid.numel() == 0:
        raise ValueError("the level grid is empty")
    if noise != "poisson":
        s = score_fn(y)
        score_fn = lambda v: s  # noqa: E731 - the score of y, reused for every candidate level
    values = torch.stack([
        level_criterion(tweedie(y, score_fn, noise, float(level)), y, noise).double() for level in grid
    ])
    return float(grid[int(torch.argmin(values))]), values


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
        if not (start > 0 and end > 0):
            raise ValueError(f"sigma_a must stay positive, got start={start}, end={end}")
        if steps < 1:
            raise ValueError(f"the annealing needs at least one step, got steps={steps}")
        self.start, self.end, self.steps = float(start), float(end), int(steps)
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


# -- the network -------------------------------------------------------------------------------------
class ScoreUNet(nn.Module):
    """``R(y)``: a compact, un-conditioned U-Net after the Noise2Noise network of the authors' code
    (3x3 convolutions, LeakyReLU(0.1), max-pooling, no normalisation, the input concatenated before the
    last layers), made CPU-sized: ``width`` channels at every scale, ``depth`` poolings (the code: 48
    and 5), and, as in FFDNet (Zhang et al. 2018), the image is first split into ``unshuffle^2``
    sub-sampled channels (``pixel_unshuffle``) so that every convolution runs at reduced resolution;
    the output is re-assembled by ``pixel_shuffle``. Inputs of any size are reflect-padded to a multiple
    of ``unshuffle * 2^depth`` and cropped back. Weights keep PyTorch's default initialisation: the
    code's N(0, 0.02) starts the output near 1e-5 while noisy-image scores are of order 1/sigma ~ 10,
    which short CPU runs cannot afford to grow into.

    ``input_scale`` multiplies the input before the first convolution (the output, the score, is in the
    input's own units). Poisson networks see counts ``y / zeta`` of order ``1 / zeta`` (~100); pass
    ``input_scale=zeta`` so the convolutions see intensities in [0, 1]: with raw counts AR-DAE did not
    get below the noisy input in our CPU runs.
    """

    def __init__(
        self, channels: int = 1, width: int = 48, depth: int = 3, unshuffle: int = 2, input_scale: float = 1.0
    ):
        super().__init__()
        if min(channels, width, depth, unshuffle) < 1:
            raise ValueError(
                f"channels, width, depth and unshuffle must be >= 1, got {channels}, {width}, {depth}, {unshuffle}"
            )
        if not (math.isfinite(input_scale) and input_scale > 0):
            raise ValueError(f"input_scale must be a positive number, got {input_scale}")
        self.config = {
            "channels": channels, "width": width, "depth": depth, "unshuffle": unshuffle, "input_scale": float(input_scale),
        }
        self.depth, self.unshuffle, self.input_scale = depth, unshuffle, float(input_scale)
        c = channels * unshuffle**2

        def conv(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.LeakyReLU(0.1)]

        self.inc = nn.Sequential(*conv(c, width), *conv(width, width))
        self.down = nn.ModuleList(nn.Sequential(*conv(width, width)) for _ in range(depth))
        self.up = nn.ModuleList(nn.Sequential(*conv(2 * width, width), *conv(width, width)) for _ in range(depth))
        self.out = nn.Sequential(*conv(width + c, width), nn.Conv2d(width, c, 3, padding=1))

    def forward(self, y: Tensor) -> Tensor:
        h, w = y.shape[-2:]
        m = self.unshuffle * 2**self.depth
        ph, pw = -h % m, -w % m
        x = y * self.input_scale if self.input_scale != 1.0 else y
        x = F.pad(x, (0, pw, 0, ph), mode="reflect") if ph or pw else x
        x = F.pixel_unshuffle(x, self.unshuffle)
        feat = self.inc(x)
        skips = [feat]
        for block in self.down:
            feat = block(F.max_pool2d(feat, 2))
            skips.append(feat)
        skips.pop()
        for block in self.up:
            feat = block(torch.cat([F.interpolate(feat, scale_factor=2.0, mode="nearest"), skips.pop()], 1))
        out = self.out(torch.cat([feat, x], 1))
        return F.pixel_shuffle(out, self.unshuffle)[..., :h, :w]


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
        self.noise = check_noise(noise)
        self.level = None if level is None else check_level(noise, level)
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

    def _network_input(self, y: Tensor, level: float | None) -> Tensor:
        return y / level if self.noise == "poisson" else y

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
        cfg = config if config is not None else TrainConfig(
            steps=2000, batch_size=8, lr=1e-3, grad_clip=None, ema_decay=0.999,
            progress=False, checkpoint_every=0,
        )
        if torch.is_tensor(noisy) and noisy.ndim == 2:  # vectors (N, D): every row is a training sample
            levels = self._fit_levels(level, 1)
            data = self._network_input(noisy.float(), levels[0])
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
                _check_images(img, self.noise)
            levels = self._fit_levels(level, len(images))
            inputs = [self._network_input(img.float(), lv) for img, lv in zip(images, levels)]
            data = _extract_patches(inputs, patch_size, n_patches, torch.Generator().manual_seed(cfg.seed))
        start, end = sigma_a if sigma_a is not None else ARDAE_SIGMA[self.noise]
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
            if self.noise == "poisson" and self.level is None:
                raise ValueError(
                    "Poisson training needs the scale zeta (level=...) to turn intensities y into counts y / zeta"
                )
            return [self.level] * n
        if isinstance(level, (int, float)) or (torch.is_tensor(level) and level.numel() == 1):
            return [check_level(self.noise, level)] * n
        levels = [check_level(self.noise, lv) for lv in level]
        if len(levels) != n:
            raise ValueError(f"got {len(levels)} noise levels for {n} images; pass one level or one per image")
        return levels

    # -- denoising -------------------------------------------------------------------------------
    def estimate_level(self, noisy: Tensor, grid: Tensor | Sequence[float] | None = None) -> float:
        """The noise level of one noisy image ``(C, H, W)`` or ``(1, C, H, W)``, by :func:`estimate_level`."""
        y = noisy if noisy.ndim == 4 else noisy.unsqueeze(0)
        _check_images(y, self.noise)
        return estimate_level(y, self.score, self.noise, grid)[0]

    @torch.no_grad()
    def denoise(
        self, noisy: Tensor, noise_level: float | None = None, *, return_info: bool = False
    ) -> Tensor | tuple[Tensor, dict]:
        """Tweedie's estimate of the clean data (:func:`tweedie`) from ``noisy`` and the learned score.

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
            _check_images(batch, self.noise)
        elif not batch.is_floating_point():
            raise TypeError(f"noisy has dtype {batch.dtype}; expected a floating-point tensor")
        level = noise_level if noise_level is not None else self.level
        if level is not None:
            level = check_level(self.noise, level)
            if self.noise == "gaussian" and batch.ndim == 4 and level >= 1:
                raise ValueError(
                    f"sigma={level:g} is in [0, 1] intensity units, so it exceeds the whole range; "
                    f"for 8-bit sigma {level:g} pass {level:g}/255 = {level / 255:.4f}"
                )
        if level is None and batch.ndim == 2:
            raise ValueError("the noise level must be given for vector data: blind estimation works on images")
        chunks = [batch] if batch.ndim == 2 else list(batch.split(1))
        outs, levels, clamped = [], [], []
        for y in chunks:
            lv = level if level is not None else estimate_level(y, self.score, self.noise)[0]
            out, frac = tweedie(y, self.score, self.noise, lv, return_clamped=True)
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
        save_checkpoint(path, self.net.state_dict(), self._meta())

    @classmethod
    def load(
        cls, path: str | os.PathLike, *, noise: str | None = None, net: nn.Module | None = None,
        device: str | torch.device = "cpu",
    ) -> Noise2Score:
        """Rebuild a model saved by :meth:`save`. ``noise``, when given, must be the checkpoint's noise model;
        ``net`` is required when the checkpoint holds a network other than :class:`ScoreUNet`."""
        tensors, meta = load_checkpoint(path, device)
        if meta.get("format") != cls.FORMAT:
            raise ValueError(f"{path} is not a Noise2Score checkpoint (format {meta.get('format')!r}, expected {cls.FORMAT!r})")
        if noise is not None and check_noise(noise) != meta["noise"]:
            raise ValueError(
                f"{path} was trained for {meta['noise']} noise and cannot denoise {noise} noise: the score of "
                f"the noisy data depends on the noise model; train a {noise} model (Noise2Score(..., noise={noise!r}).fit)"
            )
        if net is None:
            if meta["net"]["class"] != "ScoreUNet":
                raise ValueError(f"{path} holds a {meta['net']['class']} network; pass an instance of it as net=")
            net = ScoreUNet(**meta["net"]["config"])
        net.load_state_dict(tensors)
        net.to(device).eval()
        return cls(net, meta["noise"], meta["level"])


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
