"""Minority guidance (Um, Lee & Ye, ICLR 2024) and self-guided minority sampling (Um & Ye, ECCV 2024).

Tweedie's denoiser pulls a noised sample toward the majority features of the data, so samples that
reconstruct badly from one fixed noise level are the unusual ones. The *minority score* measures it
(:func:`minority_score`); quantised into equal-mass levels (:func:`quantize_levels`) it labels a data
set, a noisy-input classifier learns the levels (:func:`train_minority_classifier`) and classifier
guidance toward the highest level samples the minority (:class:`MinorityGuidance`).
:class:`SelfMinorityGuidance` needs no classifier: it differentiates the model's own reconstruction
discrepancy at sampling time.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from samplers.generators import StackedGenerator, randn
from samplers.hooks import Guidance, ScoreFn
from scorekit.checkpoint import meta_field
from scorekit.score import tweedie_denoise
from scorekit.sde import SDE, batch_time, bcast, make_sde
from scorekit.training import TrainConfig
from scorekit.validate import guidance_scale, int_at_least, positive_int

from .classifier import (
    ClassifierGuidance,
    load_classifier,
    save_classifier,
    train_noisy_classifier,
)

__all__ = [
    "minority_score",
    "perturbation_time",
    "ddpm_alpha_bar",
    "REFERENCE_ALPHA_BAR",
    "DISTANCES",
    "quantize_levels",
    "assign_levels",
    "MinorityClassifier",
    "train_minority_classifier",
    "MinorityGuidance",
    "SelfMinorityGuidance",
]

Distance = Callable[[Tensor, Tensor], Tensor]


def ddpm_alpha_bar(step: int, num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> float:
    """``alpha_bar`` after ``step + 1`` steps of DDPM's linear beta schedule (Ho et al. 2020)."""
    if not 0 <= step < num_steps:
        raise ValueError(f"step must lie in [0, {num_steps}), got {step}")
    betas = torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)
    return float(torch.prod(1 - betas[: step + 1]))


#: The reference code's perturbation level: index 60 of a 100-step respacing of the 1000-step linear
#: schedule, i.e. DDPM step 605, alpha_bar ~= 0.0241.
REFERENCE_ALPHA_BAR = ddpm_alpha_bar(605)


def perturbation_time(sde: SDE, *, t: float | None = None, alpha_bar: float | None = None,
                      snr: float | None = None) -> float:
    """The time on ``sde`` of one perturbation level, given as ``t``, as ``alpha_bar`` or as the
    signal-to-noise ratio ``snr = alpha^2 / sigma^2`` (``alpha_bar / (1 - alpha_bar)`` for VP). Levels
    given by ``alpha_bar`` or SNR mean the same noise on every SDE and under any step respacing.
    Default: :data:`REFERENCE_ALPHA_BAR`."""
    given = [name for name, v in (("t", t), ("alpha_bar", alpha_bar), ("snr", snr)) if v is not None]
    if len(given) > 1:
        raise ValueError(f"give the perturbation level once, as t, alpha_bar or snr; got {given}")
    if t is None:
        if alpha_bar is not None and not 0 < alpha_bar < 1:
            raise ValueError(f"alpha_bar must lie in (0, 1), got {alpha_bar}")
        if snr is not None and not snr > 0:
            raise ValueError(f"snr must be > 0, got {snr}")
        if snr is None:
            ab = REFERENCE_ALPHA_BAR if alpha_bar is None else alpha_bar
            snr = ab / (1 - ab)
        t = float(sde.t_from_log_snr(torch.tensor(math.log(snr), dtype=torch.float64)))
    if not 0 < t <= sde.T:
        raise ValueError(f"the perturbation time must lie in (0, {sde.T}] on {sde!r}, got t = {t} "
                         f"(from {given[0] if given else 'the default alpha_bar'})")
    return float(t)


def _perturb(sde: SDE, x0: Tensor, t: Tensor, generator) -> Tensor:
    """A draw ``x_t = alpha(t) x0 + sigma(t) z`` of ``q(x_t | x0)``, ``z`` from ``generator`` (per sample for a
    :class:`~samplers.StackedGenerator`, under its tiling rule)."""
    mean, std = sde.marginal_prob(x0, t)
    return mean + bcast(std, x0) * randn(x0.shape, generator, x0.device, x0.dtype)


