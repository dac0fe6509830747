"""The Gaussian-mixture test bed and the bundled data sets."""

import math

import pytest
import torch

from scorekit import VESDE, VPSDE, SubVPSDE
from scorekit.data import (
    GaussianMixture,
    imbalanced_mixture,
    load_digits,
    load_image,
    make_imbalanced,
    toy_2d,
)

SDES = [None, VPSDE(), SubVPSDE(), VESDE()]
ids = ["t0", "vp", "subvp", "ve"]


@pytest.mark.parametrize("sde", SDES, ids=ids)
def test_exact_score_is_the_gradient_of_the_log_density(sde):
    gm = imbalanced_mixture()
    g = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(200, 2, generator=g, dtype=torch.float64)).requires_grad_()
    t = None if sde is None else torch.rand(200, generator=g, dtype=torch.float64)
    logp = gm.log_prob(x, t, sde)
    (grad,) = torch.autograd.grad(logp.sum(), x)
    torch.testing.assert_close(gm.score(x.detach(), t, sde), grad, rtol=1e-10, atol=1e-12)
    if sde is not None:
        torch.testing.assert_close(gm.score_fn(sde)(x.detach(), t), grad, rtol=1e-10, atol=1e-12)


def test_density_integrates_to_one_and_matches_scipy():
    from scipy.stats import multivariate_normal

    gm = imbalanced_mixture()
    lin = torch.linspace(-6, 6, 601, dtype=torch.float64)
    xx, yy = torch.meshgrid(lin, lin, indexing="ij")
    pts = torch.stack([xx.flatten(), yy.flatten()], 1)
    mass = gm.log_prob(pts).exp().sum() * (lin[1] - lin[0]) ** 2
    assert abs(mass.item() - 1) < 1e-6
    ref = sum(
        w * multivariate_normal(m.numpy(), s.item() ** 2).pdf(pts[:50].numpy())
        for w, m, s in zip(gm.weights.tolist(), gm.means, gm.stds)
    )
    torch.testing.assert_close(gm.log_prob(pts[:50]).exp(), torch.from_numpy(ref))


def test_diffused_mixture_is_the_convolution_of_the_data_with_the_kernel():
    """p_t(x) = E_{x0 ~ p0}[N(x; alpha x0, sigma^2)] by Monte Carlo over x0."""
    sde = VPSDE()
    gm = imbalanced_mixture()
    x0 = gm.sample(200000, torch.Generator().manual_seed(3), dtype=torch.float64)
    t = torch.tensor(0.3, dtype=torch.float64)
    alpha, sigma = sde.marginal_coeffs(t)
    x = torch.tensor([[0.0, 2.0], [-1.5, -1.0], [1.0, 0.0]], dtype=torch.float64)
    d2 = ((x[:, None, :] - alpha * x0[None]) ** 2).sum(-1)
    mc = torch.exp(-0.5 * d2 / sigma**2).mean(1) / (2 * math.pi * sigma**2)
    exact = gm.log_prob(x, t, sde).exp()
    torch.testing.assert_close(mc, exact, rtol=0.02, atol=0)


def test_sampling_follows_the_weights():
    gm = imbalanced_mixture()
    x, k = gm.sample(40000, torch.Generator().manual_seed(0), return_labels=True)
    share = torch.bincount(k, minlength=3).double() / len(k)
    se = torch.sqrt(gm.weights * (1 - gm.weights) / len(k))
    assert ((share - gm.weights).abs() < 4 * se).all()
    # modes are separated enough that the Bayes classifier recovers the labels
    assert (gm.classify(x) == k).double().mean() > 0.995
    assert x.dtype == torch.float32


def test_responsibilities_are_bayes_rule():
    gm = imbalanced_mixture()
    sde = VESDE()
    x = torch.randn(10, 2, dtype=torch.float64)
    t = torch.full((10,), 0.4, dtype=torch.float64)
    r = gm.responsibilities(x, t, sde)
    alpha, sigma = sde.marginal_coeffs(t[:1])
    comp = torch.stack(
        [
            GaussianMixture([1.0], gm.means[k : k + 1], gm.stds[k]).log_prob(x, t, sde) + gm.weights[k].log()
            for k in range(3)
        ],
        1,
    )
    torch.testing.assert_close(r, torch.softmax(comp, 1))
    torch.testing.assert_close(r.sum(1), torch.ones(10, dtype=torch.float64))


