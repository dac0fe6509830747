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
(:func:`distillation_direction`, :func:`distillation_loss`), the generator :class:`OneStepGenerator`
(the discriminators :class:`MLPDiscriminator` and :class:`TeacherFeatureDiscriminator` live in
:mod:`scorekit.nets.distill` and are re-exported here), :class:`DistillConfig`, :class:`FDistill` (the
method on :class:`scorekit.training.TrainingLoop`, which owns EMA, checkpoints and resume) and
:func:`save_generator` / :func:`load_generator`.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checkpoint import load_tensors, meta_field, save_tensors
from .config import DataConfig
from .losses import dsm_loss
from .nets.distill import MLPDiscriminator, TeacherFeatureDiscriminator
from .score import ScoreFn, ScoreModel, data_shape_of, tweedie_denoise
from .sde import SDE, bcast
from .training import TrainConfig, TrainingLoop, load_state_checked
from .validate import fraction, non_negative, non_negative_int, positive, positive_int

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
    "DistillTrainConfig",
    "DistillRunConfig",
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
        bins, ema = positive_int(bins, "bins", "time bins"), fraction(ema, "ema", "weight of the old bin mean")
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


# -- configuration ---------------------------------------------------------------------------------
@dataclass
class DistillTrainConfig(TrainConfig):
    """:class:`~scorekit.training.TrainConfig` with f-distill's defaults, those of the reference code
    (FastGen's f-distill on DMD2): AdamW with learning rate 1e-4 and weight decay 0.01, gradient clip 10,
    batch 64, 1000 generator steps. A ``training:`` section in YAML overrides only the keys it gives."""

    steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-4
    weight_decay: float = 0.01
    grad_clip: float | None = 10.0


@dataclass
class DistillConfig:
    """Settings of :class:`FDistill` (the ``distill:`` section of a YAML config).

    ``training`` holds the optimisation settings shared with every trainer (steps, batch size, learning
    rate, EMA, checkpoints, ...): a :class:`~scorekit.training.TrainConfig`, by default
    :class:`DistillTrainConfig` (f-distill's defaults). ``steps`` counts generator updates; the generator,
    the fake score and the discriminator share the learning rate unless ``critic_lr`` is set.
    The other fields are f-distill's own, defaults from the reference code: 5 critic updates per
    generator update, GAN weight 1e-3, ``r`` clipped to ``[0.1, 20]`` and normalised over 10 time bins.
    ``t`` is drawn from ``U(t_min, T)`` for the generator, the fake score and the discriminator alike
    (DMD2 uses ``[0.02 T, 0.98 T]``; the upper end is ``T`` here so that the fake score's DSM,
    :func:`scorekit.losses.dsm_loss`, sees the same law).
    """

    divergence: str = "reverse_kl"
    alpha: float | None = None
    critic_steps: int = 5
    critic_lr: float | None = None
    gan_weight: float = 1e-3
    t_min: float = 0.02
    ratio_clip: tuple[float, float] = (0.1, 20.0)
    logit_clamp: float = 10.0
    ratio_bins: int = 10
    ratio_ema: float = 0.0
    generator_time: float | None = None
    training: DistillTrainConfig = field(default_factory=DistillTrainConfig)

    def __post_init__(self):
        resolve_divergence(self.divergence, self.alpha)
        if not isinstance(self.training, TrainConfig):
            raise TypeError(f"training must be a TrainConfig (e.g. DistillTrainConfig(steps=...)), "
                            f"got {type(self.training).__name__}")
        self.critic_steps = non_negative_int(self.critic_steps, "critic_steps", "critic updates per generator update")
        if self.critic_lr is not None:
            self.critic_lr = positive(self.critic_lr, "critic_lr", "null = training.lr")
        self.gan_weight = non_negative(self.gan_weight, "gan_weight")
        self.t_min = fraction(self.t_min, "t_min")
        self.ratio_clip = tuple(self.ratio_clip)
        if not (len(self.ratio_clip) == 2 and 0 < self.ratio_clip[0] < self.ratio_clip[1]):
            raise ValueError(f"ratio_clip must be (low, high) with 0 < low < high, got {self.ratio_clip}")
        self.logit_clamp = positive(self.logit_clamp, "logit_clamp")
        self.ratio_bins = positive_int(self.ratio_bins, "ratio_bins")
        self.ratio_ema = fraction(self.ratio_ema, "ratio_ema")
        if self.generator_time is not None:
            self.generator_time = positive(self.generator_time, "generator_time", "null = the SDE's T")


