"""Score functions: the protocol every sampler consumes, networks wrapped as scores, and Tweedie's formula.

A *score function* is any callable ``score_fn(x, t) -> Tensor`` returning ``grad_x log p_t(x)`` with
the shape of ``x``. :class:`ScoreModel` turns a network that predicts noise, the score, the clean
sample or the velocity into one, given the SDE that defines ``x_t = alpha(t) x_0 + sigma(t) z``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from .sde import SDE, as_coeff, as_time, batch_time, bcast, lib_for
from .validate import non_negative

__all__ = ["ScoreFn", "ScoreModel", "ConditionedScore", "Conditioning", "tweedie_denoise", "score_time", "tile",
           "PREDICTIONS", "TIME_INPUTS", "data_shape_of"]

PREDICTIONS = ("eps", "score", "x0", "v")
TIME_INPUTS = ("index", "t", "sigma", "log_sigma")


@runtime_checkable
class ScoreFn(Protocol):
    """``score_fn(x, t)``: ``grad_x log p_t(x)``; ``x`` of shape ``(batch, ...)``, ``t`` of shape ``(batch,)``.

    A score function whose ``host_time`` attribute is true (:class:`ScoreModel`, and the wrappers that forward
    it) also takes ``t`` as a host number, one time for the whole batch: the samplers then pass their grid's
    numbers as they are (:func:`score_time`), so that its coefficients are host numbers too.
    """

    def __call__(self, x: Tensor, t: Tensor) -> Tensor: ...


def score_time(score_fn: ScoreFn, x: Tensor, t: Tensor | float, T: float = 1.0) -> Tensor | float:
    """The time to call ``score_fn`` with for the state ``x``: a host number as it is where ``score_fn`` takes one
    (``host_time``), else :func:`~scorekit.sde.batch_time`'s ``(batch,)`` tensor, the protocol's time."""
    if getattr(score_fn, "host_time", False):
        return as_time(t, x, T)
    return batch_time(t, x, T)


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

    #: whether the network needs conditioning (a prompt, a class): then only :meth:`condition` evaluates it
    requires_condition: bool = False
    #: it takes a host time for the whole batch (see :class:`ScoreFn`) and computes its coefficients on the host; a
    #: subclass whose hooks (:meth:`coeffs`, :meth:`network_time`) need tensors of time sets it to False
    host_time: bool = True
    #: whether the network's output stacks a learned variance after its prediction (``2 C`` channels)
    learned_variance: bool = False
    condition_help: str = "class_labels=, encoder_hidden_states="

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
    def coeffs(self, t: Tensor | float) -> tuple[Tensor, Tensor] | tuple[float, float]:
        """``(alpha(t), sigma(t))`` used to convert the network output to a score (host numbers for a host ``t``)."""
        return self.sde.marginal_coeffs(t)

    def network_time(self, t: Tensor | float) -> Tensor | float:
        """The conditioning value ``c(t)`` passed to the network (a host number for a host ``t``)."""
        if self.time_input == "index":
            return t * (self.sde.N - 1)
        if self.time_input == "t":
            return t
        sigma = self.sde.marginal_coeffs(t)[1]
        return sigma if self.time_input == "sigma" else lib_for(sigma).log(sigma)

    # -- evaluation ------------------------------------------------------------------------------
    def check_input(self, x: Tensor) -> None:
        """Raise a ``ValueError`` naming both shapes when ``x`` is not a batch of what the network expects."""
        if not torch.is_tensor(x) or not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got {type(x).__name__} {getattr(x, 'dtype', '')}")
        if self.data_shape is not None and tuple(x.shape[1:]) != self.data_shape:
            expected = ", ".join(map(str, self.data_shape))
            raise ValueError(f"x has shape {tuple(x.shape)} but the model expects (B, {expected})")

    def raw(self, x: Tensor, t: Tensor, net_kwargs: dict | None = None) -> Tensor:
        """The network's own output at ``(x, t)`` (noise, score, x0 or v, per ``prediction``); ``net_kwargs``
        (conditioning such as ``class_labels``) go to the network call as they are."""
        self.check_input(x)
        if self.requires_condition and not net_kwargs:
            raise ValueError(f"this {type(self.net).__name__} model is conditional: call model.condition(...) "
                             f"({self.condition_help}) and sample with the score function it returns")
        return self._net(x, as_time(t, x, self.sde.T), net_kwargs or {})

    def _net(self, x: Tensor, t: Tensor | float, net_kwargs: dict) -> Tensor:
        # the network may run in a lower precision than the sampler's state (from_diffusers(dtype=...))
        param = next(self.net.parameters(), None)
        dtype = x.dtype if param is None or not param.is_floating_point() else param.dtype
        c = self.network_time(t)
        if not torch.is_tensor(c):  # a host time: the network still takes one value per sample
            c = torch.full((x.shape[0],), c, dtype=x.dtype if isinstance(c, float) else torch.long, device=x.device)
        out = self.net(x.to(dtype), c, **net_kwargs)
        out = getattr(out, "sample", out)
        if self.learned_variance:  # noise and a variance: only the noise half is read (as DiTPipeline)
            out = out[:, : x.shape[1]]
        if out.shape != x.shape:
            raise ValueError(f"the network returned shape {tuple(out.shape)} for input of shape {tuple(x.shape)}")
        return out.to(x.dtype)

    def _state_coeffs(self, out: Tensor, t: Tensor | float) -> tuple[Tensor, Tensor] | tuple[float, float]:
        """:meth:`coeffs` ready to scale ``out``: per-sample tensors in its dtype, or host numbers (then each
        conversion is a pass or two over the batch, as in a diffusers scheduler's step)."""
        alpha, sigma = self.coeffs(t)
        return as_coeff(alpha, out), as_coeff(sigma, out)

    def to_score(self, out: Tensor, x: Tensor, t: Tensor | float) -> Tensor:
        """The score implied by the network output ``out`` at ``(x, t)`` (``t`` of shape ``(batch,)``, or a host
        number)."""
        alpha, sigma = self._state_coeffs(out, t)
        if self.prediction == "score":
            return out
        if self.prediction == "eps":
            return out / -sigma
        if self.prediction == "x0":
            return (alpha * out - x) / sigma**2
        eps = (sigma * x + alpha * out) / (alpha**2 + sigma**2)
        return -eps / sigma

    def to_x0(self, out: Tensor, x: Tensor, t: Tensor | float) -> Tensor:
        """The clean-sample estimate ``E[x0 | x_t]`` implied by ``out``, read off the network's own
        parameterization, so that it stays defined where ``alpha(t) = 0`` for ``x0`` and ``v`` models
        (zero terminal SNR), where Tweedie's formula through the score is ``0 / 0``."""
        alpha, sigma = self._state_coeffs(out, t)
        if self.prediction == "x0":
            return out
        if self.prediction == "v":
            return (alpha * x - sigma * out) / (alpha**2 + sigma**2)
        if self.prediction == "eps":
            return (x - sigma * out) / alpha
        return (x + sigma**2 * out) / alpha

    def forward(self, x: Tensor, t: Tensor | float) -> Tensor:
        """``grad_x log p_t(x)``."""
        t = as_time(t, x, self.sde.T)
        return self.to_score(self.raw(x, t), x, t)

    def denoise(self, x: Tensor, t: Tensor | float) -> Tensor:
        """``E[x0 | x_t = x]`` from the network's output (what :func:`tweedie_denoise` uses for a model)."""
        t = as_time(t, x, self.sde.T)
        return self.to_x0(self.raw(x, t), x, t)

    # -- conditioning ----------------------------------------------------------------------------
    def condition(self, *, guidance_scale: float | None = None, **kwargs: Any) -> ConditionedScore:
        """A score function ``score_fn(x, t)`` bound to a conditioning, for every sampler and plug-in.

        The keywords a model understands are those of :meth:`conditioning`: for a network that takes them,
        ``class_labels=``, ``encoder_hidden_states=`` (with ``negative_encoder_hidden_states=`` for the
        unconditional branch) and ``added_cond_kwargs=`` (with ``negative_added_cond_kwargs=``); pretrained pipelines add ``prompt=`` /
        ``negative_prompt=`` (:class:`scorekit.pretrained.PretrainedScoreModel`). ``guidance_scale`` ``w``
        turns on classifier-free guidance (Ho & Salimans 2022) when ``w > 1``, as diffusers does: one
        network call on the unconditional and conditional inputs stacked, ``out_u + w (out_c - out_u)``
        in the network's output space. The batch rule of :class:`ConditionedScore` applies.
        """
        scale = None if guidance_scale is None else non_negative(guidance_scale, "guidance_scale")
        cond = self.conditioning(guided=scale is not None and scale > 1, **kwargs)
        return ConditionedScore(self, cond, scale)

    def conditioning(self, *, guided: bool = False, class_labels: Tensor | None = None,
                     encoder_hidden_states: Tensor | None = None,
                     negative_encoder_hidden_states: Tensor | None = None,
                     added_cond_kwargs: dict | None = None,
                     negative_added_cond_kwargs: dict | None = None) -> Conditioning:
        """The network keywords of the conditional (and, when ``guided``, the unconditional) branch.

        A plain network gets the tensors it is given; a guided call needs the unconditional branch
        spelled out (``negative_encoder_hidden_states``, and ``negative_added_cond_kwargs`` with
        ``added_cond_kwargs``), as a plain network has no null conditioning.
        """
        cond = {k: v for k, v in (("class_labels", class_labels), ("encoder_hidden_states", encoder_hidden_states),
                                  ("added_cond_kwargs", added_cond_kwargs)) if v is not None}
        if not cond:
            raise ValueError("condition() got no conditioning: pass class_labels=, encoder_hidden_states= or "
                             "added_cond_kwargs= (pretrained text-to-image pipelines also take prompt=)")
        uncond = None
        if guided:
            if negative_encoder_hidden_states is None:
                raise ValueError("classifier-free guidance (guidance_scale > 1) needs the unconditional branch: "
                                 "pass negative_encoder_hidden_states= (this network has no null conditioning)")
            uncond = {**cond, "encoder_hidden_states": negative_encoder_hidden_states}
            if added_cond_kwargs is not None:
                # the unconditional branch has its own pooled embedding: reusing the prompt's would be silently wrong
                if negative_added_cond_kwargs is None:
                    raise ValueError("classifier-free guidance with added_cond_kwargs= needs the unconditional "
                                     "branch's as well: pass negative_added_cond_kwargs= (SDXL: the negative pooled "
                                     "embedding as text_embeds, and the time_ids)")
                uncond["added_cond_kwargs"] = negative_added_cond_kwargs
        return Conditioning(cond, uncond)

    # -- latent models ---------------------------------------------------------------------------
    def decode(self, z: Tensor) -> Tensor:
        """Samples as images in ``[-1, 1]``; the identity for pixel models (latent models decode)."""
        return z

    def encode(self, images: Tensor) -> Tensor:
        """Images in ``[-1, 1]`` as model samples; the identity for pixel models (latent models encode)."""
        return images

    def extra_repr(self) -> str:
        return f"sde={self.sde!r}, prediction={self.prediction!r}, time_input={self.time_input!r}"


@dataclass
class Conditioning:
    """Network keywords for the conditional branch (``cond``) and, for classifier-free guidance, the
    unconditional one (``uncond``); every tensor's first dimension is the conditioning's batch."""

    cond: dict[str, Any]
    uncond: dict[str, Any] | None = None

    @property
    def batch(self) -> int:
        sizes = {v.shape[0] for v in _tensors(self.cond)}
        if len(sizes) != 1:
            raise ValueError(f"the conditioning tensors disagree on their batch size: {sorted(sizes)}")
        return sizes.pop()


def _tensors(tree: Any) -> list[Tensor]:
    if torch.is_tensor(tree):
        return [tree]
    if isinstance(tree, dict):
        return [t for v in tree.values() for t in _tensors(v)]
    return []


def tile(tree: Any, k: int) -> Any:
    """Every tensor in ``tree`` (nested dicts) repeated ``k`` times along its first dimension, in the order
    of ``x.repeat(k, ...)``: the library's one tiling order (the batch rule of :class:`ConditionedScore`)."""
    if torch.is_tensor(tree):
        return tree.repeat(k, *([1] * (tree.ndim - 1))) if k != 1 else tree
    if isinstance(tree, dict):
        return {key: tile(v, k) for key, v in tree.items()}
    return tree


def _cat(a: Any, b: Any) -> Any:
    if torch.is_tensor(a):
        return torch.cat([a, b])
    if isinstance(a, dict):
        return {key: _cat(a[key], b[key]) for key in a}
    return a


class ConditionedScore:
    """A model's score bound to a conditioning (:meth:`ScoreModel.condition`), called as ``score_fn(x, t)``.

    **The batch rule**: a call whose batch is ``k`` times the conditioning's batch ``B`` reads ``x`` as ``k``
    stacked copies of the ``B`` samples, ``x.repeat(k, ...)``: row ``j`` has the conditioning of sample
    ``j mod B``. SVDD's candidates, minority guidance's perturbations and Hutchinson probes tile in that
    order, so per-sample prompts stay with their samples. It carries the model's ``sde``, ``data_shape``,
    ``decode``/``encode`` and its own ``denoise`` (the guided output's ``x0``), so that samplers, Tweedie
    and plug-ins see it as they see the model.
    """

    def __init__(self, model: ScoreModel, conditioning: Conditioning, guidance_scale: float | None = None):
        self.model, self.conditioning = model, conditioning
        self.guidance_scale = guidance_scale
        self.guided = guidance_scale is not None and guidance_scale > 1
        if self.guided and conditioning.uncond is None:
            raise ValueError("classifier-free guidance needs an unconditional branch; this conditioning has none")
        self.batch = conditioning.batch
        self.sde, self.data_shape = model.sde, model.data_shape
        self.decode, self.encode = model.decode, model.encode

    def __repr__(self) -> str:
        return (f"ConditionedScore(batch={self.batch}, guidance_scale={self.guidance_scale}, "
                f"keys={sorted(self.conditioning.cond)})")

    @property
    def host_time(self) -> bool:
        """The model's: a host time goes through to it (:class:`ScoreFn`)."""
        return self.model.host_time

    def output(self, x: Tensor, t: Tensor | float) -> Tensor:
        """The network output under the conditioning (classifier-free guided when ``guidance_scale > 1``)."""
        n = x.shape[0]
        if n % self.batch:
            raise ValueError(f"a batch of {n} samples does not fit a conditioning of batch {self.batch}: the "
                             f"sample batch must be a multiple of it (k stacked copies, x.repeat(k, ...))")
        k = n // self.batch
        cond = tile(self.conditioning.cond, k)
        t = as_time(t, x, self.sde.T)
        if not self.guided:
            return self.model.raw(x, t, cond)
        both = _cat(tile(self.conditioning.uncond, k), cond)
        out_u, out_c = self.model.raw(torch.cat([x, x]), _cat(t, t), both).chunk(2)
        return out_u + self.guidance_scale * (out_c - out_u)

    def __call__(self, x: Tensor, t: Tensor | float) -> Tensor:
        t = as_time(t, x, self.sde.T)
        return self.model.to_score(self.output(x, t), x, t)

    def denoise(self, x: Tensor, t: Tensor | float) -> Tensor:
        t = as_time(t, x, self.sde.T)
        return self.model.to_x0(self.output(x, t), x, t)


def tweedie_denoise(score_fn: ScoreFn, sde: SDE, x: Tensor, t: Tensor | float) -> Tensor:
    """Tweedie's formula: ``E[x_0 | x_t = x] = (x + sigma(t)^2 score(x, t)) / alpha(t)``.

    Exact for the true score of the diffused data (Efron 2011); with a learned score it is the
    denoiser the score implies. A score function that carries its own ``denoise(x, t)`` (a
    :class:`ScoreModel`, or one bound to a conditioning) is asked for it instead: the same number where
    ``alpha > 0``, and defined at zero terminal SNR. Minority score, SVDD's posterior-mean value,
    DPM-Solver and Noise2Score reuse it. A host ``t`` stays one for a score function that takes it
    (:func:`score_time`), so that the conversion's coefficients are host numbers.
    """
    t = score_time(score_fn, x, t, sde.T)
    denoise = getattr(score_fn, "denoise", None)
    if denoise is not None:
        return denoise(x, t)
    alpha, sigma = (bcast(c, x) for c in sde.marginal_coeffs(t))
    return (x + sigma**2 * score_fn(x, t)) / alpha
