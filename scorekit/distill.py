"""f-distill: one-step generators by f-divergence distribution matching (Xu, Nie & Vahdat 2025).

A one-step generator ``x = G(z)`` is trained so that its diffused law ``q_t`` matches the teacher's
marginal ``p_t``. For ``D_f(p_t || q_t) = E_q[f(p_t / q_t)]`` the generator gradient is (paper, eq. 7)

    grad_theta D_f = E_{t, z, eps}[ h(r) (s_q(x_t) - s_p(x_t)) dx_t/dtheta ],   h(r) = r^2 f''(r) >= 0,

with ``r = p_t / q_t``. Reverse KL has ``h = 1``: DMD / Diff-Instruct / variational score distillation.
As in the authors' reference code (NVlabs/FastGen, built on DMD2), the score difference is taken in
``x0`` space, ``x0_fake - x0_teacher = sigma_t^2 / alpha_t (s_q - s_p)``, scaled per sample by DMD's
``1 / mean|x - x0_teacher|``; ``s_q`` comes from a *fake score* network (initialised from the teacher,
trained by denoising score matching on generator samples) and ``r = exp(logit)`` from a discriminator
on teacher features trained with the GAN loss ``softplus(logit_fake) + softplus(-logit_real)``, whose
optimum is ``logit = log p_t / q_t``. ``r`` is clipped, normalised per time bin, passed through ``h``
and ``h`` is divided by its batch mean. The fake score and the discriminator take ``critic_steps``
updates per generator update (DMD2's two-time-scale rule).

Public pieces: :data:`DIVERGENCES` (name -> ``h``), :func:`alpha_divergence`, the weighting
(:func:`density_ratio`, :class:`RatioNormalizer`, :func:`f_weights`), the generator update
(:func:`distillation_direction`, :func:`distillation_loss`), the networks (:class:`OneStepGenerator`,
:class:`MLPDiscriminator`, :class:`TeacherFeatureDiscriminator`), :class:`DistillConfig`,
:class:`FDistill` (training loop on accelerate with EMA, checkpoints and resume) and
:func:`save_generator` / :func:`load_generator`.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from .checkpoint import (
    atomic_dir,
    load_tensors,
    optimizer_from_tensors,
    optimizer_to_tensors,
    save_json,
    save_tensors,
)
from .losses import dsm_loss
from .nets.mlp import sinusoidal_embedding
from .score import ScoreFn, ScoreModel, data_shape_of, tweedie_denoise
from .sde import SDE, bcast
from .training import (
    latest_checkpoint,
    load_state_checked,
    prune_checkpoints,
    read_checkpoint,
    resolve_precision,
    update_ema,
)

__all__ = [
    "DIVERGENCES",
    "alpha_divergence",
    "resolve_divergence",
    "density_ratio",
    "RatioNormalizer",
    "f_weights",
    "distillation_direction",
    "distillation_loss",
    "discriminator_loss",
    "OneStepGenerator",
    "MLPDiscriminator",
    "TeacherFeatureDiscriminator",
    "DistillConfig",
    "FDistill",
    "EmpiricalCritic",
    "save_generator",
    "load_generator",
]

HFn = Callable[[Tensor], Tensor]
FORMAT = "scorekit-fdistill/1"
GENERATOR_FORMAT = "scorekit-fdistill-generator/1"


# -- divergences: h(r) = r^2 f''(r) (paper, Table 1) ------------------------------------------------
def _reverse_kl(r: Tensor) -> Tensor:
    """``f = -log r`` (KL(q || p)): ``h = 1``, DMD / VSD."""
    return torch.ones_like(r)


def _softened_reverse_kl(r: Tensor) -> Tensor:
    """``f = (r + 1) log((r + 1) / (2 r))`` (2 KL((p + q)/2 || p)): ``h = 1 / (r + 1)``."""
    return 1 / (r + 1)


def _js(r: Tensor) -> Tensor:
    """``f = r log r - (r + 1) log((r + 1) / 2)`` (Jensen-Shannon): ``h = r / (r + 1)``."""
    return r / (r + 1)


def _hellinger(r: Tensor) -> Tensor:
    """``f = 1 - sqrt(r)`` (squared Hellinger): ``h = sqrt(r) / 4``."""
    return 0.25 * torch.sqrt(r)


def _forward_kl(r: Tensor) -> Tensor:
    """``f = r log r`` (KL(p || q)): ``h = r``."""
    return r


def _jeffreys(r: Tensor) -> Tensor:
    """``f = (r - 1) log r`` (KL(p || q) + KL(q || p)): ``h = r + 1``."""
    return r + 1


def _pearson(r: Tensor) -> Tensor:
    """``f = (r - 1)^2`` (Pearson chi^2): ``h = 2 r^2``."""
    return 2 * r**2


def _neyman(r: Tensor) -> Tensor:
    """``f = (1 - r)^2 / r`` (Neyman chi^2): ``h = 2 / r``."""
    return 2 / r


DIVERGENCES: dict[str, HFn] = {
    "reverse_kl": _reverse_kl,
    "softened_reverse_kl": _softened_reverse_kl,
    "js": _js,
    "hellinger": _hellinger,
    "forward_kl": _forward_kl,
    "jeffreys": _jeffreys,
    "pearson": _pearson,
    "neyman": _neyman,
}


def alpha_divergence(alpha: float) -> HFn:
    """``h(r) = r^alpha`` of the alpha family ``f = (r^a - a r - 1 + a) / (a (a - 1))`` (paper, Table 1):
    ``a = 0`` is reverse KL, ``1`` forward KL, ``1/2`` Hellinger, ``2`` Pearson and ``-1`` Neyman, up to
    constants (which the weight normalisation removes)."""
    alpha = float(alpha)
    if not math.isfinite(alpha):
        raise ValueError(f"alpha must be a finite number, got {alpha}")

    def h(r: Tensor) -> Tensor:
        return r**alpha

    h.__name__ = f"alpha_{alpha:g}"
    return h


def resolve_divergence(divergence: str | HFn, alpha: float | None = None) -> HFn:
    """``h`` for a name of :data:`DIVERGENCES`, ``"alpha"`` (with ``alpha``), or a callable ``h``."""
    if callable(divergence):
        return divergence
    if divergence == "alpha":
        if alpha is None:
            raise ValueError("divergence 'alpha' needs the alpha parameter (e.g. alpha=0.5 for Hellinger)")
        return alpha_divergence(alpha)
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; valid names are {sorted(DIVERGENCES)} or 'alpha'")
    return DIVERGENCES[divergence]


# -- the density-ratio weighting (FastGen's f-distill) ---------------------------------------------
def density_ratio(logit: Tensor, clip: tuple[float, float] | None = (0.1, 20.0), logit_clamp: float | None = 10.0
                  ) -> Tensor:
    """``r = exp(logit)`` of a discriminator logit, in float32 or wider.

    The logit is clamped to ``[-logit_clamp, logit_clamp]`` before the exponential and ``r`` is clipped
    to ``clip``, as the reference code does; NaN logits raise (they mean the discriminator diverged).
    """
    if bool(torch.isnan(logit).any()):
        raise FloatingPointError(
            f"the discriminator returned NaN logits for {int(torch.isnan(logit).sum())} of {logit.numel()} "
            "samples: the density ratio is undefined; lower the learning rate or resume from an earlier checkpoint"
        )
    logit = logit.detach().to(torch.promote_types(logit.dtype, torch.float32))
    if logit_clamp is not None:
        logit = logit.clamp(-logit_clamp, logit_clamp)
    r = torch.exp(logit)
    return r if clip is None else r.clamp(*clip)


class RatioNormalizer(nn.Module):
    """Divide ``r`` by the mean ``r`` of its time bin: ``bins`` equal-width bins over ``[t_min, t_max]``.

    The bin means are an EMA (``ema`` = weight of the old value; 0 uses the batch's own bin means, the
    reference code's CIFAR-10 setting) kept as a buffer, so they travel with checkpoints. Bins that the
    batch leaves empty keep their previous mean.
    """

    def __init__(self, bins: int = 10, t_min: float = 0.0, t_max: float = 1.0, ema: float = 0.0):
        super().__init__()
        if bins < 1:
            raise ValueError(f"bins must be >= 1, got {bins}")
        if not 0 <= ema < 1:
            raise ValueError(f"ema must lie in [0, 1), got {ema}")
        if not t_min < t_max:
            raise ValueError(f"need t_min < t_max, got {t_min} and {t_max}")
        self.bins, self.t_min, self.t_max, self.ema = int(bins), float(t_min), float(t_max), float(ema)
        self.register_buffer("means", torch.ones(self.bins, dtype=torch.float64))

    def bin_index(self, t: Tensor) -> Tensor:
        width = (self.t_max - self.t_min) / self.bins
        return ((t.double() - self.t_min) / width).floor().long().clamp(0, self.bins - 1)

    def forward(self, r: Tensor, t: Tensor, reduce_sum: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        idx = self.bin_index(t)
        count = torch.bincount(idx, minlength=self.bins).double()
        total = torch.bincount(idx, weights=r.double(), minlength=self.bins)
        if reduce_sum is not None:
            count, total = reduce_sum(count), reduce_sum(total)
        seen = count > 0
        batch_means = total[seen] / count[seen]
        self.means[seen] = self.ema * self.means[seen] + (1 - self.ema) * batch_means
        return r / self.means[idx].to(r.dtype)

    def extra_repr(self) -> str:
        return f"bins={self.bins}, t_range=({self.t_min}, {self.t_max}), ema={self.ema}"


def f_weights(
    logit: Tensor,
    t: Tensor,
    h: HFn,
    *,
    clip: tuple[float, float] | None = (0.1, 20.0),
    logit_clamp: float | None = 10.0,
    normalizer: RatioNormalizer | None = None,
    reduce_sum: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Per-sample weights ``h(r) / mean h(r)`` with ``r = exp(logit)`` clipped and normalised per time bin.

    This is the two-stage normalisation of the reference code: ``r`` divided by its bin mean, then
    ``h`` divided by its (global, with ``reduce_sum``) batch mean, so the mean weight is 1 and DMD's
    learning rates carry over. ``reduce_sum`` sums a tensor over processes (identity by default).
    """
    r = density_ratio(logit, clip, logit_clamp)
    if normalizer is not None:
        r = normalizer(r, t, reduce_sum)
    w = h(r)
    total, count = w.sum(), torch.tensor(float(w.numel()), dtype=w.dtype, device=w.device)
    if reduce_sum is not None:
        total, count = reduce_sum(total), reduce_sum(count)
    if not bool(torch.isfinite(total)) or float(total) <= 0:
        raise FloatingPointError(f"the f-divergence weights h(r) sum to {float(total)}: expected a positive finite number")
    return w / (total / count)


# -- the generator update (DMD's VSD loss with f-distill's weights) ----------------------------------
def distillation_direction(x: Tensor, x0_teacher: Tensor, x0_fake: Tensor, weight: Tensor | None = None,
                           dmd_normalize: bool = True) -> Tensor:
    """The per-sample descent direction ``w (x0_fake - x0_teacher)`` for the generator output ``x``.

    ``x0_fake - x0_teacher = sigma_t^2 / alpha_t (s_q - s_p)(x_t)``, so this is the f-divergence gradient
    (eq. 7) with the paper's time weighting; ``weight`` is ``h(r)`` (None: reverse KL) and
    ``dmd_normalize`` multiplies by DMD's ``1 / mean|x - x0_teacher|`` (computed per sample, in float32 or wider).
    """
    with torch.no_grad():
        dims = tuple(range(1, x.ndim))
        direction = x0_fake - x0_teacher
        if dmd_normalize:
            wide = torch.promote_types(x.dtype, torch.float32)
            scale = 1 / ((x.to(wide) - x0_teacher.to(wide)).abs().mean(dim=dims, keepdim=True) + 1e-6)
            direction = direction * scale.to(direction.dtype)
        if weight is not None:
            direction = direction * bcast(weight.to(direction.dtype), direction)
    return direction


def distillation_loss(x: Tensor, direction: Tensor) -> Tensor:
    """``1/2 mean ||x - sg(x - direction)||^2``: its gradient with respect to ``x`` is ``direction / x.numel()``."""
    return 0.5 * F.mse_loss(x, (x - direction).detach())


def discriminator_loss(logit_real: Tensor, logit_fake: Tensor) -> Tensor:
    """The GAN loss ``softplus(logit_fake) + softplus(-logit_real)``; optimal logit ``log p / q``."""
    return F.softplus(logit_fake).mean() + F.softplus(-logit_real).mean()


# -- networks --------------------------------------------------------------------------------------
class OneStepGenerator(nn.Module):
    """``G(z) = x0_hat(prior_std z, time)``: Tweedie's denoiser of a (trainable) score model at ``time``.

    Built from a teacher with :meth:`from_teacher`, this is the paper's initialisation: the student is
    the teacher network run once from pure noise (``time = T`` by default). With an ``eps``-predicting
    VP teacher, ``x0_hat = (x - sigma eps) / alpha`` amplifies network errors by ``sigma / alpha`` (about
    150 at ``T = 1``); a smaller ``time`` keeps that factor moderate.
    """

    def __init__(self, score_model: nn.Module, sde: SDE, time: float | None = None,
                 data_shape: tuple[int, ...] | None = None):
        super().__init__()
        self.score_model, self.sde = score_model, sde
        self.time = float(sde.T if time is None else time)
        if not 0 < self.time <= sde.T:
            raise ValueError(f"time must lie in (0, {sde.T}], got {self.time}")
        shape = data_shape if data_shape is not None else getattr(score_model, "data_shape", None)
        if shape is None:
            raise ValueError("the data shape is unknown: pass data_shape=(C, H, W) or a ScoreModel that records it")
        self.data_shape = tuple(shape)

    @classmethod
    def from_teacher(cls, teacher: ScoreModel, sde: SDE | None = None, time: float | None = None) -> OneStepGenerator:
        """A trainable copy of ``teacher`` read as a one-step generator."""
        if not isinstance(teacher, nn.Module):
            raise TypeError("the generator can only be initialised from a teacher network (an nn.Module); "
                            "with a score function, pass generator=... explicitly")
        model = copy.deepcopy(teacher).requires_grad_(True).train()
        return cls(model, sde if sde is not None else teacher.sde, time, data_shape_of(teacher))

    def forward(self, z: Tensor) -> Tensor:
        return tweedie_denoise(self.score_model, self.sde, self.sde.prior_std * z, self.time)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None, batch_size: int = 1024) -> Tensor:
        """``n`` samples in one network evaluation per batch."""
        return sample_generator(self, n, self.data_shape, generator=generator, batch_size=batch_size)


