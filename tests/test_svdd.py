"""SVDD (guidance.svdd) against closed forms on Gaussian and product mixtures (docs/notes.md, checks V3-V5)."""

import itertools
import math

import pytest
import torch

from guidance.dps import RewardGradientGuidance
from guidance.rewards import REWARDS, digits_compressibility, ink_mass, load_reward, png_compressibility
from guidance.svdd import SVDD, best_of_n, default_value_config, fit_value_function
from samplers import StackedGenerator, count_nfe, ode_sample, pc_sample
from samplers.masked import masked_sample
from scorekit import VPSDE
from scorekit.data import GaussianMixture, imbalanced_mixture, load_digits
from scorekit.discrete import MaskedDiffusion, count_token, imbalanced_sequences

SDE = VPSDE()
RARE = 2  # index of the rare mode of imbalanced_mixture()
MIX1 = GaussianMixture([0.95, 0.05], [[-2.0], [2.0]], 0.5)  # the 1-D test bed of docs/notes.md


def staircase(x):
    """A reward of the second coordinate in steps of 1/2, highest on the rare mode; zero gradient a.e."""
    return torch.floor(2 * x[:, 1]).clamp(-4, 6)


def tail_prob(x, t, c=1.0):
    """P(x0 > c | x_t = x) for each coordinate of a product of the 1-D mixture ``MIX1``, shape (B, D)."""
    b, d = x.shape
    t = torch.as_tensor(t, dtype=x.dtype).expand(b).repeat_interleave(d)
    flat = x.reshape(-1, 1)
    resp = MIX1.responsibilities(flat, t, SDE)
    alpha, sigma = (v[:, None] for v in SDE.marginal_coeffs(t))
    mu, s2 = MIX1.means[:, 0].to(x.dtype), MIX1.stds.to(x.dtype) ** 2
    var = alpha**2 * s2 + sigma**2
    mean = mu + alpha * s2 / var * (flat - alpha * mu)  # component posterior N(mean, s2 sigma^2 / var)
    sd = torch.sqrt(s2 * sigma**2 / var)
    return (resp * torch.special.ndtr((mean - c) / sd)).sum(1).reshape(b, d)


def product_score(x, t):
    """The exact score of the D-fold product of ``MIX1``: the diffused product factorizes per coordinate."""
    b, d = x.shape
    return MIX1.score(x.reshape(-1, 1), t.repeat_interleave(d), SDE).reshape(b, d)


def sample(score, shape, guidance=(), seed=0, steps=100, predictor="ancestral", generator=None):
    """``(samples, network evaluations per sample)`` of pc_sample without corrector, in float64, drawn from
    ``generator`` (default: a ``torch.Generator`` seeded ``seed``)."""
    counted = count_nfe(score)
    generator = torch.Generator().manual_seed(seed) if generator is None else generator
    x = pc_sample(counted, SDE, shape, predictor=predictor, corrector=None, steps=steps, guidance=guidance,
                  generator=generator, dtype=torch.float64)
    return x, counted.samples / shape[0]


def rare_fraction(x):
    return float((imbalanced_mixture().classify(x) == RARE).double().mean())


# -- the 2-D imbalanced mixture with a non-differentiable staircase reward -------------------------
@pytest.fixture(scope="module")
def mixture_runs():
    score = imbalanced_mixture().score_fn(SDE)
    runs = {"base": sample(score, (1000, 2), seed=1)}
    for alpha in (0.0, 1.0, 3.0, math.inf):
        svdd = SVDD(staircase, num_candidates=8, alpha=alpha, seed=0)
        runs[alpha] = (*sample(score, (1000, 2), [svdd], seed=1), svdd.reward_evals / 1000)
    runs["best_of_8"] = best_of_n(lambda n: sample(score, (n, 2), seed=2)[0], staircase, 8, 1000)
    runs["best_of_8_groups"] = best_of_n(lambda n: sample(score, (n, 2), seed=2)[0], staircase, 8, 1000,
                                         per_group=True)
    return runs


