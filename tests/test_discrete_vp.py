"""DiscreteVPSDE: a VP SDE read from a diffusers scheduler's table, exact at its steps, against the
scheduler itself and the closed forms of the exact mixture score."""

import pytest
import torch
from diffusers import DDPMScheduler

from samplers import dpm_solver_2m, likelihood, ode_sample, pc_sample, solver_time_grid
from scorekit import VESDE, VPSDE, DiscreteVPSDE, SubVPSDE, make_sde
from scorekit.data import imbalanced_mixture
from scorekit.metrics import sliced_wasserstein

SCHEDULES = {
    "linear": dict(beta_schedule="linear"),
    "scaled_linear": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    "cosine": dict(beta_schedule="squaredcos_cap_v2"),
    "zero_snr": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True),
}
MIX = imbalanced_mixture()


def table(name):
    return DDPMScheduler(num_train_timesteps=1000, **SCHEDULES[name]).alphas_cumprod.double()


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_exact_at_the_scheduler_timesteps(name):
    abar = table(name)
    sde = DiscreteVPSDE(abar)
    t = (torch.arange(1000, dtype=torch.float64) + 1) / 1000
    alpha, sigma = sde.marginal_coeffs(t)
    torch.testing.assert_close(alpha**2, abar, rtol=0, atol=1e-15)
    torch.testing.assert_close(sigma**2, 1 - abar, rtol=0, atol=1e-15)
    torch.testing.assert_close(sde.timestep(t), torch.arange(1000, dtype=torch.float64), rtol=0, atol=1e-9)
    # the data at t = 0; the table's own betas are the DDPM discretization (to the float32 rounding of
    # diffusers' cumulative product)
    assert sde.marginal_coeffs(torch.zeros(1, dtype=torch.float64)) == (1.0, 0.0)
    betas = DDPMScheduler(num_train_timesteps=1000, **SCHEDULES[name]).betas.double()
    torch.testing.assert_close(sde.discrete_betas(), betas, rtol=0, atol=3e-7)


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_log_snr_is_monotone_with_a_closed_form_inverse(name):
    sde = DiscreteVPSDE(table(name))
    t = torch.linspace(0, 1, 20001, dtype=torch.float64)
    lam = sde.log_snr(t)
    alpha, sigma = sde.marginal_coeffs(t)
    finite = torch.isfinite(lam)
    torch.testing.assert_close(lam[finite], (2 * alpha.log() - 2 * sigma.log())[finite])
    assert bool((lam.diff() < 0).all())
    torch.testing.assert_close(sde.t_from_log_snr(lam[finite]), t[finite], rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["linear", "cosine", "zero_snr"])
def test_beta_is_the_rate_of_the_marginals(name):
    """The forward SDE is the VP SDE of alpha(t): beta = -d log alpha^2 / dt, sigma^2 = 1 - alpha^2."""
    sde = DiscreteVPSDE(table(name))
    t = torch.rand(200, generator=gen(1), dtype=torch.float64) * 0.998 + 0.001
    h = 1e-7
    log_a2 = lambda s: 2 * sde.marginal_coeffs(s)[0].log()  # noqa: E731
    fd = -(log_a2(t + h) - log_a2(t - h)) / (2 * h)
    torch.testing.assert_close(sde.beta(t), fd, rtol=1e-5, atol=0)
    alpha, sigma = sde.marginal_coeffs(t)
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones_like(t))


def test_zero_terminal_snr_prior_is_exactly_standard_normal():
    sde = DiscreteVPSDE(table("zero_snr"))
    assert float(sde.alphas_cumprod[-1]) == 0.0
    alpha, sigma = sde.marginal_coeffs(torch.ones(1, dtype=torch.float64))
    assert float(alpha) == 0.0 and float(sigma) == 1.0 and sde.prior_std == 1.0
    assert float(sde.log_snr(torch.ones(1))) == float("-inf")
    assert float(sde.t_from_log_snr(torch.tensor([float("-inf")]))) == 1.0


