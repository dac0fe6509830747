"""Minority score, minority guidance and self-guided minority sampling, against closed forms.

Test beds: a Gaussian (the minority score is a closed form), the 1-D mixture of docs/notes.md (check V1:
weights 0.95 / 0.05 at -2 / +2, std 0.5, where the level classifier ``p(level | x_t)`` is exact by
quadrature, so guidance at scale 1 must reproduce ``p(x0 | level)``), and the 2-D imbalanced mixture
(check V2: a classifier trained by ``train_minority_classifier``).
"""

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from guidance.classifier import default_classifier_config, save_classifier
from guidance.minority import (
    REFERENCE_ALPHA_BAR,
    MinorityClassifier,
    MinorityGuidance,
    SelfMinorityGuidance,
    assign_levels,
    ddpm_alpha_bar,
    minority_score,
    perturbation_time,
    quantize_levels,
    train_minority_classifier,
)
from samplers import count_nfe, pc_sample
from scorekit import VESDE, VPSDE, ScoreModel
from scorekit.data import GaussianMixture, imbalanced_mixture
from scorekit.metrics import sliced_wasserstein
from scorekit.nets import MLP
from scorekit.nets.classifier import MLPClassifier, make_classifier

RARE = 2


def gen(seed):
    return torch.Generator().manual_seed(seed)


# -- the perturbation level ---------------------------------------------------------------------------
def test_reference_level_is_ddpm_step_605():
    betas = np.linspace(1e-4, 0.02, 1000)
    assert REFERENCE_ALPHA_BAR == pytest.approx(np.prod(1 - betas[:606]), rel=1e-12)
    assert REFERENCE_ALPHA_BAR == pytest.approx(0.024, abs=5e-4)  # the reference code's step 605 of 1000 (docs/notes.md, V1)
    assert ddpm_alpha_bar(0) == pytest.approx(1 - 1e-4)


@pytest.mark.parametrize("sde", [VPSDE(), VESDE()])
def test_perturbation_time_has_the_requested_snr(sde):
    t = perturbation_time(sde, alpha_bar=0.1)
    alpha, sigma = sde.marginal_coeffs(torch.tensor(t, dtype=torch.float64))
    assert float(alpha**2 / sigma**2) == pytest.approx(0.1 / 0.9, rel=1e-9)
    assert perturbation_time(sde, snr=0.1 / 0.9) == pytest.approx(t, rel=1e-12)
    assert perturbation_time(sde, t=0.3) == 0.3


# -- the minority score ---------------------------------------------------------------------------
@pytest.mark.parametrize("sde", [VPSDE(), VESDE()])
def test_l2_minority_score_is_the_scaled_noise_prediction_error(sde):
    # The paper's Corollary 1: with d = ||.||^2, l(x0) = ((1 - abar) / abar) E ||eps_theta(x_s) - eps||^2.
    torch.manual_seed(0)
    net = MLP(3, hidden=32, depth=2).double()
    torch.nn.init.normal_(net.out[1].weight, std=0.3)  # the MLP's head starts at zero
    model = ScoreModel(net, sde, prediction="eps")
    x0 = torch.randn(50, 3, generator=gen(0), dtype=torch.float64)
    got = minority_score(model, sde, x0, n=4, generator=gen(1))
    s = perturbation_time(sde)
    alpha, sigma = (float(c) for c in sde.marginal_coeffs(torch.tensor(s, dtype=torch.float64)))
    g, err = gen(1), torch.zeros(50, dtype=torch.float64)
    with torch.no_grad():
        for _ in range(4):
            eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
            err += (model.raw(alpha * x0 + sigma * eps, torch.full((50,), s)) - eps).pow(2).sum(1)
    abar = REFERENCE_ALPHA_BAR
    torch.testing.assert_close(got, (1 - abar) / abar * err / 4, rtol=1e-9, atol=0)


