"""Forward SDEs of Song et al. (2021): VP, sub-VP and VE, with their reverse-time counterparts.

Time is continuous, ``t`` in ``[0, T]`` with ``T = 1``, a tensor of shape ``(batch,)``. Every SDE
here has an affine Gaussian transition kernel, ``x_t = alpha(t) x_0 + sigma(t) z``; the pair
``(alpha, sigma)`` is :meth:`SDE.marginal_coeffs`, from which ``marginal_prob``, the log-SNR and the
Tweedie denoiser follow. The method names match the reference code (``sde_lib.py``) so that users of
score_sde feel at home.

The samplers' time grids are host numbers, one time for the whole batch. The methods of time alone that a
step needs (``marginal_coeffs``, ``step_variance``, ``discrete_beta``, ``sigma``, ``timestep``) therefore also
take a host number and then return Python floats, computed in float64 without a tensor op, as a diffusers
scheduler computes its step's coefficients; the methods that take ``x`` return tensors either way, and from a
host time spend their tensor operations on applying the coefficients to ``x`` only. Tensors of per-sample
times take the tensor path.
"""

from __future__ import annotations

import abc
import functools
import math
from types import ModuleType
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .validate import positive_int

if TYPE_CHECKING:  # score.py imports this module
    from .score import ScoreFn

__all__ = ["SDE", "VPSDE", "SubVPSDE", "VESDE", "DiscreteVPSDE", "ReverseSDE", "SDES", "make_sde", "batch_time", "bcast",
           "as_time", "as_coeff", "lib_for"]


def bcast(v: Tensor | float, x: Tensor) -> Tensor | float:
    """Reshape a per-sample vector ``v`` of shape ``(batch,)`` so that it broadcasts against ``x``; a host
    number (one coefficient for the whole batch) broadcasts as it is."""
    if not torch.is_tensor(v):
        return v
    return v.reshape(-1, *([1] * (x.ndim - 1)))


def as_coeff(c: Tensor | float, x: Tensor) -> Tensor | float:
    """A coefficient ready to scale the state ``x``: a per-sample tensor in ``x``'s dtype, shaped to broadcast
    against it (:func:`bcast`), or a host number as it is."""
    return bcast(c.to(x.dtype), x) if torch.is_tensor(c) else c


def lib_for(*values: Tensor | float) -> ModuleType:
    """The module of elementary functions (``exp``, ``expm1``, ``sqrt``, ``log``, ``floor``) for ``values``:
    ``torch`` where any is a tensor, else ``math``, so that one formula serves per-sample times and a host
    time (evaluated in float64, without a tensor op)."""
    return torch if any(torch.is_tensor(v) for v in values) else math


def as_time(t: Tensor | float, x: Tensor, T: float = 1.0) -> Tensor | float:
    """``t`` for the time-only methods: a host number stays a Python float (its coefficients are then host
    numbers), checked as :func:`batch_time` checks a tensor; a tensor becomes :func:`batch_time`'s ``(batch,)``
    tensor."""
    if torch.is_tensor(t):
        return batch_time(t, x, T)
    if x.ndim == 0:
        raise ValueError("x must have a batch dimension: expected shape (batch, ...), got a scalar")
    t = float(t)
    if not -1e-6 * T <= t <= T * (1 + 1e-6):  # NaN fails too
        raise ValueError(f"t must lie in [0, {T}] (continuous time); got {t}")
    return t


def _cast(v: Tensor | float, like: Tensor | float) -> Tensor | float:
    """A coefficient ``v`` in the dtype of ``like`` (the time it was computed for, or the state) where both are
    tensors; host numbers stay Python floats."""
    return v.to(like.dtype) if torch.is_tensor(v) and torch.is_tensor(like) else v


def _step_index(k: Tensor | float, N: int) -> Tensor | int:
    """``floor(k)`` clamped to the steps ``0 .. N - 1``: an index tensor for a tensor, an int for a host number."""
    if torch.is_tensor(k):
        return torch.floor(k).long().clamp(0, N - 1)
    return min(max(math.floor(k), 0), N - 1)


def _sigmoid(v: float) -> float:
    """``1 / (1 + exp(-v))`` of a host number, written so that ``exp`` cannot overflow."""
    if v >= 0:
        return 1 / (1 + math.exp(-v))
    e = math.exp(v)
    return e / (1 + e)