def sample_generator(module: nn.Module, n: int, noise_shape: tuple[int, ...], *, generator: torch.Generator | None = None,
                     batch_size: int = 1024) -> Tensor:
    """``G(z)`` for ``n`` draws ``z ~ N(0, I)`` of shape ``noise_shape``, in batches, without gradients."""
    param = next(iter(module.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.get_default_dtype()
    out = []
    with torch.no_grad():
        for start in range(0, n, batch_size):
            b = min(batch_size, n - start)
            z = torch.randn((b, *noise_shape), generator=generator, device=generator.device if generator else device,
                            dtype=dtype).to(device)
            out.append(module(z))
    return torch.cat(out)


def _time_features(t: Tensor, dim: int) -> Tensor:
    # The step-index scale of the VP reference networks: sinusoidal features of 1000 t.
    return sinusoidal_embedding(1000 * t, dim)


class MLPDiscriminator(nn.Module):
    """``logit(x_t, t)``: an MLP on the flattened noisy sample and sinusoidal features of ``t``.

    For low-dimensional data (the 2-D test mixture), where there are no teacher features to reuse.
    """

    def __init__(self, data_shape: int | tuple[int, ...], hidden: int = 128, depth: int = 3, emb_dim: int = 64):
        super().__init__()
        self.data_shape = (data_shape,) if isinstance(data_shape, int) else tuple(data_shape)
        self.emb_dim = emb_dim
        layers: list[nn.Module] = [nn.Linear(math.prod(self.data_shape) + emb_dim, hidden), nn.SiLU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(hidden, hidden), nn.SiLU()]
        layers.append(nn.Linear(hidden, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        e = _time_features(t, self.emb_dim).to(x.dtype)
        return self.net(torch.cat([x.reshape(x.shape[0], -1), e], dim=1)).squeeze(1)


class TeacherFeatureDiscriminator(nn.Module):
    """``logit(x_t, t) = head(features of the frozen teacher at (x_t, t))`` (f-distill's discriminator).

    The features are the output of the teacher network's submodule ``layer`` (default: the UNet's
    ``mid_block``, or the last residual block of an :class:`~scorekit.nets.MLP`), captured by a forward
    hook. The head is a small conv net averaged over space (image features) or an MLP (vector
    features). The teacher is held by reference, not as a submodule: only the head is trained and saved.
    Gradients flow through the teacher to ``x_t``, which the generator's GAN term needs.
    """

    def __init__(self, teacher: ScoreModel, layer: str | None = None, hidden: int | None = None):
        super().__init__()
        if not isinstance(teacher, ScoreModel):
            raise TypeError(f"TeacherFeatureDiscriminator needs a ScoreModel teacher, got {type(teacher).__name__}; "
                            "for a score function use MLPDiscriminator")
        data_shape = teacher.data_shape
        if data_shape is None:
            raise ValueError("the teacher does not record its data shape; build it with ScoreModel(..., data_shape=...)")
        if layer is None:
            layer = "mid_block" if hasattr(teacher.net, "mid_block") else _last_block(teacher.net)
        object.__setattr__(self, "_teacher", teacher)
        self.layer = layer
        object.__setattr__(self, "_module", teacher.net.get_submodule(layer))
        param = next(teacher.parameters())
        with torch.no_grad():
            probe = self.features(torch.zeros((1, *data_shape), device=param.device, dtype=param.dtype),
                                  torch.full((1,), 0.5, device=param.device, dtype=param.dtype))
        channels = probe.shape[1]
        hidden = hidden or channels
        if probe.ndim == 4:
            groups = math.gcd(hidden, 32)
            self.head = nn.Sequential(nn.Conv2d(channels, hidden, 3, padding=1), nn.GroupNorm(groups, hidden), nn.SiLU(),
                                      nn.Conv2d(hidden, 1, 1))
        elif probe.ndim == 2:
            self.head = nn.Sequential(nn.Linear(channels, hidden), nn.SiLU(), nn.Linear(hidden, 1))
        else:
            raise ValueError(f"teacher layer {layer!r} gives features of shape {tuple(probe.shape)}; "
                             "expected (B, C, H, W) or (B, C)")
        self.head.to(device=param.device, dtype=param.dtype)

    def features(self, x: Tensor, t: Tensor) -> Tensor:
        """The teacher's ``layer`` output at ``(x, t)``."""
        captured: list[Tensor] = []
        handle = self._module.register_forward_hook(lambda _m, _i, out: captured.append(out[0] if isinstance(out, tuple) else out))
        try:
            self._teacher.raw(x, t)
        finally:
            handle.remove()
        return captured[0]

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        out = self.head(self.features(x, t))
        return out.mean(dim=tuple(range(1, out.ndim)))

    def extra_repr(self) -> str:
        return f"layer={self.layer!r}"


def _last_block(net: nn.Module) -> str:
    blocks = getattr(net, "blocks", None)
    if isinstance(blocks, nn.ModuleList) and len(blocks):
        return f"blocks.{len(blocks) - 1}"
    raise ValueError(f"cannot guess which layer of {type(net).__name__} to take features from; pass layer='...'")


# -- configuration ---------------------------------------------------------------------------------
@dataclass
class DistillConfig:
    """Settings of :class:`FDistill` (the ``distill:`` section of a YAML config).

    Defaults follow the reference code (FastGen's f-distill on DMD2): AdamW with weight decay 0.01,
    gradient clip 10, the same learning rate for generator, fake score and discriminator, 5 critic
    updates per generator update, GAN weight 1e-3, ``r`` clipped to ``[0.1, 20]`` and normalised over
    10 time bins. ``t`` is drawn from ``U(t_min, T)`` for the generator, the fake score and the
    discriminator alike (DMD2 uses ``[0.02 T, 0.98 T]``; the upper end is ``T`` here so that the fake
    score's DSM, :func:`scorekit.losses.dsm_loss`, sees the same law).
    """

    divergence: str = "reverse_kl"
    alpha: float | None = None
    steps: int = 1000
    critic_steps: int = 5
    batch_size: int = 64
    lr: float = 1e-4
    critic_lr: float | None = None
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01
    grad_clip: float | None = 10.0
    ema_decay: float = 0.999
    gan_weight: float = 1e-3
    t_min: float = 0.02
    ratio_clip: tuple[float, float] = (0.1, 20.0)
    logit_clamp: float = 10.0
    ratio_bins: int = 10
    ratio_ema: float = 0.0
    generator_time: float | None = None
    mixed_precision: str = "auto"
    seed: int = 0
    log_every: int = 50
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    progress: bool = True
    resume: bool = True

    def __post_init__(self):
        self.betas, self.ratio_clip = tuple(self.betas), tuple(self.ratio_clip)
        resolve_divergence(self.divergence, self.alpha)
        checks = [
            (self.steps >= 1, f"steps must be >= 1, got {self.steps}"),
            (self.critic_steps >= 0, f"critic_steps must be >= 0, got {self.critic_steps}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.lr > 0 and (self.critic_lr is None or self.critic_lr > 0), "lr and critic_lr must be > 0"),
            (self.grad_clip is None or self.grad_clip > 0, f"grad_clip must be > 0 or null, got {self.grad_clip}"),
            (0 <= self.ema_decay < 1, f"ema_decay must lie in [0, 1), got {self.ema_decay}"),
            (self.gan_weight >= 0, f"gan_weight must be >= 0, got {self.gan_weight}"),
            (0 <= self.t_min < 1, f"t_min must lie in [0, 1), got {self.t_min}"),
            (len(self.ratio_clip) == 2 and 0 < self.ratio_clip[0] < self.ratio_clip[1],
             f"ratio_clip must be (low, high) with 0 < low < high, got {self.ratio_clip}"),
            (self.logit_clamp > 0, f"logit_clamp must be > 0, got {self.logit_clamp}"),
            (self.ratio_bins >= 1, f"ratio_bins must be >= 1, got {self.ratio_bins}"),
            (0 <= self.ratio_ema < 1, f"ratio_ema must lie in [0, 1), got {self.ratio_ema}"),
            (self.checkpoint_every >= 0, f"checkpoint_every must be >= 0, got {self.checkpoint_every}"),
            (self.keep_checkpoints >= 1, f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)


# -- the method ------------------------------------------------------------------------------------
def _trainable(m) -> bool:
    return isinstance(m, nn.Module) and any(p.requires_grad for p in m.parameters())


class _Frozen:
    """Context: parameters of ``module`` stop requiring gradients (inputs still get them)."""

    def __init__(self, module):
        self.params = [p for p in module.parameters() if p.requires_grad] if isinstance(module, nn.Module) else []

    def __enter__(self):
        for p in self.params:
            p.requires_grad_(False)

    def __exit__(self, *exc):
        for p in self.params:
            p.requires_grad_(True)


class FDistill:
    """Distil ``teacher`` (a score function on ``sde``) into the one-step ``generator`` by f-distill.

    - ``generator``: any ``nn.Module`` mapping noise ``z ~ N(0, I)`` of ``noise_shape`` (default: the
      data shape) to data; default :meth:`OneStepGenerator.from_teacher` at ``config.generator_time``.
    - ``fake_score``: the score of the generator's diffused law: a trainable module (default: a copy of
      the teacher), trained by DSM on generator samples, or a fixed score function (e.g. exact, in tests).
    - ``discriminator``: ``logit(x_t, t)`` estimating ``log p_t / q_t``: a trainable module (default: a
      :class:`TeacherFeatureDiscriminator` for a teacher network, an :class:`MLPDiscriminator` for a
      score function), trained with the GAN loss against ``data`` noised at an independent ``t``, or a
      fixed function (an exact log ratio). It is only built when the divergence needs ``r`` (anything
      but reverse KL) or ``config.gan_weight > 0``.
    - ``divergence`` overrides ``config.divergence``: a name of :data:`DIVERGENCES`, ``"alpha"`` (with
      ``config.alpha``) or a callable ``h(r)``.

    :meth:`train` alternates ``critic_steps`` fake-score/discriminator updates with one generator update,
    keeps an EMA of the generator, calls each of ``callbacks`` as ``cb(self)`` after every generator update
    (``self.step`` updates done), writes atomic safetensors checkpoints to ``out_dir`` and resumes from
    them; randomness is drawn from a generator reseeded from ``(seed, process, step)`` at every step,
    so an interrupted run continues exactly as the uninterrupted one.
    """

    def __init__(
        self,
        teacher: ScoreFn,
        sde: SDE,
        generator: nn.Module | None = None,
        divergence: str | HFn | None = None,
        *,
        config: DistillConfig | None = None,
        data: Tensor | None = None,
        fake_score: ScoreFn | None = None,
        discriminator: Callable[[Tensor, Tensor], Tensor] | None = None,
        data_shape: tuple[int, ...] | None = None,
        noise_shape: tuple[int, ...] | None = None,
        out_dir: str | os.PathLike | None = None,
        meta: dict | None = None,
        callbacks: Iterable[Callable[[FDistill], None]] = (),
        accelerator=None,
    ):
        from accelerate import Accelerator

        self.config = cfg = config if config is not None else DistillConfig()
        self.sde = sde
        self.h = resolve_divergence(divergence if divergence is not None else cfg.divergence, cfg.alpha)
        self.divergence_name = divergence if isinstance(divergence, str) else (
            getattr(divergence, "__name__", "custom") if divergence is not None else cfg.divergence)
        self.needs_ratio = self.h is not _reverse_kl
        self.accelerator = acc = accelerator or Accelerator(mixed_precision=resolve_precision(cfg.mixed_precision),
                                                            cpu=not torch.cuda.is_available())
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.meta, self.callbacks = meta or {}, list(callbacks)
        device = acc.device

        if isinstance(teacher, nn.Module):
            teacher = teacher.to(device).eval().requires_grad_(False)
        self.teacher = teacher
        self.data_shape = self._data_shape(teacher, data, data_shape)

        if generator is None:
            generator = OneStepGenerator.from_teacher(teacher, sde, cfg.generator_time)
        self.noise_shape = tuple(noise_shape) if noise_shape is not None else self.data_shape
        generator.to(device)
        self._check_generator(generator)

        if fake_score is None:
            if not isinstance(teacher, nn.Module):
                raise TypeError("the fake score is initialised from the teacher network; with a teacher score "
                                "function, pass fake_score=... (a trainable ScoreModel, or a fixed score function)")
            fake_score = copy.deepcopy(teacher).requires_grad_(True).train()
        if isinstance(fake_score, nn.Module):
            fake_score.to(device)

        uses_disc = self.needs_ratio or cfg.gan_weight > 0
        if uses_disc and discriminator is None:
            discriminator = (TeacherFeatureDiscriminator(teacher) if isinstance(teacher, ScoreModel)
                             else MLPDiscriminator(self.data_shape))
        if not uses_disc:
            discriminator = None
        if isinstance(discriminator, nn.Module):
            discriminator.to(device)
        if _trainable(discriminator):
            if data is None:
                raise ValueError("a learned discriminator needs real samples: pass data=... (the teacher's training "
                                 "data, shape (n, *data_shape)) or a fixed discriminator")
            if tuple(data.shape[1:]) != self.data_shape:
                raise ValueError(f"data has shape {tuple(data.shape)} but the teacher's samples have shape "
                                 f"(n, {', '.join(map(str, self.data_shape))})")
        self.data = data.to(device) if data is not None else None

        self.normalizer = RatioNormalizer(cfg.ratio_bins, cfg.t_min, sde.T, cfg.ratio_ema).to(device)
        self.ema = copy.deepcopy(generator).requires_grad_(False).eval()
        self.generator = acc.prepare(generator)
        self.opt_generator = acc.prepare(self._adamw(generator.parameters(), cfg.lr))
        critic_lr = cfg.critic_lr or cfg.lr
        self.fake_score, self.opt_fake = fake_score, None
        if _trainable(fake_score):
            self.fake_score = acc.prepare(fake_score)
            self.opt_fake = acc.prepare(self._adamw([p for p in fake_score.parameters() if p.requires_grad], critic_lr))
        self.discriminator, self.opt_disc = discriminator, None
        if _trainable(discriminator):
            self.discriminator = acc.prepare(discriminator)
            self.opt_disc = acc.prepare(self._adamw([p for p in discriminator.parameters() if p.requires_grad], critic_lr))
        self.step = 0
        self.history: list[dict[str, float]] = []
        self._resumed = False

    # -- setup helpers -----------------------------------------------------------------------------
    @staticmethod
    def _data_shape(teacher, data: Tensor | None, data_shape) -> tuple[int, ...]:
        for shape in (data_shape, getattr(teacher, "data_shape", None), None if data is None else data.shape[1:]):
            if shape is not None:
                return tuple(shape)
        raise ValueError("the data shape is unknown: pass data_shape=..., data=... or a teacher that records it")

    def _check_generator(self, generator: nn.Module) -> None:
        param = next(iter(generator.parameters()), None)
        if param is None:
            raise ValueError("the generator has no parameters to train")
        z = torch.zeros((2, *self.noise_shape), device=param.device, dtype=param.dtype)
        with torch.no_grad():
            out = generator(z)
        if tuple(out.shape) != (2, *self.data_shape):
            raise ValueError(
                f"the generator maps noise of shape (B, {', '.join(map(str, self.noise_shape))}) to "
                f"(B, {', '.join(map(str, out.shape[1:]))}), but the teacher's data have shape "
                f"(B, {', '.join(map(str, self.data_shape))}); pass a generator with that output or noise_shape=..."
            )

    def _adamw(self, params: Iterable[nn.Parameter], lr: float) -> torch.optim.Optimizer:
        cfg = self.config
        return torch.optim.AdamW(params, lr=lr, betas=cfg.betas, weight_decay=cfg.weight_decay)

    @property
    def unwrapped_generator(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.generator)

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def _reduce_sum(self, x: Tensor) -> Tensor:
        return self.accelerator.reduce(x, reduction="sum") if self.accelerator.num_processes > 1 else x

    def _rng(self, step: int) -> torch.Generator:
        # A fresh stream per (seed, process, step): resuming needs no saved RNG state.
        seed = hash((self.config.seed, self.accelerator.process_index, step)) % (2**63)
        return torch.Generator(device=self.accelerator.device).manual_seed(seed)

    # -- draws -----------------------------------------------------------------------------------
    def _dtype(self) -> torch.dtype:
        return next(self.unwrapped_generator.parameters()).dtype

    def draw(self, rng: torch.Generator, batch_size: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """``(z, t, noise)`` for one generator update: ``z ~ N(0, I)``, ``t ~ U(t_min, T)``, ``noise ~ N(0, I)``."""
        b = batch_size or self.config.batch_size
        kw = dict(generator=rng, device=self.accelerator.device, dtype=self._dtype())
        z = torch.randn((b, *self.noise_shape), **kw)
        return z, self._draw_t(b, rng), torch.randn((b, *self.data_shape), **kw)

    def _draw_t(self, b: int, rng: torch.Generator) -> Tensor:
        t_min, T = self.config.t_min, self.sde.T
        return t_min + (T - t_min) * torch.rand(b, generator=rng, device=self.accelerator.device, dtype=self._dtype())

    def _diffuse(self, x: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        alpha, sigma = self.sde.marginal_coeffs(t)
        return bcast(alpha, x) * x + bcast(sigma, x) * noise

    # -- losses ----------------------------------------------------------------------------------
    def generator_loss(self, z: Tensor, t: Tensor, noise: Tensor) -> tuple[Tensor, dict[str, float]]:
        """The generator objective at given draws: ``distillation_loss`` with ``h`` weights, plus
        ``gan_weight * softplus(-logit)`` (the only term that differentiates through the discriminator)."""
        cfg = self.config
        x = self.generator(z)
        x_t = self._diffuse(x, t, noise)
        with torch.no_grad():
            x0_teacher = tweedie_denoise(self.teacher, self.sde, x_t, t)
            x0_fake = tweedie_denoise(self.fake_score, self.sde, x_t, t)
        weight, loss_gan, stats = None, x.new_zeros(()), {}
        if self.discriminator is not None:
            with _Frozen(self.discriminator), torch.set_grad_enabled(cfg.gan_weight > 0 and torch.is_grad_enabled()):
                logit = self.discriminator(x_t, t)
            if self.needs_ratio:
                weight = f_weights(logit, t, self.h, clip=cfg.ratio_clip, logit_clamp=cfg.logit_clamp,
                                   normalizer=self.normalizer, reduce_sum=self._reduce_sum)
                stats.update(h_min=float(weight.min()), h_max=float(weight.max()))
            if cfg.gan_weight > 0:
                loss_gan = F.softplus(-logit).mean()
            stats["logit_fake"] = float(logit.detach().mean())
        direction = distillation_direction(x, x0_teacher, x0_fake, weight)
        loss = distillation_loss(x, direction) + cfg.gan_weight * loss_gan
        return loss, stats

    def critic_loss(self, rng: torch.Generator) -> Tensor:
        """DSM loss of the fake score on ``sg(G(z))`` plus the discriminator's GAN loss (real data noised at
        an independent ``t``); only the terms of trainable critics are included."""
        b = self.config.batch_size
        z, t, noise = self.draw(rng)
        with torch.no_grad():
            x = self.generator(z)
        loss = x.new_zeros(())
        if self.opt_fake is not None:
            loss = loss + dsm_loss(self.fake_score, self.sde, x, generator=rng, eps=self.config.t_min)
        if self.opt_disc is not None:
            idx = torch.randint(self.data.shape[0], (b,), generator=rng, device=self.accelerator.device)
            real = self.data[idx].to(x.dtype)
            t_real = self._draw_t(b, rng)
            noise_real = torch.randn(real.shape, generator=rng, device=real.device, dtype=real.dtype)
            logit_fake = self.discriminator(self._diffuse(x, t, noise), t)
            logit_real = self.discriminator(self._diffuse(real, t_real, noise_real), t_real)
            loss = loss + discriminator_loss(logit_real, logit_fake)
        return loss

    # -- updates ---------------------------------------------------------------------------------
    def _apply(self, loss: Tensor, optimizers: list, modules: list) -> float:
        acc = self.accelerator
        value = acc.reduce(loss.detach().float(), reduction="mean")
        if not torch.isfinite(value):
            self._fail(float(value))
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        acc.backward(loss)
        for opt, module in zip(optimizers, modules):
            if self.config.grad_clip is not None:
                acc.clip_grad_norm_([p for p in module.parameters() if p.requires_grad], self.config.grad_clip)
            opt.step()
        return float(value)

    def critic_step(self, rng: torch.Generator) -> float:
        """One update of the fake score and the discriminator (whichever are trainable)."""
        pairs = [(o, m) for o, m in ((self.opt_fake, self.fake_score), (self.opt_disc, self.discriminator)) if o is not None]
        if not pairs:
            return 0.0
        with self.accelerator.autocast():
            loss = self.critic_loss(rng)
        return self._apply(loss, *map(list, zip(*pairs)))

    def generator_step(self, rng: torch.Generator) -> dict[str, float]:
        """One generator update; returns its loss and the weight statistics."""
        with self.accelerator.autocast():
            loss, stats = self.generator_loss(*self.draw(rng))
        stats["generator"] = self._apply(loss, [self.opt_generator], [self.generator])
        return stats

    def _update_ema(self) -> None:
        update_ema(self.ema, self.unwrapped_generator, self.config.ema_decay, self.step)

    def train(self, steps: int | None = None) -> list[dict[str, float]]:
        """Run until ``steps`` (default ``config.steps``) generator updates are done; returns the history
        (one dict of losses and weight statistics per generator update)."""
        cfg = self.config
        total = steps if steps is not None else cfg.steps
        if self.out_dir is not None and cfg.resume and not self._resumed:
            self.resume()
        bar = tqdm(total=total, initial=self.step, disable=not (cfg.progress and self.is_main),
                   desc=f"f-distill ({self.divergence_name})", dynamic_ncols=True)
        while self.step < total:
            rng = self._rng(self.step)
            critic = [self.critic_step(rng) for _ in range(cfg.critic_steps)]
            stats = self.generator_step(rng)
            stats["critic"] = sum(critic) / len(critic) if critic else 0.0
            self.step += 1
            self._update_ema()
            self.history.append(stats)
            for cb in self.callbacks:
                cb(self)
            if cfg.log_every and self.step % cfg.log_every == 0:
                bar.set_postfix({k: f"{v:.3g}" for k, v in stats.items()})
            bar.update(1)
            if self.out_dir is not None and cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                self.save_checkpoint()
        bar.close()
        if self.out_dir is not None:
            found = _newest_state(self.out_dir)
            if found is None or found[1]["step"] != self.step:
                self.save_checkpoint()
        return self.history

    def _fail(self, value: float) -> None:
        last = latest_checkpoint(self.out_dir) if self.out_dir is not None else None
        where = f"the last good checkpoint is {last}" if last else "no checkpoint was written"
        raise FloatingPointError(
            f"f-distill loss is {value} at generator step {self.step + 1}: stopped before applying it; {where}. "
            "Lower the learning rate or the GAN weight, or use mixed_precision='no', then resume."
        )

    # -- sampling and saving ---------------------------------------------------------------------
    def sample(self, n: int, generator: torch.Generator | None = None, ema: bool = True, batch_size: int = 1024) -> Tensor:
        """``n`` one-step samples from the EMA generator (or the raw one with ``ema=False``)."""
        module = self.ema if ema else self.unwrapped_generator
        return sample_generator(module, n, self.noise_shape, generator=generator, batch_size=batch_size)

    def save(self, path: str | os.PathLike, ema: bool = True, meta: dict | None = None) -> Path:
        """Write the (EMA) generator to one safetensors file; :func:`load_generator` reads it back."""
        module = self.ema if ema else self.unwrapped_generator
        info = {"divergence": self.divergence_name, "steps": self.step, "noise_shape": list(self.noise_shape),
                **self.meta, **(meta or {})}
        return save_generator(module, path, info)

    def _modules(self) -> dict[str, nn.Module]:
        acc = self.accelerator
        mods = {"generator": self.unwrapped_generator, "generator_ema": self.ema, "ratio_normalizer": self.normalizer}
        if self.opt_fake is not None:
            mods["fake_score"] = acc.unwrap_model(self.fake_score)
        if self.opt_disc is not None:
            mods["discriminator"] = acc.unwrap_model(self.discriminator)
        return mods

    def _optimizers(self) -> dict[str, torch.optim.Optimizer]:
        opts = {"generator": self.opt_generator, "fake_score": self.opt_fake, "discriminator": self.opt_disc}
        return {k: v for k, v in opts.items() if v is not None}

    def save_checkpoint(self) -> Path:
        """Write ``out_dir/checkpoints/step-XXXXXXXX`` (all networks, optimizers, ratio bins) atomically."""
        if self.out_dir is None:
            raise ValueError("this FDistill has no out_dir; pass out_dir=... to save checkpoints")
        root = self.out_dir / "checkpoints"
        final = root / f"step-{self.step:08d}"
        acc = self.accelerator
        acc.wait_for_everyone()
        if self.is_main:
            with atomic_dir(final) as tmp:
                for name, module in self._modules().items():
                    save_tensors(module.state_dict(), tmp / f"{name}.safetensors")
                for name, opt in self._optimizers().items():
                    tensors, rest = optimizer_to_tensors(opt.state_dict())
                    save_tensors(tensors, tmp / f"optimizer_{name}.safetensors", rest)
                save_json({"format": FORMAT, "step": self.step, "history": self.history,
                           "config": dataclasses.asdict(self.config), "meta": self.meta}, tmp / "state.json")
            prune_checkpoints(root, self.config.keep_checkpoints, final)
        acc.wait_for_everyone()
        return final

    def resume(self, path: str | os.PathLike | None = None) -> bool:
        """Load networks, optimizers and ratio bins from the newest checkpoint under ``path`` (default
        ``out_dir``); ``False`` when there is none."""
        self._resumed = True
        found = _newest_state(path if path is not None else self.out_dir)
        if found is None:
            return False
        ckpt, state = found
        device = self.accelerator.device
        for name, module in self._modules().items():
            tensors, _ = load_tensors(ckpt / f"{name}.safetensors", device)
            load_state_checked(module, tensors, ckpt / f"{name}.safetensors")
        for name, opt in self._optimizers().items():
            tensors, rest = load_tensors(ckpt / f"optimizer_{name}.safetensors", device)
            opt.load_state_dict(optimizer_from_tensors(tensors, rest))
        self.step, self.history = state["step"], list(state["history"])
        return True


class EmpiricalCritic:
    """Exact critics for low-dimensional checks: the generator's law taken as its empirical measure.

    ``q_t`` is the mixture of ``N(alpha g_i, (alpha^2 bandwidth^2 + sigma^2) I)`` over ``n`` generator
    samples ``g_i``, so :meth:`score` is its exact score and :meth:`log_ratio` is ``log p_t - log q_t``
    with the teacher's exact ``teacher_log_prob(x, t)``. Passed as ``fake_score=critic.score`` and
    ``discriminator=critic.log_ratio`` with ``callbacks=[critic.refresh]``, it isolates the ``h`` logic
    of f-distill from the errors of learned critics (notes, section 1.6 B: the oracle variant).
    """

    def __init__(self, generator: nn.Module, sde: SDE, teacher_log_prob: Callable[[Tensor, Tensor], Tensor],
                 noise_shape: tuple[int, ...], n: int = 2048, bandwidth: float = 1e-3, seed: int = 0):
        self.generator, self.sde, self.teacher_log_prob = generator, sde, teacher_log_prob
        self.noise_shape, self.n, self.bandwidth = tuple(noise_shape), int(n), float(bandwidth)
        self.rng = torch.Generator().manual_seed(seed)
        self.refresh()

    def refresh(self, *_) -> None:
        """Redraw the ``n`` generator samples (call after every generator update)."""
        from .data import GaussianMixture

        g = sample_generator(self.generator, self.n, self.noise_shape, generator=self.rng)
        self.mixture = GaussianMixture(torch.full((self.n,), 1.0 / self.n), g.reshape(self.n, -1).double(), self.bandwidth)

    def score(self, x: Tensor, t: Tensor) -> Tensor:
        return self.mixture.score(x.reshape(x.shape[0], -1), t, self.sde).reshape(x.shape).to(x.dtype)

    def log_ratio(self, x: Tensor, t: Tensor) -> Tensor:
        flat = x.reshape(x.shape[0], -1)
        return (self.teacher_log_prob(x, t) - self.mixture.log_prob(flat, t, self.sde)).to(x.dtype)


def _newest_state(path: str | os.PathLike | None) -> tuple[Path, dict] | None:
    """The newest f-distill checkpoint under ``path`` and its ``state.json``, or ``None``."""
    return None if path is None else read_checkpoint(path, FORMAT, "an f-distill checkpoint")


# -- one-step generator files ----------------------------------------------------------------------
def save_generator(generator: nn.Module, path: str | os.PathLike, meta: dict | None = None) -> Path:
    """Save a one-step generator's weights (safetensors, atomic) with what is needed to rebuild it.

    For a :class:`OneStepGenerator` the SDE, the time and the data shape are recorded; with
    ``meta["teacher_run_config"]`` (what ``scorekit distill`` stores) :func:`load_generator` rebuilds the
    network without being given one.
    """
    info = {"format": GENERATOR_FORMAT, **(meta or {})}
    if isinstance(generator, OneStepGenerator):
        info.update(kind="one_step", sde=generator.sde.config(), time=generator.time, data_shape=list(generator.data_shape))
    save_tensors(generator.state_dict(), path, info)
    return Path(path)


def load_generator(path: str | os.PathLike, generator: nn.Module | None = None, device: str | torch.device = "cpu"
                   ) -> tuple[nn.Module, dict]:
    """``(generator, meta)`` from a file of :func:`save_generator`.

    With ``generator`` given, its weights are replaced (keys and shapes must match); otherwise the
    network is rebuilt from the recorded teacher run config (files written by ``scorekit distill``).
    """
    tensors, meta = load_tensors(path, device)
    if meta.get("format") != GENERATOR_FORMAT:
        raise ValueError(f"{path} is not an f-distill generator (format {meta.get('format')!r}, expected {GENERATOR_FORMAT!r})")
    if generator is None:
        if meta.get("kind") != "one_step" or "teacher_run_config" not in meta:
            raise ValueError(f"{path} does not record how to rebuild its network; pass generator=... (a module of the "
                             "same architecture) to load the weights into")
        from .config import RunConfig, build_score_model, from_dict
        from .sde import make_sde

        run = from_dict(RunConfig, meta["teacher_run_config"])
        sde_cfg = dict(meta["sde"])
        sde = make_sde(sde_cfg.pop("name"), **sde_cfg)
        score = build_score_model(run.model, sde, tuple(meta["data_shape"]))
        generator = OneStepGenerator(score, sde, meta["time"], tuple(meta["data_shape"]))
    load_state_checked(generator, tensors, Path(path))
    return generator.to(device).eval().requires_grad_(False), meta