def test_minority_score_of_a_gaussian_matches_its_closed_form():
    # For x0 ~ N(mu, s^2 I), x0_hat(x_t) = mu + g (x_t - alpha mu) with g = alpha s^2 / (alpha^2 s^2 + sigma^2),
    # so l(x0) = (1 - g alpha)^2 ||x0 - mu||^2 + D g^2 sigma^2: rarer points score higher.
    sde, mu, s = VPSDE(), torch.tensor([[1.0, -0.5]], dtype=torch.float64), 0.7
    gauss = GaussianMixture([1.0], mu, s)
    points = mu + torch.linspace(-3, 3, 16, dtype=torch.float64)[:, None] * torch.tensor([[0.6, 0.8]], dtype=torch.float64)
    copies, n = 200, 20  # 4000 draws per point, as 200 copies of 20
    got = minority_score(gauss.score_fn(sde), sde, points.repeat(copies, 1), alpha_bar=0.2, n=n, generator=gen(2),
                         batch_size=4000).reshape(copies, 16).mean(0)
    alpha, sigma = math.sqrt(0.2), math.sqrt(0.8)
    g = alpha * s**2 / (alpha**2 * s**2 + sigma**2)
    c2 = (1 - g * alpha) ** 2 * (points - mu).pow(2).sum(1)
    exact = c2 + 2 * g**2 * sigma**2
    se = torch.sqrt((4 * c2 * g**2 * sigma**2 + 2 * 2 * g**4 * sigma**4) / (copies * n))  # of the mean of all draws
    assert ((got - exact).abs() < 4 * se).all()


def test_minority_score_ranks_the_rare_mode_first():
    sde, gm = VPSDE(), imbalanced_mixture()
    x, k = gm.sample(3000, gen(3), return_labels=True, dtype=torch.float64)
    scores = minority_score(gm.score_fn(sde), sde, x, generator=gen(4), batch_size=1000)
    assert roc_auc_score((k == RARE).numpy(), scores.numpy()) > 0.8


def test_custom_distance_is_used():
    sde, gm = VPSDE(), imbalanced_mixture()
    x = gm.sample(64, gen(5), dtype=torch.float64)
    l1 = minority_score(gm.score_fn(sde), sde, x, generator=gen(6),
                        distance=lambda a, b: (a - b).abs().sum(1, keepdim=True))
    # the same draws through the built-in squared L2 give a different, larger-spread score
    l2 = minority_score(gm.score_fn(sde), sde, x, generator=gen(6))
    assert l1.shape == (64,) and not torch.allclose(l1, l2)
    assert torch.corrcoef(torch.stack([l1, l2]))[0, 1] > 0.8


# -- levels -------------------------------------------------------------------------------------------
def test_quantize_levels_follows_the_reference_labelling():
    scores = torch.rand(1000, generator=gen(7), dtype=torch.float64) ** 3
    levels, thresholds = quantize_levels(scores, 10)
    expected_thresholds = np.quantile(scores.numpy(), np.arange(1, 10) / 10)
    np.testing.assert_allclose(thresholds.numpy(), expected_thresholds, rtol=1e-12)
    # label l iff q_{l-1} < score <= q_l (the reference's rule), so each level holds a tenth
    expected = np.array([np.sum(v > expected_thresholds) for v in scores.numpy()])
    np.testing.assert_array_equal(levels.numpy(), expected)
    assert torch.bincount(levels).tolist() == [100] * 10
    assert int(levels[scores.argmax()]) == 9 and int(levels[scores.argmin()]) == 0
    assert torch.equal(assign_levels(thresholds, thresholds), torch.arange(9))  # a threshold falls in the lower level


# -- V1: the exact level classifier on the 1-D mixture -------------------------------------------------
def _log_interval_prob(za: torch.Tensor, zb: torch.Tensor) -> torch.Tensor:
    """``log(Phi(zb) - Phi(za))`` for ``za < zb``, through the tail that keeps it accurate (NaN-free grads)."""
    upper = za > 0
    ua, ub = torch.where(upper, za, 0.0), torch.where(upper, zb, 1.0)
    la, lb = torch.where(upper, -1.0, za), torch.where(upper, 0.0, zb)
    log_up = torch.special.log_ndtr(-ua)
    log_up = log_up + torch.log1p(-torch.exp(torch.special.log_ndtr(-ub) - log_up))
    log_lo = torch.special.log_ndtr(lb)
    log_lo = log_lo + torch.log1p(-torch.exp(torch.special.log_ndtr(la) - log_lo))
    return torch.where(upper, log_up, log_lo)


