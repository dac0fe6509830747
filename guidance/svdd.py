"""SVDD: soft value-based derivative-free decoding (Li et al. 2024), with its baselines.

SVDD samples the reward-tilted target ``p_alpha(x) ∝ p_pre(x) exp(r(x) / alpha)`` from a pretrained
diffusion model without fine-tuning and without differentiating the reward. The optimal reverse kernel
is ``p*(x_{t-1} | x_t) ∝ p_pre(x_{t-1} | x_t) exp(v_{t-1}(x_{t-1}) / alpha)`` with the soft value
``v_t(x) = alpha log E_pre[exp(r(x0) / alpha) | x_t = x]`` (Theorem 1). Algorithm 1 approximates it by
importance sampling at every step: draw ``M`` candidates from the pretrained kernel, weigh them by
``exp(v / alpha)``, keep one per sample (``alpha = 0``: the argmax, as the reference code).

- **SVDD-PM** (``value_fn=None``): ``v(x_{t-1}) ≈ r(x0_hat(x_{t-1}))``, the reward of the posterior mean
  (Tweedie's formula; for masked discrete diffusion the denoiser's argmax, as the reference code).
- **SVDD-MC**: a value network ``v(x_t, t)`` regressed on rewards of pretrained rollouts
  (:func:`fit_value_function`).
- **SVDD-R** (``resample=True``, the paper's revision): after the local selection, the worst fraction
  of the batch is replaced by value-weighted draws from the batch.

Randomness: Algorithm 1 is per sample, and so is :class:`SVDD` under a per-sample
:class:`~samplers.StackedGenerator` (``generator=``): sample ``i`` draws its candidates and, for ``alpha > 0``,
the uniform that picks among them from its own stream, so it is what a batch of one gives. SVDD-R's global
step couples the samples of a batch by definition; it still runs under per-sample streams (see :class:`SVDD`).

Baselines with the same reward interface: :func:`best_of_n` and DPS-style gradient guidance for
differentiable rewards (:class:`RewardGradientGuidance`). Rewards are ``reward_fn(x0) -> (batch,)``;
:func:`load_reward` resolves ``"module:function"`` (or a built-in name in :data:`REWARDS`) for the CLI.

Cost (per sample, ``K`` steps, ``M`` candidates): SVDD-PM makes ``1 + M (K - 1)`` network evaluations
(the candidates share one evaluation of their common starting point, and the chosen candidate's
evaluation at the value step is reused by the next step) and ``M`` reward calls per step; SVDD-MC
``K`` network evaluations, ``M (K - 1)`` value-network calls and ``M`` reward calls (at the last step);
Best-of-N ``N K`` network evaluations and ``N`` reward calls. A noise-free last step (``pc_sample``'s
``denoise``) leaves nothing to choose and costs no reward call. :class:`SVDD` counts its reward and
value calls; wrap the score in :func:`samplers.count_nfe` to count network evaluations.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from samplers._common import prior_sample
from samplers.generators import StackedGenerator, rand
from samplers.hooks import Guidance, ScoreFn, StepFn
from samplers.masked import masked_step, masked_time_steps
from samplers.pc import pc_step, time_steps
from samplers.predictors import PREDICTORS
from scorekit.discrete import MaskedDiffusion
from scorekit.nets.classifier import make_classifier
from scorekit.score import tweedie_denoise
from scorekit.sde import SDE, batch_time
from scorekit.training import TrainConfig, Trainer
from scorekit.validate import int_at_least, positive_int

from .rewards import RewardFn, checked_values

__all__ = ["SVDD", "ValueFunction", "best_of_n", "collect_rollouts", "default_value_config", "fit_value_function",
           "posterior_mean"]

ValueFn = Callable[[Tensor, Tensor], Tensor]


def posterior_mean(score_fn: ScoreFn, sde: SDE | MaskedDiffusion, x: Tensor, t) -> Tensor:
    """SVDD-PM's clean estimate ``x0_hat(x_t)``: Tweedie's ``E[x0 | x_t]`` for an SDE, and for masked
    discrete diffusion the denoiser's argmax at masked positions (:meth:`MaskedDiffusion.argmax_decode`)."""
    if isinstance(sde, MaskedDiffusion):
        return sde.argmax_decode(score_fn, x, t)
    return tweedie_denoise(score_fn, sde, x, t)