def squared_l2(x0: Tensor, x0_hat: Tensor) -> Tensor:
    """``||x0 - x0_hat||^2`` per sample, summed over all data dimensions."""
    return (x0 - x0_hat).pow(2).reshape(x0.shape[0], -1).sum(1)


DISTANCES: dict[str, Distance] = {"l2": squared_l2}


def _distance(distance: str | Distance) -> Distance:
    if callable(distance):
        return distance
    if distance not in DISTANCES:
        raise ValueError(f"unknown distance {distance!r}; valid names are {sorted(DISTANCES)}, or pass a callable "
                         "distance(x0, x0_hat) -> (batch,)")
    return DISTANCES[distance]


def _per_sample(d: Tensor, batch: int) -> Tensor:
    d = d.reshape(d.shape[0], -1) if d.ndim > 1 else d
    if d.shape[0] != batch or (d.ndim > 1 and d.shape[1] != 1):
        raise ValueError(f"the distance returned shape {tuple(d.shape)} for a batch of {batch}; "
                         f"it must return one value per sample, shape ({batch},)")
    return d.reshape(batch)


@torch.no_grad()
def _decoded(distance: Distance, decode: Callable[[Tensor], Tensor]) -> Distance:
    """``distance`` between decoded samples: a latent model's distance in pixel space."""
    return lambda a, b: distance(decode(a), decode(b))