class ExactLevels:
    """Population minority levels of a 1-D mixture and the exact classifier ``log p(level | x_t)``.

    The L2 minority score is computed by Gauss-Hermite quadrature over the noise (exact Tweedie), the
    equal-mass thresholds are the score's quantiles under the mixture density, each level is a union
    of intervals of x0, and ``p(level | x_t) = sum_k p(k | x_t) P(x0 in level | x_t, k)`` with the
    Gaussian component posteriors ``x0 | x_t, k``.
    """

    def __init__(self, gm: GaussianMixture, sde, num_levels: int):
        self.gm, self.sde, self.L = gm, sde, num_levels
        s = perturbation_time(sde)
        alpha, sigma = (float(c) for c in sde.marginal_coeffs(torch.tensor(s, dtype=torch.float64)))
        nodes, weights = np.polynomial.hermite_e.hermegauss(80)
        nodes, weights = torch.tensor(nodes), torch.tensor(weights / math.sqrt(2 * math.pi))
        grid = torch.linspace(-6, 6, 12001, dtype=torch.float64)
        x_s = alpha * grid[:, None] + sigma * nodes[None]
        x0_hat = gm.posterior_mean(x_s.reshape(-1, 1), s, sde).reshape(x_s.shape)
        ell = ((grid[:, None] - x0_hat) ** 2 * weights).sum(1)
        mass = gm.log_prob(grid[:, None]).exp()
        mass = mass / mass.sum()
        order = torch.argsort(ell)
        cum = torch.cumsum(mass[order], 0)
        q = torch.arange(1, num_levels, dtype=torch.float64) / num_levels
        thresholds = ell[order][torch.searchsorted(cum, q)]
        level = torch.searchsorted(thresholds, ell)
        change = torch.nonzero(level[1:] != level[:-1]).flatten()
        cuts = (grid[change] + grid[change + 1]) / 2
        far = torch.tensor([50.0], dtype=torch.float64)
        self.a, self.b = torch.cat([-far, cuts]), torch.cat([cuts, far])
        self.interval_level = torch.cat([level[change], level[-1:]])
        self.grid, self.mass, self.level = grid, mass, level

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        gm = self.gm
        alpha, sigma = (c[:, None] for c in self.sde.marginal_coeffs(t))
        mu, s2 = gm.means[:, 0], gm.stds**2
        var_t = alpha**2 * s2 + sigma**2
        post_mean = mu + alpha * s2 / var_t * (x - alpha * mu)  # (B, K)
        post_std = torch.sqrt(s2 * sigma**2 / var_t)
        log_r = torch.log(gm.responsibilities(x, t, self.sde))
        za = (self.a - post_mean[..., None]) / post_std[..., None]
        zb = (self.b - post_mean[..., None]) / post_std[..., None]
        per_interval = torch.logsumexp(log_r[..., None] + _log_interval_prob(za, zb), 1)  # (B, intervals)
        return torch.stack([torch.logsumexp(per_interval[:, self.interval_level == lv], 1) for lv in range(self.L)], 1)

    def conditional_cdf(self, target: int, x: torch.Tensor) -> torch.Tensor:
        """CDF of the exact ``p(x0 | level = target)`` at ``x``."""
        m = self.mass * (self.level == target)
        cdf = torch.cumsum(m, 0) / m.sum()
        return cdf[torch.searchsorted(self.grid, x.clamp(-6, 6)).clamp(max=len(cdf) - 1)]

    def minority_share(self, target: int) -> float:
        m = self.mass * (self.level == target)
        return float(m[self.grid > 0].sum() / m.sum())


@pytest.fixture(scope="module")
def mixture_1d():
    return GaussianMixture([0.95, 0.05], [[-2.0], [2.0]], 0.5), VPSDE()


@pytest.fixture(scope="module")
def exact_levels_10(mixture_1d):
    return ExactLevels(*mixture_1d, 10)


def test_exact_level_classifier_is_a_distribution(exact_levels_10):
    clf = exact_levels_10
    x = 3 * torch.randn(16, 1, generator=gen(8), dtype=torch.float64)
    t = torch.rand(16, generator=gen(9), dtype=torch.float64) * 0.99 + 0.005
    torch.testing.assert_close(clf(x, t).exp().sum(1), torch.ones(16, dtype=torch.float64))
    assert clf.minority_share(9) == pytest.approx(0.495, abs=0.01)  # docs/notes.md, V1 (exact, from 64-draw scores)


