"""Metrics against closed forms and peer libraries (scipy, scikit-learn, scikit-image)."""

import math

import numpy as np
import pytest
import scipy.linalg
import scipy.stats
import torch
import torch.nn.functional as F
from scipy.spatial.distance import pdist
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from sklearn.neighbors import NearestNeighbors

from scorekit import fd_digits as FD
from scorekit import metrics as M
from scorekit.checkpoint import load_json
from scorekit.data import load_digits


def gen(seed):
    return torch.Generator().manual_seed(seed)


def gaussian(n, mean, cov, seed):
    mean, cov = torch.as_tensor(mean, dtype=torch.float64), torch.as_tensor(cov, dtype=torch.float64)
    z = torch.randn(n, len(mean), generator=gen(seed), dtype=torch.float64)
    return mean + z @ torch.linalg.cholesky(cov).T


# -- sliced Wasserstein ------------------------------------------------------------------------------
def test_sliced_wasserstein_in_1d_is_scipys_wasserstein_distance():
    x = torch.randn(137, 1, generator=gen(0), dtype=torch.float64)
    y = 0.5 + 2 * torch.rand(61, 1, generator=gen(1), dtype=torch.float64)
    ref = scipy.stats.wasserstein_distance(x[:, 0].numpy(), y[:, 0].numpy())
    assert M.sliced_wasserstein(x, y) == pytest.approx(ref, rel=1e-12)
    # columns at once, with unequal sample sizes
    cols = M.wasserstein_1d(torch.cat([x[:61], y], 1), torch.cat([y, x[:61]], 1))
    assert cols.tolist() == pytest.approx(
        [scipy.stats.wasserstein_distance(x[:61, 0], y[:, 0])] * 2, rel=1e-12
    )


def test_sliced_wasserstein_of_shifted_gaussians_matches_closed_form():
    mu = torch.tensor([3.0, -1.5], dtype=torch.float64)
    x = torch.randn(2000, 2, generator=gen(2), dtype=torch.float64)
    y = torch.randn(2000, 2, generator=gen(3), dtype=torch.float64) + mu
    # theta.mu ~ |mu| cos(phi) with phi uniform: E|cos| = 2/pi in 2-D
    sw1 = M.sliced_wasserstein(x, y, n_projections=1000)
    assert sw1 == pytest.approx(2 / math.pi * float(mu.norm()), rel=0.05)
    # an exact shift moves every projection by theta.mu: SW2^2 = E (theta.mu)^2 = |mu|^2 / D
    sw2 = M.sliced_wasserstein(x, x + mu, n_projections=2000, p=2)
    assert sw2 == pytest.approx(float(mu.norm()) / math.sqrt(2), rel=0.05)
    # reproducible: default seed, and an explicit generator
    assert M.sliced_wasserstein(x, y, 64) == M.sliced_wasserstein(x, y, 64)
    assert M.sliced_wasserstein(x, y, 64, generator=gen(5)) == M.sliced_wasserstein(
        x, y, 64, generator=gen(5)
    )


# -- MMD ---------------------------------------------------------------------------------------------
def test_mmd_matches_the_gaussian_closed_form():
    D, s, h, n = 2, 1.0, 1.5, 1500
    mu = torch.tensor([1.0, 0.5], dtype=torch.float64)
    x = s * torch.randn(n, D, generator=gen(6), dtype=torch.float64)
    y = s * torch.randn(n, D, generator=gen(7), dtype=torch.float64) + mu
    # E k(a, b) for a - b ~ N(delta, 2 s^2 I): (h^2 / (h^2 + 2 s^2))^{D/2} exp(-|delta|^2 / (2 (h^2 + 2 s^2)))
    c = h**2 + 2 * s**2
    exact = 2 * (h**2 / c) ** (D / 2) * (1 - math.exp(-float(mu @ mu) / (2 * c)))
    assert M.mmd(x, y, bandwidth=h) == pytest.approx(exact, rel=0.1)
    same = M.mmd(x, s * torch.randn(n, D, generator=gen(8), dtype=torch.float64), bandwidth=h)
    assert abs(same) < 0.05 * exact
    # the linear kernel's MMD^2 is |mean_x - mean_y|^2 up to the unbiased correction
    assert M.mmd(x, y, kernel="linear") == pytest.approx(float(mu @ mu), rel=0.1)