@dataclass
class DistillRunConfig:
    """A distillation run (``configs/distill_*.yaml``, what ``scorekit distill`` reads): the teacher run,
    the real data the discriminator sees, the :class:`DistillConfig` and the number of samples to write."""

    teacher: str | None = None
    teacher_ema: bool = True
    data: DataConfig = field(default_factory=DataConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    n_samples: int = 64
    out_dir: str = "outputs/distill"

    def __post_init__(self):
        self.n_samples = positive_int(self.n_samples, "n_samples", "generator samples written after the run")


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


class FDistill(TrainingLoop):
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

    It runs on :class:`~scorekit.training.TrainingLoop` with ``config.training``: each step of
    :meth:`train` is ``critic_steps`` fake-score/discriminator updates and one generator update, then the
    generator's EMA; ``callbacks`` are called as ``cb(self)`` after every generator update (``self.step``
    updates done); ``history`` holds one dict of losses and weight statistics per generator update.
    Checkpoints in ``out_dir`` hold the generator, its EMA, the trainable critics, their optimizers and the
    ratio bins in one step directory; randomness is drawn from a generator reseeded from
    ``(seed, process, step)`` at every step, so an interrupted run continues exactly as the uninterrupted one.
    """

    checkpoint_format = FORMAT
    checkpoint_kind = "an f-distill checkpoint"
    loss_name, step_name = "f-distill loss", "generator step"
    advice = "Lower the learning rate or the GAN weight, or use mixed_precision='no', then resume."

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
        self.config = cfg = config if config is not None else DistillConfig()
        super().__init__(cfg.training, record=cfg, out_dir=out_dir, callbacks=callbacks, meta=meta,
                         accelerator=accelerator)
        self.sde = sde
        self.h = resolve_divergence(divergence if divergence is not None else cfg.divergence, cfg.alpha)
        self.divergence_name = divergence if isinstance(divergence, str) else (
            getattr(divergence, "__name__", "custom") if divergence is not None else cfg.divergence)
        self.desc = f"f-distill ({self.divergence_name})"
        self.needs_ratio = self.h is not _reverse_kl
        acc, device = self.accelerator, self.device

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
            # its initialisation is drawn from config.training.seed, not from the global RNG as it happens to be
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(cfg.training.seed)  # the head is built on the CPU
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

        # what a checkpoint holds; the critics only when they are trained
        self.normalizer = self.track("ratio_normalizer", RatioNormalizer(cfg.ratio_bins, cfg.t_min, sde.T,
                                                                         cfg.ratio_ema).to(device))
        ema = self.make_ema(generator)
        self.generator = self.track("generator", acc.prepare(generator))
        self.ema = self.track("generator_ema", ema, ema_of="generator")
        self.opt_generator = self.track("optimizer_generator", self.make_optimizer(generator.parameters()))
        self.fake_score, self.opt_fake = self._critic("fake_score", fake_score)
        self.discriminator, self.opt_disc = self._critic("discriminator", discriminator)

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

    def _critic(self, name: str, critic):
        """``(critic, optimizer)``: a trainable module prepared and tracked with its AdamW at ``critic_lr``;
        anything else as it is, without an optimizer."""
        if not _trainable(critic):
            return critic, None
        params = [p for p in critic.parameters() if p.requires_grad]
        module = self.track(name, self.accelerator.prepare(critic))
        return module, self.track(f"optimizer_{name}", self.make_optimizer(params, self.config.critic_lr))

    @property
    def unwrapped_generator(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.generator)

    def data_signature(self) -> dict:
        if self.data is None:
            return {}
        return {"n": int(self.data.shape[0]), "shapes": [list(self.data.shape[1:])]}

    def _reduce_sum(self, x: Tensor) -> Tensor:
        return self.accelerator.reduce(x, reduction="sum") if self.accelerator.num_processes > 1 else x

    def _rng(self, step: int) -> torch.Generator:
        # A fresh stream per (seed, process, step): resuming needs no saved RNG state.
        seed = hash((self.config.training.seed, self.accelerator.process_index, step)) % (2**63)
        return torch.Generator(device=self.accelerator.device).manual_seed(seed)

    # -- draws -----------------------------------------------------------------------------------
    def _dtype(self) -> torch.dtype:
        return next(self.unwrapped_generator.parameters()).dtype

    def draw(self, rng: torch.Generator, batch_size: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """``(z, t, noise)`` for one generator update: ``z ~ N(0, I)``, ``t ~ U(t_min, T)``, ``noise ~ N(0, I)``."""
        b = batch_size or self.config.training.batch_size
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
        b = self.config.training.batch_size
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
    def critic_step(self, rng: torch.Generator) -> Tensor | float:
        """One update of the fake score and the discriminator (whichever are trainable); returns its loss."""
        optimizers = [opt for opt in (self.opt_fake, self.opt_disc) if opt is not None]
        if not optimizers:
            return 0.0
        with self.autocast():
            loss = self.critic_loss(rng)
        return self.optimize(loss, optimizers)

    def generator_step(self, rng: torch.Generator) -> dict[str, float]:
        """One generator update; returns its loss and the weight statistics."""
        with self.autocast():
            loss, stats = self.generator_loss(*self.draw(rng))
        stats["generator"] = self.optimize(loss, [self.opt_generator])
        return stats

    def train_step(self) -> dict[str, float]:
        """``critic_steps`` critic updates, then one generator update (DMD2's two-time-scale rule)."""
        rng = self._rng(self.step)
        critic = [self.critic_step(rng) for _ in range(self.config.critic_steps)]
        stats = self.generator_step(rng)
        stats["critic"] = sum(critic) / len(critic) if critic else 0.0
        return stats

    def progress(self) -> dict[str, str]:
        return {k: f"{v:.3g}" for k, v in self.history[-1].items()}

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
        """The checkpointed networks by name (``generator``, ``generator_ema``, ``ratio_normalizer`` and the
        trained critics ``fake_score``, ``discriminator``), unwrapped."""
        return self.tracked_modules()


class EmpiricalCritic:
    """Exact critics for low-dimensional checks: the generator's law taken as its empirical measure.

    ``q_t`` is the mixture of ``N(alpha g_i, (alpha^2 bandwidth^2 + sigma^2) I)`` over ``n`` generator
    samples ``g_i``, so :meth:`score` is its exact score and :meth:`log_ratio` is ``log p_t - log q_t``
    with the teacher's exact ``teacher_log_prob(x, t)``. Passed as ``fake_score=critic.score`` and
    ``discriminator=critic.log_ratio`` with ``callbacks=[critic.refresh]``, it isolates the ``h`` logic
    of f-distill from the errors of learned critics: the weighting of Xu, Nie & Vahdat (2025, eq. 7)
    with exact ``s_q`` and ``r``.
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
        sde_cfg = dict(meta_field(meta, "sde", path))
        sde = make_sde(meta_field(sde_cfg, "name", path, "'sde' metadata"), **{k: v for k, v in sde_cfg.items() if k != "name"})
        shape = tuple(meta_field(meta, "data_shape", path))
        score = build_score_model(run.model, sde, shape)
        generator = OneStepGenerator(score, sde, meta_field(meta, "time", path), shape)
    load_state_checked(generator, tensors, Path(path))
    return generator.to(device).eval().requires_grad_(False), meta
