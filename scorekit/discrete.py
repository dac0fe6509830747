"""Masked (absorbing-state) discrete diffusion for short token sequences (MDLM; Sahoo et al. 2024).

A sequence ``x0`` of ``length`` tokens over ``vocab_size`` symbols is noised by replacing each token,
independently, with the extra symbol ``mask_index = vocab_size`` with probability ``m(t)``; the
log-linear schedule of the reference code has ``m(t) = (1 - eps) t`` (total noise
``sigma(t) = -log(1 - (1 - eps) t)``). A *denoiser* ``denoiser(x_t, t) -> (batch, length, vocab_size)``
returns ``log p(x0 | x_t)`` per position (the x0-predictor, in MDLM's SUBS parameterization: unmasked
tokens are carried over). It plays the role that the score function plays for continuous data:
samplers and guidance take it, plus the :class:`MaskedDiffusion` that fixes the schedule.

- :meth:`MaskedDiffusion.nelbo`: the continuous-time negative ELBO (MDLM eq. 10), which for the
  log-linear schedule weighs the masked-token cross-entropy by ``1/t``;
- :meth:`MaskedDiffusion.reverse_step`: the ancestral kernel from ``t`` to ``s < t`` (MDLM eq. 7);
- :class:`MaskedDenoiser`: a small x0-predictor network;
- :class:`ProductMixture`: a mixture of product distributions with its exact x0-predictor, the
  closed-form test bed (the discrete counterpart of :class:`scorekit.data.GaussianMixture`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .nets.mlp import MLP
from .sde import batch_time
from .validate import int_at_least, positive_int

__all__ = [
    "Denoiser",
    "MaskedDiffusion",
    "MaskedDenoiser",
    "ProductMixture",
    "carry_over",
    "count_token",
    "imbalanced_sequences",
    "make_masked_loss",
    "sample_categorical",
]

Denoiser = Callable[[Tensor, Tensor], Tensor]


def sample_categorical(probs: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One draw per row of the (unnormalised) probabilities ``probs[..., V]``, by inverting the CDF
    (one uniform per row; several times faster than ``torch.multinomial`` on many short rows)."""
    cdf = probs.cumsum(-1)
    u = torch.rand(cdf.shape[:-1] + (1,), generator=generator, device=cdf.device, dtype=cdf.dtype) * cdf[..., -1:]
    return (cdf <= u).sum(-1).clamp(max=probs.shape[-1] - 1)


def carry_over(log_probs: Tensor, x_t: Tensor, mask_index: int) -> Tensor:
    """Put all of ``log p(x0 | x_t)`` on the observed token at unmasked positions (MDLM's SUBS
    parameterization): masking never changes a token, so an unmasked token is its own clean value."""
    observed = x_t != mask_index
    one_hot = F.one_hot(x_t.clamp(max=log_probs.shape[-1] - 1), log_probs.shape[-1]).bool()
    exact = torch.zeros_like(log_probs).masked_fill(~one_hot, float("-inf"))
    return torch.where(observed[..., None], exact, log_probs)