def test_discretize_is_the_ddpm_step_of_the_table():
    abar = table("scaled_linear")
    sde = DiscreteVPSDE(abar)
    x = torch.randn(4, 3, dtype=torch.float64, generator=gen(2))
    k = torch.tensor([0, 10, 500, 999])
    t = (k + 1).double() / 1000
    f, G = sde.discretize(x, t)
    beta = 1 - abar[k] / torch.cat([torch.ones(1, dtype=torch.float64), abar])[k]
    torch.testing.assert_close(f, (torch.sqrt(1 - beta)[:, None] - 1) * x)
    torch.testing.assert_close(G, beta.sqrt())
    # a step between neighbouring timesteps is the same step
    f2, G2 = sde.discretize_step(x, t, k.double() / 1000)
    torch.testing.assert_close(f2, f)
    torch.testing.assert_close(G2, G)


def test_config_round_trip_and_bad_tables():
    sde = DiscreteVPSDE(table("cosine"))
    again = make_sde(**sde.config())
    assert again == sde and hash(again) == hash(sde)
    assert again != DiscreteVPSDE(table("linear"))
    with pytest.raises(ValueError, match="must decrease strictly"):
        DiscreteVPSDE([0.5, 0.7])
    with pytest.raises(ValueError, match="must decrease strictly"):
        DiscreteVPSDE([1.0, 0.5])
    with pytest.raises(ValueError, match="at least 2 finite"):
        DiscreteVPSDE([0.5])


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_samplers_draw_the_mixture_on_the_table(name):
    """PC, the probability-flow ODE and DPM-Solver++(2M) run unchanged on the table's SDE."""
    sde = DiscreteVPSDE(table(name))
    score = MIX.score_fn(sde)
    ref = MIX.sample(3000, gen(123))
    eps = sde.sampling_eps
    x_pc = pc_sample(score, sde, (3000, 2), steps=300, eps=eps, generator=gen(), dtype=torch.float64)
    assert sliced_wasserstein(x_pc, ref) < 0.1
    x_T = sde.prior_sampling((3000, 2), generator=gen(4), dtype=torch.float64)
    x_ode = ode_sample(score, sde, None, x_T=x_T, eps=eps, rtol=1e-6, atol=1e-6)
    assert sliced_wasserstein(x_ode, ref) < 0.1
    x_dpm = dpm_solver_2m(score, sde, x_T, solver_time_grid(sde, 50, eps, "logsnr"))
    assert (x_dpm - x_ode).abs().mean() < 0.02


def test_linear_table_is_close_to_the_continuous_vp():
    """DDPM's linear betas are the N-step discretization of VPSDE(0.1, 20): the marginals agree to O(1/N)."""
    sde, vp = DiscreteVPSDE(table("linear")), VPSDE()
    t = torch.linspace(0.01, 1, 100, dtype=torch.float64)
    assert (sde.marginal_coeffs(t)[1] - vp.marginal_coeffs(t)[1]).abs().max() < 5e-3


def test_likelihood_of_a_gaussian_on_the_table():
    """For data N(0, s^2 I) the marginals are Gaussian, so the exact log-density is known in closed form."""
    sde = DiscreteVPSDE(table("linear"))
    s2 = 0.25

    def score(x, t):
        alpha, sigma = sde.marginal_coeffs(t)
        return -x / (alpha**2 * s2 + sigma**2)[:, None]

    x = torch.randn(64, 2, generator=gen(5), dtype=torch.float64) * s2**0.5
    eps = sde.sampling_eps
    out = likelihood(score, sde, x, estimator="exact", eps=eps, rtol=1e-7, atol=1e-7)
    alpha, sigma = sde.marginal_coeffs(torch.tensor([eps], dtype=torch.float64))
    var = alpha**2 * s2 + sigma**2
    exact = -0.5 * (x**2).sum(1) / var - torch.log(2 * torch.pi * var)
    torch.testing.assert_close(out.logp, exact, rtol=0, atol=2e-3)