def minority_score(
    score_fn: ScoreFn,
    sde: SDE,
    x0: Tensor,
    *,
    t: float | None = None,
    alpha_bar: float | None = None,
    snr: float | None = None,
    n: int = 5,
    distance: str | Distance = "l2",
    generator: torch.Generator | StackedGenerator | None = None,
    batch_size: int = 256,
    progress: bool = False,
    decode: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """The minority score ``l(x0) = E_z d(x0, x0_hat(alpha_s x0 + sigma_s z))`` of each sample (Um et al., eq. 6).

    ``x0_hat`` is Tweedie's reconstruction (:func:`scorekit.tweedie_denoise`) at one perturbation
    level ``s``, given by ``t``, ``alpha_bar`` or ``snr`` (:func:`perturbation_time`; default alpha_bar
    ~= 0.024, the reference code's step 605 of 1000). The expectation is a mean over ``n`` noise draws
    (5 in the reference code). ``distance`` is ``"l2"`` (squared Euclidean norm; then
    ``l = ((1 - alpha_bar) / alpha_bar) E||eps_hat - eps||^2``, the paper's Corollary 1, i.e. the
    per-sample denoising loss at one level) or a callable ``distance(x0, x0_hat) -> (batch,)``. The
    paper's LPIPS, for users who have the ``lpips`` package and its weights::

        net = lpips.LPIPS(net="vgg")          # expects 3-channel images in [-1, 1]
        distance = lambda a, b: net(a.expand(-1, 3, -1, -1), b.expand(-1, 3, -1, -1)).flatten()

    The distance is taken in the sampler's space, the latents of a latent model, by default; with
    ``decode`` (e.g. ``model.decode``) it compares the decoded images instead, as the paper does in pixels.

    Returns a float tensor of shape ``(batch,)``; larger means more unique.
    """
    n, batch_size = positive_int(n, "n (number of noise draws)"), positive_int(batch_size, "batch_size")
    dist = _distance(distance) if decode is None else _decoded(_distance(distance), decode)
    s = perturbation_time(sde, t=t, alpha_bar=alpha_bar, snr=snr)
    scores = []
    for start in tqdm(range(0, x0.shape[0], batch_size), desc="minority score", disable=not progress):
        chunk = x0[start : start + batch_size]
        ts = batch_time(s, chunk, sde.T)
        total = torch.zeros(chunk.shape[0], dtype=chunk.dtype, device=chunk.device)
        g = generator[start : start + chunk.shape[0]] if isinstance(generator, StackedGenerator) else generator
        for _ in range(int(n)):
            x_s = _perturb(sde, chunk, ts, g)
            total += _per_sample(dist(chunk, tweedie_denoise(score_fn, sde, x_s, ts)), chunk.shape[0])
        scores.append(total / n)
    return torch.cat(scores)


# -- levels --------------------------------------------------------------------------------------
def quantize_levels(scores: Tensor, num_levels: int = 100) -> tuple[Tensor, Tensor]:
    """Equal-mass levels of minority scores: ``(levels, thresholds)``.

    The ``num_levels - 1`` thresholds are the empirical quantiles ``i / L`` of ``scores``; a score in
    ``(q_{l-1}, q_l]`` gets level ``l``, so level 0 holds the most common samples and ``L - 1`` the
    most unique (the reference code's labelling; L = 100 there).
    """
    scores = torch.as_tensor(scores).flatten()
    num_levels = int_at_least(num_levels, 2, "num_levels")
    if scores.numel() < num_levels:
        raise ValueError(f"{scores.numel()} scores cannot fill {num_levels} equal-mass levels; "
                         "use fewer levels or more data")
    q = torch.arange(1, num_levels, dtype=torch.float64) / num_levels
    thresholds = torch.quantile(scores.double(), q)
    return assign_levels(scores, thresholds), thresholds


def assign_levels(scores: Tensor, thresholds: Tensor) -> Tensor:
    """The level of each score given the ``L - 1`` increasing thresholds of :func:`quantize_levels`."""
    thresholds = torch.as_tensor(thresholds, dtype=torch.float64)
    return torch.searchsorted(thresholds.to(scores.device), torch.as_tensor(scores).double().contiguous())


@dataclass
class MinorityClassifier:
    """A noisy-input classifier of minority levels with the settings that defined its labels.

    ``thresholds`` are the ``num_levels - 1`` level boundaries of the minority score, measured at
    time ``t`` of ``sde`` with ``n`` noise draws and ``distance``. ``scores``/``levels`` are the
    training set's, when known.
    """

    classifier: nn.Module
    sde: SDE
    thresholds: Tensor
    t: float
    n: int = 5
    distance: str = "l2"
    scores: Tensor | None = None
    levels: Tensor | None = None

    @property
    def num_levels(self) -> int:
        return len(self.thresholds) + 1

    @property
    def alpha_bar(self) -> float:
        """The VP ``alpha_bar`` of the perturbation level, ``snr / (1 + snr)``."""
        return float(torch.sigmoid(self.sde.log_snr(torch.tensor(self.t, dtype=torch.float64))))

    def assign(self, scores: Tensor) -> Tensor:
        """Levels of new minority scores (computed with the same settings)."""
        return assign_levels(scores, self.thresholds)

    def save(self, path: str | os.PathLike) -> None:
        """One safetensors file; its JSON header holds the architecture, the SDE and the level settings."""
        extra = {"minority": {"num_levels": self.num_levels, "thresholds": self.thresholds.tolist(), "t": self.t,
                              "alpha_bar": self.alpha_bar, "n": self.n, "distance": self.distance}}
        save_classifier(path, self.classifier, self.sde, kind="minority", extra=extra)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> MinorityClassifier:
        classifier, meta = load_classifier(path, device=device, kind="minority")
        m = meta_field(meta, "minority", path)
        num_levels, thresholds, t, n, distance = (meta_field(m, key, path, "'minority' metadata")
                                                  for key in ("num_levels", "thresholds", "t", "n", "distance"))
        if num_levels != meta_field(meta, "num_classes", path):
            raise ValueError(f"{path}: the classifier has {meta['num_classes']} outputs but {num_levels} "
                             "minority levels; the file is inconsistent")
        return cls(classifier, make_sde(**meta_field(meta, "sde", path)), torch.tensor(thresholds, dtype=torch.float64),
                   t, n, distance)


def train_minority_classifier(
    classifier: nn.Module,
    score_fn: ScoreFn,
    sde: SDE,
    x: Tensor,
    config: TrainConfig | None = None,
    *,
    num_levels: int = 100,
    scores: Tensor | None = None,
    t: float | None = None,
    alpha_bar: float | None = None,
    snr: float | None = None,
    n: int = 5,
    distance: str | Distance = "l2",
    generator: torch.Generator | StackedGenerator | None = None,
    batch_size: int = 256,
    eps: float = 1e-5,
    out_dir: str | os.PathLike | None = None,
    progress: bool = False,
    decode: Callable[[Tensor], Tensor] | None = None,
) -> MinorityClassifier:
    """Label ``x`` with minority levels and train a noisy-input classifier on them (Um et al., Sec. 3.2).

    The minority scores of ``x`` (:func:`minority_score` with ``score_fn`` and the level/``n``/
    ``distance`` settings, unless ``scores`` are given) are quantised into ``num_levels`` equal-mass
    levels (:func:`quantize_levels`), and ``classifier(x_t, t)`` (``out_dim == num_levels``) is trained
    by :func:`train_noisy_classifier` with ``t`` over the whole range ``[eps, T]``.
    """
    out_dim = getattr(classifier, "out_dim", None)
    if out_dim is not None and out_dim != num_levels:
        raise ValueError(f"the classifier has {out_dim} outputs but num_levels={num_levels}; "
                         "a minority classifier needs one logit per level")
    s = perturbation_time(sde, t=t, alpha_bar=alpha_bar, snr=snr)
    if scores is None:
        scores = minority_score(score_fn, sde, x, t=s, n=n, distance=distance, generator=generator,
                                batch_size=batch_size, progress=progress, decode=decode)
    elif len(scores) != len(x):
        raise ValueError(f"got {len(scores)} scores for {len(x)} samples")
    levels, thresholds = quantize_levels(scores, num_levels)
    name = distance if isinstance(distance, str) else getattr(distance, "__name__", "custom")
    trained = train_noisy_classifier(classifier, sde, x, levels, config, eps=eps, out_dir=out_dir,
                                     meta={"minority_levels": num_levels})
    return MinorityClassifier(trained, sde, thresholds, s, n, name, scores.detach(), levels)


class MinorityGuidance(ClassifierGuidance):
    """Minority guidance: ``s(x, t) + scale * grad_x log p(target_level | x_t = x, t)`` (Um et al., eq. 8).

    ``classifier`` is a :class:`MinorityClassifier` or any noisy-input classifier of ``num_levels``
    logits. ``target_level = num_levels - 1`` samples the most unique features, ``0`` the most common
    ones; ``scale > 1`` strengthens them (the reference code samples LSUN at ``scale = 3.5``). The
    reference code adds ``Sigma_t * scale * grad`` to the DDPM posterior mean, which to first order in
    the step is this score edit followed by the same ancestral step.
    """

    what = "level"

    def __init__(self, classifier: MinorityClassifier | nn.Module, target_level: int, scale: float = 1.0, *,
                 num_levels: int | None = None):
        if isinstance(classifier, MinorityClassifier):
            if num_levels is not None and num_levels != classifier.num_levels:
                raise ValueError(f"the minority classifier has {classifier.num_levels} levels but num_levels={num_levels}")
            num_levels, self.minority = classifier.num_levels, classifier
            classifier = classifier.classifier
        else:
            self.minority = None
        if num_levels is None and getattr(classifier, "out_dim", None) is None:
            raise ValueError("pass num_levels: the classifier does not say how many minority levels it predicts")
        super().__init__(classifier, target_level, scale, num_classes=num_levels)
        if self.minority is not None:
            self.sde = self.minority.sde

    @property
    def num_levels(self) -> int:
        return self.num_classes

    @classmethod
    def load(cls, path: str | os.PathLike, target_level: int, scale: float = 1.0,
             device: str | torch.device = "cpu") -> MinorityGuidance:
        """Guidance by a minority classifier saved with :meth:`MinorityClassifier.save`."""
        return cls(MinorityClassifier.load(path, device=device), target_level, scale)


class SelfMinorityGuidance(Guidance):
    """Self-guided minority sampling (Um & Ye, ECCV 2024): no classifier, the model guides itself.

    At a guided step, with ``x0_hat = E[x0 | x_t]`` from ``score_fn`` (Tweedie, gradients on), the
    reconstruction is re-noised to ``t_p = p_ratio * T`` and denoised once more with gradients
    stopped, ``x0_tilde``; the discrepancy ``d(x0_hat, x0_tilde)`` (averaged over ``n`` re-noisings) is
    differentiated with respect to ``x_t`` through the model, the gradient is divided per sample by
    its largest absolute entry, and ``scale`` times it is added to the score. Steps are guided every
    ``inter_rate``-th reverse step, counting from the first (a step being a new time value: PC's
    corrector and predictor at one ``t`` are one step; with multi-stage ODE solvers use
    ``inter_rate=1``). Each guided step costs ``1 + n`` extra network evaluations and one backward pass.

    Defaults follow the authors' code (``p_ratio=0.8``, ``inter_rate=5``, one re-noising,
    max-abs normalisation, no clipping of ``x0_hat``); its distance is LPIPS-AlexNet (pass a callable,
    see :func:`minority_score`) or an L_p norm; with one re-noising any positive per-sample rescaling of
    the distance (``||.||`` vs ``||.||^2``) cancels in the normalisation, so ``"l2"`` is their L2 default.

    Mapping to the score: the code adds ``Sigma_t * scale * g`` to the DDPM posterior mean
    (``mg_scale_type="var"``, ``Sigma_t = beta_t``). An ancestral VP step computes its mean as
    ``(x + beta_t s) / sqrt(1 - beta_t)``, so adding ``scale * g`` to the score shifts it by
    ``beta_t * scale * g / sqrt(1 - beta_t)``: the code's edit up to a factor ``1 + O(beta_t)`` (and
    exactly it for the ``reverse_diffusion`` predictor, ``x - f + beta_t s``). Their published scales
    (0.4 CelebA-64, 0.2 ImageNet-64) are for images in [-1, 1] and 250 steps.

    ``score_fn``/``sde`` are the model that guides itself (the unguided model, whatever other plug-ins
    the sampler composes with); ``generator`` draws the re-noising noise. The discrepancy is measured in
    the sampler's space (a latent model's latents) unless ``decode`` (``model.decode``) is given: then
    between decoded images, with the gradient taken through the decoder.
    """

    def __init__(self, score_fn: ScoreFn, sde: SDE, scale: float, *, p_ratio: float = 0.8, inter_rate: int = 5,
                 n: int = 1, distance: str | Distance = "l2", normalize: bool = True,
                 generator: torch.Generator | StackedGenerator | None = None,
                 decode: Callable[[Tensor], Tensor] | None = None):
        if not callable(score_fn):
            raise TypeError(f"score_fn must be a score function (x, t) -> score, got {type(score_fn).__name__}")
        if not isinstance(sde, SDE):
            raise TypeError(f"sde must be a scorekit SDE, got {type(sde).__name__}")
        if not 0 < p_ratio <= 1:
            raise ValueError(f"p_ratio (re-noising time as a fraction of T) must lie in (0, 1], got {p_ratio}")
        self.score_fn, self.sde, self.scale = score_fn, sde, guidance_scale(scale)
        self.p_ratio, self.inter_rate = float(p_ratio), positive_int(inter_rate, "inter_rate")
        self.n = positive_int(n, "n")
        self.distance = _distance(distance) if decode is None else _decoded(_distance(distance), decode)
        self.normalize, self.generator, self.decode = bool(normalize), generator, decode

    def direction(self, x: Tensor, t: Tensor | float) -> Tensor:
        """The (normalised) gradient ``grad_{x_t} E d(x0_hat(x_t), x0_tilde)`` of the self-guidance."""
        t = batch_time(t, x, self.sde.T)
        t_p = torch.full_like(t, self.p_ratio * self.sde.T)
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            x0_hat = tweedie_denoise(self.score_fn, self.sde, x_in, t)
            discrepancy = 0.0
            for _ in range(self.n):
                # Stop-gradient through the second reconstruction, as the authors' code (no_grad there).
                with torch.no_grad():
                    x_p = _perturb(self.sde, x0_hat.detach(), t_p, self.generator)
                    x0_tilde = tweedie_denoise(self.score_fn, self.sde, x_p, t_p)
                discrepancy = discrepancy + _per_sample(self.distance(x0_hat, x0_tilde), x.shape[0])
            (grad,) = torch.autograd.grad(discrepancy.sum() / self.n, x_in)
        if self.normalize:
            peak = grad.abs().reshape(grad.shape[0], -1).amax(1).clamp_min(torch.finfo(grad.dtype).tiny)
            grad = grad / bcast(peak, grad)
        return grad

    def with_generator(self, generator: torch.Generator | StackedGenerator | None) -> SelfMinorityGuidance:
        """A copy that draws its re-noising noise from ``generator``."""
        other = copy.copy(self)
        other.generator = generator
        return other

    def guide_score(self, score_fn: ScoreFn) -> ScoreFn:
        last_t, step = [None], [-1]

        def guided_score(x: Tensor, t: Tensor) -> Tensor:
            t_now = float(batch_time(t, x, self.sde.T)[0])
            if t_now != last_t[0]:
                last_t[0], step[0] = t_now, step[0] + 1
            s = score_fn(x, t)
            if step[0] % self.inter_rate:
                return s
            return s + self.scale * self.direction(x, t).to(s.dtype)

        return guided_score

    def __repr__(self) -> str:
        return (f"SelfMinorityGuidance(scale={self.scale}, p_ratio={self.p_ratio}, inter_rate={self.inter_rate}, "
                f"n={self.n})")