def batch_time(t: Tensor | float, x: Tensor, T: float = 1.0) -> Tensor:
    """Validate ``t`` against ``x`` and return it as a floating tensor of shape ``(batch,)``.

    A Python float or a 0-d tensor is broadcast over the batch. ``t`` is promoted to ``x``'s floating
    dtype, so float64 inputs stay float64.
    """
    if x.ndim == 0:
        raise ValueError("x must have a batch dimension: expected shape (batch, ...), got a scalar")
    batch = x.shape[0]
    dtype = x.dtype if x.is_floating_point() else torch.get_default_dtype()
    if not torch.is_tensor(t):
        t = torch.full((batch,), float(t), dtype=dtype, device=x.device)
    else:
        if not t.is_floating_point():
            t = t.to(dtype)
        t = t.to(device=x.device, dtype=torch.promote_types(t.dtype, dtype))
        if t.ndim == 0:
            check_time_range(t, T)  # once, before broadcasting
            return t.expand(batch)
        if t.shape != (batch,):
            raise ValueError(
                f"t has shape {tuple(t.shape)} but x has batch size {batch}: expected t of shape ({batch},) or a scalar"
            )
    check_time_range(t, T)
    return t


def check_time_range(t: Tensor, T: float) -> None:
    """Raise if any entry of ``t`` lies outside ``[0, T]`` (or is NaN)."""
    if t.numel() == 0:
        return
    tol = 1e-6 * T
    flat = t.detach().reshape(-1)
    if flat.stride(0) == 0:  # a broadcast scalar: one value to check
        flat = flat[:1]
    if flat.device.type != "cpu":
        # a read-back would make the host wait for the device at every SDE call; check asynchronously
        torch._assert_async(((flat >= -tol) & (flat <= T + tol)).all(), f"t must lie in [0, {T}] (continuous time)")
        return
    lo, hi = torch.stack(torch.aminmax(flat)).tolist()  # NaN propagates and fails both tests
    if lo >= -tol and hi <= T + tol:
        return
    bad = ~((t >= -tol) & (t <= T + tol))
    offending = t[bad][:4].tolist()
    raise ValueError(f"t must lie in [0, {T}] (continuous time); got values such as {offending}")


def _per_sample(v: Tensor | float, x: Tensor) -> Tensor:
    """A coefficient as a tensor of shape ``(batch,)`` (or as it is, if it is one): a host number is filled in."""
    return v if torch.is_tensor(v) else torch.full((x.shape[0],), v, dtype=x.dtype, device=x.device)


def _ddpm_step(x: Tensor, beta: Tensor | float) -> tuple[Tensor, Tensor]:
    """DDPM's forward step as ``(f, G)``: ``x' = sqrt(1 - beta) x + sqrt(beta) z = x + f + G z``."""
    xp = lib_for(beta)
    return bcast(xp.sqrt(1 - beta), x) * x - x, _per_sample(xp.sqrt(beta), x)


