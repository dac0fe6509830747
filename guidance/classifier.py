"""Classifier guidance (Dhariwal & Nichol 2021; Song et al. 2021, eq. 14) and noisy-classifier training.

A classifier of noisy inputs ``classifier(x_t, t) -> logits`` turns an unconditional score into a
conditional one by Bayes' rule, ``grad log p_t(x | y) = grad log p_t(x) + grad log p_t(y | x)``;
:class:`ClassifierGuidance` adds ``scale * grad_x log p(y | x_t, t)`` to the score, so ``scale = 1``
samples the exact conditional when the classifier is exact and ``scale > 1`` sharpens it.

Trained classifiers are saved as one safetensors file whose JSON header holds what is needed to
rebuild and check them (architecture, number of classes, SDE, and for minority classifiers the
minority-score settings): :func:`save_classifier`, :func:`load_classifier`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from samplers.hooks import Guidance, ScoreFn
from scorekit.checkpoint import load_tensors, meta_field, save_tensors
from scorekit.nets.classifier import classifier_from_config
from scorekit.sde import SDE, batch_time, bcast, make_sde
from scorekit.training import TrainConfig, Trainer, load_state_checked
from scorekit.validate import guidance_scale

__all__ = [
    "ClassifierGuidance",
    "classifier_log_prob_grad",
    "train_noisy_classifier",
    "noisy_classifier_loss",
    "default_classifier_config",
    "perturb",
    "save_classifier",
    "load_classifier",
    "CLASSIFIER_FORMAT",
]

CLASSIFIER_FORMAT = "scorekit-classifier/1"
Classifier = Callable[[Tensor, Tensor], Tensor]


def perturb(sde: SDE, x0: Tensor, t: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """A draw ``x_t = alpha(t) x0 + sigma(t) z`` from the transition kernel ``q(x_t | x0)``; returns ``(x_t, z)``."""
    z = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    mean, std = sde.marginal_prob(x0, t)
    return mean + bcast(std, x0) * z, z


def _input_dtype(classifier: Classifier, x: Tensor) -> torch.dtype:
    """The floating dtype a network's weights use (so float64 samplers can query float32 classifiers)."""
    if isinstance(classifier, nn.Module):
        for p in classifier.parameters():
            if p.is_floating_point():
                return p.dtype
    return x.dtype


def _plural(what: str) -> str:
    return what + ("es" if what.endswith("s") else "s")


def classifier_log_prob_grad(classifier: Classifier, x: Tensor, t: Tensor | float, target: Tensor | int,
                             num_classes: int | None = None, what: str = "class") -> Tensor:
    """``grad_x log p(target | x_t = x, t)`` with ``log p = log_softmax(classifier(x, t))``.

    Gradients are enabled locally (samplers run under ``torch.no_grad``); nothing accumulates in the
    classifier's ``.grad``. ``target`` is one index or one per sample, shape ``(batch,)``.
    """
    t = batch_time(t, x)
    target = torch.as_tensor(target, device=x.device).long()
    if target.ndim > 1 or (target.ndim == 1 and target.shape[0] != x.shape[0]):
        raise ValueError(f"target has shape {tuple(target.shape)} for a batch of {x.shape[0]}: pass one {what} "
                         f"index or one per sample")
    target = target.expand(x.shape[0])
    dtype = _input_dtype(classifier, x)
    with torch.enable_grad():
        x_in = x.detach().requires_grad_(True)
        logits = classifier(x_in.to(dtype), t.to(dtype))
        if logits.ndim != 2 or logits.shape[0] != x.shape[0]:
            raise ValueError(f"the classifier returned logits of shape {tuple(logits.shape)} for a batch of "
                             f"{x.shape[0]}; expected (batch, number of {_plural(what)})")
        k = logits.shape[1]
        if num_classes is not None and k != num_classes:
            raise ValueError(f"the classifier returned {k} logits but {num_classes} {_plural(what)} were expected")
        if int(target.max()) >= k or int(target.min()) < 0:
            raise ValueError(f"target {what} {int(target.max())} is out of range for a classifier with {k} {_plural(what)}")
        log_p = torch.log_softmax(logits, dim=1).gather(1, target[:, None]).sum()
        (grad,) = torch.autograd.grad(log_p, x_in)
    return grad