class MaskedDiffusion:
    """The absorbing-state forward process on sequences of ``length`` tokens from ``range(vocab_size)``.

    ``m(t) = (1 - eps) t`` is the probability that a token is masked at time ``t`` in ``[0, 1]``
    (MDLM's log-linear schedule, ``eps = 1e-3`` in the reference). ``T = 1`` and ``name`` mirror the
    SDE classes so that samplers and guidance can take either.
    """

    name = "masked"
    T = 1.0

    def __init__(self, vocab_size: int, length: int, eps: float = 1e-3):
        int_at_least(vocab_size, 2, "vocab_size")
        positive_int(length, "length")
        if not 0 <= eps < 1:
            raise ValueError(f"eps must lie in [0, 1), got {eps}")
        self.vocab_size, self.length, self.eps = int(vocab_size), int(length), float(eps)
        self.mask_index = self.vocab_size

    def __repr__(self) -> str:
        return f"MaskedDiffusion(vocab_size={self.vocab_size}, length={self.length}, eps={self.eps})"

    # -- schedule -------------------------------------------------------------------------------
    def move_chance(self, t: Tensor | float) -> Tensor:
        """``m(t) = 1 - exp(-sigma(t)) = (1 - eps) t``: the probability that a token is masked at ``t``."""
        t = t if torch.is_tensor(t) else torch.tensor(t, dtype=torch.float64)
        return (1 - self.eps) * t

    def sigma(self, t: Tensor | float) -> Tensor:
        """The log-linear total noise ``sigma(t) = -log(1 - (1 - eps) t)``."""
        return -torch.log1p(-self.move_chance(t))

    # -- checks ---------------------------------------------------------------------------------
    def check_tokens(self, x: Tensor, name: str = "x", allow_mask: bool = True) -> None:
        """Raise a ``ValueError`` unless ``x`` is an integer batch ``(B, length)`` of valid symbols."""
        if not torch.is_tensor(x) or x.dtype.is_floating_point or x.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor of token indices, got {getattr(x, 'dtype', type(x))}")
        if x.ndim != 2 or x.shape[1] != self.length:
            raise ValueError(f"{name} has shape {tuple(x.shape)} but sequences have shape (B, {self.length})")
        top = self.mask_index if allow_mask else self.vocab_size - 1
        if x.numel() and (int(x.min()) < 0 or int(x.max()) > top):
            what = f"tokens in [0, {self.vocab_size}) or the mask {self.mask_index}" if allow_mask else (
                f"tokens in [0, {self.vocab_size})")
            raise ValueError(f"{name} holds values in [{int(x.min())}, {int(x.max())}]; expected {what}")

    def check_output(self, log_probs: Tensor, x: Tensor) -> None:
        """The denoiser's output must be finite-or-``-inf`` log-probabilities of shape ``(B, length, vocab_size)``."""
        expected = (*x.shape, self.vocab_size)
        if tuple(log_probs.shape) != expected:
            raise ValueError(
                f"the denoiser returned shape {tuple(log_probs.shape)} for x of shape {tuple(x.shape)}; "
                f"expected log p(x0 | x_t) of shape {expected}"
            )
        if bool(torch.isnan(log_probs).any()) or bool((log_probs == float("inf")).any()):
            raise FloatingPointError("the denoiser returned NaN or +inf log-probabilities; check the model and its inputs")

    # -- forward process ------------------------------------------------------------------------
    def prior_sampling(self, n: int, generator: torch.Generator | None = None, device=None) -> Tensor:
        """The fully masked sequences ``x_1`` (the reference starts every sample there); deterministic, so
        ``generator`` is unused and only mirrors :meth:`SDE.prior_sampling`."""
        return torch.full((n, self.length), self.mask_index, dtype=torch.long, device=device)

    def q_sample(self, x0: Tensor, t: Tensor | float, generator: torch.Generator | None = None) -> Tensor:
        """Draw ``x_t ~ q(x_t | x0)``: each token masked independently with probability ``m(t)``."""
        t = batch_time(t, x0, self.T)
        u = torch.rand(x0.shape, generator=generator, device=x0.device, dtype=torch.float64)
        return torch.where(u < self.move_chance(t.double())[:, None], self.mask_index, x0)

    # -- training -------------------------------------------------------------------------------
    def nelbo(self, denoiser: Denoiser, x0: Tensor, generator: torch.Generator | None = None,
              sampling_eps: float = 1e-3) -> Tensor:
        """A one-sample estimate of the continuous-time negative ELBO of each sequence, in nats, ``(B,)``.

        MDLM eq. 10: ``E_t[ m'(t) / m(t) * sum_{l masked} -log p(x0^l | x_t) ]``, with ``m'/m = 1/t`` for
        the log-linear schedule. ``t`` is drawn uniformly on ``[sampling_eps, 1]`` with antithetic
        (stratified) sampling across the batch, as the reference trainer. With the exact x0-predictor
        its expectation is ``-log p(x0)`` (any-order autoregressive chain rule), up to the ``eps`` cut-offs.
        """
        self.check_tokens(x0, "x0", allow_mask=False)
        b = x0.shape[0]
        u = torch.rand(b, generator=generator, device=x0.device, dtype=torch.float64)
        u = (u / b + torch.arange(b, device=x0.device, dtype=torch.float64) / b) % 1
        t = (1 - sampling_eps) * u + sampling_eps
        x_t = self.q_sample(x0, t, generator)
        log_probs = denoiser(x_t, t)
        self.check_output(log_probs, x_t)
        masked = x_t == self.mask_index
        nll = -log_probs.gather(-1, x0[..., None]).squeeze(-1).masked_fill(~masked, 0.0)
        return nll.sum(1) / t.to(nll.dtype)

    def loss(self, denoiser: Denoiser, x0: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """The training loss: :meth:`nelbo` per token, averaged over the batch (the reference's token mean)."""
        return self.nelbo(denoiser, x0, generator).mean() / self.length

    # -- reverse process ------------------------------------------------------------------------
    def reverse_step(self, log_probs: Tensor, x: Tensor, t, s, generator: torch.Generator | None = None) -> Tensor:
        """One ancestral step ``x_t -> x_s`` (``s < t``) of the reverse process (MDLM eq. 7).

        A masked token stays masked with probability ``m(s) / m(t)``, else it is unmasked to a draw from
        the x0-predictor ``exp(log_probs)``; unmasked tokens are copied. At ``s = 0`` every remaining
        token is unmasked.
        """
        m_t = self.move_chance(batch_time(t, x, self.T).double())[:, None, None]
        m_s = self.move_chance(batch_time(s, x, self.T).double())[:, None, None]
        if bool((m_s >= m_t).any()):
            raise ValueError("the reverse step needs s < t")
        p_x0 = log_probs.double().exp() * (m_t - m_s) / m_t
        probs = torch.cat([p_x0, (m_s / m_t).expand(*x.shape, 1)], dim=-1)
        return torch.where(x == self.mask_index, sample_categorical(probs, generator), x)

    def argmax_decode(self, denoiser: Denoiser, x: Tensor, t) -> Tensor:
        """The most likely clean token at every masked position, the unmasked tokens kept.

        SVDD-PM's stand-in for a posterior mean on masked diffusion (the reference code scores the
        one-hot argmax of the denoiser at the candidate's own noise level); it is not ``E[x0 | x_t]``.
        """
        log_probs = denoiser(x, batch_time(t, x, self.T))
        self.check_output(log_probs, x)
        return torch.where(x == self.mask_index, log_probs.argmax(-1), x)


def make_masked_loss(diffusion: MaskedDiffusion) -> Callable[[nn.Module, Tensor, torch.Generator], Tensor]:
    """A :class:`scorekit.training.Trainer` loss: ``loss_fn(model, x0, generator) = diffusion.loss(model, x0, generator)``."""

    def loss_fn(model: nn.Module, batch: Tensor, generator: torch.Generator) -> Tensor:
        return diffusion.loss(model, batch, generator)

    return loss_fn


class MaskedDenoiser(nn.Module):
    """A small x0-predictor ``net(x_t, t) -> log p(x0 | x_t)`` of shape ``(B, length, vocab_size)``.

    The one-hot sequence (mask symbol included) goes through the residual time-conditioned
    :class:`scorekit.nets.MLP`, whose output holds ``vocab_size + 1`` logits per position; as in MDLM's
    SUBS parameterization the mask logit is dropped (a clean token is never the mask) and unmasked
    positions are carried over (:func:`carry_over`). For short sequences an MLP over the whole
    sequence is enough; the reference uses a CNN or a transformer on long ones.
    """

    def __init__(self, vocab_size: int, length: int, hidden: int = 256, depth: int = 3, emb_dim: int = 128,
                 time_scale: float = 999.0):
        super().__init__()
        self.vocab_size, self.length, self.mask_index = vocab_size, length, vocab_size
        self.time_scale = float(time_scale)
        self.net = MLP((length, vocab_size + 1), hidden=hidden, depth=depth, emb_dim=emb_dim)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        # t is fed on the step-index scale t * 999 that the sinusoidal features suit (as VP score models)
        c = batch_time(t, x) * self.time_scale
        logits = self.net(F.one_hot(x, self.vocab_size + 1).to(self.net.inp.weight.dtype), c)[..., : self.vocab_size]
        return carry_over(logits.log_softmax(-1), x, self.mask_index)


class ProductMixture:
    """``p(x) = sum_k w_k prod_l Cat(x^l; pi_k[l])``: a mixture of product distributions over sequences.

    ``probs`` is ``(K, length, V)`` or ``(K, V)`` (the same distribution at every position, then
    ``length`` is required). Given a partly masked sequence the component posterior is closed form,
    so :meth:`x0_log_probs` is the *exact* x0-predictor of any masked diffusion of this data.
    """

    def __init__(self, weights: Sequence[float] | Tensor, probs: Tensor | Sequence, length: int | None = None):
        w = torch.as_tensor(weights, dtype=torch.float64).flatten()
        p = torch.as_tensor(probs, dtype=torch.float64)
        if p.ndim == 2:
            if length is None:
                raise ValueError("probs of shape (K, V) needs length=")
            p = p[:, None, :].expand(-1, int(length), -1).clone()
        if p.ndim != 3 or p.shape[0] != len(w):
            raise ValueError(f"weights {tuple(w.shape)} and probs {tuple(p.shape)} disagree: expected K weights "
                             "and probs of shape (K, length, V) or (K, V)")
        if (w <= 0).any() or abs(float(w.sum()) - 1) > 1e-6:
            raise ValueError(f"weights must be positive and sum to 1, got {w.tolist()}")
        if (p < 0).any() or (p.sum(-1) - 1).abs().max() > 1e-6:
            raise ValueError("every probs[k, l] must be a probability vector (non-negative, summing to 1)")
        self.weights, self.probs = w, p
        self.K, self.length, self.vocab_size = p.shape

    def __repr__(self) -> str:
        return f"ProductMixture(K={self.K}, length={self.length}, vocab_size={self.vocab_size})"

    def sample(self, n: int, generator: torch.Generator | None = None, *, return_labels: bool = False
               ) -> Tensor | tuple[Tensor, Tensor]:
        """``n`` sequences (and their component labels)."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        x = torch.multinomial(self.probs[k].reshape(-1, self.vocab_size), 1, generator=generator).view(n, self.length)
        return (x, k) if return_labels else x

    def _component_loglik(self, x: Tensor, mask_index: int | None) -> Tensor:
        """``log prod_{l observed} pi_k[l, x^l]`` per sample and component, ``(B, K)``."""
        observed = torch.ones_like(x, dtype=torch.bool) if mask_index is None else x != mask_index
        idx = x.clamp(max=self.vocab_size - 1).to(self.probs.device)
        pos = torch.arange(self.length, device=idx.device).expand_as(idx)
        ll = self.probs.log()[:, pos, idx]                              # (K, B, L)
        return ll.masked_fill(~observed[None], 0.0).sum(-1).T

    def log_prob(self, x: Tensor) -> Tensor:
        """``log p(x)`` of clean sequences, ``(B,)``."""
        return torch.logsumexp(self.weights.log() + self._component_loglik(x, None), dim=1)

    def posterior(self, x_t: Tensor, mask_index: int) -> Tensor:
        """``p(k | x_t)``: component responsibilities given the unmasked tokens, ``(B, K)``."""
        return torch.softmax(self.weights.log() + self._component_loglik(x_t, mask_index), dim=1)

    def x0_log_probs(self, x_t: Tensor, mask_index: int) -> Tensor:
        """The exact ``log p(x0^l | x_t)``, ``(B, length, V)``: ``sum_k p(k | x_t) pi_k[l]`` at masked positions."""
        marg = torch.einsum("bk,klv->blv", self.posterior(x_t, mask_index), self.probs)
        return carry_over(marg.log(), x_t, mask_index)

    def denoiser(self, diffusion: MaskedDiffusion) -> Denoiser:
        """The exact x0-predictor as a denoiser ``(x_t, t) -> log p(x0 | x_t)`` (float64; independent of ``t``)."""
        if (diffusion.vocab_size, diffusion.length) != (self.vocab_size, self.length):
            raise ValueError(f"{diffusion!r} does not match {self!r}")

        def exact_denoiser(x: Tensor, t: Tensor) -> Tensor:
            return self.x0_log_probs(x, diffusion.mask_index)

        return exact_denoiser


def imbalanced_sequences(length: int = 12) -> ProductMixture:
    """The imbalanced sequence test bed: tokens A, C, G, T (0-3); components with weights 0.7 / 0.25 / 0.05,
    the rare one emitting G (index 2) with probability 0.9 at every position (docs/notes.md, check V5)."""
    probs = [[0.4, 0.2, 0.3, 0.1], [0.1, 0.4, 0.1, 0.4], [1 / 30, 1 / 30, 0.9, 1 / 30]]
    return ProductMixture([0.7, 0.25, 0.05], probs, length=length)


def count_token(x0: Tensor, token: int) -> Tensor:
    """The number of positions holding ``token`` in each sequence, as a float reward ``(B,)``."""
    return (x0 == token).sum(1).to(torch.get_default_dtype())