class SDE(abc.ABC):
    """An Ito SDE ``dx = f(x, t) dt + g(t) dw`` on ``t in [0, T]`` with a Gaussian transition kernel.

    Subclasses give the drift/diffusion (:meth:`sde`), the kernel coefficients
    (:meth:`marginal_coeffs`), the prior and its discretization.
    """

    name: str = "sde"
    #: the samplers' default end time ``eps`` (score_sde's ``sampling_eps``: 1e-3 for VP, 1e-5 for VE)
    sampling_eps: float = 1e-3
    #: the time input a network for this SDE sees by default (see :data:`scorekit.score.TIME_INPUTS`)
    network_time: str = "index"
    #: whether the noise grows without bound (``alpha = 1``), so that ``sigma`` itself can be a time input
    variance_exploding: bool = False
    #: DPM-Solver's default time grid (``samplers.dpm_solver.TIME_GRIDS``), the one measured best for this SDE
    solver_grid: str = "quadratic"

    def __init__(self, N: int = 1000):
        self.N = positive_int(N, "N", "number of discretization steps")

    @property
    def T(self) -> float:
        """End time of the forward SDE."""
        return 1.0

    # -- the continuous process ------------------------------------------------------------------
    @abc.abstractmethod
    def sde(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Drift ``f(x, t)`` (shape of ``x``) and diffusion ``g(t)`` (shape ``(batch,)``)."""

    @abc.abstractmethod
    def marginal_coeffs(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(alpha(t), sigma(t))`` with ``x_t | x_0 ~ N(alpha(t) x_0, sigma(t)^2 I)``; each of shape of ``t``."""

    def marginal_prob(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Mean (shape of ``x``) and std (shape ``(batch,)``) of ``p_{0t}(x_t | x_0 = x)``."""
        t = batch_time(t, x, self.T)
        alpha, sigma = self.marginal_coeffs(t)
        return bcast(alpha, x) * x, sigma

    def log_snr(self, t: Tensor) -> Tensor:
        """``lambda(t) = log(alpha(t)^2 / sigma(t)^2)``, decreasing in ``t``."""
        alpha, sigma = self.marginal_coeffs(t)
        return 2 * (torch.log(alpha) - torch.log(sigma))

    @abc.abstractmethod
    def t_from_log_snr(self, lam: Tensor) -> Tensor:
        """Inverse of :meth:`log_snr` (closed form for every SDE here)."""

    # -- prior -----------------------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def prior_std(self) -> float:
        """Standard deviation of the (isotropic Gaussian) prior ``p_T``."""

    def prior_sampling(
        self,
        shape: tuple[int, ...] | torch.Size,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Tensor:
        """Draw ``x_T ~ p_T = N(0, prior_std^2 I)`` of the given shape."""
        if device is None and generator is not None:
            device = generator.device
        return self.prior_std * torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)

    def prior_logp(self, z: Tensor) -> Tensor:
        """``log p_T(z)`` per sample, shape ``(batch,)``."""
        D = z[0].numel()
        s2 = self.prior_std**2
        return -0.5 * D * math.log(2 * math.pi * s2) - z.reshape(z.shape[0], -1).pow(2).sum(-1) / (2 * s2)

    # -- discretization --------------------------------------------------------------------------
    def _index(self, t: Tensor | float) -> Tensor | int:
        # The reference code truncates t * (N - 1) / T to find the discrete step; the small tolerance keeps
        # round-off in t = k / (N - 1) from truncating to step k - 1 (as scorekit.pretrained does).
        return _step_index(t * (self.N - 1) / self.T + 1e-3, self.N)

    def discretize(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """One step of the forward process, ``x_{i+1} = x_i + f_i(x_i) + G_i z_i``.

        The base class uses Euler-Maruyama with ``dt = T / N``; VP and VE override it with the DDPM
        and SMLD discretizations.
        """
        t = batch_time(t, x, self.T)
        dt = self.T / self.N
        drift, diffusion = self.sde(x, t)
        return drift * dt, diffusion * math.sqrt(dt)

    def discretize_step(self, x: Tensor, t: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
        """One forward step from time ``s < t`` to ``t``, ``x_t = x_s + f + G z``, for any step size.

        :meth:`discretize` fixes the step to ``T / N`` as the reference code does; samplers that take
        ``steps != N`` steps use this instead. The base class is Euler-Maruyama with ``dt = t - s``;
        VP and VE override it with DDPM and SMLD steps whose coefficients come from ``t`` and ``s``.
        """
        t, s = batch_time(t, x, self.T), batch_time(s, x, self.T)
        drift, diffusion = self.sde(x, t)
        dt = t - s
        return drift * bcast(dt, x), diffusion * torch.sqrt(dt)

    def reverse(self, score_fn: ScoreFn, probability_flow: bool = False) -> ReverseSDE:
        """The reverse-time SDE (eq. 6) or, with ``probability_flow=True``, the probability-flow ODE (eq. 13)."""
        return ReverseSDE(self, score_fn, probability_flow)

    # -- bookkeeping -----------------------------------------------------------------------------
    def config(self) -> dict:
        """Constructor arguments, enough to rebuild the SDE with :func:`make_sde`."""
        return {"name": self.name, **self._params()}

    @abc.abstractmethod
    def _params(self) -> dict: ...

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self._params().items())
        return f"{type(self).__name__}({args})"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self._params() == other._params()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self), tuple(sorted(self._params().items()))))


class _BetaTable:
    """:meth:`discrete_beta` of the SDEs with a DDPM table ``discrete_betas()`` (VP, sub-VP, discrete VP)."""

    def discrete_beta(self, t: Tensor | float) -> Tensor | float:
        """``beta_k`` of the table at the step holding ``t`` (shape of ``t``; a host number for a host ``t``)."""
        k = self._index(t)
        if torch.is_tensor(k):
            return self.discrete_betas(t.device, t.dtype)[k]
        return self._host_betas[k]

    @functools.cached_property
    def _host_betas(self) -> list[float]:
        return self.discrete_betas().tolist()


class _LinearBeta(_BetaTable, SDE):
    """Shared parts of VP and sub-VP: ``beta(t) = beta_min + t (beta_max - beta_min)``."""

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, N: int = 1000):
        super().__init__(N)
        if not 0 < beta_min < beta_max:
            raise ValueError(f"need 0 < beta_min < beta_max, got beta_min={beta_min}, beta_max={beta_max}")
        self.beta_min, self.beta_max = float(beta_min), float(beta_max)

    def beta(self, t: Tensor) -> Tensor:
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def integrated_beta(self, t: Tensor) -> Tensor:
        """``B(t) = int_0^t beta(s) ds``."""
        return self.beta_min * t + 0.5 * t**2 * (self.beta_max - self.beta_min)

    def t_from_integrated_beta(self, B: Tensor) -> Tensor:
        """Inverse of :meth:`integrated_beta` (the positive root of the quadratic)."""
        d = self.beta_max - self.beta_min
        return 2 * B / (self.beta_min + torch.sqrt(self.beta_min**2 + 2 * d * B))

    @property
    def prior_std(self) -> float:
        return 1.0

    def discrete_betas(self, device=None, dtype=torch.float64) -> Tensor:
        """DDPM's ``beta_i = (beta_min + i/(N-1) (beta_max - beta_min)) / N``, ``i = 0..N-1``."""
        return torch.linspace(self.beta_min / self.N, self.beta_max / self.N, self.N, device=device, dtype=dtype)

    def _params(self) -> dict:
        return {"beta_min": self.beta_min, "beta_max": self.beta_max, "N": self.N}


class VPSDE(_LinearBeta):
    """Variance-preserving SDE (eq. 11): ``dx = -1/2 beta(t) x dt + sqrt(beta(t)) dw``, the continuous DDPM."""

    name = "vp"

    def sde(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        t = batch_time(t, x, self.T)
        beta = self.beta(t)
        return -0.5 * bcast(beta, x) * x, torch.sqrt(beta)

    def marginal_coeffs(self, t: Tensor | float) -> tuple[Tensor, Tensor] | tuple[float, float]:
        B, xp = self.integrated_beta(t), lib_for(t)
        # -expm1(-B) keeps sigma accurate for small t, where 1 - exp(-B) cancels.
        return xp.exp(-0.5 * B), xp.sqrt(-xp.expm1(-B))

    def log_snr(self, t: Tensor) -> Tensor:
        B = self.integrated_beta(t)
        return -B - torch.log(-torch.expm1(-B))

    def t_from_log_snr(self, lam: Tensor) -> Tensor:
        # alpha^2 = sigmoid(lam) = exp(-B)  =>  B = softplus(-lam)
        return self.t_from_integrated_beta(torch.nn.functional.softplus(-lam))

    def discretize(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """DDPM discretization: ``f = sqrt(1 - beta_i) x - x``, ``G = sqrt(beta_i)``."""
        t = batch_time(t, x, self.T)
        return _ddpm_step(x, self.discrete_beta(t))

    def discretize_step(self, x: Tensor, t: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
        """DDPM step from ``s`` to ``t`` with ``1 - beta = alpha(t)^2 / alpha(s)^2 = exp(-(B(t) - B(s)))``.

        This is the ``beta`` that makes the step exact for the marginals; for ``t - s = T / N`` it is
        ``beta(t) / N`` to first order, the reference code's ``beta_i``.
        """
        t, s = as_time(t, x, self.T), as_time(s, x, self.T)
        return _ddpm_step(x, self.step_variance(t, s))

    def step_variance(self, t: Tensor | float, s: Tensor | float) -> Tensor | float:
        """``G^2`` of :meth:`discretize_step` from ``s`` to ``t`` (its ``beta``), without touching ``x``."""
        return -lib_for(t, s).expm1(self.integrated_beta(s) - self.integrated_beta(t))


class SubVPSDE(_LinearBeta):
    """Sub-VP SDE (eq. 11 of Song et al. 2021, App. B): diffusion ``sqrt(beta(t) (1 - exp(-2 B(t))))``."""

    name = "subvp"

    def sde(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        t = batch_time(t, x, self.T)
        beta = self.beta(t)
        discount = -torch.expm1(-2 * self.integrated_beta(t))
        return -0.5 * bcast(beta, x) * x, torch.sqrt(beta * discount)

    def marginal_coeffs(self, t: Tensor | float) -> tuple[Tensor, Tensor] | tuple[float, float]:
        B, xp = self.integrated_beta(t), lib_for(t)
        return xp.exp(-0.5 * B), -xp.expm1(-B)

    def t_from_log_snr(self, lam: Tensor) -> Tensor:
        # a = exp(-B/2) solves k a^2 + a - k = 0 with k = exp(lam / 2); written to avoid cancellation.
        k = torch.exp(0.5 * lam)
        a = 2 * k / (1 + torch.sqrt(1 + 4 * k**2))
        return self.t_from_integrated_beta(-2 * torch.log(a))


class VESDE(SDE):
    """Variance-exploding SDE (eq. 9): ``dx = sigma(t) sqrt(2 log(sigma_max / sigma_min)) dw``, the continuous SMLD."""

    name = "ve"
    sampling_eps = 1e-5
    network_time = "log_sigma"
    variance_exploding = True
    solver_grid = "logsnr"

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, N: int = 1000):
        super().__init__(N)
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)

    def sigma(self, t: Tensor | float) -> Tensor | float:
        """``sigma(t) = sigma_min (sigma_max / sigma_min)^t``."""
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** t

    def sde(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        t = batch_time(t, x, self.T)
        g = self.sigma(t) * math.sqrt(2 * (math.log(self.sigma_max) - math.log(self.sigma_min)))
        return torch.zeros_like(x), g

    def marginal_coeffs(self, t: Tensor | float) -> tuple[Tensor, Tensor] | tuple[float, float]:
        return torch.ones_like(t) if torch.is_tensor(t) else 1.0, self.sigma(t)

    def t_from_log_snr(self, lam: Tensor) -> Tensor:
        return (-0.5 * lam - math.log(self.sigma_min)) / math.log(self.sigma_max / self.sigma_min)

    @property
    def prior_std(self) -> float:
        return self.sigma_max

    def discrete_sigmas(self, device=None, dtype=torch.float64) -> Tensor:
        """SMLD's geometric noise levels ``sigma_i``, ``i = 0..N-1``."""
        return torch.exp(
            torch.linspace(math.log(self.sigma_min), math.log(self.sigma_max), self.N, device=device, dtype=dtype)
        )

    def discretize(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """SMLD discretization: ``f = 0``, ``G = sqrt(sigma_i^2 - sigma_{i-1}^2)`` (``sigma_{-1} = 0``)."""
        t = batch_time(t, x, self.T)
        i = self._index(t)
        sigmas = self.discrete_sigmas(t.device, t.dtype)
        prev = torch.where(i == 0, torch.zeros_like(t), sigmas[(i - 1).clamp(min=0)])
        return torch.zeros_like(x), torch.sqrt(sigmas[i] ** 2 - prev**2)

    def discretize_step(self, x: Tensor, t: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
        """SMLD step from ``s`` to ``t``: ``f = 0``, ``G = sqrt(sigma(t)^2 - sigma(s)^2)``.

        ``s = 0`` stands for the clean data (``sigma = 0``), as SMLD's ``sigma_{-1} = 0``, so that a
        sampler's last step removes the ``sigma_min`` noise too.
        """
        t, s = as_time(t, x, self.T), as_time(s, x, self.T)
        variance = self.step_variance(t, s)
        return torch.zeros_like(x), _per_sample(lib_for(variance).sqrt(variance), x)

    def step_variance(self, t: Tensor | float, s: Tensor | float) -> Tensor | float:
        """``G^2 = sigma(t)^2 - sigma(s)^2`` of :meth:`discretize_step`, without touching ``x``."""
        if torch.is_tensor(s):
            prev = torch.where(s > 0, self.sigma(s), torch.zeros_like(s))
        else:
            prev = self.sigma(s) if s > 0 else 0.0
        return self.sigma(t) ** 2 - prev**2

    def _params(self) -> dict:
        return {"sigma_min": self.sigma_min, "sigma_max": self.sigma_max, "N": self.N}


class DiscreteVPSDE(_BetaTable, SDE):
    """A VP SDE read from a discrete table ``alphas_cumprod`` (a diffusers scheduler's), exact at its steps.

    Step ``k = 0..N-1`` of the table sits at ``t_k = (k + 1) / N`` with ``alpha(t_k)^2 = alphas_cumprod[k]``,
    and ``t = 0`` is the data (``alpha = 1``), so that the samplers' noise-free last step from ``eps = 1 / N``
    to 0 is DDPM's last step. Between steps the log-SNR ``lambda = log(alpha^2 / sigma^2)`` is linear in
    ``t``, which makes :meth:`log_snr` and :meth:`t_from_log_snr` closed form and monotone; on a segment
    with an infinite end (``t = 0``, and ``t = T`` for a zero-terminal-SNR table, ``alphas_cumprod[-1] = 0``,
    Lin et al. 2024) ``alpha`` itself is linear instead, so that ``d alpha / dt`` stays finite there. The
    forward SDE is the VP SDE of that ``alpha(t)``: ``dx = -1/2 beta(t) x dt + sqrt(beta(t)) dw`` with
    ``beta(t) = -d log alpha(t)^2 / dt``.
    """

    name = "discrete_vp"
    solver_grid = "karras"

    def __init__(self, alphas_cumprod):
        table = torch.as_tensor(alphas_cumprod, dtype=torch.float64).flatten().cpu()
        if table.numel() < 2 or not bool(torch.isfinite(table).all()):
            raise ValueError(f"alphas_cumprod must hold at least 2 finite numbers, got {table.numel()} entries")
        if bool((table[0] >= 1) | (table < 0).any() | (table.diff() >= 0).any()):
            raise ValueError("alphas_cumprod must decrease strictly, from below 1 to >= 0 (a VP schedule's "
                             f"cumulative product of 1 - beta); got values from {table[0]:.6g} to {table[-1]:.6g}")
        super().__init__(table.numel())
        self.alphas_cumprod = table
        # knots t = j / N, j = 0..N, with the data (alpha = 1) at j = 0
        abar = torch.cat([table.new_ones(1), table])
        self._alpha = abar.sqrt()
        self._lam = torch.log(abar) - torch.log1p(-abar)  # +inf at j = 0, -inf at zero terminal SNR
        self._tables: dict[torch.device, tuple[Tensor, Tensor]] = {}
        self._host_knots = (self._alpha.tolist(), self._lam.tolist())  # for host times (_interp_host)
        self.sampling_eps = 1.0 / self.N
        #: ``alphas_cumprod[-1] = 0`` (Lin et al. 2024): ``beta(T)`` is infinite and ``x0_hat`` at ``T`` needs the model
        self.zero_terminal_snr = bool(table[-1] == 0)

    def _on(self, device: torch.device) -> tuple[Tensor, Tensor]:
        if device not in self._tables:
            self._tables[device] = (self._alpha.to(device), self._lam.to(device))
        return self._tables[device]

    def _interp(self, t: Tensor | float) -> tuple[Tensor, Tensor, Tensor] | tuple[float, float, float]:
        """``(alpha, sigma^2, d alpha / dt)`` at ``t`` in float64, from the segment ``[j / N, (j + 1) / N]``
        holding it: log-SNR linear where both ends are finite, else ``alpha`` linear."""
        if not torch.is_tensor(t):
            return self._interp_host(float(t))
        alpha_k, lam_k = self._on(t.device)
        pos = t.to(torch.float64) * self.N
        jf = pos.floor().clamp(0, self.N - 1)
        j, u = jf.long(), pos - jf
        smooth = torch.isfinite(lam_k[j]) & torch.isfinite(lam_k[j + 1])
        lo, hi = torch.where(smooth, lam_k[j], 0.0), torch.where(smooth, lam_k[j + 1], 0.0)
        lam = lo + u * (hi - lo)
        a = alpha_k[j] + u * (alpha_k[j + 1] - alpha_k[j])
        alpha = torch.where(smooth, torch.sigmoid(lam).sqrt(), a)
        # sigma^2 computed on its own keeps it accurate where alpha is close to 1
        sigma2 = torch.where(smooth, torch.sigmoid(-lam), (1 - a) * (1 + a))
        # d alpha / dt = 1/2 alpha sigma^2 d lambda / dt on log-SNR segments, the slope itself on the others
        rate = torch.where(smooth, 0.5 * alpha * sigma2 * (hi - lo) * self.N, (alpha_k[j + 1] - alpha_k[j]) * self.N)
        return alpha, sigma2, rate

    def _interp_host(self, t: float) -> tuple[float, float, float]:
        """:meth:`_interp` at one host time, in Python floats: the sampler's per-step coefficients, without the
        two dozen tensor operations (and a table on the device) that the batch form takes."""
        alpha_k, lam_k = self._host_knots
        pos = t * self.N
        j = _step_index(pos, self.N)
        u, lo, hi = pos - j, lam_k[j], lam_k[j + 1]
        if math.isfinite(lo) and math.isfinite(hi):
            lam = lo + u * (hi - lo)
            alpha, sigma2 = math.sqrt(_sigmoid(lam)), _sigmoid(-lam)
            return alpha, sigma2, 0.5 * alpha * sigma2 * (hi - lo) * self.N
        a = alpha_k[j] + u * (alpha_k[j + 1] - alpha_k[j])
        return a, (1 - a) * (1 + a), (alpha_k[j + 1] - alpha_k[j]) * self.N

    def _alpha_sigma2(self, t: Tensor | float) -> tuple[Tensor, Tensor] | tuple[float, float]:
        alpha, sigma2, _ = self._interp(t)
        return alpha, sigma2

    def marginal_coeffs(self, t: Tensor | float) -> tuple[Tensor, Tensor] | tuple[float, float]:
        alpha, sigma2 = self._alpha_sigma2(t)
        return _cast(alpha, t), _cast(lib_for(sigma2).sqrt(sigma2), t)

    def log_snr(self, t: Tensor) -> Tensor:
        alpha, sigma2 = self._alpha_sigma2(t)
        return (2 * torch.log(alpha) - torch.log(sigma2)).to(t.dtype)

    def t_from_log_snr(self, lam: Tensor) -> Tensor:
        alpha_k, lam_k = self._on(lam.device)
        value = lam.to(torch.float64)
        # the knots' log-SNR decreases in j: the segment holds lam_k[j] >= lam >= lam_k[j + 1]
        j = (torch.searchsorted(-lam_k, -value.contiguous(), right=False) - 1).clamp(0, self.N - 1)
        lo, hi = lam_k[j], lam_k[j + 1]
        smooth = torch.isfinite(lo) & torch.isfinite(hi)
        u_lam = (value - torch.where(smooth, lo, 0.0)) / torch.where(smooth, hi - lo, 1.0)
        u_alpha = (torch.sigmoid(value).sqrt() - alpha_k[j]) / (alpha_k[j + 1] - alpha_k[j])
        u = torch.where(smooth, u_lam, u_alpha).clamp(0, 1)
        return ((j + u) / self.N).to(lam.dtype)

    def beta(self, t: Tensor) -> Tensor:
        """``beta(t) = -d log alpha(t)^2 / dt = -2 (d alpha / dt) / alpha`` (infinite where ``alpha = 0``)."""
        alpha, _, rate = self._interp(t)
        return (-2 * rate / alpha).to(t.dtype)

    def alpha_rate(self, t: Tensor) -> Tensor:
        """``d alpha / dt = -1/2 beta alpha``, finite where ``alpha = 0`` (zero terminal SNR)."""
        return self._interp(t)[2].to(t.dtype)

    def sde(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        t = batch_time(t, x, self.T)
        beta = self.beta(t)
        return -0.5 * bcast(beta, x) * x, torch.sqrt(beta)

    def reverse(self, score_fn: ScoreFn, probability_flow: bool = False) -> ReverseSDE:
        """As :meth:`SDE.reverse`; the probability-flow drift is written through the clean-sample estimate,
        ``(d alpha / dt) (x0_hat - alpha x) / sigma^2`` (the same ODE as eq. 13), which stays finite at a
        zero-terminal-SNR ``t = T``, where ``beta`` is infinite and the score alone no longer says ``x0_hat``."""
        return _DiscreteReverse(self, score_fn, probability_flow)

    @property
    def prior_std(self) -> float:
        return 1.0

    def discrete_betas(self, device=None, dtype=torch.float64) -> Tensor:
        """The table's ``beta_k = 1 - alphas_cumprod[k] / alphas_cumprod[k - 1]`` (``alphas_cumprod[-1] = 1``)."""
        abar = self._alpha**2
        return (1 - abar[1:] / abar[:-1]).to(device=device, dtype=dtype)

    def _index(self, t: Tensor | float) -> Tensor | int:
        # step k sits at t = (k + 1) / N; the tolerance keeps round-off at the knots on their own step
        return _step_index(t * self.N - 1 + 1e-3, self.N)

    def timestep(self, t: Tensor | float) -> Tensor | float:
        """The scheduler's (fractional) timestep at ``t``, ``k = N t - 1``, held at 0 below the first step."""
        k = t * self.N - 1
        return k.clamp(min=0) if torch.is_tensor(k) else max(k, 0.0)

    def discretize(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """DDPM's ancestral step on the table: ``f = sqrt(1 - beta_k) x - x``, ``G = sqrt(beta_k)``."""
        t = batch_time(t, x, self.T)
        return _ddpm_step(x, self.discrete_beta(t))

    def discretize_step(self, x: Tensor, t: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
        """DDPM step from ``s`` to ``t`` with ``1 - beta = alpha(t)^2 / alpha(s)^2``: exact for the marginals,
        and the table's own ``beta_k`` between neighbouring steps."""
        t, s = as_time(t, x, self.T), as_time(s, x, self.T)
        return _ddpm_step(x, _cast(self.step_variance(t, s), x))

    def step_variance(self, t: Tensor | float, s: Tensor | float) -> Tensor | float:
        """``G^2`` of :meth:`discretize_step` from ``s`` to ``t`` (its ``beta``), without touching ``x``."""
        ratio = self._alpha_sigma2(t)[0] / self._alpha_sigma2(s)[0]
        return _cast(1 - ratio**2, t)

    def _params(self) -> dict:
        return {"alphas_cumprod": self.alphas_cumprod.tolist()}

    def __repr__(self) -> str:
        a = self.alphas_cumprod
        return f"DiscreteVPSDE(N={self.N}, alphas_cumprod=[{a[0]:.6g} ... {a[-1]:.6g}])"

    def __hash__(self) -> int:
        return hash((type(self), tuple(self.alphas_cumprod.tolist())))


class ReverseSDE:
    """Reverse-time SDE ``dx = [f - g^2 score] dt + g dw_bar`` (eq. 6), or the probability-flow ODE
    ``dx/dt = f - 1/2 g^2 score`` (eq. 13) when ``probability_flow`` is set. Time still runs forward
    in ``t``; samplers integrate it from ``T`` down to ``eps``."""

    def __init__(self, forward: SDE, score_fn: ScoreFn, probability_flow: bool = False):
        self.forward, self.score_fn, self.probability_flow = forward, score_fn, probability_flow
        self.N, self.T = forward.N, forward.T

    def sde(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        t = batch_time(t, x, self.T)
        drift, g = self.forward.sde(x, t)
        weight = 0.5 if self.probability_flow else 1.0
        drift = drift - bcast(weight * g**2, x) * self.score_fn(x, t)
        return drift, torch.zeros_like(g) if self.probability_flow else g

    def discretize(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Reverse of the forward discretization: ``f_rev = f - G^2 s`` (halved for the ODE), ``G_rev = G``."""
        t = batch_time(t, x, self.T)
        f, G = self.forward.discretize(x, t)
        weight = 0.5 if self.probability_flow else 1.0
        f = f - bcast(weight * G**2, x) * self.score_fn(x, t)
        return f, torch.zeros_like(G) if self.probability_flow else G


#: the SDEs a config picks by name; :func:`make_sde` also rebuilds a DiscreteVPSDE from its ``config()``
class _DiscreteReverse(ReverseSDE):
    def sde(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        if not self.probability_flow:
            return super().sde(x, t)
        from .score import tweedie_denoise  # score.py imports this module

        t = batch_time(t, x, self.T)
        alpha, sigma2, rate = (c.to(x.dtype) for c in self.forward._interp(t))
        x0 = tweedie_denoise(self.score_fn, self.forward, x, t)
        return bcast(rate / sigma2, x) * (x0 - bcast(alpha, x) * x), torch.zeros_like(t)


SDES: dict[str, type[SDE]] = {"vp": VPSDE, "subvp": SubVPSDE, "ve": VESDE}


def make_sde(name: str, **kwargs) -> SDE:
    """Build an SDE by name (``"vp"``, ``"subvp"``, ``"ve"``, ``"discrete_vp"``) with its constructor arguments."""
    key = name.lower().replace("-", "").replace("_", "")
    known = {**SDES, "discretevp": DiscreteVPSDE}
    if key not in known:
        raise ValueError(f"unknown SDE {name!r}; valid names are {sorted(SDES)} (or 'discrete_vp' with alphas_cumprod)")
    return known[key](**kwargs)
