"""Noise2Score: Tweedie's formulas against closed forms, AR-DAE against an exact score, blind level
estimation, persistence, the CLI, and the error messages users see."""

import math

import numpy as np
import pytest
import torch
from scipy import integrate

from scorekit.cli import build_parser
from scorekit.data import GaussianMixture
from scorekit.images import read_image, write_image
from scorekit.noise2score import (
    ARDAE,
    NOISE_MODELS,
    Noise2Score,
    ScoreUNet,
    estimate_level,
    level_grid,
    tweedie,
)
from scorekit.sde import VESDE
from scorekit.training import TrainConfig


def gaussian_noise_sde(sigma: float) -> VESDE:
    # y = x + sigma n is the VE SDE's marginal at t = 0 with sigma_min = sigma (alpha = 1)
    return VESDE(sigma_min=sigma, sigma_max=2 * sigma)


# -- Tweedie's formula, given the exact score of the noisy marginal --------------------------------
def test_gaussian_tweedie_is_the_posterior_mean_of_a_mixture_prior():
    """Prior 0.3 N(-1, 0.2^2) + 0.7 N(1.5, 0.5^2), sigma = 0.5: y + sigma^2 s(y) = E[x | y] (paper Sec. 3.2, Table 1),
    checked against quadrature of prior x likelihood, independent of the mixture's own formulas."""
    prior = GaussianMixture([0.3, 0.7], [[-1.0], [1.5]], [0.2, 0.5])
    sigma = 0.5
    sde = gaussian_noise_sde(sigma)
    y = torch.linspace(-3, 4, 15, dtype=torch.float64)[:, None]
    est = tweedie(y, lambda v: prior.score(v, 0.0, sde), "gaussian", sigma)

    def prior_pdf(x):
        return 0.3 * np.exp(-0.5 * ((x + 1) / 0.2) ** 2) / 0.2 + 0.7 * np.exp(-0.5 * ((x - 1.5) / 0.5) ** 2) / 0.5

    xs = np.linspace(-8, 9, 200001)
    for yi, ei in zip(y[:, 0].numpy(), est[:, 0].numpy()):
        w = prior_pdf(xs) * np.exp(-0.5 * ((yi - xs) / sigma) ** 2)
        assert ei == pytest.approx(np.trapezoid(xs * w, xs) / np.trapezoid(w, xs), abs=1e-9)


def test_gaussian_tweedie_matches_mixture_posterior_mean_in_2d():
    prior = GaussianMixture([0.6, 0.35, 0.05], [[-2.0, -1.0], [2.0, -1.0], [0.0, 2.5]], 0.4)
    sigma = 0.7
    sde = gaussian_noise_sde(sigma)
    y = prior.sample(64, torch.Generator().manual_seed(0), dtype=torch.float64)
    y = y + sigma * torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    est = tweedie(y, lambda v: prior.score(v, 0.0, sde), "gaussian", sigma)
    torch.testing.assert_close(est, prior.posterior_mean(y, 0.0, sde), rtol=0, atol=1e-12)


def test_gamma_tweedie_is_inverse_posterior_mean_of_inverse():
    """1/x ~ Gamma(a=3, rate b=2), y = x Gamma(k=50, 1/k): k y / (k - 1 - y s(y)) = 1 / E[1/x | y] exactly."""
    a, b, k = 3.0, 2.0, 50.0
    y = torch.tensor([0.3, 0.8, 1.5], dtype=torch.float64)

    def log_marginal(v: float) -> float:  # log p(y) by quadrature over w = 1/x
        f = lambda w: math.exp(  # noqa: E731
            (a - 1) * math.log(w) - b * w + k * math.log(k * w) + (k - 1) * math.log(v) - k * v * w - math.lgamma(k)
        )
        return math.log(integrate.quad(f, 0, 200, points=[(a + k) / (b + k * v)], limit=200)[0])

    def score(v: torch.Tensor) -> torch.Tensor:
        return (k - 1) / v - k * (a + k) / (b + k * v)

    for v in y.tolist():  # the closed-form score is the derivative of the quadrature log-marginal
        h = 1e-4
        assert score(torch.tensor(v)).item() == pytest.approx((log_marginal(v + h) - log_marginal(v - h)) / (2 * h), rel=1e-5)
    est, clamped = tweedie(y, score, "gamma", k, return_clamped=True)
    torch.testing.assert_close(est, (b + k * y) / (a + k), rtol=1e-12, atol=0)
    torch.testing.assert_close(est, torch.tensor([0.32075, 0.79245, 1.45283], dtype=torch.float64), rtol=0, atol=5e-6)
    assert clamped == 0.0
    inv_mean = []  # 1 / E[1/x | y] by quadrature of prior x likelihood over w = 1/x
    for v in y.tolist():
        peak = (a + k - 1) / (b + k * v)
        dens = lambda w, p: w**p * math.exp((a + k - 1) * math.log(w / peak) - (b + k * v) * (w - peak))  # noqa: E731, B023 (called within the iteration)
        inv_mean.append(integrate.quad(dens, 0, 20 * peak, args=(0,), points=[peak])[0]
                        / integrate.quad(dens, 0, 20 * peak, args=(1,), points=[peak])[0])
    torch.testing.assert_close(est, torch.tensor(inv_mean, dtype=torch.float64), rtol=1e-7, atol=0)