def test_conditional_by_bayes_rule():
    gm = GaussianMixture([0.5, 0.3, 0.2], [[0.0, 0.0], [0.0, 3.0], [2.0, 3.0]], [0.5, 0.5, 1.0])
    cond = gm.conditional(torch.tensor([0.4]), known=[0])
    lik = torch.exp(-0.5 * ((0.4 - gm.means[:, 0]) / gm.stds) ** 2) / gm.stds
    w = gm.weights * lik
    torch.testing.assert_close(cond.weights, w / w.sum())
    torch.testing.assert_close(cond.means[:, 0], gm.means[:, 1])


def test_bad_mixture_inputs():
    with pytest.raises(ValueError, match="weights must be positive and sum to 1"):
        GaussianMixture([0.5, 0.6], [[0.0], [1.0]], 1.0)
    with pytest.raises(ValueError, match="stds must be positive"):
        GaussianMixture([0.5, 0.5], [[0.0], [1.0]], [1.0, -1.0])
    with pytest.raises(ValueError, match="disagree"):
        GaussianMixture([0.5, 0.5], [[0.0], [1.0], [2.0]], 1.0)
    with pytest.raises(ValueError, match=r"x has shape \(4, 3\) but the mixture expects \(B, 2\)"):
        imbalanced_mixture().score(torch.zeros(4, 3))


def test_digits():
    x, y = load_digits()
    assert x.shape == (1797, 1, 8, 8) and x.dtype == torch.float32
    assert x.min() == -1 and x.max() == 1
    xtr, ytr = load_digits("train")
    xte, yte = load_digits("test")
    assert len(xtr) + len(xte) == 1797
    # stratified: every class is 20% held out (up to rounding)
    frac = torch.bincount(yte, minlength=10).double() / torch.bincount(y, minlength=10).double()
    assert ((frac - 0.2).abs() < 0.01).all()
    # disjoint and deterministic
    tr_rows = {tuple(r) for r in xtr.flatten(1).tolist()}
    assert sum(tuple(r) in tr_rows for r in xte.flatten(1).tolist()) < 10  # digits has a few exact duplicates
    torch.testing.assert_close(load_digits("test")[0], xte)
    x5, y5 = load_digits("train", classes=[5, 6])
    assert set(y5.tolist()) == {5, 6}
    with pytest.raises(ValueError, match="unknown split 'val'"):
        load_digits("val")
    with pytest.raises(ValueError, match=r"classes must be digits 0-9, got \[12\]"):
        load_digits(classes=[1, 12])


def test_make_imbalanced():
    x, y = load_digits()
    xi, yi = make_imbalanced(x, y, rare_class=3, share=0.05)
    share = (yi == 3).double().mean().item()
    assert abs(share - 0.05) < 0.002
    assert (torch.bincount(yi, minlength=10)[[0, 1, 2, 4]] == torch.bincount(y, minlength=10)[[0, 1, 2, 4]]).all()
    with pytest.raises(ValueError, match="share must lie in"):
        make_imbalanced(x, y, 3, 1.5)


def test_bundled_images_and_toy_sets():
    cam = load_image("camera")
    assert cam.shape == (1, 512, 512) and 0 <= cam.min() and cam.max() <= 1
    astro = load_image("astronaut")
    assert astro.shape[0] == 1
    with pytest.raises(ValueError, match="unknown image 'lena'"):
        load_image("lena")
    for name in ("moons", "checkerboard", "swiss_roll", "rings"):
        pts = toy_2d(name, 500, seed=1)
        assert pts.shape == (500, 2) and torch.isfinite(pts).all()
        torch.testing.assert_close(pts, toy_2d(name, 500, seed=1))
    with pytest.raises(ValueError, match="unknown toy set"):
        toy_2d("spiral", 10)