def _check_target(target: int | Tensor, num: int | None, what: str) -> int | Tensor:
    values = torch.as_tensor(target)
    if values.is_floating_point() or values.is_complex() or values.dtype == torch.bool:
        raise TypeError(f"the target {what} must be an integer index (or a tensor of them), got {target!r}")
    if values.numel() == 0 or int(values.min()) < 0 or (num is not None and int(values.max()) >= num):
        valid = f"0..{num - 1}" if num is not None else ">= 0"
        raise ValueError(f"target {what} {values.tolist()} is out of range: valid {_plural(what)} are {valid}")
    return int(values) if values.ndim == 0 else values.long()


class ClassifierGuidance(Guidance):
    """Classifier guidance: ``s(x, t) + scale * grad_x log p(target | x_t = x, t)``.

    ``classifier(x, t) -> logits`` of shape ``(batch, K)``, taking the continuous time ``t`` (any
    callable: a :mod:`scorekit.nets.classifier` network, or an exact posterior such as
    ``log GaussianMixture.responsibilities``). ``target`` is a class index or one per sample.
    ``num_classes`` defaults to the network's ``out_dim``; when known, ``target`` is checked against it.
    """

    what = "class"

    def __init__(self, classifier: Classifier, target: int | Tensor, scale: float = 1.0, *,
                 num_classes: int | None = None):
        if not callable(classifier):
            raise TypeError(f"classifier must be callable as classifier(x, t) -> logits, got {type(classifier).__name__}")
        out_dim = getattr(classifier, "out_dim", None)
        if num_classes is not None and out_dim is not None and num_classes != out_dim:
            raise ValueError(f"the classifier has {out_dim} outputs but num_{_plural(self.what)}={num_classes}; "
                             f"a classifier needs one logit per {self.what}")
        self.num_classes = num_classes if num_classes is not None else out_dim
        self.classifier = classifier
        self.target = _check_target(target, self.num_classes, self.what)
        self.scale = guidance_scale(scale)
        #: the SDE the classifier was trained on, when loaded from a checkpoint
        self.sde: SDE | None = None

    def log_prob_grad(self, x: Tensor, t: Tensor | float) -> Tensor:
        """``grad_x log p(target | x_t = x, t)``."""
        return classifier_log_prob_grad(self.classifier, x, t, self.target, self.num_classes, self.what)

    def guide_score(self, score_fn: ScoreFn) -> ScoreFn:
        def guided_score(x: Tensor, t: Tensor) -> Tensor:
            return score_fn(x, t) + self.scale * self.log_prob_grad(x, t)

        return guided_score

    @classmethod
    def load(cls, path: str | os.PathLike, target: int | Tensor, scale: float = 1.0,
             device: str | torch.device = "cpu") -> ClassifierGuidance:
        """Guidance by a classifier saved with :func:`save_classifier` (or trained by ``train_noisy_classifier``)."""
        classifier, meta = load_classifier(path, device=device)
        guidance = cls(classifier, target, scale)
        guidance.sde = make_sde(**meta_field(meta, "sde", path))
        return guidance

    def __repr__(self) -> str:
        return f"{type(self).__name__}(target={self.target!r}, scale={self.scale}, num_{_plural(self.what)}={self.num_classes})"


# -- training ------------------------------------------------------------------------------------
def default_classifier_config(**overrides) -> TrainConfig:
    """Optimiser settings of the minority-guidance reference code's classifier training: AdamW,
    learning rate 3e-4, weight decay 0.05, batch 256 (its linear learning-rate decay is not used)."""
    settings = {"steps": 2000, "batch_size": 256, "lr": 3e-4, "weight_decay": 0.05, "progress": False}
    return TrainConfig(**{**settings, **overrides})


def noisy_classifier_loss(sde: SDE, eps: float = 1e-5) -> Callable[[nn.Module, tuple[Tensor, Tensor], torch.Generator], Tensor]:
    """A :class:`~scorekit.training.Trainer` loss: cross-entropy of ``classifier(x_t, t)`` against the
    label of ``x0``, with ``t ~ U(eps, T)`` and ``x_t ~ q(x_t | x0)`` (the noisy-classifier objective)."""
    if not 0 <= eps < sde.T:
        raise ValueError(f"eps must lie in [0, {sde.T}), got {eps}")

    def loss_fn(model: nn.Module, batch: tuple[Tensor, Tensor], generator: torch.Generator | None = None) -> Tensor:
        x0, y = batch
        t = torch.rand(x0.shape[0], generator=generator, device=x0.device, dtype=x0.dtype) * (sde.T - eps) + eps
        x_t, _ = perturb(sde, x0, t, generator)
        return F.cross_entropy(model(x_t, t), y)

    return loss_fn