def test_median_bandwidth_is_scipys_median_pairwise_distance():
    x = torch.randn(300, 3, generator=gen(9), dtype=torch.float64)
    assert M.median_bandwidth(x) == pytest.approx(float(np.median(pdist(x.numpy()))), rel=1e-12)
    assert M.median_bandwidth(torch.ones(5, 3)) == 1.0


# -- Fréchet distance --------------------------------------------------------------------------------
def fid_reference(mu1, c1, mu2, c2):
    """The FID formula as pytorch-fid / TTUR compute it, with scipy's sqrtm."""
    covmean = scipy.linalg.sqrtm(c1 @ c2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(c1) + np.trace(c2) - 2 * np.trace(covmean))


def test_frechet_distance_from_stats_matches_scipy_sqrtm():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(6, 6)), rng.normal(size=(6, 4))
    c1, c2 = a @ a.T + 0.1 * np.eye(6), b @ b.T  # c2 is rank-deficient
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    ours = M.frechet_distance_from_stats(
        torch.tensor(mu1), torch.tensor(c1), torch.tensor(mu2), torch.tensor(c2)
    )
    assert ours == pytest.approx(fid_reference(mu1, c1, mu2, c2), rel=1e-8)
    # commuting (diagonal) covariances: sum (sqrt a - sqrt b)^2
    d1, d2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 4.0, 1.0])
    fd = M.frechet_distance_from_stats(
        torch.zeros(3), torch.diag(torch.tensor(d1)), torch.zeros(3), torch.diag(torch.tensor(d2))
    )
    assert fd == pytest.approx(float(((np.sqrt(d1) - np.sqrt(d2)) ** 2).sum()), abs=1e-12)


def test_frechet_distance_of_gaussian_samples_matches_the_analytic_value():
    m1, m2 = [0.0, 1.0, -1.0], [0.5, 0.0, -1.0]
    c1 = [[1.0, 0.3, 0.0], [0.3, 2.0, 0.2], [0.0, 0.2, 0.5]]
    c2 = [[0.5, 0.0, 0.1], [0.0, 1.0, 0.0], [0.1, 0.0, 1.5]]
    exact = fid_reference(np.array(m1), np.array(c1), np.array(m2), np.array(c2))
    fd = M.frechet_distance(gaussian(20000, m1, c1, 10), gaussian(20000, m2, c2, 11))
    assert fd == pytest.approx(exact, rel=0.03)
    assert M.frechet_distance(gaussian(20000, m1, c1, 12), gaussian(20000, m1, c1, 13)) < 0.01


# -- precision / recall ------------------------------------------------------------------------------
def test_precision_recall_limits_and_mode_dropping():
    real = torch.randn(600, 2, generator=gen(14), dtype=torch.float64)
    assert M.precision_recall(real, real) == (1.0, 1.0)
    pr = M.precision_recall(real, torch.randn(600, 2, generator=gen(15), dtype=torch.float64))
    assert pr.precision > 0.9 and pr.recall > 0.9
    assert M.precision_recall(real, real + 100.0) == (0.0, 0.0)
    # fake covers one of two real modes: all of it is realistic, half of the real data is missed
    two_modes = torch.cat([real[:300] - 10, real[300:] + 10])
    one_mode = torch.randn(300, 2, generator=gen(16), dtype=torch.float64) - 10
    pr = M.precision_recall(two_modes, one_mode)
    assert pr.precision > 0.9 and pr.recall == pytest.approx(0.5, abs=0.05)


def test_precision_recall_matches_a_scikit_learn_knn_computation():
    real = torch.randn(400, 5, generator=gen(17), dtype=torch.float64)
    fake = 1.3 * torch.randn(300, 5, generator=gen(18), dtype=torch.float64) + 0.3
    k = 4

    def coverage(points, centres):
        radii = NearestNeighbors(n_neighbors=k + 1).fit(centres).kneighbors(centres)[0][:, k]
        d = NearestNeighbors().fit(centres).radius_neighbors(points, radius=radii.max())
        return np.mean([np.any(dist <= radii[idx]) for dist, idx in zip(*d)])

    pr = M.precision_recall(real, fake, k=k)
    assert pr.precision == pytest.approx(coverage(fake.numpy(), real.numpy()), abs=1e-12)
    assert pr.recall == pytest.approx(coverage(real.numpy(), fake.numpy()), abs=1e-12)