def _tile(v: Tensor, m: int) -> Tensor:
    return v.repeat(m, *([1] * (v.ndim - 1)))


# -- SVDD ----------------------------------------------------------------------------------------
class _CandidateCache:
    """The score function (or denoiser) under SVDD, sparing the evaluations Algorithm 1 repeats.

    Both shortcuts return what the wrapped function would: (1) a batch of ``m`` identical copies (the
    candidates' common start ``x_t`` repeated ``m`` times) is evaluated once and tiled; (2) the latest
    evaluation is remembered, and :meth:`keep` narrows it to the chosen candidates tiled ``m`` times, so
    the next step's kernel reuses what the PM value computed at those points (the paper's caching).
    """

    def __init__(self, fn: Callable, m: int):
        self.fn, self.m = fn, m
        self.last: tuple[Tensor, Tensor, Tensor] | None = None

    def __getattr__(self, name: str):
        if name == "fn":
            raise AttributeError(name)
        return getattr(self.fn, name)

    def __call__(self, x: Tensor, t) -> Tensor:
        t = torch.as_tensor(t, device=x.device).broadcast_to(x.shape[:1])
        if self.last is not None:
            lx, lt, out = self.last
            if lx.shape == x.shape and lt.dtype == t.dtype and torch.equal(lx, x) and torch.equal(lt, t):
                return out
        n = x.shape[0]
        b = n // self.m
        if n % self.m == 0 and torch.equal(x[b:], x[:-b]) and torch.equal(t[b:], t[:-b]):
            out = _tile(self.fn(x[:b], t[:b]), self.m)
        else:
            out = self.fn(x, t)
        self.last = (x, t, out)
        return out

    def keep(self, candidates: Tensor, chosen: Tensor) -> None:
        """After a selection among ``candidates``: keep the evaluation at rows ``chosen``, tiled ``m`` times."""
        if self.last is None or self.last[0].shape != candidates.shape or not torch.equal(self.last[0], candidates):
            return  # the values did not evaluate the network at the candidates (SVDD-MC, the last step)
        self.last = tuple(_tile(v[chosen], self.m) for v in self.last)


