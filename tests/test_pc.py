"""Predictor-corrector sampling (Song et al. 2021, Alg. 1-5) against the exact 2-D mixture."""

import math

import pytest
import torch

from guidance.base import Guidance
from samplers import PREDICTORS, count_nfe, pc_sample
from scorekit import VESDE, VPSDE, ScoreModel, SubVPSDE
from scorekit.data import imbalanced_mixture
from scorekit.metrics import sliced_wasserstein
from scorekit.nets import MLP

MIX = imbalanced_mixture()
N_SAMPLES = 4000  # rare-mode share std error sqrt(0.05 * 0.95 / 4000) = 0.0034, well below the 0.02 tolerance


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def check_matches_mixture(x):
    ref = MIX.sample(N_SAMPLES, gen(123))
    assert sliced_wasserstein(x, ref) < 0.1
    rare_share = (MIX.classify(x) == 2).double().mean().item()
    assert abs(rare_share - 0.05) < 0.02


@pytest.mark.parametrize("sde, eps", [(VPSDE(), 1e-3), (VESDE(), 1e-5)], ids=["vp", "ve"])
def test_pc_sampler_draws_the_mixture(sde, eps):
    # float32 is plenty for a statistical check and halves the cost of the exact score
    x = pc_sample(MIX.score_fn(sde), sde, (N_SAMPLES, 2), steps=500, eps=eps, generator=gen())
    check_matches_mixture(x)


@pytest.mark.parametrize("predictor", ["ancestral", "euler_maruyama"])
def test_fewer_steps_than_N_still_sample_the_mixture(predictor):
    # The steps are derived from (t, t_next), so 100 steps discretize the same process as N = 1000.
    sde = VPSDE()
    x = pc_sample(
        MIX.score_fn(sde),
        sde,
        (N_SAMPLES, 2),
        predictor=predictor,
        corrector=None,
        steps=100,
        generator=gen(1),
    )
    check_matches_mixture(x)


@pytest.mark.parametrize("sde", [VPSDE(), VESDE(), SubVPSDE()], ids=["vp", "ve", "subvp"])
def test_step_discretization_keeps_the_marginals(sde):
    """x_t = x_s + f + G z maps N(alpha_s mu, sigma_s^2) to N(alpha_t mu, sigma_t^2) exactly (VP, VE) for
    any s < t, and to first order in t - s (sub-VP's Euler step)."""
    t, s = torch.tensor([0.7, 0.31], dtype=torch.float64), torch.tensor([0.5, 0.3], dtype=torch.float64)
    x = torch.ones(2, 1, dtype=torch.float64)
    f, G = sde.discretize_step(x, t, s)
    scale = 1 + f[:, 0]  # the step is affine: x_t = (1 + f/x) x_s + G z
    (a_s, s_s), (a_t, s_t) = sde.marginal_coeffs(s), sde.marginal_coeffs(t)
    mean_err = (scale * a_s - a_t).abs() / a_t
    var_err = (scale**2 * s_s**2 + G**2 - s_t**2).abs() / s_t**2
    if isinstance(sde, SubVPSDE):
        assert mean_err[0] > 10 * mean_err[1]  # first order: the error shrinks with the step
    else:
        assert mean_err.max() < 1e-12 and var_err.max() < 1e-12


def test_ve_last_step_reaches_the_data():
    sde = VESDE()
    x = torch.zeros(1, 2, dtype=torch.float64)
    _, G = sde.discretize_step(x, 1e-5, 0.0)  # SMLD's sigma_{-1} = 0
    assert torch.allclose(G, sde.sigma(torch.tensor([1e-5], dtype=torch.float64)))


def test_denoised_last_step_is_the_predictor_mean():
    """One reverse-diffusion step from T to 0 on VP: mean (2 - sqrt(1 - beta)) x + beta s with
    1 - beta = exp(-B(T)); without denoising the noise sqrt(beta) z is added."""
    sde = VPSDE()
    score = MIX.score_fn(sde)
    x_T = torch.randn(5, 2, generator=gen(3), dtype=torch.float64)
    beta = 1 - math.exp(-(sde.beta_min + 0.5 * (sde.beta_max - sde.beta_min)))
    T = torch.ones(5, dtype=torch.float64)
    expected = (2 - math.sqrt(1 - beta)) * x_T + beta * score(x_T, T)
    kwargs = dict(corrector=None, steps=1, x_T=x_T)
    mean = pc_sample(score, sde, None, denoise=True, generator=gen(), **kwargs)
    noisy = pc_sample(score, sde, None, denoise=False, generator=gen(), **kwargs)
    z = torch.randn(5, 2, generator=gen(), dtype=torch.float64)
    assert torch.allclose(mean, expected, atol=1e-12)
    assert torch.allclose(noisy, expected + math.sqrt(beta) * z, atol=1e-12)


def test_same_generator_gives_identical_samples():
    sde = VPSDE()
    run = lambda seed: pc_sample(MIX.score_fn(sde), sde, (64, 2), steps=20, generator=gen(seed))  # noqa: E731
    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(7), run(8))


def test_nfe_counts_predictor_and_corrector_evaluations():
    sde = VPSDE()
    score = count_nfe(MIX.score_fn(sde))
    pc_sample(score, sde, (10, 2), steps=30, n_corrector_steps=2, generator=gen())
    assert score.nfe == 30 * (1 + 2) and score.samples == 10 * 90