# -- Vendi score -------------------------------------------------------------------------------------
def test_vendi_score_closed_forms():
    assert M.vendi_score(torch.ones(10, 4)) == pytest.approx(1.0, abs=1e-9)
    assert M.vendi_score(torch.eye(7)) == pytest.approx(7.0, rel=1e-9)
    # clusters of identical points: K/n is block-constant, eigenvalues are the cluster shares p_i,
    # so VS = exp(H(p)); once via the cosine kernel with n > D, once via the rbf kernel
    counts = [5, 3, 2]
    p = np.array(counts) / sum(counts)
    expected = math.exp(-(p * np.log(p)).sum())
    basis = torch.cat([torch.eye(3)[i].expand(c, 3) for i, c in enumerate(counts)])
    assert M.vendi_score(basis) == pytest.approx(expected, rel=1e-9)
    far = torch.cat([torch.full((c, 2), 100.0 * i) for i, c in enumerate(counts)])
    assert M.vendi_score(far, kernel="rbf", bandwidth=1.0) == pytest.approx(expected, rel=1e-9)


# -- PSNR / SSIM -------------------------------------------------------------------------------------
def test_psnr_and_ssim_match_scikit_image():
    x = torch.rand(3, 2, 16, 12, generator=gen(19), dtype=torch.float64)
    y = (x + 0.1 * torch.randn(x.shape, generator=gen(20), dtype=torch.float64)).clamp(0, 1)
    xs, ys = x.numpy(), y.numpy()
    ref_psnr = [peak_signal_noise_ratio(xs[i], ys[i], data_range=1.0) for i in range(3)]
    assert M.psnr(x, y, data_range=1.0).tolist() == pytest.approx(ref_psnr, rel=1e-12)
    for kwargs in ({}, {"gaussian_weights": True}, {"win_size": 5, "use_sample_covariance": False}):
        ref = [
            structural_similarity(xs[i], ys[i], data_range=1.0, channel_axis=0, **kwargs) for i in range(3)
        ]
        assert M.ssim(x, y, data_range=1.0, **kwargs).tolist() == pytest.approx(ref, rel=1e-10), kwargs
    # digits: 8x8 images in [-1, 1]
    d = load_digits("test")[0][:4].double()
    blurred = blur(d.float()).double()
    ref = [structural_similarity(d[i, 0].numpy(), blurred[i, 0].numpy(), data_range=2.0) for i in range(4)]
    assert M.ssim(d, blurred, data_range=2.0).tolist() == pytest.approx(ref, rel=1e-10)
    assert M.ssim(d, d, data_range=2.0).tolist() == pytest.approx([1.0] * 4)
    assert torch.isinf(M.psnr(d, d, data_range=2.0)).all()


# -- FD-digits ---------------------------------------------------------------------------------------
def blur(x):
    """The 3x3 binomial blur [1, 2, 1]^T [1, 2, 1] / 16, edges replicated."""
    k = torch.tensor([1.0, 2.0, 1.0]) / 4
    return F.conv2d(F.pad(x, [1] * 4, mode="replicate"), (k[:, None] * k[None])[None, None])


@pytest.fixture(scope="module")
def digits():
    train, _ = load_digits("train")
    test, labels = load_digits("test")
    noise = 2 * torch.rand(test.shape, generator=gen(21)) - 1
    return train, test, labels, noise


def test_digits_classifier_reports_its_held_out_accuracy(digits):
    _, test, labels, _ = digits
    info = load_json(FD.DIGITS_ASSET.with_suffix(".json"))
    net = FD.digits_classifier()
    with torch.no_grad():
        accuracy = float((net(test).argmax(1) == labels).double().mean())
    assert accuracy == pytest.approx(info["test_accuracy"], abs=1e-12)
    assert accuracy > 0.97
    assert FD.digits_features(test).shape == (len(test), info["architecture"]["feature_dim"])


