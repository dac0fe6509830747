"""Log-likelihoods through the probability-flow ODE (Song et al. 2021, App. D.2) against closed forms."""

import math

import pytest
import torch

from samplers import bits_per_dim, likelihood
from scorekit import VESDE, VPSDE, SubVPSDE
from scorekit.data import GaussianMixture, imbalanced_mixture

MIX = imbalanced_mixture()


def data(n, seed=0):
    return MIX.sample(n, torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("sde", [VPSDE(), SubVPSDE()], ids=["vp", "subvp"])
def test_exact_trace_matches_the_mixture_density(sde):
    x = data(300)
    res = likelihood(MIX.score_fn(sde), sde, x, estimator="exact")
    assert (res.logp - MIX.log_prob(x)).abs().mean().item() < 0.02
    assert torch.allclose(res.bpd, -res.logp / (2 * math.log(2)))
    assert res.nfe > 10 and res.z.shape == x.shape


def test_exact_trace_on_ve_up_to_the_prior_mismatch():
    """With sigma_max = 50 the VE marginal p_T still remembers the data (means at distance ~2 shift
    log p_T by ~0.04 nats), which the N(0, sigma_max^2) prior ignores. Swapping the prior for the exact
    p_T isolates the ODE and the trace: log p_eps(x) = log p_T(z) + int div v dt."""
    sde = VESDE()
    x = data(300, seed=1)
    res = likelihood(MIX.score_fn(sde), sde, x, estimator="exact")
    exact_prior = res.logp - sde.prior_logp(res.z) + MIX.log_prob(res.z, 1.0, sde)
    assert (exact_prior - MIX.log_prob(x, 1e-5, sde)).abs().mean().item() < 2e-3
    assert (res.logp - MIX.log_prob(x)).abs().mean().item() < 0.03


@pytest.mark.parametrize("estimator", ["rademacher", "gaussian"])
def test_hutchinson_is_unbiased(estimator):
    """Many probes at one point: their mean agrees with the exact trace within its standard error. The
    point lies between the modes, where the score's Jacobian has large off-diagonal terms (for a
    2x2 symmetric Jacobian the Rademacher estimate varies only through them)."""
    sde = VPSDE()
    x = torch.tensor([[0.0, 0.5]], dtype=torch.float64).repeat(1000, 1)
    exact = likelihood(MIX.score_fn(sde), sde, x[:1], estimator="exact").logp
    res = likelihood(
        MIX.score_fn(sde), sde, x, estimator=estimator, generator=torch.Generator().manual_seed(0)
    )
    stderr = res.logp.std().item() / math.sqrt(len(x))
    assert res.logp.std().item() > 0.5  # one probe per sample: really a stochastic estimate
    assert abs(res.logp.mean().item() - exact.item()) < 3 * stderr + 1e-3


def test_bits_per_dim_matches_the_discrete_probability():
    """8-bit images in [-1, 1] under a Gaussian model: the dequantized ODE estimate (offset 7) equals
    -log2 P(k) / D with P(k) the model's mass on each quantization bin (bins are narrow against the
    std, so Jensen's gap is ~1e-5 nats)."""
    mean = torch.tensor([[0.1, -0.2, 0.3, 0.0]], dtype=torch.float64)
    std = 0.3
    gauss = GaussianMixture([1.0], mean, std)
    sde = VPSDE()

    def score(x, t):
        return gauss.score(x.reshape(len(x), 4), t, sde).reshape(x.shape)

    g = torch.Generator().manual_seed(3)
    k = torch.round((gauss.sample(64, g, dtype=torch.float64).clamp(-0.99, 0.99) + 1) / 2 * 255)
    images = (-1 + 2 * k / 255).reshape(64, 1, 2, 2)
    res = bits_per_dim(score, sde, images, estimator="exact", generator=g)
    normal = torch.distributions.Normal(mean[0], std)
    lo, hi = -1 + 2 * k / 256, -1 + 2 * (k + 1) / 256
    bpd_exact = -torch.log2(normal.cdf(hi) - normal.cdf(lo)).sum(-1) / 4
    assert res.offset == 7
    assert (res.bpd - bpd_exact).abs().mean().item() < 0.01
    res01 = bits_per_dim(score, sde, (images + 1) / 2, data_range=(0, 1), estimator="exact", generator=g)
    assert res01.offset == 8


def test_bad_input():
    sde = VPSDE()
    with pytest.raises(ValueError, match=r"unknown estimator 'skilling'.*'rademacher', 'gaussian', 'exact'"):
        likelihood(MIX.score_fn(sde), sde, data(4), estimator="skilling")
    with pytest.raises(ValueError, match="needs an adaptive ODE method"):
        likelihood(MIX.score_fn(sde), sde, data(4), method="rk4")
    with pytest.raises(ValueError, match=r"images must lie in data_range \(-1.0, 1.0\)"):
        bits_per_dim(MIX.score_fn(sde), sde, 3 * data(4))