def test_svdd_pm_moves_samples_to_the_rare_mode(mixture_runs):
    assert rare_fraction(mixture_runs["base"][0]) < 0.08
    assert rare_fraction(mixture_runs[0.0][0]) >= 0.30


def test_svdd_pm_beats_best_of_n_at_equal_network_evaluations(mixture_runs):
    x, nfe, reward_evals = mixture_runs[0.0]
    # 1 + M (K - 1) evaluations per sample against N K for best-of-N; M (K - 1) reward calls
    # (the noise-free last step has a single candidate) against N
    assert nfe == 1 + 8 * 99 <= 8 * 100
    assert reward_evals == 8 * 99
    r = staircase(x)
    for key in ("best_of_8", "best_of_8_groups"):
        _, r_best = mixture_runs[key]
        assert float(r.mean()) > float(r_best.mean()) + 1.0, key
        assert float(r.median()) > float(r_best.median()), key


def test_larger_alpha_interpolates_back_to_the_pretrained_model(mixture_runs):
    fractions = [rare_fraction(mixture_runs[a][0]) for a in (0.0, 1.0, 3.0, math.inf)]
    assert fractions[0] > fractions[1] > fractions[2] > fractions[3]
    # alpha = inf selects uniformly: the pretrained distribution (binomial error, 1000 samples)
    base = rare_fraction(mixture_runs["base"][0])
    assert abs(fractions[3] - base) < 4 * math.sqrt(0.05 * 0.95 / 1000) * math.sqrt(2)


def test_one_candidate_is_the_pretrained_sampler_bit_for_bit():
    score = imbalanced_mixture().score_fn(SDE)
    base, _ = sample(score, (64, 2), seed=3, predictor="reverse_diffusion")
    for alpha in (0.0, 1.0):
        guided, _ = sample(score, (64, 2), [SVDD(staircase, num_candidates=1, alpha=alpha)], seed=3,
                           predictor="reverse_diffusion")
        assert torch.equal(guided, base)
    d = MaskedDiffusion(4, 12)
    den = imbalanced_sequences().denoiser(d)
    guided = masked_sample(den, d, 32, steps=12, generator=torch.Generator().manual_seed(4),
                           guidance=[SVDD(staircase, 1)])
    assert torch.equal(guided, masked_sample(den, d, 32, steps=12, generator=torch.Generator().manual_seed(4)))


def test_evaluation_cache_is_exact_and_halves_the_cost():
    score = imbalanced_mixture().score_fn(SDE)
    cached, nfe_cached = sample(score, (200, 2), [SVDD(staircase, 4, seed=0)], seed=5, steps=30)
    plain, nfe_plain = sample(score, (200, 2), [SVDD(staircase, 4, seed=0, cache=False)], seed=5, steps=30)
    assert torch.equal(cached, plain)
    assert nfe_cached == 1 + 4 * 29
    assert nfe_plain == 4 * 30 + 4 * 29  # every candidate's kernel and PM value evaluated


# -- V3: the exact soft value reaches the tilted target -------------------------------------------
def soft_value(alpha):
    """The exact soft value ``alpha log E[exp(r(x0) / alpha) | x_t]`` of ``r = 1[x > 1]`` on ``MIX1``."""

    def value(x, t):
        p = tail_prob(x, t)[:, 0].clamp(1e-300, 1 - 1e-16)
        return alpha * torch.logaddexp(torch.log1p(-p), p.log() + 1 / alpha)

    return value


def tilted_target(alpha):
    """``P_alpha(x > 1)`` under ``p(x) exp(1[x > 1] / alpha)``."""
    p1 = float((MIX1.weights * torch.special.ndtr((MIX1.means[:, 0] - 1) / MIX1.stds)).sum())
    return p1 * math.exp(1 / alpha) / (p1 * math.exp(1 / alpha) + 1 - p1)


def indicator(x):
    return (x[:, 0] > 1).double()


