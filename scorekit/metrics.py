"""Sample-quality metrics: distances between sample sets, diversity, and image fidelity.

Distribution distances compare two sets of samples ``x`` (n, ...) and ``y`` (m, ...), flattened to
vectors and computed in float64: :func:`sliced_wasserstein`, :func:`mmd`, :func:`frechet_distance`
and the k-NN :func:`precision_recall`. :func:`vendi_score` measures the diversity of one set;
:func:`psnr` and :func:`ssim` compare images pairwise. The FD-digits feature network, which turns
these distances into an FID for digits, is :mod:`scorekit.fd_digits`.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "PrecisionRecall",
    "frechet_distance",
    "frechet_distance_from_stats",
    "kernel_matrix",
    "median_bandwidth",
    "mmd",
    "precision_recall",
    "psnr",
    "sliced_wasserstein",
    "ssim",
    "vendi_score",
    "wasserstein_1d",
]

KERNELS = ("rbf", "cosine", "linear")


# -- input checks ------------------------------------------------------------------------------------
def _as_matrix(x: Tensor | np.ndarray, name: str, min_rows: int = 1) -> Tensor:
    """``x`` as a float64 ``(n, D)`` matrix (samples of any shape are flattened)."""
    x = torch.as_tensor(x)
    if x.ndim < 2:
        raise ValueError(
            f"{name} must have shape (n, ...) with one sample per row, got shape {tuple(x.shape)}"
        )
    if x.shape[0] < min_rows:
        raise ValueError(f"{name} has {x.shape[0]} samples but at least {min_rows} are needed")
    x = x.detach().reshape(x.shape[0], -1).to(torch.float64)
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    return x


def _as_pair(x, y, min_rows: int = 1, names: tuple[str, str] = ("x", "y")) -> tuple[Tensor, Tensor]:
    x, y = _as_matrix(x, names[0], min_rows), _as_matrix(y, names[1], min_rows)
    if x.shape[1] != y.shape[1]:
        raise ValueError(
            f"{names[0]} and {names[1]} have different sample sizes ({x.shape[1]} vs {y.shape[1]} values per "
            "sample): both sets must hold samples of the same shape"
        )
    return x, y.to(x.device)


# -- Wasserstein -------------------------------------------------------------------------------------
def wasserstein_1d(u: Tensor, v: Tensor, p: float = 1.0) -> Tensor:
    """Exact ``W_p`` between the empirical distributions of every column of ``u`` (n, L) and ``v`` (m, L).

    ``W_p^p = int_0^1 |F^{-1}(q) - G^{-1}(q)|^p dq`` with the step quantile functions of the two
    samples; on each interval between consecutive breakpoints ``{i/n} U {j/m}`` both are constant, so
    the integral is an exact finite sum (this handles ``n != m`` without interpolation). Returns ``(L,)``.
    """
    n, m = u.shape[0], v.shape[0]
    us, vs = u.sort(dim=0).values, v.sort(dim=0).values
    q = torch.cat(
        [
            torch.arange(1, n + 1, dtype=u.dtype, device=u.device) / n,
            torch.arange(1, m + 1, dtype=u.dtype, device=u.device) / m,
        ]
    ).unique()
    widths = torch.diff(q, prepend=q.new_zeros(1))
    mid = q - widths / 2
    iu = torch.clamp((mid * n).long(), max=n - 1)
    iv = torch.clamp((mid * m).long(), max=m - 1)
    cost = (us[iu] - vs[iv]).abs().pow(p)
    return (widths[:, None] * cost).sum(0).pow(1 / p)


def sliced_wasserstein(
    x: Tensor,
    y: Tensor,
    n_projections: int = 256,
    p: float = 1.0,
    generator: torch.Generator | None = None,
) -> float:
    """Sliced Wasserstein distance ``SW_p = (E_theta W_p^p(theta#x, theta#y))^{1/p}`` (Bonneel et al. 2015).

    Directions ``theta`` are drawn uniformly on the unit sphere (``n_projections`` of them, from
    ``generator``; a fixed seed 0 when none is given, so the metric is reproducible) and each 1-D
    distance is exact (:func:`wasserstein_1d`). The default ``p=1`` is the usual "sliced W" (the mean of
    1-D ``W_1`` over directions); in one dimension it equals the exact ``W_p``.
    """
    x, y = _as_pair(x, y)
    if p < 1:
        raise ValueError(f"p must be >= 1, got {p}")
    if n_projections < 1:
        raise ValueError(f"n_projections must be >= 1, got {n_projections}")
    D = x.shape[1]
    if D == 1:
        return float(wasserstein_1d(x, y, p)[0])
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    theta = torch.randn(D, n_projections, generator=generator, dtype=torch.float64, device=generator.device)
    theta = (theta / theta.norm(dim=0, keepdim=True)).to(x.device)
    per_direction = wasserstein_1d(x @ theta, y @ theta, p).pow(p)
    return float(per_direction.mean().pow(1 / p))


# -- kernels and MMD -----------------------------------------------------------------------------------
def median_bandwidth(x: Tensor, max_points: int = 1000) -> float:
    """Median heuristic (Gretton et al. 2012): the median distance between distinct points of ``x``.

    Pairs at distance zero (duplicates) are left out; if every point coincides, any bandwidth gives
    the same kernel and 1 is returned. Above ``max_points`` rows an evenly strided subset is used.
    """
    x = _as_matrix(x, "x")
    if x.shape[0] > max_points:
        x = x[torch.linspace(0, x.shape[0] - 1, max_points).long()]
    d = torch.cdist(x, x)
    d = d[torch.triu(torch.ones_like(d, dtype=torch.bool), diagonal=1)]
    d = d[d > 0]
    return float(d.quantile(0.5)) if d.numel() else 1.0


def kernel_matrix(a: Tensor, b: Tensor, kernel: str = "rbf", bandwidth: float | None = None) -> Tensor:
    """Gram matrix ``k(a_i, b_j)`` of float64 matrices ``a`` (n, D), ``b`` (m, D).

    ``"rbf"``: ``exp(-|a - b|^2 / (2 h^2))`` with bandwidth ``h``; ``"cosine"``: ``<a, b> / (|a| |b|)``;
    ``"linear"``: ``<a, b>``.
    """
    if kernel == "rbf":
        if bandwidth is None or bandwidth <= 0:
            raise ValueError(f"the rbf kernel needs a positive bandwidth, got {bandwidth}")
        return torch.exp(-torch.cdist(a, b).pow(2) / (2 * bandwidth**2))
    if kernel == "cosine":
        norms = [t.norm(dim=1, keepdim=True) for t in (a, b)]
        if any(bool((nrm == 0).any()) for nrm in norms):
            raise ValueError(
                "the cosine kernel is undefined for all-zero samples; remove them or use kernel='rbf'"
            )
        return (a / norms[0]) @ (b / norms[1]).T
    if kernel == "linear":
        return a @ b.T
    raise ValueError(f"unknown kernel {kernel!r}; valid kernels are {list(KERNELS)}")


def mmd(x: Tensor, y: Tensor, kernel: str = "rbf", bandwidth: float | None = None) -> float:
    """Unbiased estimate of the squared maximum mean discrepancy ``MMD^2(p, q)`` (Gretton et al. 2012, eq. 3).

    ``MMD_u^2 = 1/(n(n-1)) sum_{i!=j} k(x_i, x_j) + 1/(m(m-1)) sum_{i!=j} k(y_i, y_j) - 2/(nm) sum k(x_i, y_j)``.
    Being unbiased it can be slightly negative when ``p = q``. The rbf bandwidth defaults to the median
    heuristic on the pooled samples (:func:`median_bandwidth`).
    """
    x, y = _as_pair(x, y, min_rows=2)
    if kernel == "rbf" and bandwidth is None:
        bandwidth = median_bandwidth(torch.cat([x, y]))
    n, m = x.shape[0], y.shape[0]
    kxx, kyy, kxy = (kernel_matrix(a, b, kernel, bandwidth) for a, b in ((x, x), (y, y), (x, y)))
    within_x = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
    within_y = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return float(within_x + within_y - 2 * kxy.mean())


# -- Fréchet distance ------------------------------------------------------------------------------
def _psd_sqrt(c: Tensor) -> Tensor:
    """Symmetric square root of a symmetric PSD matrix (eigenvalues clipped at 0 against round-off)."""
    w, v = torch.linalg.eigh(c)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def frechet_distance_from_stats(mu1: Tensor, cov1: Tensor, mu2: Tensor, cov2: Tensor) -> float:
    """Fréchet (2-Wasserstein squared) distance between ``N(mu1, cov1)`` and ``N(mu2, cov2)`` (Dowson & Landau 1982):

    ``|mu1 - mu2|^2 + tr(cov1 + cov2 - 2 (cov1^{1/2} cov2 cov1^{1/2})^{1/2})``.

    The cross term is computed from eigenvalues of the symmetric PSD matrix ``cov1^{1/2} cov2 cov1^{1/2}``
    (similar to ``cov1 cov2``, so it has the trace of FID's ``sqrtm(cov1 @ cov2)``) in float64: no complex
    parts and no ill-conditioned ``sqrtm`` of a non-symmetric product.
    """
    mu1, mu2 = (torch.as_tensor(m, dtype=torch.float64).flatten() for m in (mu1, mu2))
    cov1, cov2 = (torch.as_tensor(c, dtype=torch.float64) for c in (cov1, cov2))
    D = mu1.numel()
    for name, c in (("cov1", cov1), ("cov2", cov2)):
        if c.shape != (D, D):
            raise ValueError(
                f"{name} has shape {tuple(c.shape)} but the means have {D} entries: expected ({D}, {D})"
            )
    if mu2.numel() != D:
        raise ValueError(f"mu1 has {D} entries but mu2 has {mu2.numel()}")
    s1 = _psd_sqrt(cov1)
    cross = torch.linalg.eigvalsh(s1 @ cov2 @ s1).clamp(min=0).sqrt().sum()
    return float((mu1 - mu2).pow(2).sum() + cov1.trace() + cov2.trace() - 2 * cross)


def _mean_cov(x: Tensor) -> tuple[Tensor, Tensor]:
    return x.mean(0), torch.cov(x.T).reshape(x.shape[1], x.shape[1])


def frechet_distance(x: Tensor, y: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two sample sets (sample mean, unbiased covariance),
    the statistic of FID (Heusel et al. 2017) in whatever space ``x`` and ``y`` live."""
    x, y = _as_pair(x, y, min_rows=2)
    return frechet_distance_from_stats(*_mean_cov(x), *_mean_cov(y))


# -- precision / recall ------------------------------------------------------------------------------
class PrecisionRecall(NamedTuple):
    precision: float
    recall: float


def _kth_neighbour_radii(x: Tensor, k: int, chunk: int = 2048) -> Tensor:
    """Distance from each row of ``x`` to its ``k``-th nearest other row."""
    radii = [torch.cdist(x[i : i + chunk], x).kthvalue(k + 1, dim=1).values for i in range(0, len(x), chunk)]
    return torch.cat(radii)


def _coverage(points: Tensor, centres: Tensor, radii: Tensor, chunk: int = 2048) -> float:
    """Share of ``points`` inside at least one ball ``B(centres_j, radii_j)``."""
    inside = [
        (torch.cdist(points[i : i + chunk], centres) <= radii).any(dim=1)
        for i in range(0, len(points), chunk)
    ]
    return float(torch.cat(inside).double().mean())


def precision_recall(real: Tensor, fake: Tensor, k: int = 3) -> PrecisionRecall:
    """Improved precision and recall (Kynkäänniemi et al. 2019, eqs. 1-2).

    The real manifold is the union of balls around each real sample with radius its distance to the
    ``k``-th nearest other real sample; precision is the share of fake samples inside it. Recall swaps
    the roles. ``k=3`` is the paper's default; compute both in a feature space for images.
    """
    real, fake = _as_pair(real, fake, names=("real", "fake"))
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    for name, s in (("real", real), ("fake", fake)):
        if s.shape[0] <= k:
            raise ValueError(f"{name} has {s.shape[0]} samples: k-NN radii with k={k} need at least {k + 1}")
    precision = _coverage(fake, real, _kth_neighbour_radii(real, k))
    recall = _coverage(real, fake, _kth_neighbour_radii(fake, k))
    return PrecisionRecall(precision, recall)


# -- Vendi score -------------------------------------------------------------------------------------
def vendi_score(x: Tensor, kernel: str = "cosine", bandwidth: float | None = None) -> float:
    """Vendi score (Friedman & Dieng 2023, eq. 1): ``exp(-sum_i lambda_i log lambda_i)`` over the
    eigenvalues ``lambda_i`` of ``K / n``, with ``K_ij = k(x_i, x_j)`` and ``k(x, x) = 1``.

    It is the effective number of distinct samples: 1 for ``n`` identical points, ``n`` for ``n``
    mutually orthogonal ones. ``kernel`` is ``"cosine"`` (the paper's choice on embeddings) or
    ``"rbf"`` (bandwidth by the median heuristic unless given). For the cosine kernel the nonzero
    eigenvalues come from the smaller of ``X X^T / n`` and ``X^T X / n``.
    """
    x = _as_matrix(x, "x")
    if kernel not in ("cosine", "rbf"):
        raise ValueError(f"vendi_score needs a kernel with k(x, x) = 1: 'cosine' or 'rbf', got {kernel!r}")
    n = x.shape[0]
    if kernel == "cosine" and x.shape[1] < n:
        unit = x / x.norm(dim=1, keepdim=True)
        if not bool(torch.isfinite(unit).all()):
            raise ValueError(
                "the cosine kernel is undefined for all-zero samples; remove them or use kernel='rbf'"
            )
        lam = torch.linalg.eigvalsh(unit.T @ unit / n)
    else:
        if kernel == "rbf" and bandwidth is None:
            bandwidth = median_bandwidth(x)
        lam = torch.linalg.eigvalsh(kernel_matrix(x, x, kernel, bandwidth) / n)
    lam = lam[lam > 0]
    return float(torch.exp(-(lam * lam.log()).sum()))


# -- image fidelity ----------------------------------------------------------------------------------
def _image_pair(x: Tensor, y: Tensor, data_range: float) -> tuple[Tensor, Tensor]:
    x, y = torch.as_tensor(x), torch.as_tensor(y)
    if x.ndim != 4 or x.shape != y.shape:
        raise ValueError(
            f"expected two image batches of the same shape (B, C, H, W), got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    if not data_range > 0:
        raise ValueError(
            f"data_range must be positive (max - min of the valid pixel values), got {data_range}"
        )
    x, y = x.detach().double(), y.detach().double().to(x.device)
    span = float(x.max() - x.min())
    if span > data_range * (1 + 1e-6):
        raise ValueError(
            f"the reference images x span [{float(x.min()):.4g}, {float(x.max()):.4g}], wider than "
            f"data_range={data_range}: pass the range of the pixel scale (e.g. 1 for [0, 1], 2 for [-1, 1], 255)"
        )
    return x, y


def psnr(x: Tensor, y: Tensor, data_range: float) -> Tensor:
    """Peak signal-to-noise ratio per image, ``10 log10(data_range^2 / MSE)``, shape ``(B,)`` (float64).

    ``x`` is the reference batch (B, C, H, W), ``y`` the test batch; identical images give ``inf``.
    Matches ``skimage.metrics.peak_signal_noise_ratio`` image by image.
    """
    x, y = _image_pair(x, y, data_range)
    mse = (x - y).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(data_range**2 / mse)


def _gaussian_window(sigma: float, truncate: float) -> Tensor:
    radius = int(truncate * sigma + 0.5)  # scipy.ndimage's radius rule
    r = torch.arange(-radius, radius + 1, dtype=torch.float64)
    g = torch.exp(-0.5 * (r / sigma) ** 2)
    return g / g.sum()


def ssim(
    x: Tensor,
    y: Tensor,
    data_range: float,
    *,
    gaussian_weights: bool = False,
    win_size: int | None = None,
    sigma: float = 1.5,
    use_sample_covariance: bool = True,
    K1: float = 0.01,
    K2: float = 0.03,
) -> Tensor:
    """Mean structural similarity per image (Wang et al. 2004, eq. 13), shape ``(B,)`` (float64).

    Local means, variances and covariance come from a ``win_size`` x ``win_size`` uniform window
    (default 7) or, with ``gaussian_weights``, an 11-tap Gaussian of std ``sigma`` (Wang et al.'s
    setting); the SSIM map is averaged over the positions where the window fits inside the image and
    then over channels. Defaults follow ``skimage.metrics.structural_similarity`` (sample covariance,
    ``K1=0.01``, ``K2=0.03``), which it matches image by image.
    """
    x, y = _image_pair(x, y, data_range)
    if gaussian_weights:
        g = _gaussian_window(sigma, truncate=3.5)
        window = g[:, None] * g[None, :]
        if win_size is not None and win_size != len(g):
            raise ValueError(
                f"gaussian_weights with sigma={sigma} uses an {len(g)}-tap window; leave win_size unset"
            )
        win_size = len(g)
    else:
        win_size = 7 if win_size is None else win_size
        if win_size < 1 or win_size % 2 == 0:
            raise ValueError(f"win_size must be a positive odd integer, got {win_size}")
        window = torch.full((win_size, win_size), 1.0 / win_size**2, dtype=torch.float64)
    B, C, H, W = x.shape
    if min(H, W) < win_size:
        raise ValueError(
            f"images of size {H}x{W} are smaller than the {win_size}x{win_size} SSIM window; "
            "pass a smaller odd win_size (uniform window) or larger images"
        )
    window = window.to(x.device)[None, None]

    def local_mean(img: Tensor) -> Tensor:
        # "valid" convolution = skimage's filtered map with the border strip of width (win_size-1)/2 cropped
        return F.conv2d(img.reshape(B * C, 1, H, W), window)

    cov_norm = win_size**2 / (win_size**2 - 1) if use_sample_covariance else 1.0
    ux, uy = local_mean(x), local_mean(y)
    vx = cov_norm * (local_mean(x * x) - ux * ux)
    vy = cov_norm * (local_mean(y * y) - uy * uy)
    vxy = cov_norm * (local_mean(x * y) - ux * uy)
    c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
    s = (2 * ux * uy + c1) * (2 * vxy + c2) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
    return s.reshape(B, -1).mean(1)