def test_gamma_tweedie_clamps_and_reports_a_bad_denominator():
    y = torch.tensor([0.5, 0.5], dtype=torch.float64)
    s = torch.tensor([0.0, 200.0], dtype=torch.float64)  # the second makes k - 1 - y s negative
    est, clamped = tweedie(y, lambda v: s, "gamma", 50.0, return_clamped=True)
    assert clamped == 0.5
    assert est[0].item() == pytest.approx(50 * 0.5 / 49)
    assert est[1].item() == pytest.approx(50 * 0.5)  # denominator floored at 1: the estimate is capped at k y


@pytest.mark.parametrize("zeta", [1.0, 0.05])
def test_poisson_tweedie_is_geometric_posterior_mean_for_counts(zeta):
    """lambda ~ Gamma(4, rate 0.5), z ~ Poisson(lambda), y = zeta z: (y + zeta/2) exp(s(z)) with the score
    taken w.r.t. the counts z equals zeta exp(E[log lambda | z]) within 1% for z >= 10 (paper Sec. 3.2, Table 1)."""
    a, rate = 4.0, 0.5
    z = torch.tensor([0.0, 2.0, 10.0, 20.0, 50.0, 100.0], dtype=torch.float64)

    def score(v: torch.Tensor) -> torch.Tensor:  # d/dz log NegBin(z; a, rate) in the continuous z
        return torch.special.digamma(v + a) - torch.special.digamma(v + 1) - math.log1p(rate)

    def log_pmf(v: float) -> float:
        return math.lgamma(v + a) - math.lgamma(v + 1) - math.lgamma(a) + a * math.log(rate / (1 + rate)) - v * math.log1p(rate)

    for v in (2.0, 10.0):
        assert score(torch.tensor(v)).item() == pytest.approx((log_pmf(v + 1e-5) - log_pmf(v - 1e-5)) / 2e-5, rel=1e-6)
    est = tweedie(zeta * z, score, "poisson", zeta)
    geo = []
    for v in z.tolist():  # exp(E[log lambda | z]) by quadrature of prior x likelihood
        post = lambda lam, f: f(lam) * lam ** (a - 1 + v) * math.exp(-(rate + 1) * lam)  # noqa: E731, B023 (called within the iteration)
        geo.append(math.exp(integrate.quad(post, 0, 400, args=(math.log,))[0] / integrate.quad(post, 0, 400, args=(lambda t: 1.0,))[0]))
    geo = zeta * torch.tensor(geo, dtype=torch.float64)
    assert ((est - geo).abs() / geo)[z >= 10].max() < 0.01
    # the closed form (z + 1/2) exp(psi(z + a) - psi(z + 1) - log(1 + rate)) at z = 0, 2, 10, 50
    closed_form = torch.tensor([2.085, 3.648, 8.999, 35.667], dtype=torch.float64)
    torch.testing.assert_close((est / zeta)[[0, 1, 2, 4]], closed_form, rtol=0, atol=5e-4)


# -- AR-DAE -------------------------------------------------------------------------------------------
def test_ardae_schedule_is_linear_then_held():
    loss = ARDAE(0.05, 0.001, steps=100)
    assert loss.at(0) == 0.05
    assert loss.at(50) == pytest.approx(0.0255)
    assert loss.at(100) == pytest.approx(0.001)
    assert loss.at(500) == pytest.approx(0.001)