def test_exact_soft_value_approaches_the_tilted_target_as_m_grows():
    score = MIX1.score_fn(SDE)
    alpha, n = 0.5, 2000
    exact = tilted_target(alpha)
    est = {m: float(indicator(sample(score, (n, 1), [SVDD(indicator, m, alpha, soft_value(alpha), seed=m)],
                                     seed=6)[0]).mean()) for m in (2, 16)}
    se = math.sqrt(exact * (1 - exact) / n)
    assert abs(est[16] - exact) < abs(est[2] - exact) / 3
    assert abs(est[16] - exact) < 4 * se + 0.02, (est, exact)


@pytest.mark.slow
@pytest.mark.parametrize("alpha", [1.0, 0.25])
def test_exact_soft_value_reaches_the_tilted_target_with_many_steps(alpha):
    score = MIX1.score_fn(SDE)
    n = 4000
    x, _ = sample(score, (n, 1), [SVDD(indicator, 50, alpha, soft_value(alpha), seed=7)], seed=7, steps=1000)
    exact = tilted_target(alpha)
    assert abs(float(indicator(x).mean()) - exact) < 3 * math.sqrt(exact * (1 - exact) / n) + 0.01


# -- V4: a sparse reward, where the posterior mean gives no signal -----------------------------------
def count_above_one(x):
    return (x > 1).sum(1).double()


def exact_expected_count(x, t):
    """``E[count(x0 > 1) | x_t]``, the value SVDD-MC regresses (product structure: a sum over coordinates)."""
    return tail_prob(x, t).sum(1)


def test_sparse_reward_defeats_svdd_pm_but_not_an_accurate_value():
    # d = 8 product of the 1-D mixture: while the modes are decided, every coordinate's Tweedie mean sits
    # on the majority side, r(x0_hat) = 0 for all candidates and SVDD-PM selects blindly. This is the
    # documented limitation of SVDD-PM (notes V4), kept as a regression test.
    shape, m = (300, 8), 10
    base, _ = sample(product_score, shape, seed=8)
    pm, _ = sample(product_score, shape, [SVDD(count_above_one, m)], seed=8)
    exact, nfe = sample(product_score, shape, [SVDD(count_above_one, m, value_fn=exact_expected_count)], seed=8)
    _, r_best = best_of_n(lambda n: sample(product_score, (n, 8), seed=9)[0], count_above_one, m, shape[0],
                          per_group=True)
    assert nfe == 100  # a value network costs no score evaluations: the candidates share one
    assert float(count_above_one(base).mean()) < 0.7
    assert float(count_above_one(pm).mean()) < min(1.2, float(r_best.mean()))
    assert float(count_above_one(exact).mean()) > 6.0
    assert float(count_above_one(exact).median()) > float(r_best.median()) + 4