class SVDD(Guidance):
    """Soft value-based decoding (Li et al. 2024, Algorithm 1) as a step-level plug-in.

    At every reverse step the wrapped ``step_fn`` is called once on the batch repeated ``M`` times
    (``num_candidates``), which draws ``M`` candidates ``x_{t-1}`` per sample from the pretrained kernel;
    each gets the value ``v`` and one per sample is kept with probability ``∝ exp(v / alpha)``
    (``alpha = 0``: the argmax, the reference code's choice and the default; ``alpha = inf``: uniform,
    i.e. the pretrained sampler). At the last step (``t_next = 0``) the value is the reward itself.
    ``decode`` (e.g. a latent model's ``model.decode``) maps clean samples to what the reward judges, so that
    the rewards and posterior-mean values of a latent pipeline see pixel images; ``value_fn`` (SVDD-MC)
    sees the sampler's own ``x_t``.

    ``value_fn=None`` is SVDD-PM (``v = reward(x0_hat(x_{t-1}))``, :func:`posterior_mean`); a callable
    ``value_fn(x_t, t) -> (batch,)`` is SVDD-MC (:func:`fit_value_function`) or an exact value.
    ``resample=True`` adds SVDD-R's global step: the ``resample_fraction`` of the batch with the lowest
    values is replaced by draws from the batch ``∝ exp(v / alpha)``. ``cache`` reuses network evaluations
    exactly (see the module docstring); turn it off only to measure it.

    The selection draws (``alpha > 0``; the argmax draws nothing) come from ``generator``, used as given
    across runs, or from a fresh ``torch.Generator`` seeded ``seed`` every run (neither: torch's global
    generator). ``generator`` may be a per-sample :class:`~samplers.StackedGenerator` of one stream per
    sample of the batch: pass the sampler's own (``pc_sample(..., generator=g, guidance=[SVDD(...,
    generator=g)])``; separate streams seeded alike would replay the noise's random numbers), and sample ``i``
    takes its candidates and its uniform from stream ``i``, bit-for-bit what a batch of one gives.
    **SVDD-R is not batch-size independent**: its global step replaces the worst samples of the batch by
    copies of others, so a sample depends on the batch it is drawn in (a batch of one is never resampled).
    It still runs under per-sample streams, each sample drawing its donor's uniform from its own stream: a
    sample then depends on the seeds that share its batch (and their order) and on nothing else, not on the
    batch's place in the run nor on the number of processes (whose batches are fixed,
    :func:`scorekit.sampling.rank_batches`).

    ``M = 1`` (without ``resample``) returns ``step_fn`` unchanged, so the sampler is bit-for-bit the
    pretrained one. Counters ``reward_evals`` and ``value_evals`` (per-sample evaluations) accumulate
    across runs; :meth:`reset_counts` zeroes them. Works with :func:`samplers.pc_sample` and
    :func:`samplers.masked.masked_sample`; deterministic samplers refuse it.
    """

    kind = "step"

    def __init__(
        self,
        reward_fn: RewardFn,
        num_candidates: int = 8,
        alpha: float = 0.0,
        value_fn: ValueFn | None = None,
        *,
        resample: bool = False,
        resample_fraction: float = 0.05,
        seed: int | None = None,
        generator: torch.Generator | StackedGenerator | None = None,
        cache: bool = True,
        decode: Callable[[Tensor], Tensor] | None = None,
    ):
        if not callable(reward_fn):
            raise TypeError(f"reward_fn must be callable as reward_fn(x0) -> (batch,), got {type(reward_fn).__name__}")
        if value_fn is not None and not callable(value_fn):
            raise TypeError(f"value_fn must be None (SVDD-PM) or callable as value_fn(x_t, t) -> (batch,), "
                            f"got {type(value_fn).__name__}")
        num_candidates = int_at_least(num_candidates, 1, "num_candidates (M)")
        alpha = float(alpha)
        if math.isnan(alpha) or alpha < 0:
            raise ValueError(f"alpha must be >= 0 (0 = argmax selection, inf = uniform, i.e. the pretrained "
                             f"sampler), got {alpha}")
        if not 0 < resample_fraction < 1:
            raise ValueError(f"resample_fraction must lie in (0, 1), got {resample_fraction}")
        self.reward_fn, self.value_fn = reward_fn, value_fn
        self.num_candidates, self.alpha = int(num_candidates), alpha
        self.resample, self.resample_fraction = bool(resample), float(resample_fraction)
        if seed is not None and generator is not None:
            raise ValueError("give SVDD a seed or a generator for its selection draws, not both")
        self.seed, self.generator, self.cache = seed, generator, bool(cache)
        if decode is not None and not callable(decode):
            raise TypeError(f"decode must be None or callable as decode(x0) -> images, got {type(decode).__name__}")
        self.decode = decode
        self._cache: _CandidateCache | None = None
        self.reset_counts()

    def __repr__(self) -> str:
        kind = "PM" if self.value_fn is None else "MC"
        return (f"SVDD({kind}, num_candidates={self.num_candidates}, alpha={self.alpha}"
                f"{', resample=True' if self.resample else ''})")

    def reset_counts(self) -> None:
        """Zero the evaluation counters ``reward_evals`` and ``value_evals``."""
        self.reward_evals = 0
        self.value_evals = 0

    # -- evaluations ---------------------------------------------------------------------------
    def reward(self, x0: Tensor) -> Tensor:
        """``reward_fn(x0)`` (of ``decode(x0)`` when a decoder is given), checked (shape ``(batch,)``, finite)
        and counted."""
        self.reward_evals += x0.shape[0]
        return checked_values(self.reward_fn(x0 if self.decode is None else self.decode(x0)), x0.shape[0], "reward_fn")

    def value(self, x: Tensor, t_next, score_fn: ScoreFn, sde: SDE | MaskedDiffusion) -> Tensor:
        """The soft value estimate of candidates ``x`` at time ``t_next``: the reward at ``t_next = 0``,
        else ``value_fn(x, t_next)`` (MC) or ``reward(x0_hat(x, t_next))`` (PM)."""
        if bool((torch.as_tensor(t_next) == 0).all()):
            return self.reward(x)
        if self.value_fn is None:
            return self.reward(posterior_mean(score_fn, sde, x, t_next))
        self.value_evals += x.shape[0]
        return checked_values(self.value_fn(x, batch_time(t_next, x, sde.T)), x.shape[0], "value_fn")

    def _draw(self, values: Tensor, b: int, generator: torch.Generator | StackedGenerator | None) -> Tensor:
        """One index per sample (``b``) into the last axis of ``values``, drawn ``∝ exp(values / alpha)``
        (Algorithm 1's ``zeta ~ Categorical(w / sum w)``; the argmax at ``alpha = 0``, ``inf``: uniform).

        ``values`` is ``(b, choices)``, a distribution per sample, or ``(1, choices)``, one shared by the batch
        (SVDD-R). Sample ``i`` inverts the CDF at one uniform of row ``i`` of ``rand((b,), generator)``: its own
        stream's under a :class:`StackedGenerator`, so its choice does not depend on the batch.
        """
        if self.alpha == 0:
            return values.argmax(1, keepdim=True).expand(-1, b // values.shape[0]).reshape(b)
        cdf = torch.softmax(values / self.alpha, dim=1).cumsum(1)
        u = rand((b,), generator, values.device, cdf.dtype).view(values.shape[0], -1)
        # the clamp guards u * total rounding up to the total
        return torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_max(values.shape[1] - 1).reshape(b)

    def _resample(self, chosen: Tensor, values: Tensor, generator: torch.Generator | StackedGenerator | None) -> Tensor:
        """SVDD-R: the lowest-valued ``resample_fraction`` of the batch is replaced by value-weighted draws from it.

        Every sample draws a donor (one uniform from its stream, whether or not it is among the worst), so a
        stream's later draws do not depend on which samples the batch ranked worst."""
        b = chosen.shape[0]
        if b < 2:
            return chosen
        v = values[chosen]
        worst = v.argsort()[: math.ceil(self.resample_fraction * b)]
        donors = self._draw(v[None], b, generator)
        chosen = chosen.clone()
        chosen[worst] = chosen[donors[worst]]
        return chosen

    def with_generator(self, generator: torch.Generator | StackedGenerator | None) -> SVDD:
        """A copy whose selection draws come from ``generator`` (``seed`` dropped); counters start at 0."""
        other = copy.copy(self)
        other.seed, other.generator, other.reward_evals, other.value_evals = None, generator, 0, 0
        return other

    # -- the plug-in hooks -----------------------------------------------------------------------
    def guide_score(self, score_fn: ScoreFn) -> ScoreFn:
        """Wrap the score (or denoiser) in the exact evaluation cache that makes the candidates cheap."""
        self._cache = _CandidateCache(score_fn, self.num_candidates) if self.cache and self.num_candidates > 1 else None
        return score_fn if self._cache is None else self._cache

    def guide_step(self, step_fn: StepFn, score_fn: ScoreFn, sde: SDE | MaskedDiffusion) -> StepFn:
        """The SVDD step (Algorithm 1): ``M`` candidates from one call of ``step_fn``, one kept per sample."""
        m = self.num_candidates
        cache, self._cache = self._cache, None
        if m == 1 and not self.resample:
            return step_fn  # Algorithm 1 with one candidate is the pretrained kernel
        rng: dict[str, torch.Generator | None] = {}

        def svdd_step(x: Tensor, t, t_next) -> Tensor:
            b = x.shape[0]
            if "g" not in rng:
                rng["g"] = (self.generator if self.seed is None
                            else torch.Generator(x.device).manual_seed(self.seed))
                # the tiling rule would serve k * len(g) samples from k draws per stream, mixing samples' draws
                if isinstance(rng["g"], StackedGenerator) and len(rng["g"]) != b:
                    raise ValueError(f"SVDD's generator has {len(rng['g'])} streams for a batch of {b} samples; "
                                     "pass the sampler's StackedGenerator, one stream per sample")
            candidates = step_fn(_tile(x, m), t, t_next)
            if m > 1 and torch.equal(candidates[b:], candidates[:-b]):
                if x.is_floating_point() and not bool((torch.as_tensor(t_next) == 0).all()):
                    raise ValueError(
                        f"SVDD drew {m} identical candidates at t = {float(torch.as_tensor(t).flatten()[0]):.4g}: the "
                        "reverse step is deterministic. SVDD needs a stochastic sampler (pc_sample with a "
                        "stochastic predictor, masked_sample)"
                    )
                if not self.resample:
                    return candidates[:b]  # nothing to choose among (the noise-free last step)
            values = self.value(candidates, t_next, score_fn, sde)
            index = self._draw(values.view(m, b).T, b, rng["g"])
            chosen = index * b + torch.arange(b, device=index.device)
            if self.resample:
                chosen = self._resample(chosen, values, rng["g"])
            if cache is not None:
                cache.keep(candidates, chosen)
            return candidates[chosen]

        return svdd_step


# -- SVDD-MC: value functions fitted on rollouts ---------------------------------------------------
class ValueFunction(nn.Module):
    """``v(x_t, t) = mean + std * net(x_t, t)``: a value network over its targets' scale (SVDD-MC).

    ``net(x, t) -> (batch, 1)`` (e.g. :func:`scorekit.nets.classifier.make_classifier` with
    ``out_dim=1``). With ``num_tokens`` set, integer sequences are one-hot encoded first (masked
    diffusion, the mask being the last token).
    """

    def __init__(self, net: nn.Module, mean: float = 0.0, std: float = 1.0, num_tokens: int | None = None):
        super().__init__()
        self.net, self.num_tokens = net, num_tokens
        self.register_buffer("mean", torch.tensor(float(mean)))
        self.register_buffer("std", torch.tensor(float(std)))

    def standardized(self, x: Tensor, t: Tensor) -> Tensor:
        """``net(x, t)``: the value in units of the targets' standard deviation around their mean, ``(batch,)``."""
        dtype = self.mean.dtype
        if self.num_tokens is not None:
            x = F.one_hot(x, self.num_tokens)
        return self.net(x.to(dtype), batch_time(t, x).to(dtype)).reshape(x.shape[0])

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.mean + self.std * self.standardized(x, t)


@torch.no_grad()
def collect_rollouts(
    score_fn: ScoreFn,
    sde: SDE | MaskedDiffusion,
    reward_fn: RewardFn,
    data_shape: Sequence[int],
    num_rollouts: int,
    *,
    steps: int = 100,
    predictor: str = "reverse_diffusion",
    eps: float = 1e-3,
    batch_size: int = 256,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Run the pretrained sampler and return every intermediate state with the reward of its end point.

    ``(states, times, rewards)`` of ``num_rollouts * steps`` rows: ``x_{t_i}`` on the sampler's grid
    (``pc_step`` with ``predictor`` and no corrector on ``linspace(T, eps, steps)`` for an SDE; the
    ancestral kernel for masked diffusion) and ``r(x0)`` of the rollout it belongs to.
    """
    if isinstance(sde, MaskedDiffusion):
        step, (ts, ts_next) = masked_step(score_fn, sde, generator), masked_time_steps(steps)

        def prior(n: int) -> Tensor:
            return sde.prior_sampling(n)
    else:
        step = pc_step(score_fn, sde, PREDICTORS[predictor], None, generator=generator)
        ts, ts_next = time_steps(sde, steps, eps)

        def prior(n: int) -> Tensor:
            return prior_sample(sde, (n, *data_shape), generator, dtype=dtype)

    states, times, rewards = [], [], []
    for start in range(0, num_rollouts, batch_size):
        x = prior(min(batch_size, num_rollouts - start))
        tt, tn = (ts, ts_next) if not x.is_floating_point() else (ts.to(x.dtype), ts_next.to(x.dtype))
        for i in range(len(tt)):
            states.append(x)
            times.append(tt[i].expand(x.shape[0]))
            x = step(x, tt[i], tn[i])
        rewards.append(checked_values(reward_fn(x), x.shape[0], "reward_fn").repeat(len(tt)))
    return torch.cat(states), torch.cat(times), torch.cat(rewards)


def default_value_config(**overrides) -> TrainConfig:
    """Optimiser settings for value networks: AdamW, learning rate 1e-3, batch 256, 2000 steps, EMA 0.99."""
    settings = {"steps": 2000, "batch_size": 256, "lr": 1e-3, "ema_decay": 0.99, "warmup": 50, "progress": False,
                "checkpoint_every": 0}
    return TrainConfig(**{**settings, **overrides})


def fit_value_function(
    score_fn: ScoreFn,
    sde: SDE | MaskedDiffusion,
    reward_fn: RewardFn,
    data_shape: Sequence[int],
    *,
    num_rollouts: int = 1024,
    steps: int = 100,
    net: nn.Module | None = None,
    config: TrainConfig | None = None,
    predictor: str = "reverse_diffusion",
    eps: float = 1e-3,
    generator: torch.Generator | None = None,
    out_dir: str | None = None,
) -> ValueFunction:
    """SVDD-MC: fit ``v(x_t, t) ≈ E[r(x0) | x_t]`` by least squares on pretrained rollouts (:func:`collect_rollouts`).

    As the reference code, the regression target is the reward of the rollout's end point at every
    intermediate state, so the fit approximates ``E[r(x0) | x_t]`` rather than the soft value
    ``alpha log E[exp(r / alpha) | x_t]`` (equal as ``alpha -> inf``; a Jensen gap otherwise).
    ``net(x, t) -> (batch, 1)`` defaults to ``make_classifier(data_shape, 1)`` (one-hot inputs for masked
    diffusion); training runs on :class:`scorekit.training.Trainer` with ``config`` (default
    :func:`default_value_config`), checkpointing under ``out_dir``. The rollout cost (``num_rollouts *
    steps`` network evaluations) is SVDD-MC's up-front price. Returns the EMA model, frozen, in eval mode.
    """
    states, times, rewards = collect_rollouts(score_fn, sde, reward_fn, data_shape, num_rollouts, steps=steps,
                                              predictor=predictor, eps=eps, generator=generator)
    num_tokens = sde.vocab_size + 1 if isinstance(sde, MaskedDiffusion) else None
    if net is None:
        shape = (*data_shape, num_tokens) if num_tokens else tuple(data_shape)
        net = make_classifier(shape, 1, net="mlp" if num_tokens else "auto")
    std = float(rewards.std()) if rewards.numel() > 1 and float(rewards.std()) > 0 else 1.0
    model = ValueFunction(net, float(rewards.mean()), std, num_tokens)
    targets = ((rewards - rewards.mean()) / std).float()

    def loss_fn(module: nn.Module, batch: tuple[Tensor, Tensor, Tensor], generator: torch.Generator) -> Tensor:
        x, t, r = batch
        return F.mse_loss(module.standardized(x, t), r)

    trainer = Trainer(model, loss_fn, (states, times.float(), targets), config or default_value_config(),
                      out_dir=out_dir)
    trainer.train()
    return trainer.ema.eval().requires_grad_(False)


# -- baselines -----------------------------------------------------------------------------------
def best_of_n(
    sampler: Callable[[int], Tensor],
    reward_fn: RewardFn,
    n: int,
    num_samples: int,
    *,
    per_group: bool = False,
    batch_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Best-of-N: draw ``n * num_samples`` samples with ``sampler(count) -> samples`` and keep ``num_samples``.

    By default the top ``1/n`` by reward over the whole pool (the paper's baseline: a global quantile);
    ``per_group=True`` keeps the best of each of ``num_samples`` groups of ``n``. Returns ``(samples,
    rewards)``. Costs ``n`` pretrained samples (network evaluations) and ``n`` reward calls per sample.
    """
    n, num_samples = positive_int(n, "n"), positive_int(num_samples, "num_samples")
    total = n * num_samples
    chunk = batch_size or total
    pool = torch.cat([sampler(min(chunk, total - s)) for s in range(0, total, chunk)])
    if pool.shape[0] != total:
        raise ValueError(f"the sampler returned {pool.shape[0]} samples where {total} were asked for")
    rewards = checked_values(reward_fn(pool), total, "reward_fn")
    if per_group:
        best = rewards.view(n, num_samples).argmax(0)
        keep = best * num_samples + torch.arange(num_samples, device=best.device)
    else:
        keep = rewards.topk(num_samples).indices
    return pool[keep], rewards[keep]