def test_minority_guidance_with_the_exact_classifier_samples_the_level_conditional(mixture_1d, exact_levels_10):
    # Notes, check V1: at scale 1 the guided score is the score of p_t(x | level), so the sampler
    # draws p(x0 | level = L-1): minority share 0.50 (exact) instead of 0.05, and the exact CDF.
    gm, sde = mixture_1d
    clf = exact_levels_10
    n = 2000
    x = pc_sample(gm.score_fn(sde), sde, (n, 1), predictor="ancestral", corrector=None, steps=100,
                  guidance=[MinorityGuidance(clf, 9, 1.0, num_levels=10)], generator=gen(10), dtype=torch.float64)
    share = float((x > 0).double().mean())
    assert share == pytest.approx(clf.minority_share(9), abs=3.5 * math.sqrt(0.25 / n))
    xs = x.flatten().sort().values
    ks = (clf.conditional_cdf(9, xs) - torch.arange(1, n + 1, dtype=torch.float64) / n).abs().max()
    assert ks < 0.05  # Kolmogorov-Smirnov: 1.36 / sqrt(n) = 0.03 at the 5% level, plus discretisation


@pytest.mark.slow
def test_minority_guidance_exact_classifier_table_v1(mixture_1d):
    # The notes' table: L = 10 -> 0.497 (w = 1), 0.869 (w = 3: overshoot); L = 20 -> 0.999 (w = 1).
    gm, sde = mixture_1d
    for levels, w, expected in [(10, 0.0, 0.05), (10, 3.0, 0.869), (20, 1.0, None)]:
        clf = ExactLevels(gm, sde, levels)
        x = pc_sample(gm.score_fn(sde), sde, (3000, 1), predictor="ancestral", corrector=None, steps=250,
                      guidance=[MinorityGuidance(clf, levels - 1, w, num_levels=levels)], generator=gen(11),
                      dtype=torch.float64)
        expected = clf.minority_share(levels - 1) if expected is None else expected
        assert float((x > 0).double().mean()) == pytest.approx(expected, abs=0.03), (levels, w)


# -- V2: a trained minority classifier on the 2-D mixture ---------------------------------------------
@pytest.fixture(scope="module")
def trained_2d():
    sde, gm = VPSDE(), imbalanced_mixture()
    x = gm.sample(4000, gen(12))
    torch.manual_seed(0)
    net = make_classifier(2, 10, hidden=64, depth=2)
    mc = train_minority_classifier(net, gm.score_fn(sde), sde, x, default_classifier_config(steps=600, lr=3e-3),
                                   num_levels=10, generator=gen(13))
    return gm, sde, mc


def test_trained_minority_guidance_raises_the_rare_share(trained_2d):
    gm, sde, mc = trained_2d
    assert mc.num_levels == 10 and torch.bincount(mc.levels).tolist() == [400] * 10

    def sample(target, scale):
        return pc_sample(gm.score_fn(sde), sde, (2000, 2), predictor="ancestral", corrector=None, steps=100,
                         guidance=[MinorityGuidance(mc, target, scale)], generator=gen(14))

    def rare_share(x):
        return float((gm.classify(x.double()) == RARE).double().mean())

    minority, majority = sample(9, 1.0), sample(0, 1.0)
    assert rare_share(minority) >= 0.3  # 0.05 unguided
    assert rare_share(majority) < 0.02
    # On the data: the guided samples are close to true data samples of the same level (exact score,
    # same thresholds), several times closer than unguided samples (about 1.6); the two-sample noise
    # floor is about 0.06, the rest is the learned classifier's error.
    ref = gm.sample(20000, gen(15))
    ref_levels = mc.assign(minority_score(gm.score_fn(sde), sde, ref, generator=gen(16), batch_size=5000))
    for x, target in ((minority, 9), (majority, 0)):
        assert sliced_wasserstein(x, ref[ref_levels == target][:2000]) < 0.3, target
    assert sliced_wasserstein(sample(9, 0.0), ref[ref_levels == 9][:2000]) > 1.0


