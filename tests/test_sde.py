"""SDEs against their closed forms (Song et al. 2021, eqs. 9-11, Appendix B) and the DDPM/SMLD peers."""

import math

import pytest
import torch

from scorekit import VESDE, VPSDE, SubVPSDE, make_sde

SDES = [VPSDE(), SubVPSDE(), VESDE()]
ids = ["vp", "subvp", "ve"]
t64 = torch.linspace(0.01, 1.0, 50, dtype=torch.float64)


def paper_table(sde, t):
    """Marginal mean coefficient and std written out as in the paper's table."""
    if isinstance(sde, VESDE):
        return torch.ones_like(t), sde.sigma_min * (sde.sigma_max / sde.sigma_min) ** t
    b0, b1 = sde.beta_min, sde.beta_max
    B = b0 * t + 0.5 * t**2 * (b1 - b0)
    mean = torch.exp(-0.5 * B)
    std = torch.sqrt(1 - torch.exp(-B)) if isinstance(sde, VPSDE) else 1 - torch.exp(-B)
    return mean, std


@pytest.mark.parametrize("sde", SDES, ids=ids)
def test_marginals_match_the_paper_table(sde):
    x0 = torch.randn(50, 3, dtype=torch.float64)
    mean, std = sde.marginal_prob(x0, t64)
    m_ref, s_ref = paper_table(sde, t64)
    torch.testing.assert_close(mean, m_ref[:, None] * x0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(std, s_ref, rtol=1e-10, atol=1e-12)
    assert mean.dtype == std.dtype == torch.float64


@pytest.mark.parametrize("sde", SDES, ids=ids)
def test_marginal_moments_solve_the_moment_odes(sde):
    """For linear drift f = a(t) x: d alpha/dt = a alpha and d sigma^2/dt = 2 a sigma^2 + g^2."""
    h = 1e-6
    t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    ones = torch.ones(len(t), 1, dtype=torch.float64)
    drift, g = sde.sde(ones, t)
    a = drift[:, 0]
    (ap, sp), (am, sm) = sde.marginal_coeffs(t + h), sde.marginal_coeffs(t - h)
    alpha, sigma = sde.marginal_coeffs(t)
    torch.testing.assert_close((ap - am) / (2 * h), a * alpha, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close((sp**2 - sm**2) / (2 * h), 2 * a * sigma**2 + g**2, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sde", SDES, ids=ids)
def test_euler_maruyama_simulation_reproduces_the_marginal(sde):
    """Simulate the forward SDE from a point mass; the empirical mean/std at t match marginal_prob."""
    g = torch.Generator().manual_seed(0)
    n, steps, t_end = 20000, 400, 0.6
    x0 = torch.full((n, 1), 0.7, dtype=torch.float64)
    x, dt = x0.clone(), t_end / steps
    for i in range(steps):
        t = torch.full((n,), i * dt, dtype=torch.float64)
        drift, diff = sde.sde(x, t)
        x = x + drift * dt + diff[:, None] * math.sqrt(dt) * torch.randn(x.shape, generator=g, dtype=torch.float64)
    mean, std = sde.marginal_prob(x0[:1], torch.tensor([t_end], dtype=torch.float64))
    se = float(std) / math.sqrt(n)
    assert abs(x.mean().item() - mean.item()) < 4 * se + 2e-3 * abs(mean.item())
    assert abs(x.std().item() / float(std) - 1) < 0.03


def test_vp_discretization_is_ddpm_and_matches_diffusers():
    from diffusers import DDPMScheduler

    sde = VPSDE(beta_min=0.1, beta_max=20, N=1000)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=0.1 / 1000, beta_end=20 / 1000)
    torch.testing.assert_close(sde.discrete_betas().float(), sched.betas.float(), rtol=1e-6, atol=1e-9)
    x = torch.randn(3, 2, dtype=torch.float64)
    i = torch.tensor([0, 500, 999])
    t = i.double() / (sde.N - 1)
    f, G = sde.discretize(x, t)
    beta = sched.betas.double()[i]
    torch.testing.assert_close(G, beta.sqrt())
    torch.testing.assert_close(f, (1 - beta).sqrt()[:, None] * x - x)


def test_ve_discretization_is_smld():
    sde = VESDE(sigma_min=0.01, sigma_max=50, N=10)
    sig = torch.exp(torch.linspace(math.log(0.01), math.log(50), 10, dtype=torch.float64))
    x = torch.zeros(10, 1, dtype=torch.float64)
    t = torch.arange(10, dtype=torch.float64) / 9
    f, G = sde.discretize(x, t)
    prev = torch.cat([torch.zeros(1, dtype=torch.float64), sig[:-1]])
    torch.testing.assert_close(G**2, sig**2 - prev**2)
    assert (f == 0).all()


def test_subvp_discretization_is_euler():
    sde = SubVPSDE(N=100)
    x = torch.randn(4, 2, dtype=torch.float64)
    t = torch.rand(4, dtype=torch.float64)
    f, G = sde.discretize(x, t)
    drift, g = sde.sde(x, t)
    torch.testing.assert_close(f, drift / 100)
    torch.testing.assert_close(G, g / 10)


@pytest.mark.parametrize("sde", SDES, ids=ids)
def test_prior(sde):
    g = torch.Generator().manual_seed(1)
    z = sde.prior_sampling((20000, 3), generator=g, dtype=torch.float64)
    assert z.dtype == torch.float64
    assert abs(z.std().item() / sde.prior_std - 1) < 0.02
    ref = torch.distributions.Normal(0.0, sde.prior_std).log_prob(z[:5]).sum(-1)
    torch.testing.assert_close(sde.prior_logp(z[:5]), ref)
    # the prior is (close to) the marginal at T
    std_T = sde.marginal_coeffs(torch.tensor(1.0, dtype=torch.float64))[1]
    assert abs(std_T.item() / sde.prior_std - 1) < 1e-3


@pytest.mark.parametrize("sde", SDES, ids=ids)
def test_log_snr_inverse(sde):
    lam = sde.log_snr(t64)
    assert (lam[1:] < lam[:-1]).all()
    torch.testing.assert_close(sde.t_from_log_snr(lam), t64, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("sde", SDES, ids=ids)
@pytest.mark.parametrize("probability_flow", [False, True])
def test_reverse(sde, probability_flow):
    score = lambda x, t: -x  # noqa: E731
    rev = sde.reverse(score, probability_flow=probability_flow)
    x = torch.randn(4, 2, dtype=torch.float64)
    t = torch.rand(4, dtype=torch.float64)
    drift, g = sde.sde(x, t)
    rdrift, rg = rev.sde(x, t)
    w = 0.5 if probability_flow else 1.0
    torch.testing.assert_close(rdrift, drift - w * g[:, None] ** 2 * score(x, t))
    torch.testing.assert_close(rg, torch.zeros_like(g) if probability_flow else g)
    f, G = sde.discretize(x, t)
    rf, rG = rev.discretize(x, t)
    torch.testing.assert_close(rf, f - w * G[:, None] ** 2 * score(x, t))


def test_float64_stays_float64_and_float32_stays_float32():
    sde = VPSDE()
    for dtype in (torch.float32, torch.float64):
        x = torch.randn(2, 3, dtype=dtype)
        mean, std = sde.marginal_prob(x, torch.tensor([0.1, 0.2]))
        drift, g = sde.sde(x, 0.5)
        assert mean.dtype == drift.dtype == dtype


def test_bad_inputs():
    sde = VPSDE()
    x = torch.randn(3, 2)
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1.0\]"):
        sde.marginal_prob(x, torch.tensor([0.1, 1.5, 0.2]))
    with pytest.raises(ValueError, match=r"t must lie in"):
        sde.sde(x, torch.tensor([0.1, float("nan"), 0.2]))
    with pytest.raises(ValueError, match=r"t has shape \(2,\) but x has batch size 3"):
        sde.sde(x, torch.tensor([0.1, 0.2]))
    with pytest.raises(ValueError, match=r"unknown SDE 'vpp'; valid names are \['subvp', 've', 'vp'\]"):
        make_sde("vpp")
    with pytest.raises(ValueError, match="beta_min < beta_max"):
        VPSDE(beta_min=5, beta_max=1)
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        VESDE(sigma_min=-1)
    with pytest.raises(ValueError, match="positive integer"):
        VPSDE(N=0)
    assert make_sde("VP", beta_max=10) == VPSDE(beta_max=10)


def test_discrete_step_index_survives_round_off():
    # t = k / (N - 1) from a linspace lands just below the grid point for 83 of the 1000 k in float32
    # (34 in float64); it is still step k.
    sde = VPSDE()
    k = torch.arange(1000)
    t = torch.linspace(0, 1, 1000)
    torch.testing.assert_close(sde.discrete_beta(t), sde.discrete_betas(dtype=torch.float32)[k])