def test_fd_digits_orders_real_blurred_and_noise(digits):
    train, test, _, noise = digits
    fd_test, fd_light, fd_blur, fd_noise = (
        FD.fd_digits(train, s) for s in (test, (test + blur(test)) / 2, blur(test), noise)
    )
    assert 10 * fd_test < fd_light < fd_blur < fd_noise
    good, bad = FD.digits_metrics(test, train), FD.digits_metrics(noise, train)
    # the same pair in the same order: FD is symmetric, but its matrix square root only to float round-off
    # (1e-6 relative here, depending on the BLAS), so the swapped pair is compared loosely
    assert good["fd_digits"] == pytest.approx(FD.fd_digits(test, train), rel=1e-9)
    assert good["fd_digits"] == pytest.approx(fd_test, rel=1e-5)
    assert good["precision"] > 0.8 and good["recall"] > 0.8
    assert bad["precision"] < 0.3 and bad["recall"] < 0.3
    assert good["vendi"] > bad["vendi"]


def test_rebuilding_the_digits_features_reproduces_the_accuracy(tmp_path, digits):
    _, test, labels, _ = digits
    shipped = load_json(FD.DIGITS_ASSET.with_suffix(".json"))
    _, info = FD.build_digits_features(tmp_path / "digits_features.safetensors")
    assert info["training"] == shipped["training"] and info["architecture"] == shipped["architecture"]
    assert info["test_accuracy"] == pytest.approx(shipped["test_accuracy"], abs=0.01)
    rebuilt = FD.digits_classifier(tmp_path / "digits_features.safetensors")
    with torch.no_grad():
        assert float((rebuilt(test).argmax(1) == labels).double().mean()) == pytest.approx(
            info["test_accuracy"]
        )
    assert load_json(tmp_path / "digits_features.json") == info


# -- bad input ---------------------------------------------------------------------------------------
def test_bad_inputs_give_clear_errors():
    a, b = torch.randn(10, 3), torch.randn(10, 4)
    for fn in (M.sliced_wasserstein, M.mmd, M.frechet_distance):
        with pytest.raises(ValueError, match=r"different sample sizes \(3 vs 4"):
            fn(a, b)
    with pytest.raises(ValueError, match=r"real has 3 samples: k-NN radii with k=3 need at least 4"):
        M.precision_recall(torch.randn(3, 2), torch.randn(10, 2))
    with pytest.raises(ValueError, match="NaN"):
        M.mmd(torch.full((4, 2), float("nan")), torch.randn(4, 2))
    with pytest.raises(ValueError, match="unknown kernel 'gauss'"):
        M.mmd(a, a, kernel="gauss")
    with pytest.raises(ValueError, match="k\\(x, x\\) = 1"):
        M.vendi_score(a, kernel="linear")
    with pytest.raises(ValueError, match=r"cov2 has shape \(2, 2\).*expected \(3, 3\)"):
        M.frechet_distance_from_stats(torch.zeros(3), torch.eye(3), torch.zeros(3), torch.eye(2))
    img = torch.rand(2, 1, 8, 8) * 2 - 1
    with pytest.raises(ValueError, match="wider than data_range=1.*2 for \\[-1, 1\\]"):
        M.psnr(img, img, data_range=1.0)
    with pytest.raises(ValueError, match=r"same shape \(B, C, H, W\)"):
        M.ssim(img, img[:, 0], data_range=2.0)
    with pytest.raises(ValueError, match="smaller than the 11x11 SSIM window"):
        M.ssim(img, img, data_range=2.0, gaussian_weights=True)
    digits16 = (load_digits("test")[0][:10] + 1) * 8
    with pytest.raises(ValueError, match=r"spans \[0, 16\].*x / 8 - 1"):
        FD.fd_digits(digits16, digits16)
    with pytest.raises(ValueError, match="looks like \\[0, 1\\] images"):
        FD.digits_features(digits16 / 16)
    with pytest.raises(ValueError, match=r"expect \(B, 1, 8, 8\)"):
        FD.digits_features(torch.zeros(4, 3, 8, 8))