def test_ancestral_pc_from_a_zero_terminal_snr_prior():
    """From alpha(T) = 0 the ancestral step's score form is 0 / 0; its x0 form draws the mixture, and
    Euler-Maruyama (whose reverse drift is infinite at T) says so instead of returning NaN."""
    sde = DiscreteVPSDE(table("zero_snr"))
    score = MIX.score_fn(sde)
    score.denoise = lambda x, t: MIX.posterior_mean(x, t, sde)
    x = torch.randn(4, 2, dtype=torch.float64, generator=gen(5))
    from samplers.predictors import ancestral

    _, mean = ancestral(score, sde, x, 1.0, 0.999, gen())
    alpha_next = sde.marginal_coeffs(torch.tensor([0.999], dtype=torch.float64))[0]
    torch.testing.assert_close(mean, alpha_next * MIX.means.T.double().mv(MIX.weights.double()).expand(4, 2))
    x_pc = pc_sample(score, sde, (3000, 2), predictor="ancestral", steps=300, eps=sde.sampling_eps,
                     generator=gen(), dtype=torch.float64)
    assert sliced_wasserstein(x_pc, MIX.sample(3000, gen(123))) < 0.1
    with pytest.raises(ValueError, match="euler_maruyama cannot step from T on a zero-terminal-SNR"):
        pc_sample(score, sde, (8, 2), predictor="euler_maruyama", steps=10, generator=gen())


# the times a sampler passes: both ends, the knots t = j / N and their float round-off, points between knots
HOST_TIMES = [0.0, 1e-4, 1e-3, 0.0015, 0.3, 0.5 + 1e-13, 0.7, 0.999, 0.9995, 1.0]


@pytest.mark.parametrize("sde", [VPSDE(), SubVPSDE(), VESDE(), *(DiscreteVPSDE(table(n)) for n in SCHEDULES)],
                         ids=["vp", "subvp", "ve", *SCHEDULES])
def test_host_times_give_the_coefficients_of_tensor_times(sde):
    """The per-step coefficients at a host time (Python floats, no tensor op) are those of the float64 tensor
    path, which per-sample times take: DiscreteVPSDE's segment interpolation is written twice."""
    t = torch.tensor(HOST_TIMES, dtype=torch.float64)
    s = torch.cat([t.new_zeros(1), t[:-1]])  # each step's target, the data first
    pairs = [(sde.marginal_coeffs, (t,))]
    if hasattr(sde, "step_variance"):
        pairs.append((sde.step_variance, (t, s)))
    if hasattr(sde, "discrete_beta"):
        pairs.append((sde.discrete_beta, (t,)))
    if isinstance(sde, DiscreteVPSDE):
        pairs += [(sde.timestep, (t,)), (sde._interp, (t,))]
    for method, args in pairs:
        ref = method(*args)
        ref = ref if isinstance(ref, tuple) else (ref,)
        for i in range(len(t)):
            host = method(*(float(a[i]) for a in args))
            host = host if isinstance(host, tuple) else (host,)
            assert all(isinstance(h, float) for h in host), method.__name__
            torch.testing.assert_close(torch.tensor(host, dtype=torch.float64), torch.stack(ref)[:, i],
                                       rtol=1e-12, atol=1e-15, msg=f"{method.__name__} at t = {HOST_TIMES[i]}")


class TensorTimes:
    """A score model behind the protocol's ``(batch,)`` tensor times only (no ``host_time``), as guidance
    plug-ins wrap it: the samplers then take the tensor path."""

    def __init__(self, model):
        self.model, self.sde = model, model.sde

    def __call__(self, x, t):
        assert torch.is_tensor(t) and t.shape == (x.shape[0],)
        return self.model(x, t)

    def denoise(self, x, t):
        assert torch.is_tensor(t) and t.shape == (x.shape[0],)
        return self.model.denoise(x, t)