def test_minority_classifier_save_load(trained_2d, tmp_path):
    _, sde, mc = trained_2d
    path = tmp_path / "minority.safetensors"
    mc.save(path)
    loaded = MinorityClassifier.load(path)
    assert loaded.num_levels == 10 and loaded.sde == sde and loaded.n == mc.n and loaded.t == mc.t
    torch.testing.assert_close(loaded.thresholds, mc.thresholds, rtol=0, atol=0)
    x, t = torch.randn(8, 2), torch.rand(8)
    g1 = MinorityGuidance(mc, 9, 2.0).log_prob_grad(x, t)
    g2 = MinorityGuidance.load(path, target_level=9, scale=2.0).log_prob_grad(x, t)
    torch.testing.assert_close(g1, g2, rtol=0, atol=0)
    plain = tmp_path / "plain.safetensors"
    save_classifier(plain, MLPClassifier(2, 10), sde)
    with pytest.raises(ValueError, match="holds a 'classifier' classifier, but a 'minority' classifier is needed"):
        MinorityGuidance.load(plain, target_level=9)


def test_scale_zero_is_bit_identical(trained_2d):
    gm, sde, mc = trained_2d
    score = gm.score_fn(sde)
    kw = {"predictor": "ancestral", "corrector": "langevin", "steps": 25}
    plain = pc_sample(score, sde, (200, 2), generator=gen(17), **kw)
    for guide in (MinorityGuidance(mc, 9, 0.0), SelfMinorityGuidance(score, sde, 0.0, inter_rate=1, generator=gen(18))):
        assert torch.equal(pc_sample(score, sde, (200, 2), guidance=[guide], generator=gen(17), **kw), plain)


# -- self-guided minority sampling -----------------------------------------------------------------
def test_self_guidance_direction_closed_form():
    # For Gaussian data N(mu, s^2 I) Tweedie is affine, x0_hat = mu + g_t (x_t - alpha_t mu), so with the
    # second reconstruction x0_tilde held fixed (stop-gradient), grad ||x0_hat - x0_tilde||^2 = 2 g_t (x0_hat - x0_tilde).
    sde, mu, s = VPSDE(), torch.tensor([[0.5, -1.0, 2.0]], dtype=torch.float64), 0.8
    gauss = GaussianMixture([1.0], mu, s)
    x = torch.randn(10, 3, generator=gen(19), dtype=torch.float64)
    t, p_ratio = 0.3, 0.6

    def gain(time):
        alpha, sigma = (float(c) for c in sde.marginal_coeffs(torch.tensor(time, dtype=torch.float64)))
        return alpha, sigma, alpha * s**2 / (alpha**2 * s**2 + sigma**2)

    a_t, _, g_t = gain(t)
    a_p, s_p, g_p = gain(p_ratio)
    x0_hat = mu + g_t * (x - a_t * mu)
    z = torch.randn(x.shape, generator=gen(20), dtype=torch.float64)
    x0_tilde = mu + g_p * (a_p * x0_hat + s_p * z - a_p * mu)
    expected = 2 * g_t * (x0_hat - x0_tilde)
    guide = SelfMinorityGuidance(gauss.score_fn(sde), sde, 1.0, p_ratio=p_ratio, normalize=False, generator=gen(20))
    torch.testing.assert_close(guide.direction(x, t), expected, rtol=1e-9, atol=1e-12)
    normed = SelfMinorityGuidance(gauss.score_fn(sde), sde, 1.0, p_ratio=p_ratio, generator=gen(20)).direction(x, t)
    torch.testing.assert_close(normed, expected / expected.abs().amax(1, keepdim=True), rtol=1e-9, atol=1e-12)


def test_self_guidance_schedule_and_cost():
    # Guided every inter_rate-th step, counting from the first; each guided evaluation costs 1 + n extra
    # network evaluations. PC's corrector and predictor at one t belong to one step.
    sde, gm = VPSDE(), imbalanced_mixture()
    for corrector, per_step in ((None, 1), ("langevin", 2)):
        score = count_nfe(gm.score_fn(sde))
        guide = SelfMinorityGuidance(score, sde, 1.0, inter_rate=5, n=2, generator=gen(21))
        pc_sample(score, sde, (16, 2), predictor="ancestral", corrector=corrector, steps=20, guidance=[guide],
                  generator=gen(22))
        assert score.nfe == 20 * per_step + 4 * per_step * (1 + 2)