def train_noisy_classifier(
    classifier: nn.Module,
    sde: SDE,
    x: Tensor,
    y: Tensor,
    config: TrainConfig | None = None,
    *,
    eps: float = 1e-5,
    out_dir: str | os.PathLike | None = None,
    meta: dict | None = None,
) -> nn.Module:
    """Train ``classifier(x_t, t) -> logits`` to predict the label ``y`` of ``x0`` from ``x_t ~ q(x_t | x0)``,
    ``t ~ U(eps, T)``, by cross-entropy on :class:`scorekit.training.Trainer` (accelerate, EMA, checkpoints
    under ``out_dir`` with resume). ``config`` defaults to :func:`default_classifier_config`.

    Returns the EMA copy of the classifier in eval mode, with gradients of its weights switched off.
    """
    y = torch.as_tensor(y)
    if y.is_floating_point() or y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"y must be integer labels of shape ({x.shape[0]},), got {y.dtype} of shape {tuple(y.shape)}")
    out_dim = getattr(classifier, "out_dim", None)
    if len(y) and (int(y.min()) < 0 or (out_dim is not None and int(y.max()) >= out_dim)):
        raise ValueError(f"labels span {int(y.min())}..{int(y.max())} but the classifier has {out_dim} outputs "
                         f"(labels must lie in 0..{out_dim - 1 if out_dim else 'K-1'})")
    config = config if config is not None else default_classifier_config()
    trainer = Trainer(classifier, noisy_classifier_loss(sde, eps), (x, y.long()), config, out_dir=out_dir,
                      meta={"sde": sde.config(), **(meta or {})})
    trainer.train()
    return trainer.ema.eval().requires_grad_(False)


# -- persistence ---------------------------------------------------------------------------------
def save_classifier(path: str | os.PathLike, classifier: nn.Module, sde: SDE, *, kind: str = "classifier",
                    extra: dict | None = None) -> None:
    """Write the classifier's weights (safetensors, atomically) with a JSON header: format, ``kind``
    (``"classifier"`` or ``"minority"``), architecture (``classifier.config``), number of classes, SDE
    and ``extra`` (e.g. the minority-score settings)."""
    config = getattr(classifier, "config", None)
    if not isinstance(config, dict) or "class" not in config:
        raise TypeError(f"only networks from scorekit.nets.classifier can be saved (they record their "
                        f"architecture in .config); got {type(classifier).__name__}")
    meta = {"format": CLASSIFIER_FORMAT, "kind": kind, "architecture": config,
            "num_classes": int(classifier.out_dim), "sde": sde.config(), **(extra or {})}
    save_tensors(classifier.state_dict(), path, meta)


def load_classifier(path: str | os.PathLike, device: str | torch.device = "cpu",
                    kind: str | None = None) -> tuple[nn.Module, dict]:
    """``(classifier, meta)`` from a file written by :func:`save_classifier`; the classifier is in eval
    mode with its weights frozen. ``kind`` (``"classifier"``/``"minority"``), if given, must match."""
    tensors, meta = load_tensors(path, device)
    if meta.get("format") != CLASSIFIER_FORMAT:
        raise ValueError(f"{path} is not a scorekit classifier (format {meta.get('format')!r}, "
                         f"expected {CLASSIFIER_FORMAT!r})")
    if kind is not None and meta.get("kind") != kind:
        raise ValueError(f"{path} holds a {meta.get('kind')!r} classifier, but a {kind!r} classifier is needed")
    architecture = meta_field(meta, "architecture", path)
    try:
        classifier = classifier_from_config(architecture)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: the metadata's 'architecture' is malformed ({e!r}); the file was edited or not "
                         "written by save_classifier") from e
    load_state_checked(classifier, tensors, Path(path))
    return classifier.to(device).eval().requires_grad_(False), meta