@pytest.mark.parametrize("sde", [DiscreteVPSDE(table("linear")), DiscreteVPSDE(table("zero_snr")), VPSDE(), VESDE()],
                         ids=["linear", "zero_snr", "vp", "ve"])
def test_host_times_sample_what_tensor_times_sample(sde):
    """A model evaluated at the samplers' host times (its coefficients host numbers, computed once per step)
    draws the samples it draws at per-sample tensor times, for each sampler's update."""
    from scorekit import ScoreModel
    from scorekit.nets import MLP

    torch.manual_seed(0)
    # at a zero-terminal-SNR T only a v (or x0) model says x0_hat
    zero_snr = getattr(sde, "zero_terminal_snr", False)
    model = ScoreModel(MLP(2, hidden=32, depth=2), sde, "v" if zero_snr else "eps").double().eval()
    assert model.host_time and not getattr(TensorTimes(model), "host_time", False)
    eps = sde.sampling_eps
    runs = {
        "ancestral": lambda f: pc_sample(f, sde, (64, 2), predictor="ancestral", corrector=None, steps=20, eps=eps,
                                         generator=gen(), dtype=torch.float64),
        "reverse diffusion + langevin": lambda f: pc_sample(f, sde, (64, 2), steps=20, eps=eps, generator=gen(),
                                                            dtype=torch.float64),
        "annealed langevin": lambda f: pc_sample(f, sde, (64, 2), predictor=None, corrector="annealed_langevin",
                                                 steps=20, eps=eps, generator=gen(), dtype=torch.float64),
        "dpm_solver_2m": lambda f: ode_sample(f, sde, (64, 2), method="dpm_solver_2m", steps=20, eps=eps,
                                              generator=gen(), dtype=torch.float64),
    }
    if zero_snr:  # the ancestral step and DPM-Solver start at T (the others' drift is infinite there)
        runs = {k: runs[k] for k in ("ancestral", "dpm_solver_2m")}
    for sampler, run in runs.items():
        torch.testing.assert_close(run(model), run(TensorTimes(model)), rtol=1e-9, atol=1e-9, msg=sampler)


@pytest.mark.parametrize("grid", ["karras", "logsnr"])
def test_dpm_solver_from_a_zero_terminal_snr_prior(grid):
    """The log-SNR and Karras grids start at T, where the noise level is infinite: the first step goes to the
    table's last finite level. Exact mixture denoiser, same prior draw: the samples match those of the same table
    with diffusers' stand-in for zero (alphas_cumprod[-1] = 2**-24), and the grid keeps its 20 steps."""
    mix = imbalanced_mixture()
    abar = table("zero_snr")
    near = abar.clone()
    near[-1] = 2.0**-24
    samples = []
    for sde in (DiscreteVPSDE(abar), DiscreteVPSDE(near)):
        def score_fn(x, t, sde=sde):
            return mix.score(x, t, sde)
        score_fn.denoise = lambda x, t, sde=sde: mix.posterior_mean(x, t, sde)
        ts = solver_time_grid(sde, 20, sde.sampling_eps, grid)
        assert ts.shape == (21,) and ts[0] == 1.0 and torch.isfinite(ts).all()
        x = sde.prior_sampling((2000, 2), generator=gen(), dtype=torch.float64)
        samples.append(dpm_solver_2m(score_fn, sde, x, ts))
    assert torch.isfinite(samples[0]).all()
    assert (samples[0] - samples[1]).abs().mean() < 1e-2 * samples[1].abs().mean()


@pytest.mark.parametrize("t", [1.5, -0.1, float("nan")])
def test_a_host_time_outside_the_sde_range_is_refused_as_a_tensor_time_is(t):
    from scorekit import ScoreModel
    from scorekit.nets import MLP

    model = ScoreModel(MLP(2, hidden=8, depth=1), VPSDE(), "eps")
    x = torch.zeros(3, 2)
    for time in (t, torch.full((3,), t)):
        with pytest.raises(ValueError, match=r"t must lie in \[0, 1.0\]"):
            model(x, time)