class ShiftScore(Guidance):
    def __init__(self, shift):
        self.shift = shift

    def guide_score(self, score_fn):
        return lambda x, t: score_fn(x, t) + self.shift


class RecordSteps(Guidance):
    """Calls the step on a batch repeated twice (as SVDD's candidates) and keeps the first copy."""

    def __init__(self):
        self.times = []

    def guide_step(self, step_fn, score_fn, sde):
        def step(x, t, t_next):
            self.times.append((float(t), float(t_next)))
            return step_fn(torch.cat([x, x]), t, t_next)[: len(x)]

        return step


def test_score_guidance_is_applied_to_every_evaluation():
    sde = VPSDE()
    score = MIX.score_fn(sde)
    shift = torch.tensor([0.3, -0.2], dtype=torch.float64)
    guided = pc_sample(
        score, sde, (16, 2), steps=25, guidance=[ShiftScore(shift)], generator=gen(), dtype=torch.float64
    )
    by_hand = pc_sample(
        lambda x, t: score(x, t) + shift, sde, (16, 2), steps=25, generator=gen(), dtype=torch.float64
    )
    plain = pc_sample(score, sde, (16, 2), steps=25, generator=gen(), dtype=torch.float64)
    assert torch.equal(guided, by_hand)
    assert not torch.allclose(guided, plain)


def test_step_guidance_wraps_each_reverse_step():
    sde, steps, eps = VPSDE(), 12, 1e-3
    plugin = RecordSteps()
    out = pc_sample(
        MIX.score_fn(sde),
        sde,
        (8, 2),
        steps=steps,
        eps=eps,
        guidance=[plugin],
        generator=gen(),
        dtype=torch.float64,
    )
    grid = torch.linspace(1.0, eps, steps, dtype=torch.float64).tolist()
    assert [t for t, _ in plugin.times] == pytest.approx(grid)
    assert [s for _, s in plugin.times] == pytest.approx(grid[1:] + [0.0])
    assert out.shape == (8, 2) and torch.isfinite(out).all()


def test_progress_bar(capsys):
    sde = VPSDE()
    pc_sample(MIX.score_fn(sde), sde, (4, 2), steps=5, progress=True, generator=gen())
    assert "pc_sample" in capsys.readouterr().err


# -- bad input -------------------------------------------------------------------------------------
def test_unknown_predictor_and_corrector_list_the_valid_names():
    sde = VPSDE()
    with pytest.raises(
        ValueError, match=r"unknown predictor 'heun'.*'ancestral', 'euler_maruyama', 'reverse_diffusion'"
    ):
        pc_sample(MIX.score_fn(sde), sde, (4, 2), predictor="heun")
    with pytest.raises(ValueError, match=r"unknown corrector 'hmc'.*'annealed_langevin', 'langevin'"):
        pc_sample(MIX.score_fn(sde), sde, (4, 2), corrector="hmc")
    assert set(PREDICTORS) == {"euler_maruyama", "reverse_diffusion", "ancestral"}


def test_ancestral_needs_vp_or_ve():
    sde = SubVPSDE()
    with pytest.raises(ValueError, match="ancestral predictor is defined for VPSDE.*not SubVPSDE"):
        pc_sample(MIX.score_fn(sde), sde, (4, 2), predictor="ancestral", steps=3)


@pytest.mark.parametrize("steps", [0, -3, 2.5])
def test_steps_must_be_positive(steps):
    sde = VPSDE()
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        pc_sample(MIX.score_fn(sde), sde, (4, 2), steps=steps)


def test_shape_mismatches_are_reported():
    sde = VPSDE()
    with pytest.raises(ValueError, match=r"x_T has shape \(3, 2\) but shape=\(4, 2\)"):
        pc_sample(MIX.score_fn(sde), sde, (4, 2), x_T=torch.zeros(3, 2))
    model = ScoreModel(MLP((2,), hidden=16, depth=1), sde)
    with pytest.raises(
        ValueError, match=r"shape \(4, 3\) do not fit the score model, which expects \(B, 2\)"
    ):
        pc_sample(model, sde, (4, 3))
    with pytest.raises(ValueError, match=r"returned shape \(4, 1\) for x of shape \(4, 2\)"):
        pc_sample(lambda x, t: x[:, :1], sde, (4, 2), steps=2)


def test_nan_score_stops_with_the_step_and_time():
    sde = VPSDE()

    def bad_score(x, t):
        s = MIX.score(x, t, sde)
        return s * float("nan") if float(t[0]) < 0.6 else s

    # grid linspace(1, 1e-3, 5): the third step is the first below 0.6
    with pytest.raises(FloatingPointError, match=r"not finite.*step 3 of 5, t = 0\.5005"):
        pc_sample(bad_score, sde, (4, 2), steps=5, eps=1e-3, corrector=None, generator=gen())


def test_langevin_with_a_vanishing_score_stays_put():
    # A zero-initialised output layer gives s = 0, where the SNR step rule (Alg. 4/5) divides by ||s||.
    from samplers import CORRECTORS

    sde, x = VPSDE(), torch.randn(8, 2, generator=gen())
    out, mean = CORRECTORS["langevin"](lambda x, t: torch.zeros_like(x), sde, x, 0.5, snr=0.16, generator=gen())
    assert torch.equal(out, x) and torch.equal(mean, x)