def test_fitted_value_function_matches_the_exact_posterior_probability():
    score = MIX1.score_fn(SDE)
    value = fit_value_function(score, SDE, indicator, (1,), num_rollouts=768, steps=40, predictor="ancestral",
                               config=default_value_config(steps=500), generator=torch.Generator().manual_seed(10))
    for t in (0.1, 0.4):
        x = MIX1.sample(2000, torch.Generator().manual_seed(11), dtype=torch.float64)
        tt = torch.full((2000,), t, dtype=torch.float64)
        x_t = SDE.marginal_prob(x, tt)[0] + SDE.marginal_coeffs(tt)[1][:, None] * torch.randn(
            x.shape, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
        err = (value(x_t, tt).double() - tail_prob(x_t, tt)[:, 0]).abs().mean()
        assert float(err) < 0.03, (t, float(err))


@pytest.mark.slow
def test_svdd_mc_gets_the_signal_svdd_pm_misses():
    shape, m = (300, 8), 10
    value = fit_value_function(product_score, SDE, count_above_one, (8,), num_rollouts=2048, steps=100,
                               predictor="ancestral", config=default_value_config(steps=3000),
                               generator=torch.Generator().manual_seed(13))
    mc, _ = sample(product_score, shape, [SVDD(count_above_one, m, value_fn=value)], seed=14)
    pm, _ = sample(product_score, shape, [SVDD(count_above_one, m)], seed=14)
    assert float(count_above_one(mc).mean()) > float(count_above_one(pm).mean()) + 2


# -- V5: masked discrete diffusion with an exact x0-predictor ---------------------------------------
def count_g(x):
    return count_token(x, 2)


def test_discrete_svdd_pm_beats_best_of_n_at_equal_evaluations():
    d = MaskedDiffusion(4, 12)
    den = imbalanced_sequences().denoiser(d)
    n, m, steps = 300, 10, 24
    counted = count_nfe(den)
    svdd = SVDD(count_g, m, seed=0)
    x = masked_sample(counted, d, n, steps=steps, guidance=[svdd], generator=torch.Generator().manual_seed(15))
    assert counted.samples / n == 1 + m * (steps - 1) <= m * steps
    assert svdd.reward_evals / n == m * steps
    assert x.dtype == torch.long and x.shape == (n, 12) and int(x.min()) >= 0 and int(x.max()) <= 3
    _, r_best = best_of_n(lambda k: masked_sample(den, d, k, steps=steps, generator=torch.Generator().manual_seed(16)),
                          count_g, m, n)
    r = count_g(x)
    assert float(r.mean()) > float(r_best.mean()) + 2
    assert float(r.median()) > float(r_best.median()) + 2


def test_discrete_value_function_fits_the_exact_expected_count():
    # E[count of G | x_t] is exact from the mixture's x0-predictor: sum over positions of p(x0^l = G | x_t)
    d = MaskedDiffusion(4, 12)
    den = imbalanced_sequences().denoiser(d)
    value = fit_value_function(den, d, count_g, (12,), num_rollouts=1024, steps=12,
                               config=default_value_config(steps=600), generator=torch.Generator().manual_seed(21))
    g = torch.Generator().manual_seed(22)
    x0 = imbalanced_sequences().sample(2000, g)
    for t in (0.3, 0.7):
        x_t = d.q_sample(x0, t, g)
        tt = torch.full((2000,), t, dtype=torch.float64)
        exact = den(x_t, tt).exp()[..., 2].sum(1)
        err = (value(x_t, tt).double() - exact).abs().mean()
        assert float(err) < 0.4, (t, float(err))  # counts range over 0..12
    x = masked_sample(den, d, 200, steps=12, guidance=[SVDD(count_g, 8, value_fn=value)],
                      generator=torch.Generator().manual_seed(23))
    assert float(count_g(x).mean()) > 9


# -- SVDD-R ----------------------------------------------------------------------------------------
def test_global_resampling_replaces_the_worst_samples():
    score = imbalanced_mixture().score_fn(SDE)
    local, _ = sample(score, (400, 2), [SVDD(staircase, 2, seed=0)], seed=17)
    global_, _ = sample(score, (400, 2), [SVDD(staircase, 2, resample=True, seed=0)], seed=17)
    assert rare_fraction(global_) > rare_fraction(local) + 0.1
    assert float(staircase(global_).mean()) > float(staircase(local).mean())


# -- per-sample streams (samplers.StackedGenerator) -------------------------------------------------
SEEDS = list(range(6))


def svdd_batch(generator, b, **svdd):
    """``b`` SVDD samples (M = 4, alpha = 1 unless ``svdd`` says, 20 steps) whose sampler draws from
    ``generator``; the selection draws from it too (as SVDD's docstring says to pass it) unless ``svdd`` gives
    a ``seed``."""
    svdd = {"alpha": 1.0, **svdd}
    if "seed" not in svdd:
        svdd["generator"] = generator
    return sample(imbalanced_mixture().score_fn(SDE), (b, 2), [SVDD(staircase, 4, **svdd)], steps=20,
                  generator=generator)[0]


def in_batches(sizes, **svdd):
    """:func:`svdd_batch` over consecutive chunks of ``SEEDS`` of the given sizes, one StackedGenerator per
    chunk (as ``draw_samples`` makes one per batch for ``scorekit sample --seeds``)."""
    ends = list(itertools.accumulate(sizes))
    assert ends[-1] == len(SEEDS)
    return torch.cat([svdd_batch(StackedGenerator(SEEDS[a:z]), z - a, **svdd) for a, z in zip([0, *ends], ends)])


def test_svdd_selection_with_alpha_is_per_sample_under_a_stacked_generator():
    whole = in_batches([6])
    for sizes in ([2, 2, 2], [3, 3], [2, 3, 1], [1] * 6):
        assert torch.equal(whole, in_batches(sizes)), sizes
    # the independent computation: each seed alone, its sampler and selection on one plain generator
    assert torch.equal(whole, torch.cat([svdd_batch(torch.Generator().manual_seed(s), 1) for s in SEEDS]))
    # the selection is random (alpha = 1 is not the argmax), and a batch-wide selection stream (seed=)
    # makes the samples depend on the split, which the equalities above would catch
    assert not torch.equal(whole, in_batches([6], alpha=0.0))
    assert not torch.equal(in_batches([6], seed=0), in_batches([3, 3], seed=0))
    with pytest.raises(ValueError, match="SVDD's generator has 3 streams for a batch of 6 samples"):
        sample(imbalanced_mixture().score_fn(SDE), (6, 2), [SVDD(staircase, 4, 1.0, generator=StackedGenerator(SEEDS[:3]))],
               steps=2)


def test_svdd_r_under_a_stacked_generator_is_coupled_within_its_batch():
    # SVDD-R runs under per-sample streams, batch-coupled as documented: its global step copies samples
    # across the batch, so a split changes the samples; its draws come from the batch's streams, so the
    # batch is reproducible whatever torch's global stream
    torch.manual_seed(1)
    whole = in_batches([6], resample=True)
    torch.manual_seed(2)
    assert torch.equal(whole, in_batches([6], resample=True))
    assert not torch.equal(whole, in_batches([6]))  # the global step acted
    assert not torch.equal(whole, in_batches([3, 3], resample=True))  # not batch-size independent
    # a batch of one has no one to resample from: each seed alone is plain (per-sample) SVDD's sample
    assert torch.equal(in_batches([1] * 6, resample=True), in_batches([6]))


# -- baselines -------------------------------------------------------------------------------------
def test_best_of_n_keeps_the_top_quantile_or_the_group_maxima():
    pool = torch.randperm(12, generator=torch.Generator().manual_seed(18)).double()[:, None]
    sampler = iter([pool[:5], pool[5:10], pool[10:]])
    x, r = best_of_n(lambda k: next(sampler), lambda x: x[:, 0], 3, 4, batch_size=5)
    assert torch.equal(r, torch.tensor([11.0, 10.0, 9.0, 8.0], dtype=torch.float64))
    assert torch.equal(x[:, 0], r)
    _, r_groups = best_of_n(lambda k: pool, lambda x: x[:, 0], 3, 4, per_group=True)
    assert torch.equal(r_groups, pool.view(3, 4).max(0).values)


def test_reward_gradient_guidance_is_exact_for_gaussian_data_and_a_linear_reward():
    # For x0 ~ N(0, s^2) and r(x) = a x, x0_hat is linear in x_t and log E[exp(r(x0)) | x_t] =
    # a x0_hat + const, so DPS with scale 1 samples the tilted target p(x) e^{a x} = N(a s^2, s^2).
    gauss = GaussianMixture([1.0], [[0.0]], 0.5)
    a = 2.0
    guidance = RewardGradientGuidance(lambda x0: a * x0[:, 0], scale=1.0)
    x, _ = sample(gauss.score_fn(SDE), (4000, 1), [guidance], seed=19, steps=200)
    assert float(x.mean()) == pytest.approx(a * 0.25, abs=4 * 0.5 / math.sqrt(4000) + 0.01)
    assert float(x.std()) == pytest.approx(0.5, abs=0.02)


def test_reward_gradient_guidance_needs_a_differentiable_reward_and_the_sde():
    score = imbalanced_mixture().score_fn(SDE)
    with pytest.raises(TypeError, match="needs a differentiable reward"):
        sample(score, (8, 2), [RewardGradientGuidance(lambda x: staircase(x).detach())], steps=3)
    with pytest.raises(ValueError, match="needs the SDE"):
        RewardGradientGuidance(staircase).guide_score(lambda x, t: -x)


# -- rewards ---------------------------------------------------------------------------------------
def test_image_rewards():
    blank = -torch.ones(2, 1, 8, 8)
    noise = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(20)) * 2 - 1
    assert (png_compressibility(blank) > png_compressibility(noise)).all()
    assert torch.equal(png_compressibility(blank), png_compressibility(blank.clone()))
    # real digits lie on 17 grey levels, so quantising to them changes nothing; off-grid noise is removed
    digits = load_digits("test")[0][:16]
    assert torch.equal(digits_compressibility(digits), png_compressibility(digits))
    assert (digits_compressibility(noise) >= png_compressibility(noise)).all()
    assert torch.equal(ink_mass(torch.stack([blank[0], -blank[0]])), torch.tensor([0.0, 64.0]))


