"""f-distill: the divergences' h(r), the gradient identity on a 1-D case known by quadrature, the DMD
special case, the ratio weighting, checkpoints, the CLI, and mode coverage on the 2-D mixture."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from scorekit import VPSDE, ScoreModel, tweedie_denoise
from scorekit.data import GaussianMixture, imbalanced_mixture
from scorekit.distill import (
    DIVERGENCES,
    DistillConfig,
    DistillTrainConfig,
    EmpiricalCritic,
    FDistill,
    OneStepGenerator,
    RatioNormalizer,
    alpha_divergence,
    density_ratio,
    discriminator_loss,
    distillation_direction,
    distillation_loss,
    f_weights,
    load_generator,
)
from scorekit.metrics import sliced_wasserstein
from scorekit.nets import MLP

# f of each divergence, D_f(p || q) = E_q f(p / q), from the paper's Table 1 (independent of the library's h).
F_TABLE = {
    "reverse_kl": lambda r: -torch.log(r),
    "softened_reverse_kl": lambda r: (r + 1) * torch.log((r + 1) / (2 * r)),
    "js": lambda r: r * torch.log(r) - (r + 1) * torch.log((r + 1) / 2),
    "hellinger": lambda r: 1 - torch.sqrt(r),
    "forward_kl": lambda r: r * torch.log(r),
    "jeffreys": lambda r: (r - 1) * torch.log(r),
    "pearson": lambda r: (r - 1) ** 2,
    "neyman": lambda r: (1 - r) ** 2 / r,
}


def second_derivative(f, r: torch.Tensor) -> torch.Tensor:
    r = r.clone().requires_grad_(True)
    (d1,) = torch.autograd.grad(f(r).sum(), r, create_graph=True)
    (d2,) = torch.autograd.grad(d1.sum(), r)
    return d2


R_GRID = torch.logspace(-2, 1.5, 41, dtype=torch.float64)


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_h_is_r2_f_second_derivative(name):
    assert set(DIVERGENCES) == set(F_TABLE), "every registered divergence needs its f in F_TABLE"
    expected = R_GRID**2 * second_derivative(F_TABLE[name], R_GRID)
    torch.testing.assert_close(DIVERGENCES[name](R_GRID), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("a", [-1.0, 0.5, 1.5, 2.0, 3.0])
def test_alpha_family_h(a):
    f = lambda r: (r**a - a * r - 1 + a) / (a * (a - 1))  # noqa: E731
    torch.testing.assert_close(alpha_divergence(a)(R_GRID), R_GRID**2 * second_derivative(f, R_GRID))


def test_alpha_family_limits_are_the_kls():
    torch.testing.assert_close(alpha_divergence(0)(R_GRID), DIVERGENCES["reverse_kl"](R_GRID))
    torch.testing.assert_close(alpha_divergence(1)(R_GRID), DIVERGENCES["forward_kl"](R_GRID))


# -- the gradient identity (the paper's eq. 7) on a 1-D case known by quadrature ------------------
P1 = GaussianMixture([0.5, 0.5], [[-2.0], [2.0]], 0.6)
QUADRATURE_GRADIENTS = {  # dD_f/dtheta at theta = 0.7: finite differences of D_f by quadrature on [-12, 12]
    "reverse_kl": -1.14420,
    "forward_kl": 0.86420,
    "js": -0.21152,
    "hellinger": -0.10197,
    "jeffreys": -0.28000,
    "softened_reverse_kl": -0.93268,
    "pearson": 417.208,
    "neyman": -36.307,
}
X_GRID = torch.linspace(-12, 12, 24001, dtype=torch.float64)[:, None]  # the quadrature domain of those numbers


def library_gradient(name: str, theta: float, t: float) -> float:
    """E_{x_t ~ q_t}[h(r) (s_q - s_p) dx_t/dtheta] from the library's pieces, by trapezoid quadrature over x_t.

    The library works in x0 space: its direction is h (x0_fake - x0_teacher) = h sigma^2 / alpha (s_q - s_p);
    dx_t/dtheta = alpha, so the f-divergence gradient is E[direction] alpha^2 / sigma^2.
    """
    sde = VPSDE()
    q = GaussianMixture([1.0], [[theta]], 0.9)
    tt = torch.full((len(X_GRID),), t, dtype=torch.float64)
    alpha, sigma = sde.marginal_coeffs(tt[:1])
    logit = P1.log_prob(X_GRID, tt, sde) - q.log_prob(X_GRID, tt, sde)
    weight = DIVERGENCES[name](density_ratio(logit, clip=None, logit_clamp=None))
    x0_teacher = tweedie_denoise(P1.score_fn(sde), sde, X_GRID, tt)
    x0_fake = tweedie_denoise(q.score_fn(sde), sde, X_GRID, tt)
    direction = distillation_direction(X_GRID, x0_teacher, x0_fake, weight, dmd_normalize=False)[:, 0]
    density = q.log_prob(X_GRID, tt, sde).exp()
    expectation = torch.trapezoid(density * direction, X_GRID[:, 0])
    return float(expectation * alpha**2 / sigma**2)


def quadrature_gradient(name: str, theta: float, t: float, h: float = 1e-5) -> float:
    """dD_f(p_t || q_t)/dtheta by central differences of D_f = int q_t f(p_t / q_t) (the paper's f, not h)."""
    sde = VPSDE()
    tt = torch.full((len(X_GRID),), t, dtype=torch.float64)

    def D(th):
        q = GaussianMixture([1.0], [[th]], 0.9)
        log_q = q.log_prob(X_GRID, tt, sde)
        r = torch.exp(P1.log_prob(X_GRID, tt, sde) - log_q)
        return torch.trapezoid(log_q.exp() * F_TABLE[name](r), X_GRID[:, 0])

    return float((D(theta + h) - D(theta - h)) / (2 * h))


@pytest.mark.parametrize("name", sorted(QUADRATURE_GRADIENTS))
def test_gradient_identity_matches_quadrature(name):
    # t = 1e-5: sigma^2 = 1e-6, so p_t, q_t differ from p, q by O(1e-6).
    # Neyman's D_f is infinite over the whole line here (q^2 / p grows like exp(0.15 x^2)); like the numbers above,
    # the integral is over [-12, 12].
    got = library_gradient(name, 0.7, 1e-5)
    assert got == pytest.approx(QUADRATURE_GRADIENTS[name], rel=2e-5, abs=2e-5)


@pytest.mark.parametrize("name", ["reverse_kl", "forward_kl", "js", "jeffreys"])
def test_gradient_identity_at_positive_time(name):
    # At t = 0.3 the x0-space direction carries sigma^2 / alpha = 0.8: the identity holds at every t.
    assert library_gradient(name, 0.7, 0.3) == pytest.approx(quadrature_gradient(name, 0.7, 0.3), rel=1e-6, abs=1e-8)


def test_reverse_and_forward_kl_pull_opposite_ways():
    # mode seeking vs mode covering in one number: RKL moves theta to the +2 mode, FKL back towards 0.
    assert library_gradient("reverse_kl", 0.7, 1e-5) < 0 < library_gradient("forward_kl", 0.7, 1e-5)


def test_distillation_loss_gradient_is_the_direction():
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    direction = torch.randn(5, 3, dtype=torch.float64)
    distillation_loss(x, direction).backward()
    torch.testing.assert_close(x.grad, direction / x.numel())


def test_discriminator_loss_optimum_is_the_log_ratio():
    # For p = N(0, 1), q = N(1, 1): log p/q = 0.5 - x, linear. Fit logit = a + b x on samples.
    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(40000, generator=g, dtype=torch.float64), 1 + torch.randn(40000, generator=g, dtype=torch.float64)
    ab = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([ab], max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = discriminator_loss(ab[0] + ab[1] * real, ab[0] + ab[1] * fake)
        loss.backward()
        return loss

    opt.step(closure)
    assert ab[0].item() == pytest.approx(0.5, abs=0.03) and ab[1].item() == pytest.approx(-1.0, abs=0.03)


# -- ratio weighting -------------------------------------------------------------------------------
def test_density_ratio_clamps_and_clips():
    logit = torch.tensor([-50.0, -1.0, 0.0, 2.0, 50.0, float("inf")])
    r = density_ratio(logit)
    torch.testing.assert_close(r, torch.tensor([0.1, math.exp(-1), 1.0, math.exp(2), 20.0, 20.0]))


def test_nan_logits_raise():
    with pytest.raises(FloatingPointError, match="NaN logits for 1 of 3"):
        density_ratio(torch.tensor([0.0, float("nan"), 1.0]))


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_constant_ratio_gives_unit_weights(name):
    t = torch.rand(32, generator=torch.Generator().manual_seed(0))
    w = f_weights(torch.full((32,), 1.3), t, DIVERGENCES[name], normalizer=RatioNormalizer(10, 0.0, 1.0))
    torch.testing.assert_close(w, torch.ones(32))


def test_two_stage_normalisation_by_hand():
    t = torch.tensor([0.05, 0.08, 0.55, 0.95, 0.96, 0.99], dtype=torch.float64)
    r = torch.tensor([1.0, 3.0, 4.0, 0.5, 1.0, 1.5], dtype=torch.float64)
    norm = RatioNormalizer(bins=10, t_min=0.0, t_max=1.0)
    w = f_weights(r.log(), t, DIVERGENCES["forward_kl"], normalizer=norm)
    r_norm = torch.tensor([0.5, 1.5, 1.0, 0.5, 1.0, 1.5], dtype=torch.float64)  # bin means 2, 4, 1
    torch.testing.assert_close(w, r_norm / r_norm.mean())
    torch.testing.assert_close(norm.means, torch.tensor([2.0, 1, 1, 1, 1, 4, 1, 1, 1, 1], dtype=torch.float64))


def test_ratio_bin_means_are_an_ema():
    norm = RatioNormalizer(bins=2, t_min=0.0, t_max=1.0, ema=0.5)
    t = torch.tensor([0.1, 0.9])
    norm(torch.tensor([3.0, 5.0]), t)
    out = norm(torch.tensor([1.0, 1.0]), t)
    torch.testing.assert_close(norm.means, torch.tensor([1.5, 2.0], dtype=torch.float64))  # 0.5 * (0.5 + 0.5*r) + 0.5
    torch.testing.assert_close(out, torch.tensor([1 / 1.5, 1 / 2.0]))


# -- one generator update equals DMD ---------------------------------------------------------------
def tiny_teacher(seed=0):
    torch.manual_seed(seed)
    return ScoreModel(MLP(2, hidden=16, depth=1), VPSDE(), data_shape=(2,)).double()


def perturbed_copy(model, seed=1):
    fake = copy.deepcopy(model).requires_grad_(True)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in fake.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return fake


def hand_f_weights(logit, t, h, t_min, T, bins=10):
    """f-distill's weights from the reference code's recipe, written out sample by sample: r = exp(logit)
    clipped to [0.1, 20], divided by the mean r of its t-bin (10 equal bins over [t_min, T]), h(r) divided
    by its batch mean."""
    r = [min(max(math.exp(min(max(v, -10.0), 10.0)), 0.1), 20.0) for v in logit.tolist()]
    b = [min(int((v - t_min) / ((T - t_min) / bins)), bins - 1) for v in t.tolist()]
    bin_mean = {k: sum(ri for ri, bi in zip(r, b) if bi == k) / b.count(k) for k in set(b)}
    w = [h(ri / bin_mean[bi]) for ri, bi in zip(r, b)]
    return torch.tensor([wi * len(w) / sum(w) for wi in w], dtype=logit.dtype)


def hand_dmd_step(fd: FDistill, generator: nn.Module, seed: int, gan_logit=None, gan_weight=0.0, h=None) -> nn.Module:
    """DMD's generator update written out from its definition (Yin et al. 2024, eq. 7-8 with DMD2's
    1/mean|x - x0_real| weighting), applied to a copy of ``generator`` with the same AdamW settings; with
    ``h``, each sample's update is scaled by f-distill's weight (``hand_f_weights`` of ``gan_logit``)."""
    sde, cfg = fd.sde, fd.config
    g = copy.deepcopy(generator)
    z, t, noise = fd.draw(torch.Generator().manual_seed(seed))
    x = g(z)
    alpha, sigma = (c[:, None] for c in sde.marginal_coeffs(t))
    x_t = alpha * x + sigma * noise
    with torch.no_grad():
        x0_real = (x_t + sigma**2 * fd.teacher(x_t, t)) / alpha
        x0_fake = (x_t + sigma**2 * fd.fake_score(x_t, t)) / alpha
        w = 1 / ((x - x0_real).abs().mean(dim=1, keepdim=True) + 1e-6)
        grad = w * (x0_fake - x0_real)
        if h is not None:
            grad = grad * hand_f_weights(gan_logit(x_t, t), t, h, cfg.t_min, sde.T)[:, None]
    loss = 0.5 * ((x - (x - grad).detach()) ** 2).mean()
    if gan_weight:
        loss = loss + gan_weight * F.softplus(-gan_logit(x_t, t)).mean()
    train = cfg.training
    opt = torch.optim.AdamW(g.parameters(), lr=train.lr, betas=train.betas, weight_decay=train.weight_decay)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return g


@pytest.mark.parametrize("case", ["reverse_kl", "js_constant_ratio", "reverse_kl_gan", "forward_kl_weighted",
                                  "hellinger_weighted_gan"])
def test_generator_update_equals_dmd(case):
    teacher = tiny_teacher()
    generator = OneStepGenerator.from_teacher(teacher, time=0.6)
    logit_fn, divergence, gan, h = None, "reverse_kl", 0.0, None
    if case == "js_constant_ratio":  # constant r: every weight normalises to 1, so JS = DMD
        logit_fn, divergence = (lambda x, t: torch.full((x.shape[0],), 0.7, dtype=x.dtype)), "js"
    if case == "reverse_kl_gan":  # the GAN term differentiates through the (fixed) discriminator
        logit_fn, gan = (lambda x, t: -(x**2).sum(1) * t), 0.3
    if case.endswith("_weighted") or case.endswith("_weighted_gan"):
        # a varying ratio (some logits beyond log 20 and log 0.1, so the clip acts): DMD with per-sample
        # weights h(r) normalised per t-bin and over the batch
        logit_fn = lambda x, t: 4 * x[:, 0] - 2 * x[:, 1] + 3 * t  # noqa: E731
        divergence = case.split("_weighted")[0]
        h = {"forward_kl": lambda r: r, "hellinger": math.sqrt}[divergence]  # Hellinger's 1/4 cancels
        gan = 0.2 if case.endswith("_gan") else 0.0
    cfg = DistillConfig(divergence=divergence, gan_weight=gan,
                        training=DistillTrainConfig(batch_size=16, lr=1e-2, grad_clip=None, progress=False))
    fd = FDistill(teacher, teacher.sde, generator, config=cfg, fake_score=perturbed_copy(teacher), discriminator=logit_fn)
    if h is not None:
        z, t, noise = fd.draw(torch.Generator().manual_seed(3))
        logit = logit_fn(fd._diffuse(generator(z), t, noise), t)
        assert bool((logit > math.log(20)).any() and (logit < math.log(0.1)).any()), "the clip is not exercised"
    expected = hand_dmd_step(fd, generator, seed=3, gan_logit=logit_fn, gan_weight=gan, h=h)
    fd.generator_step(torch.Generator().manual_seed(3))
    moved = sum(float((a - b).detach().abs().sum()) for a, b in zip(expected.parameters(), teacher.parameters()))
    assert moved > 1e-3
    for a, b in zip(fd.unwrapped_generator.parameters(), expected.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_generator_and_fake_score_start_from_the_teacher():
    teacher = tiny_teacher()
    fd = FDistill(teacher, teacher.sde, config=DistillConfig(divergence="reverse_kl", gan_weight=0.0,
                                                              training=DistillTrainConfig(progress=False)))
    z = torch.randn(8, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    # the paper's student: the teacher run once from pure noise at T, x = x0_hat(prior_std z, T)
    expected = tweedie_denoise(teacher, teacher.sde, teacher.sde.prior_std * z, torch.ones(8, dtype=torch.float64))
    torch.testing.assert_close(fd.generator(z), expected, rtol=0, atol=0)
    x_t = torch.randn(8, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    t = torch.rand(8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    torch.testing.assert_close(fd.fake_score(x_t, t), teacher(x_t, t), rtol=0, atol=0)
    # copies, not the teacher itself: training them leaves the teacher frozen and unchanged
    before = [p.clone() for p in teacher.parameters()]
    fd.train(2)
    assert not any(p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.parameters()))
    assert not torch.equal(fd.fake_score(x_t, t), teacher(x_t, t))


def test_five_critic_updates_per_generator_update():
    # DMD2's two-time-scale rule as f-distill uses it: the defaults are the reference code's
    cfg = DistillConfig(divergence="js", training=DistillTrainConfig(steps=3, batch_size=8, progress=False))
    assert (cfg.critic_steps, cfg.ratio_clip, cfg.ratio_bins, cfg.logit_clamp) == (5, (0.1, 20.0), 10, 10.0)
    teacher = tiny_teacher()
    data = imbalanced_mixture().sample(64, torch.Generator().manual_seed(0), dtype=torch.float64)
    fd = FDistill(teacher, teacher.sde, config=cfg, data=data)
    fd.train()

    def updates(opt):
        return {int(state["step"]) for state in opt.state.values()}

    assert updates(fd.opt_generator) == {3}
    assert updates(fd.opt_fake) == {15} and updates(fd.opt_disc) == {15}


# -- bad input -------------------------------------------------------------------------------------
def test_unknown_divergence_lists_valid_names():
    teacher = tiny_teacher()
    with pytest.raises(ValueError, match=r"unknown divergence 'kl'; valid names are \['forward_kl', 'hellinger'"):
        FDistill(teacher, teacher.sde, divergence="kl", data=torch.zeros(4, 2))
    with pytest.raises(ValueError, match="unknown divergence 'chi2'"):
        DistillConfig(divergence="chi2")
    with pytest.raises(ValueError, match="needs the alpha parameter"):
        DistillConfig(divergence="alpha")


def test_generator_with_wrong_output_shape_is_refused():
    teacher = tiny_teacher()
    with pytest.raises(ValueError, match=r"maps noise of shape \(B, 2\) to \(B, 3\), but the teacher's data have shape \(B, 2\)"):
        FDistill(teacher, teacher.sde, nn.Linear(2, 3).double(), data=torch.zeros(4, 2))


def test_learned_discriminator_needs_data():
    teacher = tiny_teacher()
    with pytest.raises(ValueError, match="needs real samples: pass data="):
        FDistill(teacher, teacher.sde, divergence="js")
    with pytest.raises(ValueError, match=r"data has shape \(4, 3\)"):
        FDistill(teacher, teacher.sde, divergence="js", data=torch.zeros(4, 3))


def test_nan_loss_stops_training_with_a_clear_error():
    teacher = tiny_teacher()
    nan_teacher = lambda x, t: torch.full_like(x, float("nan"))  # noqa: E731
    cfg = DistillConfig(critic_steps=1, gan_weight=0.0, training=DistillTrainConfig(steps=2, progress=False))
    fd = FDistill(nan_teacher, teacher.sde, nn.Linear(2, 2).double(), config=cfg, fake_score=perturbed_copy(teacher),
                  data_shape=(2,))
    with pytest.raises(FloatingPointError, match="f-distill loss is nan at generator step 1"):
        fd.train()


class NaNGradient(nn.Module):
    """A linear generator whose output is finite but whose weight gradient is NaN (0 * inf)."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 2).double()

    def forward(self, z):
        return self.linear(z) + torch.sqrt((self.linear.weight * 0).sum())


def test_nan_generator_gradients_stop_training_naming_the_optimizer(tmp_path):
    teacher = tiny_teacher()
    cfg = DistillConfig(critic_steps=1, gan_weight=0.0, training=DistillTrainConfig(steps=3, progress=False,
                                                                                      checkpoint_every=1))
    fd = FDistill(teacher, teacher.sde, NaNGradient(), config=cfg, fake_score=perturbed_copy(teacher), data_shape=(2,),
                  out_dir=tmp_path)
    with pytest.raises(FloatingPointError, match=r"the gradient norm of optimizer_generator is nan \(with a finite "
                       r"f-distill loss of .*\) at generator step 1: training stopped without applying it; no "
                       r"checkpoint with finite tensors was written"):
        fd.train()
    assert not (tmp_path / "checkpoints" / "step-00000001").exists()
    assert torch.isfinite(fd.unwrapped_generator.linear.weight).all()


# -- checkpoints, resume, save/load ------------------------------------------------------------------
def small_run(out_dir, steps, callbacks=()):
    teacher = tiny_teacher()
    data = imbalanced_mixture().sample(256, torch.Generator().manual_seed(0), dtype=torch.float64)
    cfg = DistillConfig(divergence="js", critic_steps=2,
                        training=DistillTrainConfig(steps=4, batch_size=16, lr=1e-3, checkpoint_every=2, progress=False))
    fd = FDistill(teacher, teacher.sde, config=cfg, data=data, out_dir=out_dir, callbacks=callbacks)
    fd.train(steps)
    return fd


def assert_same_state(a, b):
    """Two state dicts (of modules or optimizers) are equal to the bit: tensors, numbers and nesting."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same_state(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_state(x, y)
    elif torch.is_tensor(a):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    else:
        assert a == b


def assert_same_run(straight: FDistill, resumed: FDistill):
    assert resumed.step == straight.step and resumed.history == straight.history
    for name in ("generator", "generator_ema", "fake_score", "discriminator", "ratio_normalizer"):
        assert_same_state(straight._modules()[name].state_dict(), resumed._modules()[name].state_dict())
    opts = straight.tracked_optimizers()
    assert set(opts) == {"optimizer_generator", "optimizer_fake_score", "optimizer_discriminator"}
    for name, opt in opts.items():
        assert_same_state(opt.state_dict(), resumed.tracked_optimizers()[name].state_dict())


def test_resume_continues_exactly(tmp_path):
    straight = small_run(tmp_path / "a", 4)
    small_run(tmp_path / "b", 2)
    resumed = small_run(tmp_path / "b", 4)
    assert resumed.step == 4 and len(resumed.history) == 4
    for name in ("generator", "generator_ema", "fake_score", "discriminator"):
        for a, b in zip(straight._modules()[name].state_dict().values(), resumed._modules()[name].state_dict().values()):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]
    assert_same_run(straight, resumed)


def test_interrupted_run_resumes_bit_for_bit(tmp_path):
    # A run killed after its 3rd generator update (checkpoint at 2 only), continued by a fresh FDistill on
    # the same out_dir, ends equal to the bit to the uninterrupted run: every network, the EMA, the ratio
    # bins, the three optimizers' states and the history.
    def crash(fd):
        if fd.step == 3:
            raise KeyboardInterrupt

    straight = small_run(tmp_path / "a", 4)
    with pytest.raises(KeyboardInterrupt):
        small_run(tmp_path / "b", 4, callbacks=[crash])
    ckpt = tmp_path / "b" / "checkpoints" / "step-00000002"
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["step-00000002"]
    assert {p.name for p in ckpt.iterdir()} == {
        "generator.safetensors", "generator_ema.safetensors", "fake_score.safetensors", "discriminator.safetensors",
        "ratio_normalizer.safetensors", "optimizer_generator.safetensors", "optimizer_fake_score.safetensors",
        "optimizer_discriminator.safetensors", "state.json"}
    resumed = small_run(tmp_path / "b", 4)
    assert_same_run(straight, resumed)
    assert resumed.history[2] == straight.history[2]  # the lost 3rd update was redone, not skipped


def test_save_and_load_generator(tmp_path):
    fd = small_run(None, 2)
    path = fd.save(tmp_path / "g.safetensors")
    target = OneStepGenerator.from_teacher(tiny_teacher(seed=5), time=1.0)
    loaded, meta = load_generator(path, target)
    assert meta["divergence"] == "js" and meta["steps"] == 2 and meta["time"] == 1.0
    z = torch.randn(8, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(loaded(z), fd.ema(z))
    assert loaded.sample(5, torch.Generator().manual_seed(0)).shape == (5, 2)
    with pytest.raises(ValueError, match="does not record how to rebuild"):
        load_generator(path)


def test_cli_distills_a_trained_teacher(tmp_path):
    from scorekit.cli import main
    from scorekit.config import RunConfig, load_config
    from scorekit.config import build_trainer as make_trainer

    teacher_cfg = load_config("configs/digits_vp.yaml", RunConfig, [
        f"out_dir={tmp_path / 'teacher'}", "training.steps=2", "training.batch_size=8", "training.progress=false",
        "model.options.block_out_channels=[8,16,16]"])
    make_trainer(teacher_cfg).train()
    rc = main(["distill", "--config", "configs/distill_digits.yaml", "--teacher", str(tmp_path / "teacher"),
               "--out_dir", str(tmp_path / "fd"), "--divergence", "js", "distill.training.steps=2",
               "distill.critic_steps=1", "distill.training.batch_size=4", "distill.training.progress=false",
               "n_samples=4"])
    assert rc == 0
    generator, meta = load_generator(tmp_path / "fd" / "generator.safetensors")
    assert meta["divergence"] == "js" and meta["steps"] == 2
    assert generator.sample(3, torch.Generator().manual_seed(0)).shape == (3, 1, 8, 8)
    assert (tmp_path / "fd" / "samples.png").is_file()
    rc = main(["distill", "--config", "configs/distill_digits.yaml", "--teacher", str(tmp_path / "teacher"),
               "--divergence", "kl"])
    assert rc == 2


# -- the 2-D imbalanced mixture: mode coverage with exact (oracle) critics --------------------------
MIX = imbalanced_mixture()
COMMON = GaussianMixture([0.6 / 0.95, 0.35 / 0.95], MIX.means[:2], 0.4)  # the mixture without its 5% mode
Z_EVAL = torch.randn(4000, 2, generator=torch.Generator().manual_seed(5))


def oracle_distill(gen, target, divergence, steps, lr, record=None):
    """f-distill of ``target``'s exact score into ``gen`` with the exact critics of EmpiricalCritic."""
    sde = VPSDE()
    critic = EmpiricalCritic(gen, sde, lambda x, t: target.log_prob(x, t, sde), (2,), n=1024, bandwidth=0.1)
    cfg = DistillConfig(divergence=divergence, gan_weight=0.0,
                        training=DistillTrainConfig(steps=steps, batch_size=256, lr=lr, ema_decay=0.95, progress=False))
    callbacks = [critic.refresh] + ([record] if record else [])
    fd = FDistill(target.score_fn(sde), sde, gen, config=cfg, fake_score=critic.score,
                  discriminator=critic.log_ratio, data_shape=(2,), callbacks=callbacks)
    fd.train()
    return fd


def rare_share(x):
    return float((MIX.classify(x.double()) == 2).float().mean())


@pytest.fixture(scope="module")
def coverage_runs():
    # The generator starts on the two common modes only (a short reverse-KL run on COMMON), then each
    # divergence distils the full mixture for 400 steps; the rare mode's share of the EMA generator is
    # recorded every 20 steps.
    torch.manual_seed(0)
    start = nn.Sequential(nn.Linear(2, 64), nn.SiLU(), nn.Linear(64, 64), nn.SiLU(), nn.Linear(64, 2))
    oracle_distill(start, COMMON, "reverse_kl", 100, 1e-2)
    assert rare_share(start(Z_EVAL).detach()) < 0.005
    runs = {}
    for name in ("reverse_kl", "js", "forward_kl"):
        shares = []
        record = lambda fd: shares.append(rare_share(fd.ema(Z_EVAL))) if fd.step % 20 == 0 else None  # noqa: E731, B023 (called within the iteration)
        fd = oracle_distill(copy.deepcopy(start), MIX, name, 400, 2e-3, record)
        runs[name] = (fd, shares)
    return runs


def test_each_divergence_matches_the_mixture(coverage_runs):
    ref = MIX.sample(4000, torch.Generator().manual_seed(2))
    for name, (fd, _) in coverage_runs.items():
        sw = sliced_wasserstein(fd.sample(4000, torch.Generator().manual_seed(3)), ref)
        assert sw < 0.15, f"{name}: sliced W {sw:.3f}"


def test_forward_kl_and_js_recover_the_rare_mode_faster_than_reverse_kl(coverage_runs):
    # The paper's mode-coverage claim: weights h(r) growing with r = p/q pull samples towards the mode
    # the generator misses. Measured as the rare mode's mean share over the run (true share 0.05).
    mean = {k: sum(s) / len(s) for k, (_, s) in coverage_runs.items()}
    assert mean["forward_kl"] > mean["reverse_kl"] + 0.01, mean
    assert mean["js"] > mean["reverse_kl"] + 0.005, mean