def test_self_guidance_samples_rarer_points():
    # The method targets samples the model reconstructs badly: the guided samples' minority score goes
    # up and their data log-density down, monotonically in the scale.
    sde, gm = VPSDE(), imbalanced_mixture()
    score = gm.score_fn(sde)
    means_ms, means_logp = [], []
    for scale in (0.0, 0.5, 1.0):
        guide = SelfMinorityGuidance(score, sde, scale, p_ratio=perturbation_time(sde, alpha_bar=0.3), inter_rate=1,
                                     generator=gen(23))
        x = pc_sample(score, sde, (1000, 2), predictor="ancestral", corrector=None, steps=50, guidance=[guide],
                      generator=gen(24), dtype=torch.float64)
        means_ms.append(float(minority_score(score, sde, x, generator=gen(25), batch_size=1000).mean()))
        means_logp.append(float(gm.log_prob(x).mean()))
    assert means_ms[0] < means_ms[1] < means_ms[2] and means_ms[2] > 1.2 * means_ms[0]
    assert means_logp[0] > means_logp[1] > means_logp[2]


# -- bad input ----------------------------------------------------------------------------------------
def test_bad_input_errors():
    sde, gm = VPSDE(), imbalanced_mixture()
    score = gm.score_fn(sde)
    five = MLPClassifier(2, out_dim=5)
    with pytest.raises(ValueError, match="has 5 outputs but num_levels=10"):
        MinorityGuidance(five, 9, 1.0, num_levels=10)
    with pytest.raises(ValueError, match="has 5 outputs but num_levels=10"):
        train_minority_classifier(five, score, sde, torch.randn(20, 2), num_levels=10)
    with pytest.raises(ValueError, match="target level 5 is out of range: valid levels are 0..4"):
        MinorityGuidance(five, 5, 1.0)
    with pytest.raises(ValueError, match="target level -1 is out of range"):
        MinorityGuidance(five, -1, 1.0)
    with pytest.raises(ValueError, match="scale must be a finite number >= 0"):
        MinorityGuidance(five, 4, -0.5)
    with pytest.raises(ValueError, match="pass num_levels"):
        MinorityGuidance(lambda x, t: x, 1)
    with pytest.raises(ValueError, match="the classifier returned 5 logits but 10 levels were expected"):
        MinorityGuidance(lambda x, t: five(x, t), 9, num_levels=10).log_prob_grad(torch.randn(3, 2), 0.5)
    with pytest.raises(ValueError, match="scale must be a finite number >= 0"):
        SelfMinorityGuidance(score, sde, -1.0)
    with pytest.raises(ValueError, match="p_ratio"):
        SelfMinorityGuidance(score, sde, 1.0, p_ratio=0.0)
    with pytest.raises(ValueError, match="inter_rate must be a positive integer"):
        SelfMinorityGuidance(score, sde, 1.0, inter_rate=0)
    x = torch.randn(8, 2)
    with pytest.raises(ValueError, match="give the perturbation level once"):
        minority_score(score, sde, x, t=0.5, alpha_bar=0.1)
    with pytest.raises(ValueError, match=r"alpha_bar must lie in \(0, 1\)"):
        minority_score(score, sde, x, alpha_bar=1.5)
    with pytest.raises(ValueError, match="unknown distance 'lpips'"):
        minority_score(score, sde, x, distance="lpips")
    with pytest.raises(ValueError, match=r"the distance returned shape \(8, 2\)"):
        minority_score(score, sde, x, distance=lambda a, b: a - b)
    with pytest.raises(ValueError, match="n .* must be a positive integer"):
        minority_score(score, sde, x, n=0)
    with pytest.raises(ValueError, match="8 scores cannot fill 10 equal-mass levels"):
        quantize_levels(torch.rand(8), 10)
    with pytest.raises(ValueError, match="num_levels must be an integer >= 2"):
        quantize_levels(torch.rand(8), 1)