def test_load_reward_resolves_names_modules_and_files(tmp_path):
    assert load_reward("compressibility") is REWARDS["compressibility"]
    assert load_reward("guidance.rewards:ink_mass") is ink_mass
    path = tmp_path / "my_reward.py"
    path.write_text("def reward(x):\n    return x.sum(1)\n")
    assert torch.equal(load_reward(f"{path}:reward")(torch.ones(3, 2)), torch.full((3,), 2.0))
    with pytest.raises(ValueError, match="neither a built-in"):
        load_reward("nonsense")
    with pytest.raises(ValueError, match="cannot load the reward module 'no_such_module'"):
        load_reward("no_such_module:f")
    with pytest.raises(ValueError, match="has no callable 'missing'"):
        load_reward("guidance.rewards:missing")


# -- bad input -------------------------------------------------------------------------------------
def test_bad_rewards_and_values_raise_clear_errors():
    score = imbalanced_mixture().score_fn(SDE)
    with pytest.raises(ValueError, match=r"reward_fn returned shape \(32, 1\) for a batch of 32 samples"):
        sample(score, (4, 2), [SVDD(lambda x: staircase(x)[:, None], 8)], steps=3)
    with pytest.raises(FloatingPointError, match="reward_fn returned 32 non-finite values"):
        sample(score, (4, 2), [SVDD(lambda x: staircase(x) * float("nan"), 8)], steps=3)
    with pytest.raises(ValueError, match=r"value_fn returned shape \(\)"):
        sample(score, (4, 2), [SVDD(staircase, 8, value_fn=lambda x, t: x.sum())], steps=3)
    with pytest.raises(TypeError, match="reward_fn must return a tensor"):
        sample(score, (4, 2), [SVDD(lambda x: [0.0] * len(x), 8)], steps=3)
    with pytest.raises(ValueError, match="the sampler returned 3 samples where 8 were asked for"):
        best_of_n(lambda k: torch.zeros(3, 2), staircase, 2, 4)


def test_bad_settings_raise_clear_errors():
    with pytest.raises(ValueError, match="num_candidates \\(M\\) must be an integer >= 1, got 0"):
        SVDD(staircase, 0)
    with pytest.raises(ValueError, match="alpha must be >= 0"):
        SVDD(staircase, 4, alpha=-1.0)
    with pytest.raises(TypeError, match="reward_fn must be callable"):
        SVDD("staircase")
    with pytest.raises(ValueError, match="resample_fraction must lie in"):
        SVDD(staircase, resample=True, resample_fraction=1.5)
    with pytest.raises(ValueError, match="a seed or a generator for its selection draws, not both"):
        SVDD(staircase, seed=0, generator=torch.Generator())


def test_deterministic_samplers_refuse_svdd():
    score = imbalanced_mixture().score_fn(SDE)
    with pytest.raises(ValueError, match="SVDD guides the stochastic reverse step.*probability-flow ODE"):
        ode_sample(score, SDE, (4, 2), guidance=[SVDD(staircase)])
    with pytest.raises(ValueError, match="SVDD drew 8 identical candidates.*deterministic"):
        pc_sample(score, SDE, (4, 2), predictor=None, corrector=None, steps=3, guidance=[SVDD(staircase)])