def test_ardae_fit_recovers_gaussian_posterior_mean():
    """AR-DAE on noisy samples only (prior 0.3 N(-1, 0.2^2) + 0.7 N(1.5, 0.5^2), sigma = 0.5): Tweedie with
    the learned score is within 5% of the Bayes MMSE of the exact posterior mean, and as good a denoiser."""
    prior = GaussianMixture([0.3, 0.7], [[-1.0], [1.5]], [0.2, 0.5])
    sigma = 0.5
    sde = gaussian_noise_sde(sigma)
    g = torch.Generator().manual_seed(0)
    x = prior.sample(8192, g)
    y = x + sigma * torch.randn(x.shape, generator=g)
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(1, 64), torch.nn.SiLU(), torch.nn.Linear(64, 64), torch.nn.SiLU(), torch.nn.Linear(64, 1)
    )
    n2s = Noise2Score(net, "gaussian", sigma)
    cfg = TrainConfig(steps=400, batch_size=512, lr=1e-2, grad_clip=None, ema_decay=0.95, progress=False,
                      checkpoint_every=0)
    n2s.fit(y, config=cfg, sigma_a=(0.1, 0.01))
    xt = prior.sample(4000, torch.Generator().manual_seed(1), dtype=torch.float64)
    yt = xt + sigma * torch.randn(xt.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    est = n2s.denoise(yt.float()).double()
    exact = prior.posterior_mean(yt, 0.0, sde)
    mmse = (exact - xt).square().mean()
    assert (est - exact).square().mean() < 0.05 * mmse
    assert (est - xt).square().mean() < 1.06 * mmse
    assert (yt - xt).square().mean() > 1.5 * mmse  # the bar is meaningful: the noisy input is far off


# -- blind mode ---------------------------------------------------------------------------------------
def block_labels(g: torch.Generator) -> torch.Tensor:
    """A 128 x 128 image of 8 x 8 blocks, each labelled 0 or 1 at random, shape (1, 1, 128, 128)."""
    return torch.randint(2, (16, 16), generator=g).repeat_interleave(8, 0).repeat_interleave(8, 1)[None, None]


@pytest.mark.parametrize("sigma8", [15, 25, 35])
def test_blind_gaussian_level_recovered_within_3_of_255(sigma8):
    """A two-level block image (pixel prior 0.5 N(0.25, 0.02^2) + 0.5 N(0.75, 0.02^2)), its exact noisy
    pixel score, and the code's Charbonnier-TV grid search recover sigma within 3/255."""
    g = torch.Generator().manual_seed(0)
    levels = torch.tensor([0.25, 0.75], dtype=torch.float64)
    prior = GaussianMixture([0.5, 0.5], levels[:, None], 0.02)
    x = levels[block_labels(g)]
    x = x + 0.02 * torch.randn(x.shape, generator=g, dtype=torch.float64)
    sigma = sigma8 / 255
    y = x + sigma * torch.randn(x.shape, generator=g, dtype=torch.float64)
    sde = gaussian_noise_sde(sigma)
    best, values = estimate_level(y, lambda v: prior.score(v.reshape(-1, 1), 0.0, sde).reshape(v.shape), "gaussian")
    assert values.shape == level_grid("gaussian").shape
    assert abs(best - sigma) <= 3 / 255 + 1e-12


@pytest.mark.parametrize("zeta", [0.01, 0.05])
def test_blind_poisson_scale_recovered_within_two_grid_steps(zeta):
    """Block image whose counts lambda = x / zeta follow Gamma(400, rate 400 zeta / m) around m = 0.25 or 0.75;
    z ~ Poisson(lambda), y = zeta z. With the exact score of the counts (an equal mixture of negative binomials,
    continued in z) the code's grid search (0.1 TV + Poisson NLL) lands within two grid steps (0.0019) of zeta."""
    g = torch.Generator().manual_seed(0)
    shape = torch.tensor([400.0, 400.0], dtype=torch.float64)
    rate = shape * zeta / torch.tensor([0.25, 0.75], dtype=torch.float64)
    labels = block_labels(g)
    lam = torch._standard_gamma(shape[labels], generator=g) / rate[labels]
    y = zeta * torch.poisson(lam, generator=g)

    def score(v: torch.Tensor) -> torch.Tensor:  # d/dz log (0.5 NegBin_0(z) + 0.5 NegBin_1(z))
        v = v.unsqueeze(-1)
        log_pmf = (torch.lgamma(v + shape) - torch.lgamma(v + 1) - torch.lgamma(shape)
                   + shape * torch.log(rate / (1 + rate)) - v * torch.log1p(rate))
        each = torch.special.digamma(v + shape) - torch.special.digamma(v + 1) - torch.log1p(rate)
        return (torch.softmax(log_pmf, -1) * each).sum(-1)

    best, values = estimate_level(y, score, "poisson")
    assert values.shape == level_grid("poisson").shape
    assert abs(best - zeta) <= 0.0019 + 1e-12


# -- the model object, persistence, CLI ---------------------------------------------------------------
def tiny_model(noise="gaussian", level=None):
    torch.manual_seed(0)
    return Noise2Score(ScoreUNet(1, width=8, depth=2), noise, level)


def test_save_load_roundtrip_and_wrong_noise_model(tmp_path):
    n2s = tiny_model("gamma", 50.0)
    torch.nn.init.normal_(n2s.net.out[-1].weight, 0, 0.1)  # a non-trivial score
    path = tmp_path / "g.safetensors"
    n2s.save(path)
    back = Noise2Score.load(path)
    assert (back.noise, back.level, back.net.config) == ("gamma", 50.0, n2s.net.config)
    y = 0.2 + 0.6 * torch.rand(1, 1, 20, 24, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(back.denoise(y), n2s.denoise(y), rtol=0, atol=0)
    with pytest.raises(ValueError, match="trained for gamma noise and cannot denoise gaussian noise"):
        Noise2Score.load(path, noise="gaussian")


def test_score_unet_input_scale_rescales_the_input_and_survives_save_load(tmp_path):
    torch.manual_seed(0)
    scaled = ScoreUNet(1, width=8, depth=2, input_scale=0.01)
    plain = ScoreUNet(1, width=8, depth=2)
    plain.load_state_dict(scaled.state_dict())
    z = 100 * torch.rand(2, 1, 20, 24, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(scaled(z), plain(0.01 * z), rtol=0, atol=0)
    path = tmp_path / "p.safetensors"
    Noise2Score(scaled, "poisson", 0.01).save(path)
    back = Noise2Score.load(path)
    assert back.net.config["input_scale"] == 0.01
    torch.testing.assert_close(back.net(z), scaled(z), rtol=0, atol=0)
    with pytest.raises(ValueError, match="input_scale must be a positive number, got 0"):
        ScoreUNet(input_scale=0)


def test_poisson_network_sees_counts():
    seen = []

    def net(v):
        seen.append(v)
        return torch.zeros_like(v)

    n2s = Noise2Score(torch.nn.Identity(), "poisson", 0.01)
    n2s.score = net
    y = torch.full((1, 1, 4, 4), 0.37)
    out = n2s.denoise(y)
    torch.testing.assert_close(seen[0], y / 0.01)
    torch.testing.assert_close(out, y + 0.005)  # zero score: (y + zeta / 2) exp(0)


def denoise_cli(*argv):
    """``scorekit denoise ARGV`` through the CLI's parser; errors raise (``main`` would print them)."""
    args = build_parser(["denoise"]).parse_args(["denoise", *map(str, argv)])
    return args._run(args)


def test_cli_fit_save_and_reuse_checkpoint(tmp_path):
    from PIL import Image

    src, out_dir = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (40, 48), dtype=np.uint8)).save(src / f"im{i}.png")
    ckpt = tmp_path / "n2s.safetensors"
    assert denoise_cli(src, out_dir, "--sigma", 25, "--fit", "--steps", 3, "--width", 8, "--depth", 2,
                       "--patch-size", 32, "--save-checkpoint", ckpt) == 0
    first = np.array(Image.open(out_dir / "im0.png"))
    assert first.dtype == np.uint8 and first.shape == (40, 48)
    again = tmp_path / "again.npy"
    assert denoise_cli(src / "im0.png", again, "--sigma", 25, "--checkpoint", ckpt) == 0
    arr = np.load(again)
    np.testing.assert_array_equal(np.round(np.clip(arr, 0, 1) * 255).astype(np.uint8), first)
    model = Noise2Score.load(ckpt)
    img = read_image(src / "im0.png")
    expected = model.denoise(img, 25 / 255).numpy()[0]
    np.testing.assert_allclose(arr, expected, atol=1e-6)
    with pytest.raises(ValueError, match="trained for gaussian noise and cannot denoise gamma noise"):
        denoise_cli(src / "im0.png", tmp_path / "x.png", "--noise", "gamma", "--k", 50, "--checkpoint", ckpt)


def test_cli_poisson_fit_scales_counts_back_to_intensities(tmp_path):
    from PIL import Image

    png = tmp_path / "a.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32), dtype=np.uint8)).save(png)
    ckpt = tmp_path / "p.safetensors"
    assert denoise_cli(png, tmp_path / "b.png", "--noise", "poisson", "--zeta", 0.02, "--fit", "--steps", 2,
                       "--width", 8, "--depth", 2, "--patch-size", 32, "--save-checkpoint", ckpt) == 0
    model = Noise2Score.load(ckpt, noise="poisson")
    assert model.level == 0.02 and model.net.config["input_scale"] == 0.02


def test_image_io_roundtrip(tmp_path):
    img = torch.rand(1, 9, 11, generator=torch.Generator().manual_seed(0))
    for name, bits, tol in (("a.png", 8, 0.5 / 255), ("b.png", 16, 0.5 / 65535), ("c.tif", 8, 0), ("d.npy", 8, 0)):
        write_image(tmp_path / name, img, bits)
        back = read_image(tmp_path / name)
        assert back.shape == img.shape and back.dtype == torch.float32
        assert (back - img).abs().max().item() <= tol + 1e-7


# -- bad input ----------------------------------------------------------------------------------------
def test_unknown_noise_model_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown noise model 'speckle'; supported noise models are \['gaussian', 'poisson', 'gamma'\]"):
        tweedie(torch.ones(2), lambda v: v, "speckle", 1.0)
    with pytest.raises(ValueError, match="supported noise models"):
        Noise2Score(torch.nn.Identity(), "salt")
    assert list(NOISE_MODELS) == ["gaussian", "poisson", "gamma"]


@pytest.mark.parametrize("noise,level", [("gaussian", -0.1), ("poisson", 0.0), ("gamma", -5.0), ("gaussian", float("nan"))])
def test_non_positive_noise_levels_are_refused(noise, level):
    with pytest.raises(ValueError, match="must be a positive number"):
        tweedie(torch.ones(1, 1, 2, 2), lambda v: v, noise, level)
    with pytest.raises(ValueError, match="must be a positive number"):
        tiny_model(noise).denoise(torch.full((1, 1, 8, 8), 0.5), level)


def test_images_in_wrong_range_or_dtype_say_how_to_scale():
    n2s = tiny_model()
    with pytest.raises(TypeError, match=r"dtype torch.uint8; expected floating-point intensities in \[0, 1\]: convert 8-bit images with x.float\(\) / 255"):
        n2s.denoise(torch.full((1, 8, 8), 200, dtype=torch.uint8), 25 / 255)
    with pytest.raises(ValueError, match=r"reach 200, but Noise2Score expects intensities in \[0, 1\] units; divide 8-bit images by 255"):
        n2s.denoise(torch.full((1, 8, 8), 200.0), 25 / 255)
    with pytest.raises(ValueError, match=r"sigma=25 is in \[0, 1\] intensity units.*pass 25/255 = 0.0980"):
        n2s.denoise(torch.full((1, 8, 8), 0.5), 25)
    with pytest.raises(ValueError, match="poisson noise is non-negative but the noisy images have a minimum of -0.1"):
        tiny_model("poisson", 0.01).denoise(torch.full((1, 8, 8), -0.1))
    with pytest.raises(ValueError, match="Poisson training needs the scale zeta"):
        tiny_model("poisson").fit(torch.rand(2, 1, 16, 16))


def test_gamma_shape_must_exceed_one():
    with pytest.raises(ValueError, match=r"Gamma shape k must exceed 1 .*got 0.5"):
        tweedie(torch.ones(1, 1, 2, 2), lambda v: v, "gamma", 0.5)


def test_fit_refuses_patches_larger_than_images_and_mismatched_levels():
    n2s = tiny_model()
    images = [torch.rand(1, 16, 20), torch.rand(1, 40, 40)]
    with pytest.raises(ValueError, match=r"patch_size=32 does not fit images of shape \[\(1, 16, 20\)\]; lower patch_size"):
        n2s.fit(images, patch_size=32)
    with pytest.raises(ValueError, match="got 3 noise levels for 2 images; pass one level or one per image"):
        n2s.fit(images, [0.1, 0.1, 0.1], patch_size=16)


def test_loading_a_file_that_is_not_a_noise2score_checkpoint(tmp_path):
    from scorekit.checkpoint import save_tensors

    path = tmp_path / "other.safetensors"
    save_tensors({"w": torch.zeros(1)}, path, {"format": "something/1"})
    with pytest.raises(ValueError, match=r"is not a Noise2Score checkpoint \(format 'something/1', expected 'scorekit.noise2score/1'\)"):
        Noise2Score.load(path)


def test_cli_errors_name_the_right_flag(tmp_path):
    from PIL import Image

    png = tmp_path / "a.png"
    Image.fromarray(np.zeros((16, 16), dtype=np.uint8)).save(png)
    with pytest.raises(ValueError, match="--sigma is the gaussian noise level; for --noise gamma use --k"):
        denoise_cli(png, tmp_path / "b.png", "--noise", "gamma", "--sigma", 25, "--fit")
    with pytest.raises(ValueError, match="no model: pass --checkpoint PATH"):
        denoise_cli(png, tmp_path / "b.png", "--sigma", 25)
    with pytest.raises(ValueError, match="must be a positive number"):
        denoise_cli(png, tmp_path / "b.png", "--sigma", -5, "--fit")
